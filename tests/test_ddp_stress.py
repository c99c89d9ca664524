"""Every way a torchrun run ends, on a machine too busy to run gloo's threads on time: to the end (with the data
prepared by process 0 while process 1 waits, and with a single-process checkpoint resumed), stopped by SIGTERM to
one process or Ctrl-C to torchrun, and failed in one process. No process aborts or hangs; they stop together."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from test_ddp import TINY

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux's SCHED_IDLE")

BUSY = """
# train.py as torchrun runs it, on a machine too busy to run gloo's threads on time: all of the process's threads
# share one CPU, and gloo's run only while the main thread waits (SCHED_IDLE). A worker that finishes a collective
# then lets go of it only after the main thread has moved on, as a loaded machine can make any worker do
import os, runpy, sys
import torch.distributed as dist

def init_process_group(*args, **kwargs):
    real_init(*args, **kwargs)
    cpu = {int(os.environ["LOCAL_RANK"]) % os.cpu_count()}
    for thread in map(int, os.listdir("/proc/self/task")):
        os.sched_setaffinity(thread, cpu)
        with open(f"/proc/self/task/{thread}/comm") as f:
            if "gloo" in f.read():
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))

real_init, dist.init_process_group = dist.init_process_group, init_process_group
with open(f"pid{os.environ['RANK']}", "w") as f:
    f.write(str(os.getpid()))
sys.path.insert(0, os.path.dirname(sys.argv[1]))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def busy_torchrun(*args, cwd):
    (cwd / "busy.py").write_text(BUSY, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(cwd / "busy.py"), os.path.join(ROOT, "train.py"), *TINY, "--batch_size=4",
               "--gradient_accumulation_steps=2", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ended(process, cwd):
    """(stdout, stderr, the exit codes torchrun reports for its failed processes) of a run that ended on its own,
    after checking that no process aborted and none had to be killed."""
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a hang: kill the training processes (pid0, pid1 name them), then torchrun
        for pid_file in cwd.glob("pid*"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        pytest.fail(f"the run hung:\n{process.communicate()[1]}")
    codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)]
    assert "terminate called" not in stderr and -signal.SIGABRT not in codes, stderr
    assert "forcefully exiting" not in stderr, stderr  # torchrun's SIGKILL, 30 s after a process did not stop
    return stdout, stderr, codes


def iter_num(path):
    return torch.load(path, weights_only=True)["iter_num"]


def wait_for_training(process):
    """Read process 0's output up to its first progress line."""
    for line in process.stdout:
        if line.startswith("iter "):
            return
    pytest.fail("the run ended before its first step")


def test_runs_that_end_on_their_own_end_together(corpus):
    # with the data prepared by process 0 while process 1 waits at the barrier
    run = busy_torchrun("--max_iters=2", "--eval_interval=2", cwd=corpus)
    stdout, stderr, _ = ended(run, corpus)
    assert run.returncode == 0 and "done: 2 steps" in stdout, stderr
    assert stderr.count("written to data/char") == 1 and iter_num(corpus / "out" / "last.pt") == 2

    # a single-process checkpoint resumed under torchrun
    one = run_script("train.py", *TINY, "--max_iters=1", "--eval_interval=100", "--out_dir=one", cwd=corpus)
    assert one.returncode == 0, one.stderr
    run = busy_torchrun("--init_from=resume", "--out_dir=one", "--max_iters=2", cwd=corpus)
    stdout, stderr, _ = ended(run, corpus)
    assert run.returncode == 0 and "done: 2 steps" in stdout, stderr
    assert iter_num(corpus / "one" / "last.pt") == 2


def test_a_signal_stops_every_process_after_the_same_step(corpus):
    # SIGTERM to process 1: every process stops after the same step, saves, and exits with 130 (torchrun may end
    # one that has saved and is on its way out with a SIGTERM of its own)
    run = busy_torchrun("--max_iters=100000", "--eval_interval=100000", "--out_dir=term", cwd=corpus)
    wait_for_training(run)
    os.kill(int((corpus / "pid1").read_text()), signal.SIGTERM)
    stdout, stderr, codes = ended(run, corpus)
    saved = re.findall(r"saved term/last.pt at step (\d+)", stdout)
    assert len(saved) == 1 and iter_num(corpus / "term" / "last.pt") == int(saved[0]), stdout + stderr
    assert 130 in codes and set(codes) <= {130, -signal.SIGTERM}, stderr

    # Ctrl-C: torchrun passes SIGINT on to every process, which stop the same way, in time (before its SIGKILL)
    run = busy_torchrun("--max_iters=100000", "--eval_interval=100000", "--out_dir=int", cwd=corpus)
    wait_for_training(run)
    run.send_signal(signal.SIGINT)
    stdout, stderr, _ = ended(run, corpus)
    saved = re.findall(r"saved int/last.pt at step (\d+)", stdout)
    assert len(saved) == 1 and iter_num(corpus / "int" / "last.pt") == int(saved[0]), stdout + stderr


def test_a_failure_in_one_process_ends_the_others_with_one_line(corpus):
    (corpus / "out" / "last.pt").mkdir(parents=True)  # process 0 cannot write its first checkpoint
    run = busy_torchrun("--max_iters=4", "--eval_interval=2", cwd=corpus)
    stdout, stderr, codes = ended(run, corpus)
    assert run.returncode != 0 and 'train.py", line' not in stderr, stderr  # no process printed a traceback
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: cannot write out/last.pt"), stderr
    # process 1, in its next collective, finds process 0 gone and says so, unless torchrun's SIGTERM ended it first
    assert errors[1:] == ["error: another process of this run stopped (its error is above), so process 1 stops "
                          "too"] or -signal.SIGTERM in codes, stderr
    assert set(codes) <= {1, -signal.SIGTERM}, stderr
