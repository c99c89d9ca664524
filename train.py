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
file of `key = value` lines (see configurator.py). The functions read the settings from there; everything else
they need comes in as arguments.

The run, in the order of main(): settings -> processes and device -> data -> model -> precision and optimizer ->
the loop (evaluate and save, step, log) -> the end (a sample).
"""

import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import bench
import configurator
import prepare
import tokenizer as tokenizers
from files import make_folder, remove_stale_temporaries, write_atomically
from gpt import GPT2_SIZES, GPT, GPTConfig
from muon import Muon
from checkpoint import base_reference, load_base, load_checkpoint, model_from_checkpoint, rng_state, set_rng_state
from lora import LAYERS, adapter_state, add_adapters

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
# AdamW with linear warmup and cosine decay
learning_rate = 5e-3  # peak learning rate; small models take large steps
max_iters = 2500  # optimizer steps in the whole run; more steps, lower loss, longer wait
lr_decay_iters = 0  # steps over which the lr decays to min_lr; 0: max_iters (kept when a resume adds steps)
warmup_iters = 100  # steps of linear warmup from 0 to learning_rate
min_lr = 1e-4  # the lr at the end of the decay
weight_decay = 0.1  # applied to matrices and embeddings only, never to biases or LayerNorm gains
beta1 = 0.9  # AdamW momentum
beta2 = 0.99  # AdamW second-moment decay; 0.99 suits small batches better than GPT-2's 0.95
grad_clip = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
muon = True  # Muon for the blocks' weight matrices (muon.py), AdamW for embeddings, gains and biases
muon_learning_rate = 0.01  # Muon's peak lr, on the same warmup and decay as learning_rate
muon_momentum = 0.95  # Muon's (Nesterov) momentum
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

SWITCHES = ("rope", "rmsnorm", "qk_norm", "relu2", "zero_init", "tie_embeddings")  # GPTConfig's, past GPT-2
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", *SWITCHES)
DEFAULT_DATA = {os.path.join("data", t): t for t in ("char", "bpe", "gpt2")}  # data train.py may prepare itself

# processes: torchrun starts one per device and tells each where it stands; a plain `python train.py` is one
DDP = "RANK" in os.environ
RANK, LOCAL_RANK, WORLD_SIZE = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
MASTER = RANK == 0  # only this process prints and writes checkpoints


def log(*args, **kwargs):
    if MASTER:
        print(*args, **kwargs)


def main(args):
    ckpt = configure(args)
    dev = start_processes()
    try:
        stopped = train(ckpt, dev)
        if DDP:  # finish together, stopped or not: process 0 may still be saving or sampling, and torchrun ends
            dist.barrier()  # the others as soon as one exits
    finally:
        if DDP:
            dist.destroy_process_group()
    if stopped:
        raise SystemExit(130)


def train(ckpt, dev):
    """The run, once the settings and processes are in place; True if a signal stopped it (last.pt saved)."""
    # data and model
    meta, data = load_dataset()
    torch.manual_seed(seed + RANK)  # dropout differs per process; DDP copies process 0's initial weights to all
    model = build_model(ckpt, meta, dev)
    lora = lora_record(ckpt)  # a LoRA run's checkpoints: the adapters and the base they belong to; else None

    # precision and optimizer, and where a resumed run left them
    device_type, precision = dev.split(":")[0], resolve_precision(model, dev)
    autocast = nullcontext() if precision == "float32" else torch.autocast(device_type, getattr(torch, precision))
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    optimizers = make_optimizers(model, device_type)
    data_rng = torch.Generator().manual_seed(seed)  # draws every batch: the same in all processes
    iter_num, best_val_loss, seconds = restore(ckpt, optimizers, scaler, data_rng) if ckpt else (0, math.inf, 0.0)

    # compiled, and wrapped for several processes; raw_model stays the plain module that checkpoints save
    raw_model = model
    if compile:
        model = torch.compile(model)
    if DDP:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if device_type == "cuda" else None)
    write_settings(dev)
    start_log(iter_num)

    # the loop: evaluate and save every eval_interval steps, then one optimizer step, with a progress line
    progress = Progress(raw_model, dev, iter_num, seconds)
    with StopRequests() as stop:
        while True:
            if iter_num % eval_interval == 0 or iter_num == max_iters:
                losses = evaluate(raw_model, data, autocast, dev)  # not through DDP's hooks or a recompile
                if not all(map(math.isfinite, losses.values())):
                    raise SystemExit(f"error: the {'val' if math.isfinite(losses['train']) else 'train'} loss is "
                                     f"not finite at step {iter_num}; stopped without saving these weights")
                improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    f"{' (best)' if improved else ''}, {progress.elapsed():.1f} s", flush=True)
                append_log(step=iter_num, seconds=progress.elapsed(), train_loss=losses["train"],
                           val_loss=losses["val"])
                save(["last.pt", "best.pt"] if improved else ["last.pt"], raw_model, lora, optimizers, scaler,
                     data_rng, meta, iter_num, best_val_loss, progress.elapsed())
                if MASTER and eval_sample_length > 0:
                    print_sample(raw_model, meta, eval_sample_length)
                progress.restart(iter_num)  # leave evaluation out of the step timing
            if iter_num >= max_iters:
                break
            loss = step(model, optimizers, scaler, autocast, data["train"], data_rng, iter_num, dev, stop)
            iter_num += 1
            if iter_num % log_interval == 0:
                progress.log(iter_num, loss, get_lr(iter_num - 1))
            if stop:
                save(["last.pt"], raw_model, lora, optimizers, scaler, data_rng, meta, iter_num, best_val_loss,
                     progress.elapsed())
                log(f"saved {out_dir}/last.pt at step {iter_num}; continue with --init_from=resume")
                return True

    # the end: how long it took, and a sample of what the model learned
    log(f"done: {iter_num} steps in {progress.elapsed():.1f} s, best val loss {best_val_loss:.4f}, "
        f"{bench.peak_memory(device_type)}", flush=True)
    if MASTER and sample_length > 0:
        print_sample(raw_model, meta, sample_length, fast=True)
    return False


# -----------------------------------------------------------------------------
# settings, processes, data, model, precision, optimizer


def configure(args):
    """Apply the flags to the settings above (for --init_from=resume, on top of the run's own settings), check
    them, and return the checkpoint to resume from, or None."""
    overridden = configurator.configure(globals(), args)
    ckpt = None
    if init_from == "resume":  # the run continues with its saved settings; flags given now (--max_iters) win
        ckpt = load_checkpoint(os.path.join(out_dir, "last.pt"))
        run_state = ("optimizer", "scaler", "rng", "iter_num", "best_val_loss", "config")
        missing = [k for k in run_state if k not in ckpt]
        if missing or not isinstance(ckpt["config"], dict):
            raise SystemExit(f"error: {out_dir}/last.pt lacks {', '.join(missing) or 'its settings'}, so the run cannot "
                             f"continue exactly; sample from it with generate.py, or start a new run with "
                             f"--init_from=scratch --out_dir=NEW_DIR")
        for k, v in ckpt["config"].items():
            if k in globals() and k not in overridden and k != "init_from":
                globals()[k] = v
        if dtype == "auto" and "precision" in ckpt:  # the precision it chose, not a new choice by a new probe
            globals()["dtype"] = ckpt["precision"]
        fixed = {k: ckpt["model_config"].get(k, getattr(GPTConfig, k)) for k in MODEL_KEYS}
        fixed["muon"] = ckpt["config"].get("muon", False)  # which optimizer holds which moments
        adapters = ckpt.get("lora", dict(rank=0, alpha=lora_alpha, layers=lora_layers))  # which weights train
        fixed.update(lora_rank=adapters["rank"], lora_alpha=adapters["alpha"], lora_layers=adapters["layers"])
        clash = [k for k in fixed if k in overridden and globals()[k] != fixed[k]]
        if clash:
            saved = ", ".join(f"{k}={fixed[k]}" for k in clash)
            raise SystemExit(f"error: the checkpoint in {out_dir} has {saved}; drop those flags to resume, "
                             f"or start a new run with --init_from=scratch --out_dir=NEW_DIR")
    elif init_from != "scratch" and init_from not in GPT2_SIZES and not os.path.exists(init_from):
        raise SystemExit(f"error: --init_from={init_from} is unknown; use scratch, resume, a checkpoint's path, a "
                         f"GPT-2 size ({', '.join(GPT2_SIZES)}), or a folder with a GPT-2's config.json and "
                         f"model.safetensors")
    elif init_from == "scratch" and lora_rank:
        raise SystemExit(f"error: --lora_rank={lora_rank} adapts a trained model, and --init_from=scratch has none; "
                         f"pass --init_from=path/to/best.pt or a GPT-2, or drop --lora_rank")
    elif init_from != "scratch" and os.path.realpath(init_from) in (os.path.realpath(os.path.join(out_dir, name))
                                                                   for name in ("best.pt", "last.pt")):
        raise SystemExit(f"error: --init_from={init_from} lies in --out_dir={out_dir}, whose checkpoints this run "
                         f"writes over; pass another --out_dir")
    if init_from not in ("scratch", "resume"):  # fine-tuning: the weights bring their own architecture
        for k in SWITCHES:
            if k not in overridden:
                globals()[k] = None  # the base's, once build_model has loaded it
        if "muon" not in overridden:  # and AdamW fine-tunes them, as they were trained, unless asked otherwise
            globals()["muon"] = False
    if lr_decay_iters == 0:  # fixed now and saved: resuming with a larger --max_iters goes on at min_lr
        globals()["lr_decay_iters"] = max_iters
    check_settings()
    return ckpt


def check_settings():
    """Catch the settings that would otherwise fail with a traceback deep inside the run."""
    configurator.check_at_least(globals(), dict(
        n_layer=1, n_head=1, n_embd=1, block_size=1, batch_size=1, gradient_accumulation_steps=1, eval_interval=1,
        eval_iters=1, log_interval=1, max_iters=0, warmup_iters=0, lr_decay_iters=0, learning_rate=0, min_lr=0,
        weight_decay=0, grad_clip=0, sample_length=0, eval_sample_length=0))
    configurator.check_seed(seed)
    if n_embd % n_head:
        raise SystemExit(f"error: --n_embd={n_embd} must be a multiple of --n_head={n_head}")
    if rope and n_embd // n_head % 2:
        raise SystemExit(f"error: --rope=True turns pairs of dimensions, so the head size (n_embd / n_head = "
                         f"{n_embd // n_head}) must be even; change --n_embd or --n_head, or pass --rope=False")
    if not 0 <= dropout < 1:
        raise SystemExit(f"error: --dropout={dropout} must be in [0, 1)")
    if min_lr > learning_rate:
        raise SystemExit(f"error: --min_lr={min_lr} is above --learning_rate={learning_rate}; the lr decays to "
                         f"min_lr, so give a smaller one")
    if lora_rank < 0 or lora_alpha <= 0 or lora_layers not in LAYERS:
        raise SystemExit(f"error: --lora_rank={lora_rank}, --lora_alpha={lora_alpha}, --lora_layers={lora_layers}: "
                         f"the rank must be >= 0 (0: no adapters), alpha > 0, and the layers one of "
                         f"{', '.join(LAYERS)}")
    if gradient_accumulation_steps % WORLD_SIZE:
        raise SystemExit(f"error: --gradient_accumulation_steps={gradient_accumulation_steps} is the total over "
                         f"{WORLD_SIZE} processes and must be a multiple of {WORLD_SIZE}")


def start_processes():
    """The device this process trains on; under torchrun, one GPU per process and a process group."""
    dev = configurator.pick_device(device)
    if DDP and dev.startswith("cuda"):
        if LOCAL_RANK >= torch.cuda.device_count():
            raise SystemExit(f"error: torchrun started more processes than this machine has GPUs "
                             f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()}")
        dev = configurator.pick_device(f"cuda:{LOCAL_RANK}")
    if DDP:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return dev


def load_dataset():
    """meta.json and both splits of data_dir, prepared first if data_dir is a default one and empty."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and data_dir not in DEFAULT_DATA:
        raise SystemExit(f"error: no prepared data in {data_dir}; run python prepare.py --data_dir={data_dir}")
    if not os.path.exists(meta_path) and LOCAL_RANK == 0:  # one process per machine prepares it
        prepare.prepare(tokenizer=DEFAULT_DATA[data_dir], data_dir=data_dir)
    if DDP:
        dist.barrier()  # every process, whether or not it found the data: the others wait for it
    meta = prepare.read_meta(data_dir)
    return meta, {split: prepare.load_split(data_dir, split, meta, block_size) for split in ("train", "val")}


def build_model(ckpt, meta, dev):
    """A new GPT, the resumed one, or one to fine-tune (a checkpoint's or GPT-2's, with low-rank adapters when
    lora_rank > 0); its shape is recorded in the settings."""
    if ckpt:
        if ckpt["tokenizer"] != meta["tokenizer"]:
            raise SystemExit(f"error: the data in {data_dir} was tokenized differently from the checkpoint in "
                             f"{out_dir}; pass the --data_dir the run was trained on")
        model = model_from_checkpoint(ckpt, os.path.join(out_dir, "last.pt"))  # a LoRA run's: base + adapters
    elif init_from == "scratch":
        model = GPT(GPTConfig(vocab_size=meta["vocab_size"], **{k: globals()[k] for k in MODEL_KEYS}))
    else:  # fine-tuning: the shape comes with the weights
        model, tokenizer = load_base(init_from, dropout)
        changed = [k for k in SWITCHES if globals()[k] is not None and globals()[k] != getattr(model.config, k)]
        if changed:
            raise SystemExit(f"error: --{changed[0]}={globals()[changed[0]]} changes the architecture, and the "
                             f"weights of {init_from} need their own; drop it to fine-tune them")
        if tokenizer is None and model.config.vocab_size != meta["vocab_size"]:
            raise SystemExit(f"error: {init_from} has a vocabulary of {model.config.vocab_size} but the data in "
                             f"{data_dir} has {meta['vocab_size']}; use --data_dir=data/gpt2 (prepared on first "
                             f"use) or data that python prepare.py --tokenizer=gpt2 wrote")
        if tokenizer is not None and tokenizer != meta["tokenizer"]:
            raise SystemExit(f"error: the data in {data_dir} was tokenized differently from {init_from}; prepare "
                             f"it with that model's tokenizer: python prepare.py --input=FILE "
                             f"--tokenizer=<the data_dir it was trained on> --data_dir=NEW_DIR")
        if block_size > model.config.block_size:
            raise SystemExit(f"error: --block_size={block_size} is longer than {init_from}'s "
                             f"{model.config.block_size} positions")
        model.crop_block_size(block_size)
        if lora_rank:  # freeze every weight, and train adapters on the linear layers
            add_adapters(model, lora_rank, lora_alpha, lora_layers, torch.Generator().manual_seed(seed))
    globals().update({k: getattr(model.config, k) for k in MODEL_KEYS})  # what was built, for config.json
    return model.to(dev)


def lora_record(ckpt):
    """What a LoRA run's checkpoints hold besides the adapters: their settings, and the base they belong to (its
    name or absolute path, and its sha256); None for a run without adapters."""
    if not lora_rank:
        return None
    if ckpt:
        return ckpt["lora"]
    return dict(rank=lora_rank, alpha=lora_alpha, layers=lora_layers, **base_reference(init_from))


def resolve_precision(model, dev):
    """The dtype setting, with 'auto' resolved: bf16 autocast where it is fast, fp16 + loss scaling on GPUs
    without bf16, fp32 otherwise. A CPU gains from bf16 only with bf16 matrix units and only for wide models, so
    'auto' takes it there when the model is at least 256 wide and a bf16 matmul beats fp32 by half again."""
    wide = dtype == "auto" and dev == "cpu" and model.config.n_embd >= 256
    fast = wide and bench.cpu_matmul_flops(torch.bfloat16) > 1.5 * bench.cpu_matmul_flops(torch.float32)
    if dev.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # the fp32 matmuls autocast leaves may use TF32 tensor cores
    globals()["dtype"] = configurator.pick_dtype(dtype, dev, default="bfloat16" if fast else "float32")
    return dtype


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


def make_optimizers(model, device_type):
    """[AdamW], with weight decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm gains; with
    --muon=True, [AdamW, Muon], Muon taking the weight matrices inside the blocks."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for name, p in model.named_parameters() if muon and p.requires_grad and p.dim() == 2 and ".h." in name]
    params = [p for p in params if not any(p is m for m in matrices)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for the whole update
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused)
    return [adamw, Muon(matrices, lr=muon_learning_rate, momentum=muon_momentum)] if muon else [adamw]


def save(names, model, lora, optimizers, scaler, data_rng, meta, iter_num, best_val_loss, seconds):
    """Write everything needed to rebuild the model and continue the run exactly to out_dir/name, for each name
    (for a LoRA run, the adapters and the `lora` record instead of every weight). Every process takes part (each
    one's random state is gathered); only one writes."""
    adamw, *rest = optimizers
    weights = dict(model=adapter_state(model), lora=lora) if lora else dict(model=model.state_dict())
    state = dict(**weights, optimizer=adamw.state_dict(), scaler=scaler.state_dict(),
                 **({"muon": rest[0].state_dict()} if rest else {}),
                 model_config=asdict(model.config), precision=dtype, tokenizer=meta["tokenizer"],
                 config=current_settings(), iter_num=iter_num, best_val_loss=best_val_loss, seconds=seconds,
                 rng=rng_state(data_rng))
    for name in names if MASTER else ():
        write_atomically(os.path.join(out_dir, name), lambda f: torch.save(state, f))


def restore(ckpt, optimizers, scaler, data_rng):
    """Put the optimizers, the grad scaler and every random state back where the checkpoint left them; return
    (iter_num, best_val_loss, seconds of training so far)."""
    adamw, *rest = optimizers
    try:
        adamw.load_state_dict(ckpt["optimizer"])  # its moments, and the hyperparameters it was saved with:
        for group, decay in zip(adamw.param_groups, (weight_decay, 0.0)):  # those given now win
            group.update(weight_decay=decay, betas=(beta1, beta2))
        if rest:
            rest[0].load_state_dict(ckpt["muon"])
            rest[0].param_groups[0].update(momentum=muon_momentum)
        if ckpt["scaler"]:  # empty unless the run used float16
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], data_rng, RANK)
        iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        seconds = float(ckpt.get("seconds", 0.0))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {out_dir}/last.pt holds a damaged optimizer, iteration or random state "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}); resume from an "
                         f"earlier copy, or start a new run with --init_from=scratch --out_dir=NEW_DIR")
    ckpt.clear()  # free the loaded tensors before training
    return iter_num, best_val_loss, seconds


