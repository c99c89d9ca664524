"""Low-rank adapters: what an adapted layer computes, that training moves the adapters and nothing else, small
checkpoints that find their base and notice when it changed, exact resume, merging, and fine-tuning from a
train.py checkpoint."""

import copy
import importlib
import os
import shutil

import pytest
import torch

import lora
import prepare
import progress
from checkpoint import load_model
from conftest import one_error_line, run_script, trained_folder
from generate import load_for_sampling
from gpt import GPT, GPTConfig

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--warmup_iters=2", "--learning_rate=1e-2", "--sample_length=0", "--device=cpu"]
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linear layers of a block


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder holding input.txt, its data/char, and base/: a small model train.py trained on it."""
    return trained_folder(tmp_path_factory, "lora", *TINY, "--max_iters=30", "--eval_interval=10", "--out_dir=base")


@pytest.fixture
def train(base, monkeypatch, capsys):
    """train.py's main() in the base's folder; returns what it printed."""
    monkeypatch.chdir(base)

    def run(*args):
        importlib.import_module("train").main(list(args))
        return capsys.readouterr().out

    return run


def load(path):
    return torch.load(path, weights_only=True)


def random_gpt(**shape):
    """A small GPT with every parameter random, biases and LayerNorms included."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50), **shape}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def adapter_count(n_layer, n_embd, rank):
    """r * (in + out) for each adapted layer: c_attn C -> 3C, c_proj C -> C, c_fc C -> 4C, c_proj 4C -> C."""
    C = n_embd
    return n_layer * rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))


# -----------------------------------------------------------------------------
# the adapters themselves


@pytest.mark.parametrize("layers", ["attn", "mlp", "all"])
def test_at_initialisation_the_adapted_model_is_exactly_the_base(layers):
    model = random_gpt()
    idx = torch.randint(0, 50, (3, 16))
    expected, _ = model(idx)
    adapted = lora.add_adapters(copy.deepcopy(model), rank=4, alpha=8.0, layers=layers)
    logits, _ = adapted(idx)
    assert torch.equal(logits, expected)  # B starts at zero: the correction is exactly 0
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    wanted = {"attn": ADAPTED[:2], "mlp": ADAPTED[2:], "all": ADAPTED}[layers]
    assert sorted(trainable) == sorted(f"transformer.h.{i}.{m}.{w}" for i in range(2) for m in wanted
                                       for w in ("lora_A", "lora_B"))


def test_an_adapted_layer_adds_the_scaled_low_rank_product_to_the_frozen_one():
    base = torch.nn.Linear(24, 40)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 24)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + (6.0 / 3) * (x.double() @ A.T) @ B.T  # written out in float64
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.merged()(x).double(), expected, rtol=0, atol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias  # the base's tensors, not copies


def test_merged_and_unmerged_adapters_give_the_same_logits():
    adapted = lora.add_adapters(random_gpt(), rank=4, alpha=16.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.5)  # adapters far from zero: the correction matters
    idx = torch.randint(0, 50, (3, 16))
    unmerged, _ = adapted(idx)
    merged_model = lora.merge_adapters(copy.deepcopy(adapted))
    merged, _ = merged_model(idx)
    assert (unmerged - random_gpt()(idx)[0]).abs().max() > 0.1
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged_model.modules())
    assert merged_model.state_dict().keys() == random_gpt().state_dict().keys()  # a plain GPT again
    assert all(p.requires_grad for p in merged_model.parameters())


def test_the_mfu_figure_counts_4_flops_per_frozen_weight_and_6_per_adapter_weight():
    model = random_gpt()
    full, weights = progress.flops_per_token(model), model.num_params(non_embedding=True)
    lora.add_adapters(model, rank=2, alpha=4.0)  # every weight frozen: its gradient is never computed
    assert progress.flops_per_token(model) == full - 2 * weights + 6 * adapter_count(n_layer=2, n_embd=32, rank=2)


# -----------------------------------------------------------------------------
# training with adapters


def test_lora_training_moves_only_the_adapters_and_says_how_many_train(train, base, monkeypatch):
    import train as train_py

    seen, real_save = [], train_py.save

    def save(names, model, *args):  # the model as it is at every save, base weights included
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_save(names, model, *args)

    monkeypatch.setattr(train_py, "save", save)
    out = train(*TINY, "--init_from=base/best.pt", "--out_dir=adapted", "--lora_rank=2", "--max_iters=10",
                "--eval_interval=5")
    assert f"({adapter_count(n_layer=2, n_embd=32, rank=2):,} of them trainable)" in out

    base_weights = load(base / "base" / "best.pt")["model"]
    assert len(seen) == 3  # steps 0, 5 and 10
    for state in seen:
        frozen = {k: v for k, v in state.items() if "lora_" not in k}
        assert frozen.keys() == base_weights.keys()
        for k, v in frozen.items():
            assert torch.equal(v, base_weights[k]), f"{k} moved"
    assert all(seen[-1][f"transformer.h.{i}.{m}.lora_B"].abs().max() > 0 for i in range(2) for m in ADAPTED)

    ckpt = load(base / "adapted" / "last.pt")
    assert ckpt["model"].keys() == {k for k in seen[-1] if "lora_" in k}  # the adapters alone
    assert ckpt["lora"]["base"] == os.path.abspath("base/best.pt") and ckpt["lora"]["rank"] == 2
    for k, v in ckpt["model"].items():
        assert torch.equal(v, seen[-1][k])


def test_a_lora_checkpoint_is_a_small_fraction_of_its_base(train, base):
    train(*TINY, "--init_from=base/best.pt", "--out_dir=small", "--lora_rank=1", "--lora_layers=attn",
          "--max_iters=5", "--eval_interval=5")
    assert os.path.getsize(base / "small" / "best.pt") < os.path.getsize(base / "base" / "best.pt") / 5


