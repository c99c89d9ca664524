"""The training step, pinned from outside: train.py's real main() against a reference step written out here in
plain PyTorch, a golden loss trajectory, and direct checks of the batches, the learning rate the optimizer runs
at, gradient accumulation and clipping."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import gpt
from conftest import small_text
from muon import Muon

# a tiny run of GPT-2's recipe (its architecture, and AdamW alone) that goes through every part of the step:
# dropout, two micro-steps per step, both weight-decay groups, warmup (steps 0-2), the cosine (3-6), the floor
# after it (7-9), and a gradient norm above grad_clip at steps 0 and 1 only, so that the clipped and the
# unclipped step are both taken
GPT2_RECIPE = dict(rope=False, zero_init=False, muon=False)  # train.py's defaults go past GPT-2's
RUN = dict(**GPT2_RECIPE, n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.1, bias=True, batch_size=4,
           gradient_accumulation_steps=2, learning_rate=1e-2, min_lr=1e-3, warmup_iters=3, lr_decay_iters=7,
           max_iters=10, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, seed=1337)


def train_in_process(folder, **settings):
    """Run train.py's main() in `folder` (which holds input.txt) and record what happened: the losses it logged,
    every call of the model, and, at every optimizer step, each group's settings and gradients."""
    import train

    args = ["--device=cpu", "--sample_length=0", "--log_interval=1", "--eval_interval=1000", "--eval_iters=1"]
    seen = dict(calls=[], steps=[], other_steps=[])

    def forward(model, idx, targets=None, cache=None):
        seen["calls"].append((model.training, idx.clone(), None if targets is None else targets.clone()))
        return real_forward(model, idx, targets, cache)

    def before_step(optimizer, args, kwargs):
        groups = [dict(g, grads=[p.grad.clone() for p in g["params"]], shapes=[tuple(p.shape) for p in g["params"]])
                  for g in optimizer.param_groups]
        if isinstance(optimizer, torch.optim.AdamW):
            seen["steps"].append(groups)
        else:  # Muon, under the default recipe: recorded apart, step by step
            seen["other_steps"].append((type(optimizer).__name__, groups))

    real_forward = gpt.GPT.forward
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(folder)
        mp.setattr(gpt.GPT, "forward", forward)
        hook = register_optimizer_step_pre_hook(before_step)
        try:
            train.main(args + [f"--{k}={v}" for k, v in settings.items()])
        finally:
            hook.remove()
    seen["losses"] = [float(line.split("loss ")[1].split(",")[0]) for line in out.getvalue().splitlines()
                      if line.startswith("iter ")]
    seen["final"] = torch.load(folder / "out" / "last.pt", weights_only=True)
    seen["data"] = np.memmap(folder / "data" / "char" / "train.bin", dtype=np.uint16, mode="r")
    seen["vocab_size"] = json.loads((folder / "data" / "char" / "meta.json").read_text(encoding="utf-8"))["vocab_size"]
    seen["settings"] = json.loads((folder / "out" / "config.json").read_text(encoding="utf-8"))
    return seen


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train.py's own run of RUN, recorded."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    return train_in_process(folder, **RUN)


# -----------------------------------------------------------------------------
# the reference: what train.py promises to do, written out without any of its code


def scheduled_lr(it, s):
    """Warmup: step it runs at learning_rate * (it + 1) / (warmup_iters + 1), so step 0 already moves and the peak
    comes at step warmup_iters; then half a cosine from learning_rate down to min_lr, reached at lr_decay_iters
    and kept from there on."""
    if it < s["warmup_iters"]:
        return s["learning_rate"] * (it + 1) / (s["warmup_iters"] + 1)
    if it >= s["lr_decay_iters"]:
        return s["min_lr"]
    progress = (it - s["warmup_iters"]) / (s["lr_decay_iters"] - s["warmup_iters"])  # 0 -> 1
    return s["min_lr"] + (s["learning_rate"] - s["min_lr"]) * (1 + math.cos(math.pi * progress)) / 2


