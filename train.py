r"""
train.py: train a GPT (gpt.py) on the token ids that prepare.py wrote.

    python train.py                                   # a Shakespeare model in under 5 minutes on a CPU, then a sample
    python train.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --dropout=0.2 --batch_size=64 \
        --learning_rate=1e-3 --max_iters=5000 --min_lr=1e-4 --eval_interval=250 --eval_iters=200  # on a GPU
    python train.py --init_from=resume                # continue the run in out_dir exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py --gradient_accumulation_steps=8   # the same on 8 GPUs

Reads data_dir/train.bin, val.bin and meta.json (preparing Tiny Shakespeare first if data_dir is a default one and
empty). Writes to out_dir: config.json (the resolved settings), last.pt (at every evaluation, at the end, and on
Ctrl-C) and best.pt (whenever the val loss improves). Settings are the globals below: override them as
--key=value or with a config file of `key = value` lines (see configurator.py).
"""

import functools
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import configurator
import tokenizer as tokenizers
from gpt import GPT2_SIZES, GPT, GPTConfig, load_checkpoint, model_from_checkpoint
from prepare import write_atomically

# -----------------------------------------------------------------------------
# where from, where to
data_dir = "data/char"  # prepared data: train.bin, val.bin, meta.json
out_dir = "out"  # checkpoints and config.json
init_from = "scratch"  # 'scratch', 'resume' (continue out_dir/last.pt), or fine-tune GPT-2: 'gpt2', 'gpt2-medium',
#                        'gpt2-large', 'gpt2-xl' or a folder with a GPT-2's config.json and model.safetensors
# the model (when resuming or fine-tuning, the checkpoint's shape is used; block_size may crop GPT-2's 1024)
# The shape is the best of a sweep for 5 minutes on a 2-core CPU: in a fixed time, a small model taking many
# small steps beats a bigger one taking few (README, "Speed"). max_iters leaves room for slower CPUs.
n_layer = 6  # transformer blocks: depth
n_head = 4  # attention heads per block
n_embd = 64  # width of the residual stream; cost grows with its square
block_size = 64  # context length in tokens; attention cost grows with it
dropout = 0.0  # regularisation; helps bigger models on small data (0.2 for the 6-layer GPU run)
bias = True  # biases in Linear and LayerNorm layers, as in GPT-2
# batches
batch_size = 16  # sequences per micro-step (per process under torchrun)
gradient_accumulation_steps = 1  # micro-steps per optimizer step, counted over all processes
# AdamW with linear warmup and cosine decay
learning_rate = 5e-3  # peak learning rate; small models take large steps
max_iters = 4000  # optimizer steps in the whole run (7500 fill 5 minutes on a fast 2-core CPU: val 1.578)
lr_decay_iters = 0  # steps over which the lr decays to min_lr; 0: max_iters (kept when a resume adds steps)
warmup_iters = 100  # steps of linear warmup from 0 to learning_rate
min_lr = 1e-4  # the lr at the end of the decay
weight_decay = 0.1  # applied to matrices and embeddings only, never to biases or LayerNorm gains
beta1 = 0.9  # AdamW momentum
beta2 = 0.99  # AdamW second-moment decay; 0.99 suits small batches better than GPT-2's 0.95
grad_clip = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
# evaluation and logging
eval_interval = 500  # evaluate, and write checkpoints, every this many steps
eval_iters = 25  # batches per evaluation, from fixed, evenly spaced windows of each split
log_interval = 100  # print a progress line every this many steps
sample_length = 500  # characters/tokens of text to print at the end (0 for none)
# system
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16' or 'float16' (autocast; float16 adds a GradScaler)
compile = False  # torch.compile the model: faster steps after a compile that costs a minute or more
seed = 1337  # same seed and settings on a CPU: the same run, step for step
# -----------------------------------------------------------------------------

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
DEFAULT_DATA = {os.path.join("data", t): t for t in ("char", "bpe", "gpt2")}  # data train.py may prepare itself
GPU_PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s; first match wins
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def load_data(split, vocab_size, expected_tokens):
    """A split's token ids as a read-only memmap, checked against meta.json."""
    path = os.path.join(data_dir, f"{split}.bin")
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size % 2 or size // 2 != expected_tokens:
        raise SystemExit(f"error: {path} has {size} bytes but meta.json says {expected_tokens} uint16 tokens "
                         f"(truncated or corrupted?); run prepare.py again")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if data.max() >= vocab_size:
        raise SystemExit(f"error: {path} holds token id {data.max()} >= vocab_size {vocab_size}; run prepare.py again")
    if len(data) <= block_size:
        raise SystemExit(f"error: {path} has {len(data)} tokens, too few for --block_size={block_size}; "
                         f"use a smaller --block_size or more text")
    return data


