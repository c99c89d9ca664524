"""train.py under torchrun: two CPU processes (gloo) train exactly like one, and share checkpoints with it."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, run_script

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=0", "--learning_rate=1e-2", "--sample_length=0"]


def torchrun(*args, cwd, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def load(path):
    return torch.load(path, weights_only=True)


def logged_losses(stdout):
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines() if line.startswith("iter")]


def test_two_processes_train_a_model_whose_checkpoint_works_everywhere(corpus):
    result = torchrun(*TINY, "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=6",
                      "--eval_interval=3", cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert "(float32, 2 processes)" in result.stdout and result.stdout.count("step 6:") == 1  # only rank 0 logs
    ckpt = load(corpus / "out" / "last.pt")
    assert ckpt["iter_num"] == 6 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert len(ckpt["rng"]["torch"]) == 2  # each process's dropout stream, for an exact resume

    sample = run_script("generate.py", "--init_from=out/last.pt", "--max_new_tokens=20", cwd=corpus)
    assert sample.returncode == 0 and len(sample.stdout) > 20, sample.stderr
    resumed = run_script("train.py", "--init_from=resume", "--max_iters=8", cwd=corpus)  # one process takes over
    assert resumed.returncode == 0, resumed.stderr
    assert load(corpus / "out" / "last.pt")["iter_num"] == 8


def test_a_step_on_two_processes_equals_one_process_on_the_whole_batch(corpus):
    # bias=False: the key bias's true gradient is exactly zero (softmax ignores a shift shared by all keys), and
    # Adam would blow its float noise, which differs with the order of the sums, up to a full-size update
    common = [*TINY, "--max_iters=1", "--eval_interval=100", "--bias=False"]
    one = run_script("train.py", *common, "--batch_size=8", "--out_dir=one", cwd=corpus)
    two = torchrun(*common, "--batch_size=4", "--gradient_accumulation_steps=2", "--out_dir=two", cwd=corpus)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = load(corpus / "one" / "last.pt")["model"], load(corpus / "two" / "last.pt")["model"]
    # Adam's first step moves each weight by about lr (1e-2) in the direction of its gradient's sign: wrong or
    # unsynchronised batches would move many weights differently by that much. Agreement to 1% of a step leaves
    # room only for the few weights whose gradient is near Adam's eps, where summation order shows.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), k
    assert sum((a[k] - b[k]).abs().gt(1e-6).sum().item() for k in a) <= 3
    assert logged_losses(one.stdout) == logged_losses(two.stdout)  # same batches, same mean loss, to 4 decimals

    # and a single-process checkpoint continues under torchrun
    more = torchrun("--init_from=resume", "--out_dir=one", "--max_iters=3", "--gradient_accumulation_steps=2",
                    cwd=corpus)
    assert more.returncode == 0, more.stderr
    assert load(corpus / "one" / "last.pt")["iter_num"] == 3


def test_gradient_accumulation_must_divide_among_the_processes(corpus):
    result = torchrun(*TINY, "--max_iters=1", "--gradient_accumulation_steps=3", cwd=corpus)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "--gradient_accumulation_steps=3 is the total over 2 processes" in errors[0]


RECORDER = """
# train.py as torchrun runs it, recording in order: each micro-step's forward through DDP ("micro"), each
# gradient synchronisation (DDP's last bucket: "sync"), each optimizer step ("step"); and the first dropout mask
import json, os, runpy, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook

events, masks = [], []
real_init, real_forward = DistributedDataParallel.__init__, DistributedDataParallel.forward
real_dropout = torch.nn.functional.dropout

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self.register_comm_hook(None, synchronise)

def synchronise(state, bucket):
    if bucket.is_last():
        events.append("sync")
    return allreduce_hook(state, bucket)

def forward(self, *args, **kwargs):
    events.append("micro")
    return real_forward(self, *args, **kwargs)

def dropout(x, p=0.5, training=True, inplace=False):
    out = real_dropout(x, p, training, inplace)
    if training and p > 0 and not masks:
        masks.append(((out == 0) & (x != 0)).flatten().tolist())
    return out

def destroy_process_group():  # written here: train.py's processes leave with os._exit once the group is gone
    with open(f"events{os.environ['RANK']}.json", "w") as f:
        json.dump(dict(events=events, mask=masks[0]), f)
    real_destroy()

DistributedDataParallel.__init__, DistributedDataParallel.forward = init, forward
torch.nn.functional.dropout = dropout
real_destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, destroy_process_group
register_optimizer_step_pre_hook(lambda *args: events.append("step"))
sys.path.insert(0, os.path.dirname(sys.argv[1]))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_processes_synchronise_gradients_once_per_step_and_draw_their_own_dropout(corpus):
    (corpus / "recorder.py").write_text(RECORDER, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(corpus / "recorder.py"), os.path.join(ROOT, "train.py"), *TINY, "--batch_size=4",
               "--gradient_accumulation_steps=4", "--max_iters=3", "--eval_interval=100", "--dropout=0.2",
               "--muon=True"]
    result = subprocess.run(command, cwd=corpus, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = [json.loads((corpus / f"events{rank}.json").read_text()) for rank in (0, 1)]
    for run in runs:  # 4 micro-steps over 2 processes: 2 each, one all-reduce of the gradients per step, and
        assert run["events"] == ["micro", "micro", "sync", "step", "step"] * 3  # then AdamW's step and Muon's
    mask0, mask1 = (torch.tensor(run["mask"]) for run in runs)
    assert 0.1 < mask0.float().mean() < 0.3 and 0.1 < mask1.float().mean() < 0.3  # dropout 0.2 of the activations
    assert (mask0 != mask1).float().mean() > 0.2  # masks drawn independently: they differ in about 32% of places