def test_a_resumed_lora_run_is_bit_identical_to_an_unbroken_one(train, base):
    args = [*TINY, "--init_from=base/best.pt", "--lora_rank=2", "--dropout=0.1", "--gradient_accumulation_steps=2",
            "--eval_interval=5", "--lr_decay_iters=20"]
    train(*args, "--max_iters=20", "--out_dir=straight")
    train(*args, "--max_iters=10", "--out_dir=broken")
    train("--init_from=resume", "--max_iters=20", "--out_dir=broken")  # base, adapters and state from last.pt
    a, b = load(base / "straight" / "last.pt"), load(base / "broken" / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 20
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["optimizers"]["adamw"]["state"]) == len(a["model"])  # AdamW holds moments for the adapters only
    for sa, sb in zip(a["optimizers"]["adamw"]["state"].values(), b["optimizers"]["adamw"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_base_that_changed_or_went_away_is_one_line(train, base, tmp_path):
    mine = tmp_path / "mine.pt"
    shutil.copy(base / "base" / "best.pt", mine)
    train(*TINY, f"--init_from={mine}", f"--out_dir={tmp_path / 'adapted'}", "--lora_rank=2", "--max_iters=2",
          "--eval_interval=2")
    adapted = f"--init_from={tmp_path / 'adapted' / 'best.pt'}"
    assert run_script("generate.py", adapted, "--max_new_tokens=5", cwd=base).returncode == 0

    ckpt = load(mine)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1.0  # the base, trained on a little
    torch.save(ckpt, mine)
    line = one_error_line(run_script("generate.py", adapted, "--max_new_tokens=5", cwd=base))
    assert f"{mine}, the base model that" in line and "has changed since the adapters were trained" in line

    mine.unlink()
    line = one_error_line(run_script("look.py", "eval", adapted, cwd=base))
    assert f"for the base model {mine}, which is not there any more" in line


@pytest.mark.parametrize("args, message", [
    (["--lora_rank=4"], "--init_from=scratch has none"),
    (["--init_from=base/best.pt", "--out_dir=base", "--lora_rank=4"], "lies in --out_dir=base"),
    (["--init_from=base/best.pt", "--out_dir=x", "--lora_rank=4", "--lora_layers=embedding"], "one of attn, mlp, all"),
    (["--init_from=base/best.pt", "--out_dir=x", "--lora_rank=-1"], "the rank must be >= 0"),
    (["--init_from=base/model.pt", "--out_dir=x"], "--init_from=base/model.pt is unknown"),
])
def test_lora_mistakes_are_named(train, args, message):
    with pytest.raises(SystemExit, match=message):
        train(*TINY, "--max_iters=1", *args)


def test_resuming_a_lora_run_with_other_adapters_is_a_clear_error(train):
    train(*TINY, "--init_from=base/best.pt", "--out_dir=resumed", "--lora_rank=2", "--max_iters=2")
    with pytest.raises(SystemExit, match="has lora_rank=2; drop those flags"):
        train("--init_from=resume", "--out_dir=resumed", "--lora_rank=4")
    with pytest.raises(SystemExit, match="has lora_layers=all"):
        train("--init_from=resume", "--out_dir=resumed", "--lora_layers=mlp")


# -----------------------------------------------------------------------------
# merging, sampling, and fine-tuning from a checkpoint


def test_sampling_merges_the_adapters_and_lora_py_writes_the_merged_checkpoint(train, base):
    train(*TINY, "--init_from=base/best.pt", "--out_dir=merge", "--lora_rank=2", "--max_iters=10",
          "--learning_rate=5e-2")
    unmerged, _ = load_model("merge/last.pt")
    assert any(isinstance(m, lora.LoRALinear) for m in unmerged.modules())
    sampling, _ = load_for_sampling("merge/last.pt", "cpu", "float32")
    lora.main(["--init_from=merge/last.pt", "--out=merged.pt"])
    merged, _ = load_model("merged.pt")
    assert not any(isinstance(m, lora.LoRALinear) for m in [*sampling.modules(), *merged.modules()])
    assert "lora" not in load("merged.pt") and not any("lora_" in k for k in load("merged.pt")["model"])

    idx = torch.randint(0, unmerged.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected, _ = unmerged.eval()(idx)
        base_logits, _ = load_model("base/best.pt")[0].eval()(idx)
        assert (expected - base_logits).abs().max() > 1e-3  # the adapters changed the model
        for model in (sampling, merged.eval()):
            torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-5)


def test_fine_tuning_a_checkpoint_starts_from_its_weights_and_needs_its_tokenizer(train, base):
    out = train(*TINY, "--init_from=base/best.pt", "--out_dir=full", "--max_iters=0", "--dropout=0.1")
    assert "trainable" not in out  # every weight trains
    started, saved = load(base / "full" / "last.pt"), load(base / "base" / "best.pt")
    assert started["model"].keys() == saved["model"].keys()
    assert all(torch.equal(started["model"][k], saved["model"][k]) for k in saved["model"])
    assert started["model_config"]["dropout"] == 0.1  # the run's setting, not the checkpoint's

    (base / "other.txt").write_text("0123456789 " * 300, encoding="utf-8")
    prepare.prepare(input=str(base / "other.txt"), data_dir=str(base / "data" / "digits"))
    with pytest.raises(SystemExit, match="tokenized differently from base/best.pt; prepare it with"):
        train(*TINY, "--init_from=base/best.pt", "--out_dir=digits", "--data_dir=data/digits", "--max_iters=1")
