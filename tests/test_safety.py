"""Checkpoints you can trust and errors you can act on: resume, interrupts, kills, poisoned files, bad input."""

import importlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import GPT2_RECIPE, ROOT, one_error_line, run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--warmup_iters=2", "--learning_rate=1e-2", "--sample_length=0"]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def start(args, cwd):
    """Start train.py as a user would, with its output (stdout and stderr together) readable line by line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(process, text):
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}:\n{''.join(lines)}")


# -----------------------------------------------------------------------------
# resume and determinism


def test_a_resumed_run_is_bit_identical_to_an_unbroken_one(script, corpus):
    args = [*TINY, "--dropout=0.1", "--gradient_accumulation_steps=2", "--eval_interval=5", "--lr_decay_iters=24"]
    script("train", *args, "--max_iters=24", "--out_dir=straight")
    script("train", *args, "--max_iters=10", "--out_dir=broken")
    script("train", "--init_from=resume", "--max_iters=24", "--out_dir=broken")  # the rest comes from the checkpoint
    a, b = load(corpus / "straight" / "last.pt"), load(corpus / "broken" / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 24
    assert_same_state(a["model"], b["model"])
    for pa, pb in zip(a["optimizers"]["adamw"]["state"].values(), b["optimizers"]["adamw"]["state"].values()):
        assert_same_state(pa, pb)


def test_a_checkpoint_from_before_optimizers_had_names_resumes_bit_identically(script, corpus):
    args = [*TINY, "--dropout=0.1", "--gradient_accumulation_steps=2", "--eval_interval=5", "--lr_decay_iters=12"]
    script("train", *args, "--max_iters=12", "--out_dir=straight")
    script("train", *args, "--max_iters=6", "--out_dir=broken")
    ckpt = load(corpus / "broken" / "last.pt")
    optimizers = ckpt.pop("optimizers")  # the layout of older checkpoints: AdamW's state as "optimizer", Muon's as
    ckpt.update(optimizer=optimizers["adamw"], muon=optimizers["muon"])  # "muon", and none of the newer settings
    for setting in ("fused_attention", "muon_weight_decay"):
        del ckpt["config"][setting]
    torch.save(ckpt, corpus / "broken" / "last.pt")
    script("train", "--init_from=resume", "--max_iters=12", "--out_dir=broken")
    a, b = load(corpus / "straight" / "last.pt"), load(corpus / "broken" / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 12
    assert_same_state(a["model"], b["model"])
    for name in ("adamw", "muon"):
        for pa, pb in zip(a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()):
            assert_same_state(pa, pb)


def test_a_resume_applies_new_optimizer_settings_and_keeps_the_lr_schedule(script, corpus, capsys):
    script("train", *TINY, "--max_iters=20", "--min_lr=1e-4")
    config = load(corpus / "out" / "last.pt")["config"]
    assert config["lr_decay_iters"] == 20  # 0 (the default) was resolved to max_iters and saved
    capsys.readouterr()
    script("train", "--init_from=resume", "--max_iters=26", "--log_interval=2", "--weight_decay=0.5", "--beta2=0.9")
    lrs = [line.split("lr ")[1].split(",")[0] for line in capsys.readouterr().out.splitlines() if "lr " in line]
    assert lrs == ["1.00e-04"] * 3  # past the decay it stays at min_lr: more steps do not stretch the cosine again
    groups = load(corpus / "out" / "last.pt")["optimizers"]["adamw"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.9, 0.9) for g in groups)


def test_a_resumed_run_still_knows_its_best_val_loss(script, corpus, capsys):
    # lr 0.3 makes AdamW's val loss go up and down: best at step 8, worse at 12 (where the first run stops) and 16
    args = [*TINY, *GPT2_RECIPE, "--eval_interval=4", "--learning_rate=0.3", "--lr_decay_iters=40"]
    script("train", *args, "--max_iters=12")
    first = capsys.readouterr().out
    best = (corpus / "out" / "best.pt").read_bytes()
    script("train", "--init_from=resume", "--max_iters=16")
    resumed = capsys.readouterr().out
    vals = [float(v) for v in re.findall(r"^step \d+: .*val loss ([\d.]+)", first + resumed, re.M)]
    assert len(vals) == 6 and min(vals) < min(vals[3:])  # steps 0-12, then 12 again and 16: none beats the first run
    assert "(best)" not in resumed  # the resumed run compares with the best so far, not with nothing
    assert (corpus / "out" / "best.pt").read_bytes() == best
    assert load(corpus / "out" / "last.pt")["best_val_loss"] == pytest.approx(min(vals), abs=1e-4)


def test_every_random_state_survives_a_checkpoint_round_trip(tmp_path):
    import io
    import random

    import checkpoint

    data_rng = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    buffer = io.BytesIO()
    torch.save(checkpoint.rng_state(data_rng), buffer)

    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=data_rng).item()

    first = draw()
    buffer.seek(0)
    checkpoint.set_rng_state(torch.load(buffer, weights_only=True), data_rng, rank=0)
    assert draw() == first


def test_the_same_seed_and_settings_give_the_same_loss_curve(script, capsys):
    def curve(*extra):
        script("train", *TINY, "--max_iters=20", "--log_interval=1", "--eval_interval=10", *extra)
        out = capsys.readouterr().out
        return [line.split(",")[0] for line in out.splitlines() if line.startswith(("iter", "step"))]

    first, second, other = curve(), curve(), curve("--seed=7")
    assert len(first) == 23 and first == second
    assert first != other


def test_ctrl_c_saves_last_and_the_run_resumes_identically(script, corpus):
    args = [*TINY, "--max_iters=200", "--log_interval=1", "--eval_interval=1000"]
    process = start([*args, "--out_dir=broken"], corpus)
    wait_for(process, "iter 20:")
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "Traceback" not in output
    stopped = load(corpus / "broken" / "last.pt")["iter_num"]
    assert 20 <= stopped < 200 and f"saved broken/last.pt at step {stopped}" in output

    script("train", "--init_from=resume", "--out_dir=broken")
    script("train", *args, "--out_dir=straight")
    assert_same_state(load(corpus / "straight" / "last.pt")["model"], load(corpus / "broken" / "last.pt")["model"])


def test_a_second_ctrl_c_quits_at_once_without_saving(corpus):
    big = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=32", "--eval_iters=1"]
    process = start([*big, "--max_iters=1000", "--log_interval=1", "--sample_length=0"], corpus)
    wait_for(process, "iter 2:")
    process.send_signal(signal.SIGINT)
    wait_for(process, "interrupted: saving")
    process.send_signal(signal.SIGINT)  # within the same (slow) step
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "interrupted again" in output and "saved" not in output
    assert load(corpus / "out" / "last.pt")["iter_num"] == 0  # the step-0 checkpoint is untouched


def test_killing_the_trainer_at_random_moments_never_breaks_the_checkpoint(script, corpus):
    rng = random.Random(0)
    args = [*TINY, "--n_embd=64", "--n_layer=2", "--max_iters=100000", "--eval_interval=1", "--eval_iters=1"]
    for attempt in range(4):  # checkpoints are written every step, so many kills land mid-write
        process = start([*args, "--init_from=resume"] if attempt else args, corpus)
        wait_for(process, "step")
        wait_for(process, "step")  # the second evaluation: the first one's checkpoint is on disk
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        ckpt = load(corpus / "out" / "last.pt")  # the previous or the new checkpoint, whole either way
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    script("train", "--init_from=resume", "--max_iters=" + str(ckpt["iter_num"] + 3))
    assert load(corpus / "out" / "last.pt")["iter_num"] == ckpt["iter_num"] + 3


# -----------------------------------------------------------------------------
# what gets loaded, and what gets saved


def test_every_save_goes_to_a_temporary_file_that_is_fsynced_then_renamed_over_the_old_one(script, corpus,
                                                                                            monkeypatch):
    events = []  # ("fsync", inode, size) and ("replace", inode, size, src, dst), in the order they happen
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.stat(src).st_size, os.path.abspath(src),
                       os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    script("train", *TINY, "--max_iters=2", "--eval_interval=1")
    saves = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[4].endswith(".pt")]
    assert [os.path.basename(e[4]) for _, e in saves].count("last.pt") == 3  # steps 0, 1 and 2
    for i, (_, inode, size, src, dst) in saves:
        assert src != dst and os.path.dirname(src) == os.path.dirname(dst)  # a temporary file beside it
        assert ("fsync", inode, size) in events[:i]  # its bytes on the disk, all of them, before the rename
        folder = os.stat(os.path.dirname(dst)).st_ino
        assert any(e[:2] == ("fsync", folder) for e in events[i + 1 :])  # then the rename itself
    assert saves[-1][1][1] == os.stat(saves[-1][1][4]).st_ino  # the last one is the file that is there now


class Payload:
    """Unpickling this object would create a file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_nothing_runs(script, corpus):
    script("train", *TINY, "--max_iters=1")
    ckpt = load(corpus / "out" / "last.pt")
    marker = corpus / "pwned"
    torch.save({**ckpt, "extra": Payload(str(marker))}, corpus / "evil.pt")
    torch.save({**ckpt, "extra": Payload(str(marker))}, corpus / "out" / "last.pt")

    line = one_error_line(run_script("generate.py", "--init_from=evil.pt", cwd=corpus))
    assert "refusing to load evil.pt" in line and "pickled Python objects" in line
    with pytest.raises(SystemExit, match="refusing to load out/last.pt"):
        script("train", "--init_from=resume")
    assert not marker.exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(script, corpus):
    # lr 100 blows up within a few steps (which one depends on the CPU's kernels), long before the first save
    with pytest.raises(SystemExit, match=r"loss became (nan|-?inf) at step [1-9]\d?; stopped without saving"):
        script("train", *TINY, "--max_iters=50", "--learning_rate=100", "--warmup_iters=0")
    for name in ("last.pt", "best.pt"):
        ckpt = load(corpus / "out" / name)
        assert ckpt["iter_num"] == 0 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_resuming_with_another_model_shape_is_a_clear_error(script):
    script("train", *TINY, "--max_iters=1")
    with pytest.raises(SystemExit, match="checkpoint in out has n_layer=1, n_embd=16; drop those flags"):
        script("train", "--init_from=resume", "--n_layer=3", "--n_embd=32")