def batch(data, offsets, device):
    """Inputs and next-token targets, both (B, T), from windows of block_size + 1 tokens starting at `offsets`."""
    window = torch.from_numpy(data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T + 1)
    x, y = window[:, :-1], window[:, 1:]
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it):
    """Linear warmup to learning_rate, then cosine decay to min_lr over lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


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
    """The device's peak FLOP/s in the training precision: a datasheet for GPUs, the matmul probe on a CPU."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((f for gpu, f in GPU_PEAK_FLOPS.items() if re.search(rf"\b{gpu}\b", name)), None)  # not A10G
        return peak if ptdtype != torch.float32 else None  # fp32 / tf32 peaks are not in the table
    return cpu_matmul_flops(ptdtype) if device_type == "cpu" else None


def check_settings():
    """Catch the settings that would otherwise fail with a traceback deep inside the run."""
    least = dict(n_layer=1, n_head=1, n_embd=1, block_size=1, batch_size=1, gradient_accumulation_steps=1,
                 eval_interval=1, eval_iters=1, log_interval=1, max_iters=0, warmup_iters=0, lr_decay_iters=0,
                 learning_rate=0, min_lr=0, weight_decay=0, grad_clip=0, sample_length=0)
    for key, lowest in least.items():
        if globals()[key] < lowest:
            raise SystemExit(f"error: --{key}={globals()[key]} must be at least {lowest}")
    if n_embd % n_head:
        raise SystemExit(f"error: --n_embd={n_embd} must be a multiple of --n_head={n_head}")
    if not 0 <= dropout < 1:
        raise SystemExit(f"error: --dropout={dropout} must be in [0, 1)")
    if min_lr > learning_rate:
        raise SystemExit(f"error: --min_lr={min_lr} is above --learning_rate={learning_rate}; the lr decays to "
                         f"min_lr, so give a smaller one")


def main(args):
    overridden = configurator.configure(globals(), args)
    ckpt = None
    if init_from == "resume":  # the run continues with its saved settings; flags given now (--max_iters) win
        ckpt = load_checkpoint(os.path.join(out_dir, "last.pt"))
        for k, v in ckpt.get("config", {}).items():
            if k in globals() and k not in overridden and k != "init_from":
                globals()[k] = v
        if dtype == "auto" and "precision" in ckpt:  # the precision it chose, not a new choice by a new probe
            globals()["dtype"] = ckpt["precision"]
        clash = [k for k in MODEL_KEYS if k in overridden and globals()[k] != ckpt["model_config"].get(k)]
        if clash:
            saved = ", ".join(f"{k}={ckpt['model_config'].get(k)}" for k in clash)
            raise SystemExit(f"error: the checkpoint in {out_dir} has {saved}; drop those flags to resume, "
                             f"or start a new run with --init_from=scratch --out_dir=NEW_DIR")
    elif init_from != "scratch" and init_from not in GPT2_SIZES and not os.path.isdir(init_from):
        raise SystemExit(f"error: --init_from={init_from} is unknown; use scratch, resume, a GPT-2 size "
                         f"({', '.join(GPT2_SIZES)}), or a folder with a GPT-2's config.json and model.safetensors")
    if lr_decay_iters == 0:  # fixed now and saved: resuming with a larger --max_iters goes on at min_lr
        globals()["lr_decay_iters"] = max_iters
    check_settings()
    settings = {k: globals()[k] for k in configurator.setting_names(globals())}

    # processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    dev = configurator.pick_device(device)
    if ddp and dev.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: torchrun started more processes than this machine has GPUs "
                             f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()}")
        dev = configurator.pick_device(f"cuda:{local_rank}")  # one GPU per process
    if ddp:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    try:
        train(settings, ckpt, ddp, rank, local_rank, world, dev)
        if ddp:
            dist.barrier()  # finish together: a process that tears down while another still works can crash it
    finally:
        if ddp:
            dist.destroy_process_group()


