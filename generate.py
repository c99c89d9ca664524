"""
generate.py: sample text from a checkpoint that train.py wrote.

    python generate.py                                             # 500 tokens (characters) from out/best.pt
    python generate.py --prompt="ROMEO:" --num_samples=3 --max_new_tokens=200
    python generate.py --prompt=FILE:prompt.txt --temperature=0   # greedy: always the most likely token
    python generate.py --top_k=40 --top_p=0.9 --seed=7
    python generate.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # OpenAI's GPT-2 (downloaded once)
    python generate.py --quantize=int8                              # int8 weights: less memory, faster on a CPU

The checkpoint holds everything needed (weights, model shape, tokenizer); a LoRA run's holds the adapters and
names its base, and the adapters are merged into the base's weights as it loads. Text streams to stdout as it is
made; the speed goes to stderr. Each new token is one forward pass over one position, thanks to the key/value
cache in gpt.py; `--kv_cache=False` recomputes the whole context every step instead (same tokens, much slower).
"""

import codecs
import functools
import sys
import time
import timeit

import torch
import torch.nn as nn
from torch.nn import functional as F

import configurator
from checkpoint import load_model
from lora import merge_adapters

# -----------------------------------------------------------------------------
init_from = "out/best.pt"  # a checkpoint of train.py's, or GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
#                            folder with a GPT-2's config.json and model.safetensors (and vocab.json, merges.txt)
prompt = "\n"  # text to continue, or FILE:path to read it from a file
num_samples = 1  # independent samples, generated together as one batch
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 always takes the most likely token
top_k = 0  # sample only among the k most likely tokens (0: all)
top_p = 1.0  # sample only among the most likely tokens whose probabilities add up to p (1.0: all)
seed = 1337  # the same seed, checkpoint and settings give the same text
kv_cache = True  # reuse the keys and values of earlier positions
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'mps'
dtype = "auto"  # the weights' precision: 'auto' (bf16 or fp16 on a GPU, fp32 elsewhere), 'float32', 'bfloat16'
quantize = ""  # 'int8': every linear layer's weight in int8, a quarter of fp32's bytes (Int8Linear); '': as loaded
# -----------------------------------------------------------------------------


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (B, V) -> the distribution (B, V) to sample the next token from, after temperature, top-k, top-p."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the largest is 0: no overflow to inf
    if 0 < top_k < logits.size(-1):  # keep exactly the k largest logits
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probabilities reach top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # the mass ranked above each token
        sorted_probs[above >= top_p] = 0.0  # the most likely token always stays: nothing is above it
        sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The next token (B, 1) for each row of logits (B, V): the most likely one if temperature is 0, else drawn."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    try:
        return torch.multinomial(probs, 1, generator=generator)
    except RuntimeError:
        if torch.isfinite(probs).all():
            raise
        raise SystemExit("error: the model's outputs are not finite numbers (NaN or inf), so there is nothing to "
                         "sample from; its weights are damaged, or they overflowed in this --dtype (try float32)")


@torch.inference_mode()  # no autograd bookkeeping at all: less overhead per token than no_grad
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True):
    """Yield the next token of every sequence, (B,), max_new_tokens times, continuing the prompts idx (B, T).

    The model sees at most block_size positions. When the context outgrows them, we keep its last 3/4 and
    start again from position 0 (the positions it was trained on), re-reading those tokens in one batched pass;
    the cache then fills again for block_size/4 more tokens. (A rolling window would leave every cached key
    encoded for a position it no longer has.) With kv_cache=False every step recomputes that same context in
    full, so both paths see exactly the same tokens.
    """
    if idx.is_cuda:  # cuDNN's attention builds a plan for each new key length, and here every token brings one
        torch.backends.cuda.enable_cudnn_sdp(False)
    block_size = model.config.block_size
    keep = block_size - block_size // 4
    context = idx if idx.size(1) <= block_size else idx[:, -keep:]  # (B, T) what the model sees
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            hidden = model.hidden(context)  # (B, T, C): the whole context, every step
        elif cache is None:
            cache = model.new_cache(context.size(0))
            hidden = model.hidden(context, cache)  # read the context once, filling the cache
        else:
            hidden = model.hidden(context[:, -1:], cache)  # only the newest token: (B, 1, C)
        logits = model.lm_head(hidden[:, -1, :])  # (B, V): only the last position predicts the next token
        next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield next_id[:, 0]
        context = torch.cat([context, next_id], dim=1)
        if context.size(1) > block_size:  # outgrown: keep the most recent tokens, start over at position 0
            context, cache = context[:, -keep:], None


