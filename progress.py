"""
progress.py: what a training run reports as it goes. Every log_interval steps train.py prints a progress line
(loss, lr, ms per step, tokens/s and MFU: the model's FLOPs per second over the device's peak), at every
evaluation a line of losses, at the end the peak memory; each line is also a JSON row of out_dir/log.jsonl, which
`python look.py curves` draws.

    Progress(...)                 times the steps between progress lines, and prints and logs each line
    LogFile(path, resume_at)      out_dir/log.jsonl, begun anew or cut back to the step a run resumes from
    flops_per_token(model)        training FLOPs per token of a GPT, from its shape
    peak_flops(device_type, dtype) the device's peak FLOP/s: a datasheet for GPUs, a quick matmul probe on a CPU
    peak_memory(device_type)      the run's peak memory, as text

docs/speed.md explains the counts and gives the figures on several machines.
"""

import functools
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from files import write_atomically

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


class LogFile:
    """out_dir/log.jsonl: a JSON object per progress line and per evaluation. path None: a process that writes
    none (all but process 0 under torchrun)."""

    def __init__(self, path, resume_at=None):
        """Begin the log: empty for a new run; for a run resumed at step resume_at, the rows up to its checkpoint,
        so that no step appears twice or goes missing (the evaluation at resume_at runs again)."""
        self.path, rows = path, []
        if path is None:
            return
        if resume_at is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        step = row["step"]
                    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill, say
                        break
                    if step < resume_at or (step == resume_at and "val_loss" not in row):
                        rows.append(row)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        write_atomically(path, lambda f: f.write(text.encode("utf-8")))

    def append(self, **row):
        """One more row, written before the checkpoint that covers it."""
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


class Progress:
    """Times the steps between progress lines (evaluations left out); prints and logs each line. Under torchrun
    every process calls log(), which averages the loss over them, and only process 0 prints (show)."""

    def __init__(self, model, dev, dtype, tokens_per_step, processes, log_file, show):
        self.tokens_per_step, self.processes, self.log_file, self.show = tokens_per_step, processes, log_file, show
        self.flops_per_step = flops_per_token(model) * tokens_per_step
        self.peak = peak_flops(dev.split(":")[0], getattr(torch, dtype))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = f" ({trainable:,} of them trainable)" if trainable < model.num_params() else ""
        if show:
            print(f"{model.num_params() / 1e6:.2f}M parameters{frozen} on {dev} ({dtype}, {processes} process"
                  f"{'es' * (processes > 1)}), {tokens_per_step:,} tokens per step")

    def restart(self, iter_num):
        """Time the steps from here: after an evaluation, or at the start."""
        self.t0, self.iter0 = time.perf_counter(), iter_num

    def log(self, iter_num, loss, lr, seconds):
        """The line of step iter_num: its loss (a tensor), the lr it ran at, the seconds of training so far."""
        if dist.is_initialized():  # the mean over all processes' batches, as one process would report it
            dist.all_reduce(loss)
            loss /= self.processes
        dt = (time.perf_counter() - self.t0) / max(1, iter_num - self.iter0)  # per step since the last line
        mfu = f"{self.flops_per_step / dt / self.peak / self.processes:.1%}" if self.peak else "n/a"
        if self.show:
            print(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{self.tokens_per_step / dt:,.0f} tok/s, mfu {mfu}", flush=True)
        self.log_file.append(step=iter_num, seconds=seconds, loss=loss.item(), lr=lr,
                             tokens_per_s=self.tokens_per_step / dt)
        self.restart(iter_num)
