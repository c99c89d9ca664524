r"""
train.py: train a GPT (gpt.py) on the token ids that prepare.py wrote.

    python train.py                                   # a Shakespeare model in minutes on a CPU, then a sample
    python train.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --dropout=0.2 --batch_size=64 \
        --learning_rate=1e-3 --max_iters=5000 --min_lr=1e-4 --eval_interval=250 --eval_iters=200 \
        --rope=False --zero_init=False --muon=False   # on a GPU: the classic 6 x 384 run, GPT-2's recipe
    python train.py --init_from=resume                # continue the run in out_dir exactly where it stopped
    python train.py --init_from=out/best.pt --data_dir=data/new --out_dir=out-new --lora_rank=8   # adapt a model
    torchrun --standalone --nproc_per_node=8 train.py --gradient_accumulation_steps=8   # the same on 8 GPUs

Reads data_dir/train.bin, val.bin and meta.json (preparing them first if data_dir is a default one and empty).
Writes to out_dir: config.json (the resolved settings), last.pt (at every evaluation, at the end, and on Ctrl-C),
best.pt (whenever the val loss improves) and log.jsonl (a JSON object per progress line and evaluation, which
`python look.py curves` draws). Settings are the globals below: override them as --key=value or with a config
file of `key = value` lines (see configurator.py).

Read it in order: the settings; then the idea (a batch, the learning rate, the optimizers, one step, evaluation,
the loop, and main(), the run from start to end); then, below one banner, the machinery a real run needs
(settings from a checkpoint or a base model, several processes, saving and resuming, the log, Ctrl-C, progress).
"""

import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import configurator
import prepare
import tokenizer as tokenizers
from checkpoint import (MODEL_KEYS, base_reference, base_settings, load_base, load_checkpoint, model_from_checkpoint,
                        optimizer_states, resumed_settings, rng_state, set_rng_state)
from configurator import UserError
from files import make_folder, remove_stale_temporaries, write_atomically
from gpt import GPT2_SIZES, GPT, GPTConfig
from lora import LAYERS, adapter_state, add_adapters
from muon import Muon
from progress import LogFile, Progress, cpu_matmul_flops, peak_memory

