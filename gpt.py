"""
gpt.py: a GPT language model in one file, the next step after bigram.py.

bigram.py predicts the next token from the current one alone. A GPT lets every position look back at all the
positions before it (causal self-attention), mixes what it gathered through a small MLP, and stacks that block
n_layer times. The architecture and initialisation are GPT-2's, so the same code trains a 0.3M-parameter
Shakespeare model on a laptop and holds OpenAI's 124M to 1.5B-parameter weights: GPT.from_pretrained("gpt2")
downloads them once (Hugging Face's model.safetensors, read here without the safetensors package) or reads a folder
that Hugging Face's save_pretrained wrote, and gives the same logits as the transformers library's GPT-2.

    python gpt.py        # parameter counts of the GPT-2 sizes, component by component

Used by train.py (training) and generate.py (sampling); importing it has no side effects.
"""

import functools
import json
import math
import mmap
import os
import sys
import timeit
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


# -----------------------------------------------------------------------------
# The three parts of a transformer block, and the one layer they all use


class Linear(nn.Linear):
    """nn.Linear, plus a faster way to multiply one token's vector by a large weight on some CPUs (generation).

    Generating one token at a time multiplies every weight matrix by a single vector: a memory-bound product that
    PyTorch may run on one core at a fraction of the memory's speed, and most of the time per token. Cut into one
    slab of rows per thread and multiplied as a batch (bmm), the same product runs on every core: 2-4x faster per
    product on the AMD CPUs the README measures, but 3-4x slower on an Intel one whose BLAS does the plain product
    well. So slabs_pay() times both once and the faster is kept."""

    def forward(self, x):
        # the usual path for training, over 4 rows, non-fp32, autocast, GPUs, and weights under 512 KB (cached)
        if (self.weight.numel() < 2**17 or x.numel() > 4 * self.in_features or torch.is_grad_enabled()
                or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        pay = slabs_pay(torch.get_num_threads())
        return slab_linear(x, self.weight, self.bias) if pay else F.linear(x, self.weight, self.bias)


def slab_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for a few rows of x (..., in) -> (..., out), as S = threads products at once."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    slabs = max(2, torch.get_num_threads())  # at least 2: even on one thread, bmm beat addmm on the AMD CPUs
    n = out_features // slabs * slabs  # the rows that fill whole slabs; the few left over go on their own
    xt = x.reshape(rows, in_features).t()  # (in, rows)
    w = weight[:n].reshape(slabs, n // slabs, in_features)  # (S, n/S, in)
    y = torch.bmm(w, xt.expand(slabs, -1, -1)).view(n, rows)  # S products on S threads
    if n < out_features:
        y = torch.cat([y, weight[n:] @ xt])  # (out, rows)
    y = y.t() if bias is None else y.t() + bias  # (rows, out)
    return y.reshape(*x.shape[:-1], out_features)


@functools.cache  # timed once per process and number of threads
def slabs_pay(threads):
    """Whether slab_linear reads weights faster than F.linear here: timed on first use, in about 50 ms.

    Timed on 64 MB of weights, more than most CPUs' caches hold, read from memory as a model big enough to gain
    reads them: timing one weight over and over would time it from the cache instead, where the two come out close
    and the choice flips from one process to the next."""
    weights, x = torch.zeros(16, 1024, 1024), torch.zeros(1, 1024)  # 16 weights of 4 MB, and one token

    def fastest(product):  # seconds for all 16 weights, the best of 5 runs
        return min(timeit.repeat(lambda: [product(x, w) for w in weights], number=1, repeat=5))

    return fastest(slab_linear) < fastest(F.linear)


class CausalSelfAttention(nn.Module):
    """Every position gathers information from itself and the positions before it, in n_head ways at once."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # query, key, value in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # mixes the heads back together

    def forward(self, x, cache=None):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3 * C) cut into 3 x nh heads
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs) unpacked: each (B, nh, T, hs)
        if cache is not None:  # generation: remember this step's keys and values, attend over all so far
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        # softmax(q @ k^T / sqrt(hs)) @ v: (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk) @ (B, nh, Tk, hs)
        # is_causal masks the future; a single new query (T == 1) comes after every cached key, so needs no mask
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """Each position thinks on its own about what attention gathered: expand 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's GELU (the tanh approximation)
        return F.dropout(self.c_proj(x), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The key/value cache for generation


class KVCache:
    """One layer's keys and values for the positions seen so far, so each new token costs one position, not T."""

    def __init__(self, batch_size, n_head, max_len, head_size, device, dtype):
        self.k = torch.zeros(batch_size, n_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_head, max_len, head_size, device=device, dtype=dtype)
        self.len = 0  # positions filled

    def append(self, k, v):  # k, v: (B, nh, T, hs)
        T = k.size(2)
        assert self.len == 0 or T == 1, "fill an empty cache with the prompt, then add one token at a time"
        assert self.len + T <= self.k.size(2), "the cache is full: start a new one from the last tokens"
        self.k[:, :, self.len : self.len + T] = k
        self.v[:, :, self.len : self.len + T] = v
        self.len += T
        return self.k[:, :, : self.len], self.v[:, :, : self.len]


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding: what each token is
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding: where it is
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: reading a token and writing it share one table

        # GPT-2's initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled down by 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_folder, dropout=0.0):
        """GPT-2's published weights by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or those in a folder
        that Hugging Face's save_pretrained wrote, as a float32 GPT on the CPU. See "GPT-2's pretrained weights"."""
        config, tensors, source = gpt2_checkpoint(name_or_folder)
        with torch.device("meta"):  # shapes only: every weight comes from the file, so skip the random init
            model = cls(GPTConfig(**config, dropout=dropout))
        model.to_empty(device="cpu")
        model.lm_head.weight = model.transformer.wte.weight  # to_empty made the tied pair two tensors: tie again
        model.load_state_dict(gpt2_state_dict(tensors, model, source))  # copies, converting fp16/bf16 to fp32
        return model

    def crop_block_size(self, block_size):
        """Keep only the first block_size positions: fine-tune GPT-2 (1024) on shorter, cheaper contexts."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].clone())

    def num_params(self, non_embedding=False):
        """Parameters counted once (the tied lm_head is wte); non_embedding leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, cache=None):
        """The final hidden state of every position: (B, T) token ids -> (B, T, C)."""
        B, T = idx.size()
        start = cache[0].len if cache else 0  # with a cache, idx continues where the cache left off
        assert start + T <= self.config.block_size, f"{start + T} positions, but block_size is {self.config.block_size}"
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = F.dropout(x, self.config.dropout, self.training)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        """(B, T) ids -> logits (B, T, vocab_size), and the mean cross-entropy against (B, T) targets if given."""
        logits = self.lm_head(self.hidden(idx, cache))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch_size):
        """An empty key/value cache per layer, for generating `batch_size` sequences at once."""
        c = self.config
        p = self.lm_head.weight
        return [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, p.device, p.dtype)
                for _ in range(c.n_layer)]


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and Python literals, readable with torch.load(weights_only=True)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by train.py without running any pickled code; one-line errors otherwise."""
    import pickle
    import zipfile

    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one with `python train.py` or pass its path")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one loses its directory
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or corrupted?); "
                         f"use another one, such as best.pt beside last.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SystemExit(f"error: refusing to load {path}: it holds pickled Python objects, not just tensors "
                         f"and plain values ({first[:120]}); only load checkpoints from sources you trust")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or corrupted?): {str(e)[:120]}")
    missing = [k for k in ("model", "model_config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} is not a gpt-from-scratch checkpoint (missing {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt, path="the checkpoint"):
    """Build the GPT a checkpoint describes and load its weights."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, AssertionError) as e:
        raise SystemExit(f"error: {path} does not match its own model_config ({str(e).splitlines()[0][:160]})")
    return model