def reference_run(data, vocab_size, s):
    """Train from the same seed on the same windows as train.py; return (the loss of every step, the model).

    Every step draws gradient_accumulation_steps x batch_size window starts from one generator seeded with the
    seed; a window of block_size + 1 tokens gives the inputs (its first block_size) and the targets (its last
    block_size: each input's next token). The gradient is the mean over all the step's windows, clipped to a
    global norm of grad_clip, and AdamW takes the scheduled lr, with weight decay on matrices and embeddings only.
    With s["muon"], Muon takes the 2-D weights inside the blocks instead, at the same schedule scaled to its own
    peak, and AdamW the rest. The clipping is the float32 arithmetic of torch's clip_grad_norm_ and the updates are
    torch's fused AdamW and muon.Muon, so that the comparison can be bit for bit: train.py's configuration of them
    is what is under test."""
    T, B, A = s["block_size"], s["batch_size"], s["gradient_accumulation_steps"]
    torch.manual_seed(s["seed"])  # the initial weights, and then the dropout masks
    model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab_size, block_size=T, n_layer=s["n_layer"], n_head=s["n_head"],
                                  n_embd=s["n_embd"], dropout=s["dropout"], bias=s["bias"], rope=s["rope"],
                                  zero_init=s["zero_init"]))
    params = list(model.parameters())  # the tied lm_head is wte: once
    blocks = [p for p in model.transformer.h.parameters() if p.dim() == 2] if s["muon"] else []
    rest = [p for p in params if not any(p is b for b in blocks)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": s["weight_decay"]},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]  # biases, LayerNorm gains
    adamw = torch.optim.AdamW(groups, lr=0.0, betas=(s["beta1"], s["beta2"]), eps=1e-8, fused=True)
    peaks = [(adamw, s["learning_rate"])]
    if s["muon"]:
        peaks.append((Muon(blocks, lr=0.0, momentum=s["muon_momentum"]), s["muon_learning_rate"]))
    windows = torch.Generator().manual_seed(s["seed"])
    losses = []
    for it in range(s["max_iters"]):
        starts = torch.randint(len(data) - T, (A, B), generator=windows)
        step_loss = torch.zeros(())
        for micro in range(A):
            tokens = torch.from_numpy(np.stack([data[i : i + T + 1] for i in starts[micro].tolist()]).astype(np.int64))
            inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each: targets[t] = inputs[t + 1]
            _, loss = model(inputs, targets)
            (loss / A).backward()  # gradients add up over the micro-steps: their mean, the whole step's loss
            step_loss += loss.detach() / A
        losses.append(step_loss.item())
        if s["grad_clip"] > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            for p in params:
                p.grad.mul_(torch.clamp(s["grad_clip"] / (norm + 1e-6), max=1.0))
        for optimizer, peak in peaks:  # AdamW on the schedule; Muon at the same point of its own
            lr = scheduled_lr(it, s)
            for group in optimizer.param_groups:
                group["lr"] = lr if optimizer is adamw else lr / s["learning_rate"] * peak
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, model


def test_train_py_takes_exactly_the_steps_of_the_reference(run):
    losses, model = reference_run(run["data"], run["vocab_size"], RUN)
    assert len(run["losses"]) == RUN["max_iters"]
    for step, (logged, expected) in enumerate(zip(run["losses"], losses)):
        assert abs(logged - expected) <= 0.5e-4 + 1e-6, f"step {step}: train.py logged {logged}, reference {expected}"
    final = run["final"]["model"]
    assert final.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():  # bit for bit: the same float32 operations in the same order
        assert torch.equal(final[name], p), f"{name} differs by up to {(final[name] - p).abs().max().item():.2e}"


# The losses train.py must log for RUN on small_text(), as computed by reference_run() above (not by train.py),
# on a 2-core Xeon (model 207) in float32, with 1 thread and with 2; the same to 4 decimals with AdamW's update
# written out by hand in place of torch's fused kernel. Compared to within one unit of the 4th decimal, so that
# another CPU's rounding passes.
GOLDEN = [3.5108, 3.4671, 3.4067, 3.3621, 3.2680, 3.1929, 3.1298, 3.1251, 3.1088, 3.1088]


def test_the_first_steps_follow_the_golden_trajectory(run):
    assert run["losses"] == pytest.approx(GOLDEN, abs=1.01e-4)
    assert reference_run(run["data"], run["vocab_size"], RUN)[0] == pytest.approx(GOLDEN, abs=1.01e-4)


# -----------------------------------------------------------------------------
# each part of the step on its own


def test_every_target_is_the_token_after_its_input_in_the_training_text(run):
    data, T = run["data"], RUN["block_size"]
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(data), T + 1)  # (N - T, T + 1): every window
    calls = [(idx, targets) for training, idx, targets in run["calls"] if training]
    assert len(calls) == RUN["max_iters"] * RUN["gradient_accumulation_steps"]
    for idx, targets in calls:
        assert idx.shape == targets.shape == (RUN["batch_size"], T)
        assert torch.equal(targets[:, :-1], idx[:, 1:])
        for row in torch.cat([idx, targets[:, -1:]], dim=1).numpy():  # inputs plus the last target
            assert (windows == row).all(axis=1).any(), "a batch row is not a window of train.bin"