# -----------------------------------------------------------------------------
# where from, where to
data_dir = "data/char"  # prepared data: train.bin, val.bin, meta.json
out_dir = "out"  # checkpoints, config.json and log.jsonl
init_from = "scratch"  # 'scratch', 'resume' (continue out_dir/last.pt), or fine-tune a train.py checkpoint
#                        (path/to/best.pt) or GPT-2: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a folder
#                        with a GPT-2's config.json and model.safetensors
# the model (when resuming or fine-tuning, the checkpoint's shape is used; block_size may crop its positions).
# In a few minutes on a CPU, a small model taking many small steps beats a bigger one taking few (docs/speed.md)
n_layer = 6  # transformer blocks: depth
n_head = 4  # attention heads per block
n_embd = 64  # width of the residual stream; cost grows with its square
block_size = 64  # context length in tokens; attention cost grows with it
dropout = 0.0  # regularisation; helps bigger models on small data (0.2 for the 6-layer GPU run)
bias = True  # biases in Linear and LayerNorm layers, as in GPT-2
fused_attention = True  # attention in one fused kernel; False trains your edited attend() in gpt.py (slower)
# past GPT-2's architecture (gpt.py's GPTConfig explains each). On by default: what docs/speed.md measured to pay
# in minutes on a CPU. Fine-tuning takes its base's architecture, and AdamW, unless these are given
rope = True  # rotary position embeddings instead of a learned position table
rmsnorm = False  # RMSNorm instead of LayerNorm
qk_norm = False  # normalised queries and keys in attention
relu2 = False  # ReLU^2 instead of GELU in the MLP
zero_init = True  # output projections start at zero
tie_embeddings = True  # lm_head shares the token embedding's table
# fine-tuning with low-rank adapters (lora.py): the base model stays frozen and only the adapters train, at
# learning_rate on its schedule; checkpoints hold the adapters and a reference to the base
lora_rank = 0  # rank of each adapter: more, closer to full fine-tuning; 0: no adapters, every weight trains
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_layers = "all"  # which linear layers of each block get adapters: 'attn', 'mlp' or 'all'
# batches
batch_size = 16  # sequences per micro-step (per process under torchrun)
gradient_accumulation_steps = 1  # micro-steps per optimizer step, counted over all processes
# the optimizers, on one schedule: linear warmup, cosine decay
learning_rate = 5e-3  # AdamW's peak learning rate; small models take large steps
max_iters = 2500  # optimizer steps in the whole run; more steps, lower loss, longer wait
lr_decay_iters = 0  # steps over which the lr decays to min_lr; 0: max_iters (kept when a resume adds steps)
warmup_iters = 100  # steps of linear warmup from 0 to learning_rate
min_lr = 1e-4  # AdamW's lr at the end of the decay
weight_decay = 0.1  # AdamW's, on the matrices and embeddings it trains: with muon, only the token embedding
#                     (which the tied lm_head shares); without, every matrix too. Never biases or gains
beta1 = 0.9  # AdamW momentum
beta2 = 0.99  # AdamW second-moment decay; 0.99 suits small batches better than GPT-2's 0.95
grad_clip = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
muon = True  # Muon for the weight matrices inside the blocks (muon.py), AdamW for embeddings, gains and biases
muon_learning_rate = 0.01  # Muon's peak lr: the same curve as AdamW's, scaled to this peak
muon_momentum = 0.95  # Muon's (Nesterov) momentum
muon_weight_decay = 0.0  # Muon's decoupled decay of the blocks' matrices; 0: none (weight_decay is AdamW's)
# evaluation and logging
eval_interval = 500  # evaluate, and write checkpoints, every this many steps
eval_iters = 25  # batches per evaluation, from fixed, evenly spaced windows of each split
log_interval = 100  # print a progress line every this many steps
sample_length = 500  # characters/tokens of text to print at the end (0 for none)
eval_sample_length = 0  # characters/tokens of text to print at every evaluation, to watch it improve (0 for none)
# system
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16' or 'float16' (autocast; float16 adds a GradScaler)
compile = False  # torch.compile the model: faster steps after a compile that costs a minute or more
seed = 1337  # same seed and settings on a CPU: the same run, step for step
# -----------------------------------------------------------------------------

# processes: torchrun starts one per device and tells each where it stands; a plain `python train.py` is one
DDP = "RANK" in os.environ
RANK, LOCAL_RANK, WORLD_SIZE = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
MASTER = RANK == 0  # only this process prints and writes checkpoints


def log(*args, **kwargs):
    if MASTER:
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# The idea: batches of text, the learning rate, the optimizers, one step, evaluation, the loop


def batch(data, offsets, device):
    """Inputs and next-token targets, both (B, T), from windows of block_size + 1 tokens starting at `offsets`;
    or, for conversations (sft.py), the conversations numbered `offsets`, a row each, with targets only where the
    assistant speaks (prepare.Conversations)."""
    if isinstance(data, prepare.Conversations):
        x, y = map(torch.from_numpy, data.rows(offsets, block_size))
    else:
        window = torch.from_numpy(data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T + 1)
        x, y = window[:, :-1], window[:, 1:]
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def rows_in(data):
    """How many different rows a batch can draw from a split: the starts of its windows, or its conversations."""
    return len(data) if isinstance(data, prepare.Conversations) else len(data) - block_size


