import functools
import math

import pytest
import torch

from gpt import GPT2_SIZES, GPT, GPTConfig, parameter_table


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32), **kw}))


def test_loss_at_initialisation_is_about_ln_vocab_size():
    model = tiny(vocab_size=65, n_embd=64)
    x, y = torch.randint(0, 65, (16, 16)), torch.randint(0, 65, (16, 16))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_a_tiny_model_overfits_one_batch():
    model = tiny()
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    x = torch.randint(0, 50, (2, 16))
    for t in (0, 5, 14):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randint(0, 50, changed[:, t + 1 :].shape)  # everything after position t
        a, _ = model(x)
        b, _ = model(changed)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the future itself does change


def test_a_token_changes_the_logits_at_its_own_and_later_positions():
    model = tiny().eval()
    x = torch.randint(0, 50, (1, 16))
    changed = x.clone()
    changed[0, 3] = (x[0, 3] + 1) % 50
    a, _ = model(x)
    b, _ = model(changed)
    assert (a[0] - b[0]).abs().amax(dim=-1)[3:].min() > 0  # attention really carries information forward


def test_lm_head_is_tied_to_the_token_embedding_and_residual_projections_are_scaled():
    model = tiny(n_layer=8, n_embd=256)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)


@pytest.mark.parametrize("name, published", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                             ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_sizes_have_the_published_parameter_counts(name, published):
    config = GPTConfig(vocab_size=50257, block_size=1024, **GPT2_SIZES[name])
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(config)
    assert model.num_params() == published
    assert parameter_table(config)[-1] == ("total", published)


def test_the_parameter_table_adds_up_to_the_real_module_with_and_without_bias():
    for bias in (True, False):
        config = GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=32, bias=bias)
        assert parameter_table(config)[-1][1] == GPT(config).num_params()


def test_dropout_is_active_in_training_and_off_in_eval():
    model = tiny(dropout=0.5)
    x = torch.randint(0, 50, (2, 16))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_cpu_path_for_one_token_computes_what_nn_linear_computes(monkeypatch, threads):
    import gpt

    slab_products = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: slab_products.append(a) or real_bmm(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(gpt, "slabs_pay", functools.cache(gpt.slabs_pay.__wrapped__))  # a fresh, empty cache
    torch.manual_seed(0)
    for out, inn, bias in [(1536, 384, True), (1001, 512, False), (50257, 64, False)]:  # 1001, 50257: ragged slabs
        layer = gpt.Linear(inn, out, bias=bias)
        for shape in [(1, 1, inn), (4, 1, inn), (2, 2, inn), (inn,)]:
            x = torch.randn(shape)
            reference = torch.nn.functional.linear(x, layer.weight.detach(), layer.bias)
            with torch.inference_mode():
                layer(x)  # the first use times the two products
                slab_products.clear()
                chosen = layer(x)  # whichever was faster here
                took_slabs = bool(slab_products)
                slabs = gpt.slab_linear(x, layer.weight, layer.bias)
            assert took_slabs == gpt.slabs_pay(threads) and slab_products
            assert slabs.shape == chosen.shape == reference.shape
            torch.testing.assert_close(slabs, reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chosen, reference, rtol=1e-5, atol=1e-5)
            slab_products.clear()
        with torch.inference_mode():  # more rows: the usual path
            layer(torch.randn(8, inn))
        assert not slab_products
        layer(torch.randn(1, inn)).sum().backward()  # training: the usual path, with gradients
        assert not slab_products and layer.weight.grad is not None
    assert gpt.slabs_pay.cache_info().misses == 1  # timed once per number of threads, not per weight


def test_the_one_token_path_takes_whichever_product_was_faster(monkeypatch):
    import gpt

    layer = gpt.Linear(384, 1536)
    x = torch.randn(1, 384)
    for slow, expect_slabs in (("bmm", False), ("linear", True)):
        monkeypatch.setattr(gpt, "slabs_pay", functools.cache(gpt.slabs_pay.__wrapped__))  # not timed yet
        used = []
        for name, module in (("bmm", torch), ("linear", torch.nn.functional)):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, real=real, name=name: used.append(name) or real(*a))

        def fake_repeat(stmt, number, repeat):  # a clock on which the `slow` product takes a second, no real timing
            used.clear()
            stmt()
            return [1.0 if slow in used else 0.001] * repeat

        monkeypatch.setattr(gpt.timeit, "repeat", fake_repeat)
        with torch.inference_mode():
            layer(x)  # the first call times both
            used.clear()
            layer(x)
        assert used == (["bmm"] if expect_slabs else ["linear"])
        monkeypatch.undo()