def test_the_optimizer_runs_at_the_scheduled_learning_rate(run):
    lrs = [[group["lr"] for group in step] for step in run["steps"]]
    assert len(lrs) == RUN["max_iters"]
    for it, step in enumerate(lrs):
        assert step == [pytest.approx(scheduled_lr(it, RUN), rel=1e-12)] * 2, f"step {it}"
    peak, floor, w = RUN["learning_rate"], RUN["min_lr"], RUN["warmup_iters"]
    assert lrs[0][0] == pytest.approx(peak / (w + 1))  # warmup starts one step up, not at 0 or at the peak
    assert lrs[w - 1][0] == pytest.approx(peak * w / (w + 1)) and lrs[w][0] == pytest.approx(peak)
    assert lrs[5][0] == pytest.approx((peak + floor) / 2)  # halfway through the cosine (steps 3 to 7)
    assert lrs[7][0] == lrs[9][0] == pytest.approx(floor)  # after the decay


def test_the_optimizer_decays_matrices_and_embeddings_only_with_the_set_betas(run):
    for step in run["steps"]:
        assert [g["weight_decay"] for g in step] == [RUN["weight_decay"], 0.0]
        assert all(g["betas"] == (RUN["beta1"], RUN["beta2"]) and g["eps"] == 1e-8 for g in step)
        assert all(grad.dim() >= 2 for grad in step[0]["grads"]) and all(grad.dim() < 2 for grad in step[1]["grads"])
    n_params = sum(len(g["grads"]) for g in run["steps"][0])
    assert n_params == len(run["final"]["model"]) - 1  # every parameter once; lm_head.weight is wte.weight