def test_a_checkpoint_that_contradicts_its_own_model_config_is_a_clear_error(script, corpus):
    script("train", *TINY, "--max_iters=1")
    ckpt = load(corpus / "out" / "last.pt")
    ckpt["model_config"]["n_layer"] = 2
    torch.save(ckpt, corpus / "edited.pt")
    with pytest.raises(SystemExit, match="edited.pt does not match its own model_config"):
        script("generate", "--init_from=edited.pt")


@pytest.mark.parametrize("model_config, message", [
    (None, "bad.pt is not a gpt-from-scratch checkpoint (missing model_config)"),
    ([2, 2, 16], "bad.pt is not a gpt-from-scratch checkpoint (missing model_config)"),
    ({"n_layers": 1}, "bad.pt does not match its own model_config"),
    ({"n_layer": "one"}, "bad.pt does not match its own model_config"),
    ({"n_head": 0}, "bad.pt does not match its own model_config"),
])
def test_a_checkpoint_whose_model_config_is_missing_or_malformed_is_one_line(script, corpus, model_config, message):
    script("train", *TINY, "--max_iters=1")
    ckpt = load(corpus / "out" / "last.pt")
    if model_config is None:
        del ckpt["model_config"]
    elif isinstance(model_config, dict):
        ckpt["model_config"].update(model_config)
    else:
        ckpt["model_config"] = model_config
    torch.save(ckpt, corpus / "bad.pt")
    with pytest.raises(SystemExit) as e:
        script("generate", "--init_from=bad.pt")
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    if model_config is None:  # and as a user meets it
        assert message in one_error_line(run_script("generate.py", "--init_from=bad.pt", cwd=corpus))