def get_lr(it):
    """AdamW's lr at step `it`: linear warmup to learning_rate, cosine decay to min_lr over lr_decay_iters, then
    min_lr. Every other optimizer follows the same curve, scaled to its own peak (step() does that)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizers(model, device_type):
    """{name: (optimizer, its peak lr)}, each trainable parameter in one: with muon, Muon takes the weight matrices
    inside the blocks; AdamW takes the rest, decaying those with dim >= 2 (matrices, embeddings), never biases or
    gains. step(), save() and restore() loop over this dict: an optimizer swapped or added here trains, saves and
    resumes like the others."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied lm_head is wte: counted once
    matrices = [p for name, p in model.named_parameters() if muon and p.requires_grad and p.dim() == 2 and ".h." in name]
    params = [p for p in params if not any(p is m for m in matrices)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for the whole update
    optimizers = {"adamw": (torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused),
                            learning_rate)}
    if muon:
        optimizers["muon"] = (Muon(matrices, lr=muon_learning_rate, momentum=muon_momentum,
                                   weight_decay=muon_weight_decay), muon_learning_rate)
    return optimizers


def step(model, optimizers, scaler, autocast, train_data, data_rng, it, dev, stop):
    """Optimizer step `it` over gradient_accumulation_steps micro-batches; returns the mean loss (a tensor).
    The step's windows are drawn for all processes at once, and process r takes every WORLD_SIZE-th micro-batch."""
    starts = torch.randint(rows_in(train_data), (gradient_accumulation_steps, batch_size), generator=data_rng).numpy()
    accum = gradient_accumulation_steps // WORLD_SIZE  # micro-steps in this process
    loss_sum = torch.zeros((), device=dev)
    for micro in range(accum):
        x, y = batch(train_data, starts[micro * WORLD_SIZE + RANK], dev)
        sync = not DDP or micro == accum - 1  # DDP averages the gradients over processes on the last one only
        with nullcontext() if sync else model.no_sync(), autocast:
            _, loss = model(x, y)
            loss = loss / accum  # the mean over micro-steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    stop_together(stop, loss_sum, it, dev)  # on Ctrl-C in any process, or on a loss that is not finite

    if grad_clip > 0:
        for optimizer, _ in optimizers.values():
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = get_lr(it)
    for optimizer, peak in optimizers.values():
        for group in optimizer.param_groups:  # AdamW at lr; another optimizer at the same point of its own curve
            group["lr"] = lr if peak == learning_rate else lr / learning_rate * peak if learning_rate else 0.0
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    return loss_sum


