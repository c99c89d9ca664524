"""
fast_linear.py: linear layers that make sampling faster on a CPU, and smaller.

    use_slab_products(model)   large layers multiply one token's vector as slabs on every core (SlabLinear)
    quantize_int8(model)       every linear layer's weight in int8 with a scale per row (Int8Linear)

A cached sampling step multiplies every weight matrix by one vector, so its speed is how fast the weights can be
read. The first trick spreads that read over every core where the CPU's BLAS does not; the second reads a quarter
of fp32's bytes. Training never uses them: generate.py, chat.py, look.py and train.py's closing sample do.
"""

import functools
import timeit

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# One token's vector times a large weight matrix


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