def test_a_prompt_file_that_is_not_utf8_is_one_line(script, corpus):
    script("train", *TINY, "--max_iters=1")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    line = one_error_line(run_script("generate.py", "--init_from=out/last.pt", "--prompt=FILE:latin1.txt", cwd=corpus))
    assert "cannot read the prompt file latin1.txt (UnicodeDecodeError); give a UTF-8 text file" in line


def test_resuming_on_data_with_another_vocabulary_is_a_clear_error(script, corpus):
    script("train", *TINY, "--max_iters=1")
    (corpus / "other.txt").write_text("0123456789 +-*/=\n" * 500, encoding="utf-8")
    importlib.import_module("prepare").prepare(input="other.txt", data_dir="data/digits")
    with pytest.raises(SystemExit, match="data in data/digits was tokenized differently"):
        script("train", "--init_from=resume", "--data_dir=data/digits")


# -----------------------------------------------------------------------------
# bad input: one line that says what to do, and a non-zero exit


def test_mistakes_end_in_one_line_and_a_non_zero_exit(corpus):
    assert "unknown setting --n_layers (did you mean --n_layer?)" in one_error_line(
        run_script("train.py", "--n_layers=2", cwd=corpus))
    assert "--top_p=2.0 is out of range" in one_error_line(run_script("generate.py", "--top_p=2", cwd=corpus))