def start_log(iter_num):
    """Begin out_dir/log.jsonl: empty for a new run; for a resumed one, the rows up to its checkpoint at step
    iter_num, so that no step appears twice or goes missing (the evaluation at iter_num runs again)."""
    if not MASTER:
        return
    path, rows = os.path.join(out_dir, "log.jsonl"), []
    if init_from == "resume" and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    step = row["step"]
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill, say
                    break
                if step < iter_num or (step == iter_num and "val_loss" not in row):
                    rows.append(row)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def append_log(**row):
    """One more row of out_dir/log.jsonl, written before the checkpoint that covers it."""
    if MASTER:
        with open(os.path.join(out_dir, "log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# the loop: batches, the learning rate, one step, evaluation


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


def step(model, optimizers, scaler, autocast, train_data, data_rng, it, dev, stop):
    """Optimizer step `it` over gradient_accumulation_steps micro-batches; returns the mean loss (a tensor).
    The step's windows are drawn for all processes at once, and process r takes every WORLD_SIZE-th micro-batch."""
    adamw, *rest = optimizers
    for group in adamw.param_groups:
        group["lr"] = get_lr(it)
    for group in rest[0].param_groups if rest else ():  # Muon: the same schedule, scaled to its own peak
        group["lr"] = get_lr(it) / learning_rate * muon_learning_rate if learning_rate else 0.0
    starts = torch.randint(len(train_data) - block_size, (gradient_accumulation_steps, batch_size),
                           generator=data_rng).numpy()
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

    # stop together: on a signal in any process, or on a non-finite loss (before it reaches the weights). What
    # was agreed here decides, in every process: a signal that lands after it waits for the next step
    flags = torch.tensor([len(stop.signals), 0 if torch.isfinite(loss_sum) else 1], device=dev)
    if DDP:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop.agreed = bool(flags[0])
    if flags[1]:
        raise SystemExit(f"error: the loss became {loss_sum.item()} at step {it}; stopped without saving, so "
                         f"{out_dir}/last.pt keeps the last good weights; try a lower --learning_rate or check the data")
    if grad_clip > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
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
        n = min(eval_iters * batch_size, len(data[split]) - block_size)
        starts = np.linspace(0, len(data[split]) - block_size - 1, n).astype(np.int64)[RANK::WORLD_SIZE]
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


class StopRequests:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save; a second Ctrl-C quits at once.
    True once every process has agreed to stop (step() sets `agreed`); the old handlers come back when the loop
    ends."""

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


class Progress:
    """Times the steps between progress lines (evaluations left out), and prints loss, lr, speed and MFU: the
    model's FLOPs per second over the device's peak (see bench.py). elapsed() counts on from a resumed run's
    seconds."""

    def __init__(self, model, dev, iter_num, seconds=0.0):
        self.tokens_per_iter = batch_size * gradient_accumulation_steps * block_size
        self.flops_per_iter = bench.flops_per_token(model) * self.tokens_per_iter
        self.peak = bench.peak_flops(dev.split(":")[0], getattr(torch, dtype))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = f" ({trainable:,} of them trainable)" if trainable < model.num_params() else ""
        log(f"{model.num_params() / 1e6:.2f}M parameters{frozen} on {dev} ({dtype}, {WORLD_SIZE} process"
            f"{'es' * (WORLD_SIZE > 1)}), {self.tokens_per_iter:,} tokens per step")
        self.t_start = time.perf_counter() - seconds
        self.restart(iter_num)

    def elapsed(self):
        return time.perf_counter() - self.t_start

    def restart(self, iter_num):
        self.t0, self.iter0 = time.perf_counter(), iter_num

    def log(self, iter_num, loss, lr):
        if DDP:  # the mean over all processes' batches, as one process would report it
            dist.all_reduce(loss)
            loss /= WORLD_SIZE
        dt = (time.perf_counter() - self.t0) / max(1, iter_num - self.iter0)  # per step since the last line
        mfu = f"{self.flops_per_iter / dt / self.peak / WORLD_SIZE:.1%}" if self.peak else "n/a"
        log(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
            f"{self.tokens_per_iter / dt:,.0f} tok/s, mfu {mfu}", flush=True)
        append_log(step=iter_num, seconds=self.elapsed(), loss=loss.item(), lr=lr,
                   tokens_per_s=self.tokens_per_iter / dt)
        self.restart(iter_num)


def print_sample(model, meta, length, fast=False):
    """`length` tokens of text from the model, starting from a newline (or the first character). The sample draws
    from a generator of its own, so training goes on exactly as without it, and the model is back in train mode
    after. fast: the CPU's faster one-row products (generate.py), for the sample at the end."""
    from generate import sample_text, use_slab_products

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