@torch.no_grad()
def evaluate(model, data, autocast, dev):
    """The mean loss of each split over the same evenly spaced windows every time, shared out between processes."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        n = min(eval_iters * batch_size, rows_in(data[split]))
        starts = np.linspace(0, rows_in(data[split]) - 1, n).astype(np.int64)[RANK::WORLD_SIZE]
        total = torch.zeros(2, device=dev)  # (sum of losses, number of windows)
        for i in range(0, len(starts), batch_size):
            x, y = batch(data[split], starts[i : i + batch_size], dev)
            with autocast:
                _, loss = model(x, y)
            total += torch.stack([loss.float() * len(x), torch.tensor(len(x), device=dev)])
        if DDP:
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
    model.train()
    return losses


def train(model, raw_model, optimizers, data, run, progress, dev):
    """The loop: evaluate and save every eval_interval steps and at the end, take one optimizer step, print a
    progress line every log_interval steps. `model` takes the steps (compiled, or wrapped for several processes);
    `raw_model`, the plain module, is evaluated and saved. True if Ctrl-C or SIGTERM stopped it (last.pt saved)."""
    autocast = nullcontext() if dtype == "float32" else torch.autocast(dev.split(":")[0], getattr(torch, dtype))
    with StopRequests() as stop:
        while True:
            if run.iter_num % eval_interval == 0 or run.iter_num == max_iters:
                losses = evaluate(raw_model, data, autocast, dev)  # not through DDP's hooks or a recompile
                improved = losses["val"] < run.best_val_loss
                run.best_val_loss = min(run.best_val_loss, losses["val"])
                report(losses, improved, run, progress.log_file)
                save(["last.pt", "best.pt"] if improved else ["last.pt"], raw_model, optimizers, run)
                if MASTER and eval_sample_length > 0:
                    print_sample(raw_model, run.meta, eval_sample_length)
                progress.restart(run.iter_num)  # leave evaluation out of the step timing
            if run.iter_num >= max_iters:
                return False
            loss = step(model, optimizers, run.scaler, autocast, data["train"], run.data_rng, run.iter_num, dev, stop)
            run.iter_num += 1
            if run.iter_num % log_interval == 0:
                progress.log(run.iter_num, loss, get_lr(run.iter_num - 1), run.seconds())
            if stop:
                save(["last.pt"], raw_model, optimizers, run)
                log(f"saved {out_dir}/last.pt at step {run.iter_num}; continue with --init_from=resume")
                return True


@configurator.script
def main(args):
    """The run: settings, processes, data, model, optimizers, the loop, and a sample of what the model learned."""
    ckpt, dev = configure(args)  # every setting is applied here: the flags, then a resumed run's or a base's
    if DDP:  # join the other processes: NCCL between GPUs, gloo between CPU processes
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    try:
        meta, data = load_dataset()
        torch.manual_seed(seed + RANK)  # the initial weights, then dropout: different in every process
        raw_model = build_model(ckpt, meta, dev)
        optimizers = make_optimizers(raw_model, dev.split(":")[0])
        run = start_run(ckpt, optimizers, meta, dev)  # step 0, or where the checkpoint left every state
        model = torch.compile(raw_model) if compile else raw_model
        if DDP:  # processes start from process 0's weights and average their gradients at every step
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.startswith("cuda") else None)
        write_settings(dev)
        progress = start_progress(raw_model, run, dev)  # its lines, and log.jsonl begun (or cut back to the step)
        stopped = train(model, raw_model, optimizers, data, run, progress, dev)
        if not stopped:
            finish(raw_model, run, dev)  # the last line, and a sample
        if DDP:  # finish together, stopped or not: process 0 may still be saving or sampling, and torchrun ends
            dist.barrier()  # the others as soon as one exits
    finally:
        if DDP:
            dist.destroy_process_group()
    if stopped:
        raise SystemExit(130)


# -----------------------------------------------------------------------------
# --- machinery: settings from a checkpoint or a base, processes, data and model, saving and resuming, Ctrl-C,
# --- the progress lines and log (progress.py)


DEFAULT_DATA = {os.path.join("data", t): t for t in ("char", "bpe", "gpt2")}  # data train.py may prepare itself


def configure(args):
    """Apply every setting, here and nowhere else: the flags, then what a resumed run (its own settings) or a
    base model (its shape and switches) brings, then what 'auto' and 0 stand for. Returns the checkpoint to resume
    from (or None) and the device this process trains on."""
    overridden = configurator.configure(globals(), args)
    flags = {k: globals()[k] for k in overridden}
    ckpt = None
    if init_from == "resume":  # the run continues with its saved settings; flags given now (--max_iters) win
        path = os.path.join(out_dir, "last.pt")
        ckpt = load_checkpoint(path)
        saved = resumed_settings(ckpt, path, flags)
        globals().update({k: v for k, v in saved.items() if k in configurator.setting_names(globals())})
    elif init_from != "scratch":  # fine-tuning: the weights bring their architecture, and AdamW trains them
        if init_from not in GPT2_SIZES and not os.path.exists(init_from):
            raise UserError(f"--init_from={init_from} is unknown; use scratch, resume, a checkpoint's path, a GPT-2 "
                            f"size ({', '.join(GPT2_SIZES)}), or a folder with a GPT-2's config.json and "
                            f"model.safetensors")
        globals().update(base_settings(init_from, flags))
    dev = pick_device()
    globals().update(lr_decay_iters=lr_decay_iters or max_iters,  # fixed now: a resume that adds steps stays at min_lr
                     dtype=resolve_precision(dev))
    check_settings()
    return ckpt, dev


def check_settings():
    """Catch the settings that would otherwise fail with a traceback deep inside the run."""
    configurator.check_at_least(globals(), dict(
        n_layer=1, n_head=1, n_embd=1, block_size=1, batch_size=1, gradient_accumulation_steps=1, eval_interval=1,
        eval_iters=1, log_interval=1, max_iters=0, warmup_iters=0, lr_decay_iters=0, learning_rate=0, min_lr=0,
        weight_decay=0, muon_weight_decay=0, grad_clip=0, sample_length=0, eval_sample_length=0))
    configurator.check_seed(seed)
    if init_from == "scratch" and lora_rank:
        raise UserError(f"--lora_rank={lora_rank} adapts a trained model, and --init_from=scratch has none; pass "
                        f"--init_from=path/to/best.pt or a GPT-2, or drop --lora_rank")
    if init_from != "resume" and os.path.realpath(init_from) in (os.path.realpath(os.path.join(out_dir, n))
                                                                 for n in ("best.pt", "last.pt")):
        raise UserError(f"--init_from={init_from} lies in --out_dir={out_dir}, whose checkpoints this run writes "
                        f"over; pass another --out_dir")
    if n_embd % n_head:
        raise UserError(f"--n_embd={n_embd} must be a multiple of --n_head={n_head}")
    if rope and n_embd // n_head % 2:
        raise UserError(f"--rope=True turns pairs of dimensions, so the head size (n_embd / n_head = "
                        f"{n_embd // n_head}) must be even; change --n_embd or --n_head, or pass --rope=False")
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout={dropout} must be in [0, 1)")
    if min_lr > learning_rate:
        raise UserError(f"--min_lr={min_lr} is above --learning_rate={learning_rate}; the lr decays to min_lr, so "
                        f"give a smaller one")
    if lora_rank < 0 or lora_alpha <= 0 or lora_layers not in LAYERS:
        raise UserError(f"--lora_rank={lora_rank}, --lora_alpha={lora_alpha}, --lora_layers={lora_layers}: the rank "
                        f"must be >= 0 (0: no adapters), alpha > 0, and the layers one of {', '.join(LAYERS)}")
    if gradient_accumulation_steps % WORLD_SIZE:
        raise UserError(f"--gradient_accumulation_steps={gradient_accumulation_steps} is the total over "
                        f"{WORLD_SIZE} processes and must be a multiple of {WORLD_SIZE}")


def pick_device():
    """The device this process trains on: the setting's, or under torchrun on GPUs, the process's own GPU."""
    if DDP and configurator.pick_device(device).startswith("cuda"):
        if LOCAL_RANK >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes than this machine has GPUs "
                            f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()}")
        return configurator.pick_device(f"cuda:{LOCAL_RANK}")
    return configurator.pick_device(device)


def resolve_precision(dev):
    """The dtype setting, with 'auto' resolved: bf16 autocast where it is fast, fp16 + loss scaling on GPUs
    without bf16, fp32 otherwise. A CPU gains from bf16 only with bf16 matrix units and only for wide models, so
    'auto' takes it there when the model is at least 256 wide and a bf16 matmul beats fp32 by half again."""
    wide = dtype == "auto" and dev == "cpu" and n_embd >= 256
    fast = wide and cpu_matmul_flops(torch.bfloat16) > 1.5 * cpu_matmul_flops(torch.float32)
    if dev.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # the fp32 matmuls autocast leaves may use TF32 tensor cores
    return configurator.pick_dtype(dtype, dev, default="bfloat16" if fast else "float32")


def load_dataset():
    """meta.json and both splits of data_dir, prepared first if data_dir is a default one and empty."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and data_dir not in DEFAULT_DATA:
        raise UserError(f"no prepared data in {data_dir}; run python prepare.py --data_dir={data_dir}")
    if not os.path.exists(meta_path) and LOCAL_RANK == 0:  # one process per machine prepares it
        prepare.prepare(tokenizer=DEFAULT_DATA[data_dir], data_dir=data_dir)
    if DDP:
        dist.barrier()  # every process, whether or not it found the data: the others wait for it
    meta = prepare.read_meta(data_dir)
    data = {split: prepare.load_split(data_dir, split, meta, block_size) for split in ("train", "val")}
    if "conversations" in meta:  # sft.py's: a conversation a row
        cut, skipped = (sum(getattr(d, k) for d in data.values()) for k in ("cut", "skipped"))
        log(f"conversations: {len(data['train']):,} train, {len(data['val']):,} val; {cut} cut after an answer and "
            f"{skipped} left out, longer than block_size={block_size}")
    return meta, data


