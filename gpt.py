"""
gpt.py: a GPT language model in one file, the next step after bigram.py.

bigram.py predicts the next token from the current one alone. A GPT lets every position look back at all the
positions before it (causal self-attention), mixes what it gathered through a small MLP, and stacks that block
n_layer times. The architecture and initialisation are GPT-2's, so the same code trains a 0.3M-parameter
Shakespeare model on a laptop and holds OpenAI's 124M to 1.5B-parameter weights (checkpoint.py reads them).

    python gpt.py        # parameter counts of the GPT-2 sizes, component by component

Read it in order: GPTConfig, attention, MLP, Block, GPT, and the key/value cache that makes sampling fast.
train.py trains it, generate.py samples from it; importing it has no side effects.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 256  # the longest context the model sees (positions 0..block_size-1)
    vocab_size: int = 65  # number of distinct tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; n_embd must divide evenly among them
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # probability of zeroing activations during training (0 for small data is often best)
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    # past GPT-2: each off by default, so that GPT-2's architecture (and its published weights) stay exact
    rope: bool = False  # rotary position embeddings (rotate q and k by position) instead of a learned table
    rmsnorm: bool = False  # RMSNorm (rescale only) instead of LayerNorm (recentre and rescale)
    qk_norm: bool = False  # normalise each head's queries and keys, so that no score can grow without bound
    relu2: bool = False  # ReLU(x)^2 in the MLP instead of GELU
    zero_init: bool = False  # output projections start at zero: every block starts as the identity
    tie_embeddings: bool = True  # lm_head reads from the token embedding's table, as in GPT-2


GPT2_SIZES = {  # OpenAI's published shapes; all use vocab_size 50257 and block_size 1024
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# -----------------------------------------------------------------------------
# The three parts of a transformer block


def norm(config, size):
    """The normalisation layer: LayerNorm, or with config.rmsnorm, RMSNorm (x / rms(x) * gain)."""
    return nn.RMSNorm(size, eps=1e-5) if config.rmsnorm else nn.LayerNorm(size, bias=config.bias)


def rotary(positions, hs, dtype):
    """RoPE's rotations for the positions given (T,), or per row (B, 1, T), as (cos, sin), each of the positions'
    shape plus (hs,): each pair of dimensions (i, i + hs/2) turns by the angle position * 10000^(-2i/hs). sin
    carries the pair's signs: (-sin, sin). Computed once per forward pass, for every layer."""
    precise = torch.float64 if dtype == torch.float64 else torch.float32  # angles at least as precise as x
    frequency = 10000.0 ** (-torch.arange(0, hs, 2, device=positions.device, dtype=precise) / hs)  # (hs/2,)
    angle = positions.to(precise)[..., None] * frequency  # (..., T, hs/2)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (..., T, hs) each


def rotate(x, rotation):
    """Rotary position embedding of x (B, nh, T, hs): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for each pair
    of dimensions x1 = x[..., i], x2 = x[..., i + hs/2], by the angles of rotary(). A query at position m and a key
    at n then meet at the angle (m - n) * frequency: their dot product depends on how far apart they are, not where."""
    cos, sin = (t.to(x.dtype) for t in rotation)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Every position gathers information from itself and the positions before it, in n_head ways at once.

    Each position emits a query (what it looks for), a key (what it holds) and a value (what it passes on). A
    query's dot product with every key says how much to take from that position; the future is masked out, a
    softmax turns the scores into weights that sum to 1, and the output is the weighted sum of the values."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert not config.rope or config.n_embd // config.n_head % 2 == 0, "rope needs an even head size"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # mixes the heads back together
        self.fused = True  # F.scaled_dot_product_attention, the same computation in one kernel; False: attend()
        self.weights = None  # the written-out path keeps its attention weights here: (B, nh, T, Tk)

    def forward(self, x, rotation=None, visible=None, cache=None):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3 * C) cut into 3 x nh heads
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs) unpacked: each (B, nh, T, hs)
        if self.qk_norm:  # unit RMS per head: a score is a cosine similarity times sqrt(hs)
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotation is not None:  # RoPE: positions enter here, as rotations, not as a table added to the input
            q, k = rotate(q, rotation), rotate(k, rotation)
        if cache is not None:  # generation: keep this step's keys and values, attend over all of the row's so far
            k, v = cache.store(k, v)  # (B, nh, Tk, hs): Tk, the longest row's positions
        if self.fused:  # without `visible`, every row is a whole sequence: the plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = self.attend(q, k, v, visible)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)

    def attend(self, q, k, v, visible=None):
        """softmax(q @ k^T / sqrt(hs)) @ v with the future masked out, step by step; what the fused kernel computes.
        visible (B, 1, T, Tk) says which keys each query may see; None: query i sees keys 0..i."""
        T, Tk, hs = q.size(2), k.size(2), q.size(3)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
        if visible is None:
            visible = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril()  # (T, Tk)
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = F.softmax(scores, dim=-1)  # (B, nh, T, Tk): each row sums to 1
        self.weights = weights.detach()
        weights = F.dropout(weights, self.dropout, self.training)
        return weights @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)


