"""train.py under torchrun: two CPU processes (gloo) train exactly like one, and share checkpoints with it."""

import os
import subprocess
import sys

import torch

from conftest import ROOT, one_error_line, run_script

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