def build_model(ckpt, meta, dev):
    """The GPT the settings describe: new, resumed, or a base to fine-tune (with low-rank adapters when
    lora_rank > 0); attention fused or written out as fused_attention says."""
    if ckpt:
        if ckpt["tokenizer"] != meta["tokenizer"]:
            raise UserError(f"the data in {data_dir} was tokenized differently from the checkpoint in {out_dir}; "
                            f"pass the --data_dir the run was trained on")
        model = model_from_checkpoint(ckpt, os.path.join(out_dir, "last.pt"), dropout)  # a LoRA run's: base + adapters
    elif init_from == "scratch":
        model = GPT(GPTConfig(vocab_size=meta["vocab_size"], **{k: globals()[k] for k in MODEL_KEYS}))
    else:
        model, tokenizer = load_base(init_from, dropout)
        # conversations for a base model: the data's tokenizer is the base's plus the chat template's tokens
        grow = meta["tokenizer"]["type"] == "chat" and (tokenizer or {}).get("type") != "chat"
        expected = meta["tokenizer"]["base"] if grow else meta["tokenizer"]
        if tokenizer is None and model.config.vocab_size != tokenizers.from_dict(expected).vocab_size:
            raise UserError(f"{init_from} has a vocabulary of {model.config.vocab_size} but the data in {data_dir} "
                            f"has {meta['vocab_size']}; use --data_dir=data/gpt2 (prepared on first use) or data that "
                            f"python prepare.py --tokenizer=gpt2 wrote")
        if tokenizer is not None and tokenizer != expected:
            raise UserError(f"the data in {data_dir} was tokenized differently from {init_from}; prepare it with that "
                            f"model's tokenizer: python prepare.py --input=FILE --tokenizer=<the data_dir it was "
                            f"trained on> --data_dir=NEW_DIR")
        if block_size > model.config.block_size:
            raise UserError(f"--block_size={block_size} is longer than {init_from}'s {model.config.block_size} "
                            f"positions")
        model.crop_block_size(block_size)
        if grow:  # new rows for the template's tokens; the old tokens' logits stay as they were
            model.add_tokens(meta["vocab_size"])
        if lora_rank:  # freeze every weight, and train adapters on the linear layers (and new rows' table)
            add_adapters(model, lora_rank, lora_alpha, lora_layers, torch.Generator().manual_seed(seed), grow)
    return model.use_fused_attention(fused_attention).to(dev)


