"""int8 weights for sampling: the rounding bound, the product on either path against a float64 reference, greedy
text against fp32's, the command lines, and why a quantized checkpoint can never be trained on by mistake."""

import copy
import importlib
import re

import pytest
import torch

import generate
from conftest import one_error_line, run_script, trained_folder
from fast_linear import Int8Linear, int8_weights, quantize_int8
from gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with input.txt, data/char and out/: a small model (32 wide, so the int8 kernel applies)."""
    return trained_folder(tmp_path_factory, "int8", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                          "--batch_size=8", "--max_iters=60", "--eval_interval=30", "--eval_iters=2",
                          "--sample_length=0", "--device=cpu")


def test_every_weight_is_within_half_a_scale_of_its_int8_value():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-4, 2, 64)[:, None]  # rows of very different sizes
    w[5] = 0.0  # and a row of zeros
    q, scale = int8_weights(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(64) != 5] >= 126).all()  # each row's range, near enough
    error = (w.double() - q.double() * scale.double()[:, None]).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()  # per channel: at most half a step
    exact = w.double().abs().amax(dim=1) / 127  # rounded up to a bfloat16: at most 2^-7 above
    rows = torch.arange(64) != 5
    assert ((scale.double() >= exact) & (scale.double() <= exact * (1 + 2**-7)))[rows].all()
    assert (q[5] == 0).all()


@pytest.mark.parametrize("rows", [1, 8, 9, 64])
@pytest.mark.parametrize("in_features, bias", [(48, True), (48, False), (40, True)])
def test_an_int8_layer_computes_the_product_of_its_int8_weights_on_either_path(monkeypatch, rows, in_features, bias):
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape) or kernel(*a))
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, 80, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(rows, 3, in_features)[:, 1]  # (rows, in), not contiguous
    with torch.no_grad():
        y = layer(x)

    q, scale = int8_weights(linear.weight)
    exact = x.to(torch.bfloat16).double() @ q.double().T  # the product takes bf16 activations: (rows, 80)
    expected = exact * scale.double() + (linear.bias.detach().double() if bias else 0.0)
    # either path rounds the product to bf16 (8 significant bits) once, before the float32 bias: within 2^-8
    assert y.dtype == torch.float32 and y.shape == (rows, 80)
    assert ((y.double() - expected).abs() <= exact.abs() * scale.double() * 2**-8 + 1e-6).all()
    takes_kernel = rows <= Int8Linear.kernel_rows and in_features % 16 == 0
    assert calls == ([(rows, in_features)] if takes_kernel else [])


def next_token_model():
    """A GPT with clear margins by construction: its token embeddings are large and lm_head holds each token's
    successor's row, so it predicts token t + 1 after t by a wide margin, while the random blocks still add to
    the residual stream (through int8 weights too)."""
    torch.manual_seed(0)
    V = 60
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=V, tie_embeddings=False))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25)  # rows of norm about 4: they dominate the residual stream
        model.lm_head.weight.copy_(2 * model.transformer.wte.weight.roll(1, dims=0))  # row u: token u - 1's
    return model.eval()


def test_int8_greedy_text_equals_fp32_for_a_model_with_clear_margins():
    model = next_token_model()
    small = quantize_int8(copy.deepcopy(model))
    prompt = torch.tensor([[7]])
    texts = [torch.stack(list(generate.generate(m, prompt, 100, temperature=0)), dim=1)[0] for m in (model, small)]
    assert texts[0].tolist() == [(7 + i) % 60 for i in range(1, 101)]  # the model is what it was built to be
    assert torch.equal(texts[1], texts[0])  # 100 tokens: the cached steps and three re-reads of the context

    # and it passes for the reason claimed: every margin is far larger than int8 moves any logit
    with torch.no_grad():
        context = torch.cat([prompt[0], texts[0]])[None, :32]
        logits, quantized = model(context)[0][0], small(context)[0][0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 10 * (logits - quantized).abs().max()


def test_every_linear_layer_is_quantized_and_the_embedding_lookup_stays_float(trained):
    model, _ = generate.load_for_sampling(str(trained / "out" / "best.pt"), "cpu", "float32", quantize="int8")
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert len(linears) == 2 * 4 + 1 and all(isinstance(m, Int8Linear) for m in linears)  # lm_head too
    assert model.lm_head.weight.dtype == torch.int8 and model.transformer.wte.weight.dtype == torch.float32
    assert model.new_cache(1).k.dtype == torch.float32


def test_generate_and_look_sample_and_evaluate_with_int8_weights(trained, monkeypatch, capsys):
    result = run_script("generate.py", "--quantize=int8", "--prompt=The king", "--max_new_tokens=20", cwd=trained)
    assert result.returncode == 0 and result.stdout.startswith("The king"), result.stderr
    line = one_error_line(run_script("generate.py", "--quantize=int4", cwd=trained))
    assert "--quantize=int4 is unknown; use int8" in line

    monkeypatch.chdir(trained)
    losses = []
    for flag in ("--quantize=", "--quantize=int8"):
        importlib.import_module("look").main(["eval", flag])
        losses.append(float(re.search(r"loss ([\d.]+) nats", capsys.readouterr().out)[1]))
    assert losses[0] < 3.0 and abs(losses[1] - losses[0]) < 0.02  # a model that learned, nearly unchanged


def test_a_checkpoint_holding_int8_weights_can_be_neither_resumed_nor_loaded(trained):
    ckpt = torch.load(trained / "out" / "last.pt", weights_only=True)
    model, _ = generate.load_for_sampling(str(trained / "out" / "last.pt"), "cpu", "float32", quantize="int8")
    ckpt["model"] = model.state_dict()  # what saving a quantized model would write
    (trained / "quantized").mkdir()
    torch.save(ckpt, trained / "quantized" / "last.pt")
    for script, args in (("train.py", ["--init_from=resume", "--out_dir=quantized"]),
                         ("train.py", ["--init_from=quantized/last.pt", "--out_dir=again", "--lora_rank=2"]),
                         ("generate.py", ["--init_from=quantized/last.pt"])):
        line = one_error_line(run_script(script, *args, cwd=trained))
        assert "holds int8 weights (transformer.h.0.attn.c_attn.weight), not float ones" in line, script
