import json
import math
import re

import pytest
import torch

from conftest import GPT2_RECIPE, run_script

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--log_interval=5", "--warmup_iters=2", "--learning_rate=1e-2"]


def test_end_to_end_prepare_train_checkpoint_generate(corpus):
    # train.py prepares the default dataset itself when it is missing
    result = run_script("train.py", *TINY, "--max_iters=30", "--eval_interval=10", "--sample_length=40", cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert (corpus / "data" / "char" / "meta.json").exists()
    assert "step 30: train loss" in result.stdout and "a sample" in result.stdout

    # the checkpoint is self-contained and loads without unpickling any Python object
    ckpt = torch.load(corpus / "out" / "best.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizers", "model_config", "tokenizer", "config", "iter_num", "best_val_loss"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    last = torch.load(corpus / "out" / "last.pt", weights_only=True)
    assert last["iter_num"] == 30 and last["best_val_loss"] == ckpt["best_val_loss"] <= math.log(ckpt["model_config"]["vocab_size"])
    config = json.loads((corpus / "out" / "config.json").read_text())
    assert config["max_iters"] == 30 and config["device"] == "cpu" and config["dtype"] == "float32"

    # generate.py needs nothing but the checkpoint: run it where there is no data at all
    (corpus / "input.txt").unlink()
    for f in (corpus / "data" / "char").iterdir():
        f.unlink()
    result = run_script("generate.py", "--init_from=out/best.pt", "--prompt=The king", "--max_new_tokens=50",
                        "--seed=3", cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The king") and len(result.stdout) >= len("The king") + 50
    assert "tokens/s" in result.stderr
    again = run_script("generate.py", "--init_from=out/best.pt", "--prompt=The king", "--max_new_tokens=50",
                       "--seed=3", cwd=corpus)
    assert again.stdout == result.stdout
    in_bf16 = run_script("generate.py", "--init_from=out/best.pt", "--prompt=The king", "--max_new_tokens=50",
                         "--dtype=bfloat16", "--num_samples=2", cwd=corpus)
    assert in_bf16.returncode == 0 and in_bf16.stdout.count("The king") == 2, in_bf16.stderr


def test_a_text_without_newlines_trains_and_samples_to_the_end(corpus):
    (corpus / "input.txt").write_text("to be or not to be, that is the question. " * 300, encoding="utf-8")
    result = run_script("train.py", *TINY, "--max_iters=10", "--sample_length=30", cwd=corpus)
    assert result.returncode == 0 and "a sample" in result.stdout, result.stderr


def test_best_checkpoint_never_records_a_worse_val_loss(corpus):
    # a learning rate this high makes AdamW's val loss go up and down: best.pt must keep the minimum
    result = run_script("train.py", *TINY, "--max_iters=16", "--lr_decay_iters=40", "--eval_interval=4",
                        "--learning_rate=0.3", "--sample_length=0", *GPT2_RECIPE, cwd=corpus)
    assert result.returncode == 0, result.stderr
    vals = [float(v) for v in re.findall(r"^step \d+: .*val loss ([\d.]+)", result.stdout, re.M)]
    assert vals[-1] > min(vals)  # the run ends worse than its best: the last evaluation must not become best.pt
    best = torch.load(corpus / "out" / "best.pt", weights_only=True)
    last = torch.load(corpus / "out" / "last.pt", weights_only=True)
    assert abs(best["best_val_loss"] - min(vals)) < 1e-4 and abs(last["best_val_loss"] - min(vals)) < 1e-4
    assert best["iter_num"] == 4 * vals.index(min(vals)) and last["iter_num"] == 16
    assert not torch.equal(best["model"]["transformer.wte.weight"], last["model"]["transformer.wte.weight"])


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A10G", None), ("NVIDIA L40", None), ("Some Future GPU", None)])
def test_mfu_uses_the_datasheet_peak_of_the_gpu_in_use_or_none(monkeypatch, name, peak):
    import progress

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert progress.peak_flops("cuda", torch.bfloat16) == peak
    assert progress.peak_flops("cuda", torch.float32) is None  # no fp32 peaks in the table: n/a, not a guess


def test_mfu_on_cpu_is_measured_against_a_matmul_probe():
    import progress

    assert 1e9 < progress.peak_flops("cpu", torch.float32) < 1e14
    assert progress.peak_flops("mps", torch.float32) is None


@pytest.mark.parametrize("bf16_speedup", [3.0, 1.2])
def test_auto_precision_on_cpu_takes_bf16_only_for_wide_models_where_it_is_faster(corpus, monkeypatch, bf16_speedup):
    import train

    # the probe's answer is set here: a test that timed bf16 itself could disagree with train.py's own timing
    probe = {torch.float32: 1e11, torch.bfloat16: 1e11 * bf16_speedup}
    monkeypatch.setattr(train, "cpu_matmul_flops", probe.get)
    monkeypatch.chdir(corpus)
    args = ["--device=cpu", "--n_layer=1", "--n_head=4", "--block_size=16", "--batch_size=2", "--max_iters=1",
            "--eval_iters=1", "--sample_length=0"]
    wide = "bfloat16" if bf16_speedup > 1.5 else "float32"  # bf16 must beat fp32 by half again
    for width, expected in ((128, "float32"), (256, wide)):
        train.main([*args, f"--n_embd={width}", f"--out_dir=out{width}"])
        assert json.loads((corpus / f"out{width}" / "config.json").read_text())["dtype"] == expected
        assert torch.load(corpus / f"out{width}" / "last.pt", weights_only=True)["precision"] == expected

    # a resumed run keeps the precision its run chose, even where the probe would now choose the other one
    probe[torch.bfloat16] = 1e11 * (1.2 if bf16_speedup > 1.5 else 3.0)
    train.main(["--init_from=resume", "--out_dir=out256", "--max_iters=2"])
    assert torch.load(corpus / "out256" / "last.pt", weights_only=True)["precision"] == wide


def test_fused_attention_false_trains_an_edited_attend_in_every_block_and_true_ignores_it(corpus, monkeypatch):
    import gpt
    import train

    monkeypatch.chdir(corpus)
    args = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
            "--max_iters=3", "--eval_iters=1", "--eval_interval=100", "--sample_length=0"]

    def weights(*extra):
        train.main([*args, *extra])
        return torch.load(corpus / "out" / "last.pt", weights_only=True)["model"]

    plain = weights()
    real, called = gpt.CausalSelfAttention.attend, []

    def edited(self, q, k, v, visible=None):  # a learner's edit of the lesson: every score at half its size
        called.append(self)
        return real(self, q / 2, k, v, visible)

    monkeypatch.setattr(gpt.CausalSelfAttention, "attend", edited)
    assert all(torch.equal(a, b) for a, b in zip(weights().values(), plain.values())) and not called  # fused
    changed = weights("--fused_attention=False")
    assert len({id(m) for m in called}) == 2  # the edit ran in both blocks
    assert any(not torch.equal(changed[k], plain[k]) for k in plain)  # and changed what was trained
    monkeypatch.setattr(gpt.CausalSelfAttention, "attend", real)
    unedited = weights("--fused_attention=False")  # the lesson as written computes what the kernel does
    for k in plain:
        torch.testing.assert_close(unedited[k], plain[k], rtol=1e-4, atol=1e-5)