@dataclass
class Run:
    """Where the run stands, besides its weights and optimizers: what a checkpoint saves to continue exactly."""

    meta: dict  # the data's meta.json: its tokenizer goes into every checkpoint
    scaler: torch.amp.GradScaler  # float16's loss scale (disabled in other precisions)
    data_rng: torch.Generator  # draws every batch: the same in all processes
    lora: dict | None  # a LoRA run's adapter settings and base (checkpoint.base_reference); None otherwise
    iter_num: int = 0
    best_val_loss: float = math.inf
    started: float = field(default_factory=time.perf_counter)  # moved back by a resumed run's seconds

    def seconds(self):
        """Seconds of training so far, those of the run it resumes included."""
        return time.perf_counter() - self.started


def start_run(ckpt, optimizers, meta, dev):
    """A new run at step 0, or the resumed one, with its optimizers and every random state put back."""
    lora = None
    if lora_rank:  # the adapters' checkpoints name their base, by name or absolute path, and its sha256
        lora = ckpt["lora"] if ckpt else dict(rank=lora_rank, alpha=lora_alpha, layers=lora_layers,
                                              **base_reference(init_from))
    run = Run(meta, torch.amp.GradScaler(dev.split(":")[0], enabled=dtype == "float16"),
              torch.Generator().manual_seed(seed), lora)
    if ckpt:
        restore(ckpt, optimizers, run)
    return run