def text_decoder(tok):
    """A function from one token id to the text it completes, for streaming: a character whose UTF-8 bytes span
    several tokens comes out whole with its last token ('' before), and bytes that are not UTF-8 become U+FFFD.
    Called with no token, at the end, it gives what a character cut off by the last token leaves (U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(token=None):
        return decoder.decode(b"" if token is None else tok.decode_bytes([token]), final=token is None)

    return decode


def sample_text(model, tok, prompt_text, max_new_tokens, num_samples=1, temperature=0.8, top_k=0, top_p=1.0,
                seed=1337, kv_cache=True, out=sys.stdout):
    """Generate from a prompt string and write the text to `out`, streaming it when there is one sample."""
    model.eval()
    device = model.lm_head.weight.device
    ids = tok.encode(prompt_text, allowed_special=True)  # a prompt may start with <|endoftext|>, as GPT-2's do
    if not ids:
        raise SystemExit("error: the prompt is empty after encoding; give some text with --prompt")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (B, T)
    generator = torch.Generator(device).manual_seed(seed)
    decoders = [text_decoder(tok) for _ in range(num_samples)]
    texts = [prompt_text for _ in range(num_samples)]
    if num_samples == 1:
        out.write(prompt_text)
    t0 = time.perf_counter()
    for step, next_ids in enumerate(generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                             kv_cache)):
        if step == 0:
            first = time.perf_counter() - t0  # the prompt's pass, plus one-time warm-up (GPU; slabs_pay on a CPU)
        for i, token in enumerate(next_ids.tolist()):
            piece = decoders[i](token)  # "" while a character's bytes are still incomplete
            texts[i] += piece
            if num_samples == 1:
                out.write(piece)
                out.flush()
    ends = [decode() for decode in decoders]  # a character the last token cut off: U+FFFD
    texts = [text + end for text, end in zip(texts, ends)]
    if num_samples == 1:
        out.write(ends[0])
    elapsed = time.perf_counter() - t0
    if num_samples > 1:
        out.write(("\n" + "-" * 80 + "\n").join(texts))
    out.write("\n")
    out.flush()
    n = max_new_tokens * num_samples
    print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:,.0f} tokens/s; the first after {first:.2f} s]",
          file=sys.stderr)
    return texts


def load_for_sampling(init_from, device, dtype, quantize=""):
    """The model and tokenizer from init_from (see checkpoint.py), on `device` in `dtype`, ready to sample from:
    a LoRA run's adapters merged into the weights, and those quantized to int8 if `quantize` says so."""
    if quantize not in ("", "int8"):
        raise SystemExit(f"error: --quantize={quantize} is unknown; use int8, or leave it empty for the weights as "
                         f"they are")
    model, tok = load_model(init_from)
    model = merge_adapters(model).to(device, getattr(torch, dtype)).eval()  # the same outputs as unmerged, faster
    if quantize:
        quantize_int8(model)
    else:
        use_slab_products(model)
    return model, tok


# -----------------------------------------------------------------------------
# Faster on a CPU: one token's vector times a large weight matrix


def use_slab_products(model):
    """Let the model's large linear layers multiply a single token's vector the faster of two ways (SlabLinear)."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.numel() >= 2**17:  # 512 KB in fp32: smaller ones stay cached
            module.__class__ = SlabLinear  # the same module and parameters, another forward


class SlabLinear(nn.Linear):
    """nn.Linear, plus a second way to multiply a few rows by a large weight on a CPU.

    Each cached sampling step multiplies every weight matrix by one vector: a memory-bound product that some
    CPUs' BLAS runs on one core, far below the memory's speed. Cut into one slab of rows per thread and
    multiplied as one batched product (bmm), it runs on every core. Other CPUs' BLAS already reads the weight at
    full speed, and there the slabs only cost; slabs_pay() times both once, and the faster is kept."""

    def forward(self, x):
        if (x.numel() > 4 * self.in_features or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)  # training, prefill, GPUs, other precisions
        if slabs_pay(torch.get_num_threads()):
            return slab_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def slab_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for a few rows of x (..., in) -> (..., out), as S = threads products at once."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    slabs = max(2, torch.get_num_threads())  # at least 2 slabs: bmm splits its batch over the threads
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

    The weights add up to 64 MB, more than most CPUs' caches hold, so both products read them from memory, as
    they do for a model large enough to gain: one small weight timed over and over would be read from the cache,
    where the two products come out close and the choice would flip from one process to the next."""
    weights, x = torch.zeros(16, 1024, 1024), torch.zeros(1, 1024)  # 16 weights of 4 MB, and one token

    def fastest(product):  # seconds for all 16 weights, the best of 5 runs
        return min(timeit.repeat(lambda: [product(x, w) for w in weights], number=1, repeat=5))

    return fastest(slab_linear) < fastest(F.linear)