# -----------------------------------------------------------------------------
# GPT-2's pretrained weights: OpenAI's four sizes from Hugging Face's hub, or a folder save_pretrained wrote

GPT2_SIZES = {  # published shapes; all use vocab_size 50257 and block_size 1024
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
GPT2_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"

SAFETENSORS_DTYPES = {  # the format's dtype names (all little-endian, like every machine PyTorch runs on)
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path):
    """The tensors in a .safetensors file, {name: tensor}, memory-mapped rather than read into memory.

    The format is deliberately simple, and unlike a pickle it cannot run code: 8 bytes giving the header's length
    n (little-endian), n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}},
    then the tensors' raw bytes, with begin and end counted from the end of the header."""

    def bad(why):
        return SystemExit(f"error: {path} is not a valid safetensors file ({why}); "
                          f"delete it and download or save it again")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, 100_000_000):  # the format's own limit on the header is 100 MB
            raise bad(f"header length {n} does not fit a file of {size:,} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not JSON: {e}")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never changed
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, such as {"format": "pt"}
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
            assert all(type(d) is int and d >= 0 for d in shape) and type(begin) is type(end) is int
        except (KeyError, TypeError, ValueError, AssertionError):
            raise bad(f"tensor {name!r} has a malformed entry {str(info)[:100]}")
        if type(dtype) is not str or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has dtype {str(dtype)[:20]}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[dtype]
        itemsize = dtype.itemsize
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} lies at bytes {begin}..{end} of a data section of {data_size:,} bytes: "
                      f"truncated?")
        if end - begin != numel * itemsize:
            raise bad(f"tensor {name!r} has {end - begin} bytes, but {info['dtype']}{shape} needs {numel * itemsize}")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)  # no copy
        if (8 + n + begin) % itemsize:
            raw = raw.clone()  # a misaligned tensor: copy it to memory where its numbers start on a boundary
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def gpt2_config(folder):
    """GPTConfig's fields from a Hugging Face config.json, refusing any GPT-2 variant this GPT cannot compute."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        shape = dict(n_layer=cfg.get("n_layer", 12), n_head=cfg.get("n_head", 12), n_embd=cfg.get("n_embd", 768),
                     block_size=cfg.get("n_positions", 1024), vocab_size=cfg.get("vocab_size", 50257))
    except FileNotFoundError:
        raise SystemExit(f"error: no config.json in {folder}; put the config.json that came with the weights there")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SystemExit(f"error: {path} is not a JSON object ({str(e)[:100]}); use the one save_pretrained wrote")
    if not all(type(v) is int and v > 0 for v in shape.values()) or shape["n_embd"] % shape["n_head"]:
        raise SystemExit(f"error: {path} gives an impossible shape {shape}; use the one save_pretrained wrote")
    # each setting as GPT2Config defaults it when absent, and the values under which the two compute the same
    for key, default, same in [
        ("model_type", "gpt2", ["gpt2"]),
        ("activation_function", "gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),  # GELU's tanh approximation
        ("layer_norm_epsilon", 1e-5, [1e-5]),
        ("n_inner", None, [None, 4 * shape["n_embd"]]),  # the MLP's width
        ("scale_attn_weights", True, [True]),
        ("scale_attn_by_inverse_layer_idx", False, [False]),
        ("reorder_and_upcast_attn", False, [False]),
        ("add_cross_attention", False, [False]),
        ("tie_word_embeddings", True, [True]),
    ]:
        if cfg.get(key, default) not in same:
            raise SystemExit(f"error: {path} sets {key}={cfg[key]!r}, a GPT-2 variant this GPT cannot represent "
                             f"exactly (it needs {' or '.join(map(json.dumps, same))}); use a standard GPT-2")
    return shape


def gpt2_checkpoint(name_or_folder):
    """(GPTConfig fields, {name: tensor}, where they came from) for one of GPT2_SIZES, downloaded into
    prepare.CACHE_DIR the first time, or for a folder holding config.json and model.safetensors."""
    if name_or_folder in GPT2_SIZES:  # a folder with the same name can be passed as ./gpt2
        import prepare  # only needed here

        name = name_or_folder
        path = os.path.join(prepare.CACHE_DIR, name, "model.safetensors")
        if not os.path.exists(path):
            url = GPT2_URL.format(name)
            print(f"downloading {name} from {url} to {path}", file=sys.stderr)
            prepare.download(url, path, f"connect to the internet, or download model.safetensors and config.json "
                                        f"from https://huggingface.co/openai-community/{name} yourself and pass "
                                        f"the folder: --init_from=path/to/folder")
        return dict(vocab_size=50257, block_size=1024, **GPT2_SIZES[name]), read_safetensors(path), path

    folder = name_or_folder
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {folder!r} is neither a GPT-2 size ({', '.join(GPT2_SIZES)}) nor a folder; pass "
                         f"one of those sizes, or a folder with the config.json and model.safetensors of a GPT-2")
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("best.pt", "last.pt")):
        raise SystemExit(f"error: {folder} is a train.py run, not a GPT-2; sample from it with python generate.py "
                         f"--init_from={os.path.join(folder, 'best.pt')}, continue it with python train.py "
                         f"--init_from=resume --out_dir={folder}")
    config = gpt2_config(folder)
    files = ["model.safetensors"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):  # a large model that save_pretrained split into shards
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: {index} does not map tensors to files ({str(e)[:100]}); save the model again")
    if not all(os.path.isfile(os.path.join(folder, file)) for file in files):
        raise SystemExit(f"error: no {' or '.join(files)} in {folder}; weights in .bin or .pt files are pickles, "
                         f"which can run arbitrary code when loaded, so they are not read: convert them with "
                         f"transformers' save_pretrained(folder, safe_serialization=True)")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(os.path.join(folder, file)))
    return config, tensors, folder


def gpt2_state_dict(tensors, model, source):
    """GPT-2's tensors under our names and in nn.Linear's layout, checked name by name and shape by shape
    against `model`. The names already match, up to an optional `transformer.` prefix."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state, lm_head = {}, None
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask kept as a buffer; is_causal=True does its job here
        if name == "lm_head.weight":
            lm_head = t  # the output layer, tied to wte: checked below
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        state[key] = t.t() if key.endswith(conv1d) else t  # GPT-2's Conv1D stores (in, out); Linear is (out, in)

    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}

    def first(names):
        return ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "") or "none"

    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise SystemExit(f"error: {source} does not hold the tensors of a GPT-2 (missing: {first(missing)}; "
                         f"unexpected: {first(unexpected)}); use the model.safetensors of a GPT2LMHeadModel")
    for key, t in state.items():
        if t.shape != expected[key] or not t.is_floating_point():
            raise SystemExit(f"error: {source}: {key} is {str(t.dtype)[6:]}{list(t.shape)} where this model needs "
                             f"float{list(expected[key])}; use the config.json that came with the weights")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        raise SystemExit(f"error: {source} holds an lm_head.weight different from wte.weight; this GPT ties the two "
                         f"tables, as GPT-2 does, so it cannot hold these weights")
    return {**state, "lm_head.weight": state["transformer.wte.weight"]}


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