def save(names, model, optimizers, run):
    """Write everything needed to rebuild the model and continue the run exactly to out_dir/name, for each name
    (for a LoRA run, the adapters and the `lora` record instead of every weight). Every process takes part (each
    one's random state is gathered); only one writes."""
    weights = dict(model=adapter_state(model), lora=run.lora) if run.lora else dict(model=model.state_dict())
    state = dict(**weights, optimizers={name: opt.state_dict() for name, (opt, _) in optimizers.items()},
                 scaler=run.scaler.state_dict(), model_config=asdict(model.config), precision=dtype,
                 tokenizer=run.meta["tokenizer"], config=current_settings(), iter_num=run.iter_num,
                 best_val_loss=run.best_val_loss, seconds=run.seconds(), rng=rng_state(run.data_rng))
    for name in names if MASTER else ():
        write_atomically(os.path.join(out_dir, name), lambda f: torch.save(state, f))


def restore(ckpt, optimizers, run):
    """Put the optimizers' states, the grad scaler, the step, the best val loss and every random state back where
    the checkpoint left them. Each optimizer keeps the hyperparameters given now (a new --weight_decay, say)."""
    try:
        for name, state in optimizer_states(ckpt, optimizers).items():
            optimizer = optimizers[name][0]
            given = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(state)  # the moments, and the hyperparameters saved with them
            for group, settings in zip(optimizer.param_groups, given):
                group.update(settings)
        if ckpt["scaler"]:  # empty unless the run used float16
            run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], run.data_rng, RANK)
        run.iter_num, run.best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        run.started -= float(ckpt.get("seconds", 0.0))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{out_dir}/last.pt holds a damaged optimizer, iteration or random state "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}); resume from an "
                        f"earlier copy, or start a new run with --init_from=scratch --out_dir=NEW_DIR")
    ckpt.clear()  # free the loaded tensors before training


def write_settings(dev):
    """out_dir/config.json: every setting as this run resolved it, and where it runs. Temporaries that killed
    runs left in out_dir go first."""
    if MASTER:
        make_folder(out_dir)
        remove_stale_temporaries(out_dir)
        text = json.dumps(dict(current_settings(), device=dev, world_size=WORLD_SIZE), indent=2)
        write_atomically(os.path.join(out_dir, "config.json"), lambda f: f.write(text.encode("utf-8")))


def current_settings():
    return {k: globals()[k] for k in configurator.setting_names(globals())}


def start_progress(model, run, dev):
    log_file = LogFile(os.path.join(out_dir, "log.jsonl") if MASTER else None,
                       run.iter_num if init_from == "resume" else None)
    progress = Progress(model, dev, dtype, batch_size * gradient_accumulation_steps * block_size, WORLD_SIZE,
                        log_file, show=MASTER)
    progress.restart(run.iter_num)
    return progress


def report(losses, improved, run, log_file):
    """An evaluation's line and log row; a loss that is not finite stops the run before it is saved."""
    if not all(map(math.isfinite, losses.values())):
        raise UserError(f"the {'val' if math.isfinite(losses['train']) else 'train'} loss is not finite at step "
                        f"{run.iter_num}; stopped without saving these weights")
    log(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        f"{' (best)' if improved else ''}, {run.seconds():.1f} s", flush=True)
    log_file.append(step=run.iter_num, seconds=run.seconds(), train_loss=losses["train"], val_loss=losses["val"])