class MLP(nn.Module):
    """Each position thinks on its own about what attention gathered: expand 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout, self.relu2 = config.dropout, config.relu2

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")  # GPT-2's GELU: tanh approximation
        return F.dropout(self.c_proj(x), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rotation=None, visible=None, cache=None):
        x = x + self.attn(self.ln_1(x), rotation, visible, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embedding: what each token is
        if not config.rope:  # position embedding: where it is (with RoPE, attention rotates q and k instead)
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        parts["ln_f"] = norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # reading a token and writing it share one table
            self.lm_head.weight = self.transformer.wte.weight

        # GPT-2's initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled down by 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, cache=None):
        """The final hidden state of every position: (B, T) token ids -> (B, T, C). Without a cache, each row is a
        sequence from position 0; with one, row b goes on from its own length, positions cache.lens[b] onwards."""
        B, T = idx.size()
        positions, visible, end = torch.arange(T, device=idx.device), None, T  # (T,); the plain causal mask
        if cache is not None:
            positions = cache.lens[:, None] + positions  # (B, T): each row's own
            end = int(positions.max()) + 1  # the longest row's positions, as far as attention reads
            visible = cache.visible(positions, end)  # (B, 1, T, end): a query at position p sees keys 0..p of its row
        assert end <= self.config.block_size, f"{end} positions, but block_size is {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rope:
            x = x + self.transformer.wpe(positions)  # + (T, C), or (B, T, C) per row
        x = F.dropout(x, self.config.dropout, self.training)
        hs = self.config.n_embd // self.config.n_head
        rotation = None  # with RoPE, the turns of every position, shared by every layer: (T, hs) or (B, 1, T, hs)
        if self.config.rope:
            rotation = rotary(positions if cache is None else positions[:, None], hs, x.dtype)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotation, visible, None if cache is None else cache.layer(i, end))
        if cache is not None:
            cache.lens += T  # every row took T more positions
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        """(B, T) ids -> logits (B, T, vocab_size), and the mean cross-entropy against (B, T) targets if given."""
        logits = self.lm_head(self.hidden(idx, cache))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Extend idx (B, T) by max_new_tokens tokens, each drawn from the model's prediction: bigram.py's loop, with
        the context cropped to the last block_size tokens. generate.py has the fast, cached and tunable one."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])  # (B, T, V)
            probs = F.softmax(logits[:, -1, :], dim=-1)  # only the last position predicts the next token: (B, V)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx

    def use_fused_attention(self, fused=True):
        """Attention in every block by the fused kernel (True), or by CausalSelfAttention.attend() written out
        (False: an edit of attend() then changes what the model computes). Returns the model."""
        for block in self.transformer.h:
            block.attn.fused = fused
        return self

    def num_params(self, non_embedding=False):
        """Parameters counted once (a tied lm_head is wte); non_embedding leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and not self.config.rope else n

    def crop_block_size(self, block_size):
        """Keep only the first block_size positions: fine-tune GPT-2 (1024) on shorter, cheaper contexts."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if not self.config.rope:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].clone())

    @torch.no_grad()
    def add_tokens(self, vocab_size):
        """Grow the vocabulary to vocab_size (a chat template's special tokens). The new rows of the token embedding
        and of lm_head start at the mean of the old rows: the old tokens' logits stay exactly as they were, and each
        new token starts out as an average one, neither likely nor ruled out."""
        wte, head = self.transformer.wte, self.lm_head
        grow = lambda w: nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - len(w), -1)]))
        wte.weight, wte.num_embeddings = grow(wte.weight), vocab_size
        head.weight = wte.weight if self.config.tie_embeddings else grow(head.weight)
        head.out_features = self.config.vocab_size = vocab_size
        return self

    def new_cache(self, batch_size):
        """An empty key/value cache for generating `batch_size` sequences at once."""
        c, p = self.config, self.transformer.wte.weight  # the cache takes the embedding's device and (float) dtype
        shape = (c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        k, v = torch.zeros(shape, device=p.device, dtype=p.dtype), torch.zeros(shape, device=p.device, dtype=p.dtype)
        return KVCache(k, v, torch.zeros(batch_size, dtype=torch.long, device=p.device))


# -----------------------------------------------------------------------------
# The key/value cache for generation


class KVCache:
    """Every layer's keys and values for the positions seen so far, so that each new token costs one position, not T.

    Without it, generating token t recomputes the keys and values of all t positions before it, although they
    never change: a past position only ever attends to positions before itself. Each row of the batch has a
    length of its own (lens), so the rows can hold sequences of different lengths, and one row can be emptied
    and filled again while the others go on."""

    def __init__(self, k, v, lens):
        self.k, self.v = k, v  # (n_layer, B, nh, block_size, hs) each
        self.lens = lens  # (B,): the positions filled, per row

    def visible(self, positions, end):
        """Which of keys 0..end - 1 each new query sees, (B, 1, T, end) for queries at positions (B, T): those at its
        own position and before, in its own row."""
        return (torch.arange(end, device=positions.device) <= positions[:, :, None])[:, None]

    def layer(self, i, end):
        return LayerCache(self, i, end)

    def rows(self, start, end):
        """Rows start..end - 1 as a cache of their own, sharing this one's memory: what is written to it is here."""
        return KVCache(self.k[:, start:end], self.v[:, start:end], self.lens[start:end])


class LayerCache:
    """Layer i's part of a KVCache, during a forward pass that reads keys 0..end - 1 (and advances lens when every
    layer is done)."""

    def __init__(self, cache, i, end):
        self.cache, self.i, self.end = cache, i, end

    def store(self, k, v):
        """Put k, v (B, nh, T, hs) of the new tokens at each row's next T positions; return this layer's keys and
        values 0..end - 1, (B, nh, end, hs) each (a row's positions past its own are masked)."""
        c, (B, _, T, _) = self.cache, k.shape
        positions = c.lens[:, None] + torch.arange(T, device=k.device)  # (B, T)
        rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        c.k[self.i][rows, :, positions] = k.transpose(1, 2)  # (B, T, nh, hs) into each row's own places
        c.v[self.i][rows, :, positions] = v.transpose(1, 2)
        return c.k[self.i, :, :, : self.end], c.v[self.i, :, :, : self.end]


# -----------------------------------------------------------------------------
# `python gpt.py`: where the parameters of the GPT-2 family live


def parameter_table(config):
    """(component, parameter count) rows computed from the shapes alone, with the total last."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    b = 1 if config.bias else 0
    rows = [
        ("token embedding wte (tied with lm_head)", V * C),
        ("position embedding wpe", config.block_size * C),
        (f"attention: c_attn + c_proj, x{L}", L * (C * 3 * C + 3 * C * b + C * C + C * b)),
        (f"MLP: c_fc + c_proj, x{L}", L * (C * 4 * C + 4 * C * b + 4 * C * C + C * b)),
        (f"LayerNorms ln_1 + ln_2, x{L}", L * 2 * (C + C * b)),
        ("final LayerNorm ln_f", C + C * b),
    ]
    return rows + [("total", sum(n for _, n in rows))]


if __name__ == "__main__":
    for name, shape in GPT2_SIZES.items():
        config = GPTConfig(vocab_size=50257, block_size=1024, **shape)
        print(f"{name}: {shape}")
        for component, n in parameter_table(config):
            print(f"  {component:42s} {n:>15,}")
        print()