def first_step_gradients(tmp_path, name, **settings):
    """The gradients the optimizer receives at train.py's first step, for a run of the given settings."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    base = dict(**GPT2_RECIPE, n_layer=1, n_head=2, n_embd=16, block_size=16, learning_rate=1e-2, warmup_iters=0,
                max_iters=1)
    seen = train_in_process(folder, **{**base, **settings})
    return torch.cat([grad.flatten() for group in seen["steps"][0] for grad in group["grads"]]), seen["losses"]


def test_four_micro_steps_of_two_sequences_equal_one_step_of_eight(tmp_path):
    # the same 8 windows either way: one generator draws 4 x 2 or 1 x 8 starts in the same order
    big, big_loss = first_step_gradients(tmp_path, "big", batch_size=8, gradient_accumulation_steps=1, grad_clip=0.0)
    small, small_loss = first_step_gradients(tmp_path, "small", batch_size=2, gradient_accumulation_steps=4,
                                             grad_clip=0.0)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-7)  # the mean over 8, not the sum of 4 means
    assert small_loss == pytest.approx(big_loss, abs=1e-4)


def test_clipping_scales_the_gradient_down_to_grad_clip_and_zero_turns_it_off(tmp_path):
    raw, _ = first_step_gradients(tmp_path, "raw", batch_size=4, grad_clip=0.0)
    clipped, _ = first_step_gradients(tmp_path, "clipped", batch_size=4, grad_clip=0.25)
    loose, _ = first_step_gradients(tmp_path, "loose", batch_size=4, grad_clip=1e6)
    assert raw.norm() > 0.5  # grad_clip=0: the gradient as computed, well above 0.25
    assert clipped.norm().item() == pytest.approx(0.25, rel=1e-5)
    torch.testing.assert_close(clipped, raw * 0.25 / raw.norm(), rtol=1e-4, atol=1e-8)  # same direction
    assert torch.equal(loose, raw)  # a norm below grad_clip is left alone


# -----------------------------------------------------------------------------
# train.py's own recipe: RoPE, zero-initialised projections, and Muon for the blocks' matrices beside AdamW

DEFAULT_RUN = {k: v for k, v in RUN.items() if k not in GPT2_RECIPE}  # the same tiny run; the rest as train.py has it


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default")
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    return train_in_process(folder, **DEFAULT_RUN)


def test_the_default_recipe_takes_exactly_the_steps_of_the_reference(default_run):
    settings = default_run["settings"]  # config.json: every setting as the run resolved it
    assert settings["rope"] and settings["zero_init"] and settings["muon"] and settings["tie_embeddings"]
    assert not any(settings[k] for k in ("rmsnorm", "qk_norm", "relu2")) and settings["muon_weight_decay"] == 0
    losses, model = reference_run(default_run["data"], default_run["vocab_size"], settings)
    assert default_run["losses"] == pytest.approx(losses, abs=0.5e-4 + 1e-6)
    final = default_run["final"]["model"]
    assert final.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        assert torch.equal(final[name], p), f"{name} differs by up to {(final[name] - p).abs().max().item():.2e}"


def test_the_default_recipe_runs_adamw_and_muon_each_at_its_scheduled_learning_rate(default_run):
    s = default_run["settings"]
    adamw, muon = default_run["steps"], default_run["other_steps"]
    assert len(adamw) == len(muon) == RUN["max_iters"] and {name for name, _ in muon} == {"Muon"}
    for it, (adamw_groups, (_, muon_groups)) in enumerate(zip(adamw, muon)):
        lr = scheduled_lr(it, s)
        assert [g["lr"] for g in adamw_groups] == [pytest.approx(lr, rel=1e-12)] * 2, f"step {it}"
        muon_lr = lr / s["learning_rate"] * s["muon_learning_rate"]  # the same point of the curve, its own peak
        assert [g["lr"] for g in muon_groups] == [pytest.approx(muon_lr, rel=1e-12)], f"step {it}"
    w = s["warmup_iters"]
    assert muon[w][1][0]["lr"] == pytest.approx(s["muon_learning_rate"])  # the peak, where AdamW's is
    assert muon[-1][1][0]["lr"] == pytest.approx(s["min_lr"] / s["learning_rate"] * s["muon_learning_rate"])


def test_the_default_recipe_decays_only_the_token_embedding_and_gives_muon_every_matrix_of_the_blocks(default_run):
    s, V = default_run["settings"], default_run["vocab_size"]
    C, L = s["n_embd"], s["n_layer"]
    adamw, (_, muon) = default_run["steps"][0], default_run["other_steps"][0]
    assert adamw[0]["shapes"] == [(V, C)] and adamw[0]["weight_decay"] == s["weight_decay"] == 0.1  # wte = lm_head
    assert all(len(shape) == 1 for shape in adamw[1]["shapes"]) and adamw[1]["weight_decay"] == 0.0  # gains, biases
    assert sorted(muon[0]["shapes"]) == sorted([(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L)
    assert muon[0]["weight_decay"] == 0.0 and muon[0]["momentum"] == s["muon_momentum"] == 0.95
    n_params = len(adamw[0]["shapes"]) + len(adamw[1]["shapes"]) + len(muon[0]["shapes"])
    assert n_params == len(default_run["final"]["model"]) - 1  # every parameter once; lm_head.weight is wte.weight


def test_muon_weight_decay_reaches_muon_and_weight_decay_stays_adamw_s(tmp_path):
    folder = tmp_path / "decay"
    folder.mkdir()
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    seen = train_in_process(folder, **{**DEFAULT_RUN, "max_iters": 1, "weight_decay": 0.3, "muon_weight_decay": 0.2})
    adamw, (_, muon) = seen["steps"][0], seen["other_steps"][0]
    assert [g["weight_decay"] for g in adamw] == [0.3, 0.0] and muon[0]["weight_decay"] == 0.2