def stop_together(stop, loss_sum, it, dev):
    """Every process learns whether any of them got a signal or a non-finite loss, so that all stop at the same
    step: to save, or (for the loss, before it reaches the weights) with an error. What is agreed here decides in
    every process: a signal that lands after it waits for the next step."""
    flags = torch.tensor([len(stop.signals), 0 if torch.isfinite(loss_sum) else 1], device=dev)
    if DDP:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop.agreed = bool(flags[0])
    if flags[1]:
        raise UserError(f"the loss became {loss_sum.item()} at step {it}; stopped without saving, so "
                        f"{out_dir}/last.pt keeps the last good weights; try a lower --learning_rate or check the data")


class StopRequests:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save; a second Ctrl-C quits at once.
    True once every process has agreed to stop (stop_together sets `agreed`); the old handlers come back when the
    loop ends."""

    def __enter__(self):
        self.signals, self.agreed = [], False
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def on_signal(self, signum, frame):
        if self.signals:
            print("\ninterrupted again: quitting without saving", file=sys.stderr)
            os._exit(130)
        self.signals.append(signum)
        log(f"\ninterrupted: saving {out_dir}/last.pt after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    def __bool__(self):
        return self.agreed

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def finish(model, run, dev):
    """The last line (steps, time, best val loss, peak memory) and a sample of what the model learned."""
    log(f"done: {run.iter_num} steps in {run.seconds():.1f} s, best val loss {run.best_val_loss:.4f}, "
        f"{peak_memory(dev.split(':')[0])}", flush=True)
    if MASTER and sample_length > 0:
        print_sample(model, run.meta, sample_length, fast=True)


def print_sample(model, meta, length, fast=False):
    """`length` tokens of text from the model, starting from a newline (or the first character). The sample draws
    from a generator of its own, so training goes on exactly as without it, and the model is back in train mode
    after. fast: the CPU's faster one-row products (fast_linear.py), for the sample at the end."""
    from fast_linear import use_slab_products
    from generate import sample_text

    tok = tokenizers.from_dict(meta["tokenizer"])
    start = tok.chars[0] if isinstance(tok, tokenizers.CharTokenizer) else "\n"  # sorted: "\n" if there is one
    log("-" * 40 + " a sample " + "-" * 40)
    if fast:
        use_slab_products(model)
    try:
        sample_text(model, tok, start, length, seed=seed)
    except KeyboardInterrupt:  # the checkpoints are already written
        raise SystemExit(130)
    model.train()


def run_process(args):
    """main(args) in one of torchrun's processes, which then ends with os._exit, whatever happened.

    The interpreter's own shutdown is not safe here. DDP imports torch.distributed.nn, whose functions take the
    process group as a default argument, so the group and gloo's worker threads outlive destroy_process_group.
    A worker that is late letting go of a finished collective (on a busy machine) frees tensors that Python made,
    which needs the GIL; a shutting-down interpreter ends such a thread inside a destructor that may not throw:
    'terminate called without an active exception', SIGABRT. So every process leaves by this path: once main()
    has met the others at its barrier (or failed) and torn the group down, it prints what Python would, flushes
    and exits. An error in another process reaches this one as a lost connection in a collective: one line."""
    code = 1
    try:
        main(args)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException as e:
        if isinstance(e, RuntimeError) and "gloo/transport" in str(e):
            print(f"error: another process of this run stopped (its error is above), so process {RANK} stops too",
                  file=sys.stderr)
        else:  # a bug, or Ctrl-C before the loop: reported as Python would
            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if DDP:
        run_process(sys.argv[1:])
    else:
        main(sys.argv[1:])