# -----------------------------------------------------------------------------
# Smaller weights: int8, with one scale per output row


def int8_weights(weight):
    """Per-output-channel symmetric int8 of a weight (out, in): (q, scale) with weight ~ q * scale[:, None], where
    q is int8 in [-127, 127] and scale (out,) is the row's largest |w| / 127 rounded up to a bfloat16 (the dtype the
    int8 kernel takes its scales in). Every weight lies within scale / 2 of its q * scale."""
    w = weight.detach().float()
    exact = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.bfloat16).tiny) / 127  # (out,); zeros: q = 0
    scale = exact.bfloat16()
    up = (scale.view(torch.int16) + 1).view(torch.bfloat16)  # the next bfloat16 above a positive one
    scale = torch.where(scale.float() < exact, up, scale)  # so that no |w| / scale exceeds 127
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def quantize_int8(model):
    """Turn every nn.Linear of the model into an Int8Linear, in place. lm_head, tied to the token embedding, gets
    an int8 copy of that table for its product, while the embedding's lookups keep reading the float table."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and a scale per output row (int8_weights): a quarter of fp32's bytes to hold,
    and to read for every token. Only the weights are quantized: the activations stay float.

    On a CPU, the product takes bf16 activations: a few rows (a cached sampling step) go through PyTorch's int8
    kernel, torch._weight_int8pack_mm, which converts each int8 weight to float as it multiplies and scales the
    output rows (vectorised for bf16 only, and only for in_features a multiple of 16); many rows (a prompt, an
    evaluation) through a bf16 matmul with the int8 weight converted for that product, then scaled. Elsewhere the
    int8 weight is converted to the activations' dtype for each product. The bias is added in float32."""

    kernel_rows = 8  # up to this many rows the int8 kernel beats converting the weight for a matmul

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = int8_weights(linear.weight)
        self.weight = nn.Parameter(q, requires_grad=False)  # (out, in) int8: counted and moved like any weight
        self.register_buffer("scale", scale)  # (out,) bfloat16
        self.bias = linear.bias

    def forward(self, x):
        if x.device.type != "cpu":
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        else:
            a = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, in), a new tensor unless x was bf16
            if len(a) <= self.kernel_rows and self.in_features % 16 == 0:
                if a.data_ptr() % 32 or not a.is_contiguous():  # the kernel reads rows with aligned 32-byte loads
                    a = a.clone(memory_format=torch.contiguous_format)
                y = torch._weight_int8pack_mm(a, self.weight, self.scale)  # (rows, out) bf16
            else:
                y = F.linear(a, self.weight.to(torch.bfloat16)).float() * self.scale  # int8 is exact in bf16
            y = y.view(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def main(args):
    configurator.configure(globals(), args)
    configurator.check_at_least(globals(), dict(max_new_tokens=1, num_samples=1))
    configurator.check_seed(seed)
    if temperature < 0:
        raise SystemExit(f"error: --temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k < 0:
        raise SystemExit(f"error: --top_k={top_k} must be >= 0 (0 means no limit)")
    if not 0 < top_p <= 1:
        raise SystemExit(f"error: --top_p={top_p} must be in (0, 1] (1 means no limit)")
    text = prompt
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read the prompt file {text[5:]} ({type(e).__name__}); "
                             f"give a UTF-8 text file")
    dev = configurator.pick_device(device)
    model, tok = load_for_sampling(init_from, dev, configurator.pick_dtype(dtype, dev), quantize)  # fp32 off the GPU
    try:
        sample_text(model, tok, text, max_new_tokens, num_samples, temperature, top_k, top_p, seed, kv_cache)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
