"""
mfu.py: the figures train.py's progress lines print beside the loss: MFU (model FLOPs utilisation, the FLOPs
the model does per second over the device's peak) and peak memory.

    flops_per_token(model)        training FLOPs per token of a GPT, from its shape
    peak_flops(device_type, dtype) the device's peak FLOP/s: a datasheet for GPUs, a quick matmul probe on a CPU
    peak_memory(device_type)      the run's peak memory, as text

docs/speed.md explains the counts and gives the figures on several machines.
"""

import functools
import re
import sys
import time

import torch

GPU_PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s; first match wins
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def flops_per_token(model):
    """Training FLOPs per token: 6 per weight (2 forward, 4 backward: the input's gradient and the weight's), 4 per
    frozen weight (no gradient of its own, as under LoRA), the position table left out, plus
    6 * n_layer * n_embd * block_size for attention's two products (causal: half of the full score matrix)."""
    c = model.config
    frozen = sum(p.numel() for name, p in model.named_parameters() if not p.requires_grad and "wpe" not in name)
    return 6 * model.num_params(non_embedding=True) - 2 * frozen + 6 * c.n_layer * c.n_embd * c.block_size


@functools.cache
def cpu_matmul_flops(dtype):
    """FLOP/s of a 1024x1024 matmul in `dtype` on this CPU, measured in a few milliseconds."""
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)  # leaves torch's rng alone
    a @ a  # warm up
    t0 = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 1024**3 / (time.perf_counter() - t0)


def peak_flops(device_type, ptdtype):
    """The device's peak FLOP/s in the training precision: a datasheet for GPUs, the matmul probe on a CPU;
    None where neither is known (fp32 on a GPU, an unlisted GPU, MPS)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((f for gpu, f in GPU_PEAK_FLOPS.items() if re.search(rf"\b{gpu}\b", name)), None)  # not A10G
        return peak if ptdtype != torch.float32 else None
    return cpu_matmul_flops(ptdtype) if device_type == "cpu" else None


def peak_memory(device_type):
    """The run's peak memory, as text: allocated on a GPU, this process's resident set elsewhere."""
    if device_type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB on the GPU"
    if sys.platform == "win32":
        return "peak memory n/a"
    import resource  # KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return f"{rss:,.0f} MiB peak RSS"