@pytest.mark.parametrize("args, message", [
    (["--n_layers=2"], "unknown setting --n_layers"),
    (["--n_layer=2.5"], "--n_layer must be int"),
    (["--learning_rate=fast"], "is not a Python literal"),
    (["--data_dir=nowhere"], "no prepared data in nowhere"),
    (["--init_from=resume", "--out_dir=empty"], "no checkpoint at empty/last.pt"),
    (["--init_from=gpt7"], "--init_from=gpt7 is unknown"),
    (["--block_size=100000"], "too few for --block_size=100000"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 must be a multiple of --n_head=4"),
    (["--n_embd=30", "--n_head=2"], "the head size (n_embd / n_head = 15) must be even"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--learning_rate=-1"], "--learning_rate=-1.0 must be at least 0"),
    (["--learning_rate=True"], "--learning_rate must be float (like 0.01), got True"),
    (["--dropout=1.5"], "--dropout=1.5 must be in [0, 1)"),
    (["--min_lr=0.1", "--learning_rate=0.01"], "--min_lr=0.1 is above --learning_rate=0.01"),
    (["--dtype=float16", "--device=cpu"], "--dtype=float16 needs a CUDA GPU, and this runs on cpu"),
    (["--dtype=int8"], "--dtype=int8 is unknown"),
    (["--device=tpu"], "--device=tpu is not a device"),
])
def test_train_rejects_bad_settings(script, args, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        script("train", *TINY, "--max_iters=1", *args)


def test_train_rejects_a_truncated_or_corrupted_bin_file(script, corpus):
    importlib.import_module("prepare").prepare()
    train_bin = corpus / "data" / "char" / "train.bin"
    good = train_bin.read_bytes()
    train_bin.write_bytes(good[:-3])
    with pytest.raises(SystemExit, match=r"train.bin has \d+ bytes but meta.json says \d+ uint16 tokens"):
        script("train", *TINY, "--max_iters=1")
    train_bin.write_bytes(good[:-2] + np.array([65535], dtype=np.uint16).tobytes())
    with pytest.raises(SystemExit, match="holds token id 65535 >= vocab_size"):
        script("train", *TINY, "--max_iters=1")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_truncated_or_corrupted_checkpoint_is_a_clear_error(script, corpus, damage):
    script("train", *TINY, "--max_iters=1")
    path = corpus / "out" / "last.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b""}[damage])
    with pytest.raises(SystemExit, match="out/last.pt is not a readable checkpoint"):
        script("generate", "--init_from=out/last.pt")
    with pytest.raises(SystemExit, match="out/last.pt is not a readable checkpoint"):
        script("train", "--init_from=resume")


@pytest.mark.parametrize("args, message", [
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be at least 1"),
    (["--max_new_tokens=-5"], "--max_new_tokens=-5 must be at least 1"),
    (["--top_p=0"], "--top_p=0.0 is out of range: give above 0"),
    (["--top_p=1.5"], "--top_p=1.5 is out of range"),
    (["--temperature=-1"], "--temperature=-1.0 is out of range: give from 0"),
    (["--top_k=-1"], "--top_k=-1 is out of range: give from 0"),
    (["--num_samples=0"], "--num_samples=0 must be at least 1"),
    (["--dtype=int8"], "--dtype=int8 is unknown"),
    (["--dtype=float16", "--device=cpu"], "--dtype=float16 needs a CUDA GPU"),
    (["--init_from=out"], "out is a train.py run, not a GPT-2; sample from it with python generate.py"),
    (["--prompt=FILE:nope.txt"], "cannot read the prompt file nope.txt"),
    (["--prompt=日本"], "outside this model's vocabulary: '日' '本'"),
    (["--init_from=missing.pt"], "no checkpoint at missing.pt"),
])
def test_generate_rejects_bad_settings(script, args, message):
    script("train", *TINY, "--max_iters=1")
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("]", r"\]")):
        script("generate", "--init_from=out/last.pt", *args)


@pytest.mark.parametrize("switch", ["--rope=True", "--rmsnorm=True", "--qk_norm=True", "--relu2=True",
                                    "--zero_init=True", "--tie_embeddings=False", "--muon=True", "all"])
def test_each_switch_past_gpt2_trains_and_resumes_bit_identically(script, corpus, switch):
    every = ["--rope=True", "--rmsnorm=True", "--qk_norm=True", "--relu2=True", "--zero_init=True",
             "--tie_embeddings=False", "--muon=True"]
    args = [*TINY, *GPT2_RECIPE, "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=12",
            *(every if switch == "all" else [switch])]
    script("train", *args, "--max_iters=12", "--out_dir=straight")
    script("train", *args, "--max_iters=6", "--out_dir=broken")
    script("train", "--init_from=resume", "--max_iters=12", "--out_dir=broken")
    a, b = load(corpus / "straight" / "last.pt"), load(corpus / "broken" / "last.pt")
    assert_same_state(a["model"], b["model"])
    assert a["optimizers"].keys() == ({"adamw", "muon"} if "--muon=True" in args else {"adamw"})
    for name in a["optimizers"]:
        for pa, pb in zip(a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()):
            assert_same_state(pa, pb)
    on = {k.split("=")[0][2:]: k.endswith("True") for k in (every if switch == "all" else [switch])}
    assert all(a["model_config"].get(k, a["config"].get(k)) == v for k, v in on.items())
    baseline = load(corpus / "straight" / "last.pt")  # and the switch changed what was trained
    script("train", *TINY, *GPT2_RECIPE, "--dropout=0.1", "--eval_interval=4", "--max_iters=12", "--out_dir=plain")
    plain = load(corpus / "plain" / "last.pt")
    assert plain["model"].keys() != baseline["model"].keys() or any(
        not torch.equal(plain["model"][k], baseline["model"][k]) for k in plain["model"])


def test_resuming_with_another_optimizer_or_architecture_is_a_clear_error(script):
    script("train", *TINY, "--max_iters=1", "--muon=True", "--rope=False")
    with pytest.raises(SystemExit, match="checkpoint in out has muon=True; drop those flags"):
        script("train", "--init_from=resume", "--muon=False")
    with pytest.raises(SystemExit, match="checkpoint in out has rope=False; drop those flags"):
        script("train", "--init_from=resume", "--rope=True")