def train(settings, ckpt, ddp, rank, local_rank, world, dev):
    master = rank == 0  # only this process prints and writes checkpoints
    log = print if master else (lambda *a, **k: None)
    device_type = dev.split(":")[0]
    if gradient_accumulation_steps % world:
        raise SystemExit(f"error: --gradient_accumulation_steps={gradient_accumulation_steps} is the total over "
                         f"{world} processes and must be a multiple of {world}")
    accum = gradient_accumulation_steps // world  # micro-steps in this process

    # data: prepared by prepare.py, or prepared now if data_dir is a default one and empty
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and data_dir not in DEFAULT_DATA:
        raise SystemExit(f"error: no prepared data in {data_dir}; run python prepare.py --data_dir={data_dir}")
    if not os.path.exists(meta_path) and local_rank == 0:  # one process per machine prepares it
        import prepare
        prepare.prepare(tokenizer=DEFAULT_DATA[data_dir], data_dir=data_dir)
    if ddp:
        dist.barrier()  # every process, whether or not it found the data: the others wait for it
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    vocab_size = meta["vocab_size"]
    data = {s: load_data(s, vocab_size, meta[f"{s}_tokens"]) for s in ("train", "val")}

    # the model
    torch.manual_seed(seed + rank)  # dropout differs per process; DDP copies process 0's initial weights to all
    if ckpt:
        if ckpt["tokenizer"] != meta["tokenizer"]:
            raise SystemExit(f"error: the data in {data_dir} was tokenized differently from the checkpoint in "
                             f"{out_dir}; pass the --data_dir the run was trained on")
        model = model_from_checkpoint(ckpt, os.path.join(out_dir, "last.pt"))
    elif init_from == "scratch":
        model = GPT(GPTConfig(vocab_size=vocab_size, **{k: settings[k] for k in MODEL_KEYS}))
    else:  # fine-tuning GPT-2: the shape comes with the weights
        model = GPT.from_pretrained(init_from, dropout=dropout)
        if model.config.vocab_size != vocab_size:
            raise SystemExit(f"error: {init_from} has a vocabulary of {model.config.vocab_size} but the data in "
                             f"{data_dir} has {vocab_size}; use --data_dir=data/gpt2 (prepared on first use) or "
                             f"data that python prepare.py --tokenizer=gpt2 wrote")
        if block_size > model.config.block_size:
            raise SystemExit(f"error: --block_size={block_size} is longer than {init_from}'s "
                             f"{model.config.block_size} positions")
        model.crop_block_size(block_size)
    settings.update({k: getattr(model.config, k) for k in MODEL_KEYS})  # what was built, for config.json
    model.to(dev)

    # precision: bf16 autocast where it is fast, fp16 + loss scaling on GPUs without bf16, fp32 otherwise.
    # On a CPU bf16 pays only on chips with bf16 units and for wide models (measured here: no gain at n_embd
    # 128-192, 1.8x at 256, 2.4x at 384), so auto takes it there when a bf16 matmul beats fp32 by half again.
    wide = dtype == "auto" and device_type == "cpu" and model.config.n_embd >= 256
    fast = wide and cpu_matmul_flops(torch.bfloat16) > 1.5 * cpu_matmul_flops(torch.float32)
    precision = configurator.pick_dtype(dtype, dev, default="bfloat16" if fast else "float32")
    ptdtype = getattr(torch, precision)
    autocast = nullcontext() if precision == "float32" else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # the fp32 matmuls autocast leaves may use TF32 tensor cores

    # AdamW: weight decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for the whole update (on CPU since torch 2.4): faster
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused)

    # random state: one generator draws every batch (the same in all processes, which take disjoint parts)
    data_rng = torch.Generator().manual_seed(seed)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])  # its moments, and the hyperparameters it was saved with:
        for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):  # those given now win
            group.update(weight_decay=decay, betas=(beta1, beta2))
        if ckpt["scaler"]:  # empty unless the run used float16
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"], data_rng, rank)
        ckpt.clear()  # free the loaded tensors before training

    raw_model = model  # the plain module: what gets saved, without _orig_mod. or module. prefixes
    if compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if device_type == "cuda" else None)

    if master:
        os.makedirs(out_dir, exist_ok=True)
        resolved = dict(settings, device=dev, dtype=precision, world_size=world)
        text = json.dumps(resolved, indent=2).encode("utf-8")
        write_atomically(os.path.join(out_dir, "config.json"), lambda f: f.write(text))

    # evaluation: the same evenly spaced windows every time, shared out between the processes
    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = {}
        for split in ("train", "val"):
            n = min(eval_iters * batch_size, len(data[split]) - block_size)
            starts = np.linspace(0, len(data[split]) - block_size - 1, n).astype(np.int64)[rank::world]
            total = torch.zeros(2, device=dev)  # (sum of losses, number of windows)
            for i in range(0, len(starts), batch_size):
                x, y = batch(data[split], starts[i : i + batch_size], dev)
                with autocast:
                    _, loss = raw_model(x, y)  # not through DDP's hooks or a recompile for a new shape
                total += torch.stack([loss.float() * len(x), torch.tensor(len(x), device=dev)])
            if ddp:
                dist.all_reduce(total)
            losses[split] = (total[0] / total[1]).item()
        model.train()
        return losses

    def save(names):
        """Write everything needed to rebuild the model and continue the run exactly to out_dir/name for each
        name. Every process takes part (the rng states are gathered); only the master writes."""
        state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                     model_config=asdict(raw_model.config), precision=precision, tokenizer=meta["tokenizer"],
                     config=settings, iter_num=iter_num, best_val_loss=best_val_loss, rng=rng_state(data_rng, ddp))
        for name in names if master else ():
            write_atomically(os.path.join(out_dir, name), lambda f: torch.save(state, f))

    # Ctrl-C (or SIGTERM) asks to stop after the current step and save; a second Ctrl-C quits at once
    stop = []

    def on_signal(signum, frame):
        if stop:
            print("\ninterrupted again: quitting without saving", file=sys.stderr)
            os._exit(130)
        stop.append(signum)
        log(f"\ninterrupted: saving {out_dir}/last.pt after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # the loop
    n_params, c = raw_model.num_params(), raw_model.config
    flops_per_token = 6 * raw_model.num_params(non_embedding=True) + 6 * c.n_layer * c.n_embd * c.block_size
    peak = peak_flops(device_type, ptdtype)
    tokens_per_iter = batch_size * gradient_accumulation_steps * block_size
    log(f"{n_params / 1e6:.2f}M parameters on {dev} ({precision}, {world} process{'es' * (world > 1)}), "
        f"{tokens_per_iter:,} tokens per step")
    t_start = t0 = time.perf_counter()
    t0_iter = iter_num
    try:
        while True:
            if iter_num % eval_interval == 0 or iter_num == max_iters:
                losses = evaluate()
                if not all(map(math.isfinite, losses.values())):
                    raise SystemExit(f"error: the {'val' if math.isfinite(losses['train']) else 'train'} loss is "
                                     f"not finite at step {iter_num}; stopped without saving these weights")
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    f"{' (best)' if improved else ''}, {time.perf_counter() - t_start:.1f} s", flush=True)
                save(["last.pt", "best.pt"] if improved else ["last.pt"])
                t0, t0_iter = time.perf_counter(), iter_num  # leave evaluation out of the step timing
            if iter_num >= max_iters:
                break

            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # this step's windows, drawn for all processes at once: process r takes every world-th micro-batch
            starts = torch.randint(len(data["train"]) - block_size, (gradient_accumulation_steps, batch_size),
                                   generator=data_rng).numpy()
            loss_sum = torch.zeros((), device=dev)
            for micro in range(accum):
                x, y = batch(data["train"], starts[micro * world + rank], dev)
                last_micro = micro == accum - 1
                with model.no_sync() if ddp and not last_micro else nullcontext(), autocast:
                    _, loss = model(x, y)
                    loss = loss / accum  # the mean over micro-steps (DDP averages over processes)
                scaler.scale(loss).backward()
                loss_sum += loss.detach()

            # stop together: on a signal in any process, or on a non-finite loss (before it reaches the weights)
            flags = torch.tensor([len(stop), 0 if torch.isfinite(loss_sum) else 1], device=dev)
            if ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[1]:
                raise SystemExit(f"error: the loss became {loss_sum.item()} at step {iter_num}; stopped without "
                                 f"saving, so {out_dir}/last.pt keeps the last good weights; try a lower "
                                 f"--learning_rate or check the data")
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1

            if iter_num % log_interval == 0:
                if ddp:  # the mean over all processes' batches, as one process would report it
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                dt = (time.perf_counter() - t0) / max(1, iter_num - t0_iter)  # over the steps since the last line
                mfu = f"{flops_per_token * tokens_per_iter / dt / peak / world:.1%}" if peak else "n/a"
                log(f"iter {iter_num}: loss {loss_sum.item():.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                    f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu}", flush=True)
                t0, t0_iter = time.perf_counter(), iter_num
            if flags[0]:
                save(["last.pt"])
                log(f"saved {out_dir}/last.pt at step {iter_num}; continue with --init_from=resume")
                raise SystemExit(130)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    if device_type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB on the GPU"
    elif sys.platform != "win32":  # the peak resident memory of this process: KiB on Linux, bytes on macOS
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        memory = f"{rss:,.0f} MiB peak RSS"
    else:
        memory = "peak memory n/a"
    log(f"done: {iter_num} steps in {time.perf_counter() - t_start:.1f} s, best val loss {best_val_loss:.4f}, "
        f"{memory}", flush=True)
    if master and sample_length > 0:
        from generate import sample_text

        tok = tokenizers.from_dict(meta["tokenizer"])
        start = tok.chars[0] if isinstance(tok, tokenizers.CharTokenizer) else "\n"  # sorted: "\n" if there is one
        log("-" * 40 + " a sample " + "-" * 40)
        try:
            sample_text(raw_model, tok, start, sample_length, seed=seed)
        except KeyboardInterrupt:  # the checkpoints are already written
            raise SystemExit(130)


def rng_state(data_rng, ddp):
    """Every random state a step can touch, as tensors and plain values, so that a resumed run draws the same
    numbers as an unbroken one. Dropout differs per process, so under DDP every process's torch state is kept."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)
    states = [(torch.get_rng_state(), cuda)]
    if ddp:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (torch.get_rng_state(), cuda))
    _, keys, *rest = np.random.get_state()  # ('MT19937', 624 uint32 keys, position, gauss flag, gauss)
    return {"python": list(random.getstate()[1]), "numpy": [torch.from_numpy(keys.astype(np.int64)), *rest],
            "torch": [s[0] for s in states], "cuda": [s[1] for s in states], "data": data_rng.get_state()}


def set_rng_state(state, data_rng, rank):
    random.setstate((3, tuple(state["python"]), None))
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    r = rank if rank < len(state["torch"]) else 0  # resuming on more processes than saved: reuse the first
    torch.set_rng_state(state["torch"][r])
    if torch.cuda.is_available() and state["cuda"][r].numel():
        torch.cuda.set_rng_state(state["cuda"][r])
    data_rng.set_state(state["data"])


if __name__ == "__main__":
    main(sys.argv[1:])
