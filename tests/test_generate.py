import functools

import pytest
import torch

from generate import GREEDY_BELOW, generate, next_token_probs, sample_next, sample_text
from gpt import GPT, GPTConfig
from tokenizer import CharTokenizer


def tiny(block_size=16, vocab_size=30, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def tokens(model, prompt, n, **kw):
    return torch.stack(list(generate(model, prompt, n, **kw)), dim=1)  # (B, n)


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    model = tiny()
    tok = CharTokenizer("".join(chr(ord("a") + i) for i in range(30)))
    texts = [sample_text(model, tok, "abc", 60, seed=s, out=open("/dev/null", "w")) for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


def test_streamed_text_holds_a_character_back_until_its_last_byte_comes():
    from generate import text_decoder
    from tokenizer import BPETokenizer

    tok = BPETokenizer([])  # no merges: one token per byte, so every character beyond ASCII spans several
    text = "naïve 😀 日本"
    decode = text_decoder(tok)
    pieces = [decode(token) for token in tok.encode(text)]
    assert pieces[:5] == ["n", "a", "", "ï", "v"] and pieces[7:11] == ["", "", "", "😀"]
    assert "".join(pieces) == text


def test_temperature_zero_is_argmax_decoding():
    model = tiny()
    prompt = torch.randint(0, 30, (2, 3))
    expected = prompt
    for _ in range(12):  # a plain greedy loop that stays within block_size
        logits, _ = model(expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens(model, prompt, 12, temperature=0), expected[:, 3:])


def test_top_k_keeps_exactly_k_candidates():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.5, -1.0]])  # ties at the boundary: still exactly k
    for k in (1, 3, 4, 8):
        probs = next_token_probs(logits, top_k=k)
        assert (probs > 0).sum().item() == k
        assert set(torch.topk(logits[0], k).indices.tolist()) == set(probs[0].nonzero()[:, 0].tolist())
        assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_whose_probability_reaches_p():
    probs_in = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs_in.log()
    for p, kept in [(0.3, {1}), (0.5, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        probs = next_token_probs(logits, top_p=p)
        assert set(probs[0].nonzero()[:, 0].tolist()) == kept, p
        renormalised = probs_in[0, list(kept)] / probs_in[0, list(kept)].sum()
        assert torch.allclose(probs[0, list(kept)], renormalised)


def test_sampling_draws_only_from_the_kept_candidates():
    logits = torch.randn(1, 30).repeat(4000, 1)
    drawn = sample_next(logits, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(drawn[:, 0].tolist()) == set(torch.topk(logits[0], 5).indices.tolist())


def awkward_logits(V=30):
    """(6, V) logits of every awkward kind: ordinary, spread wide, all equal, a tie at the top, huge, bf16's."""
    torch.manual_seed(0)
    tie = torch.randn(V)
    tie[3] = tie[7] = tie.max() + 1
    return torch.stack([torch.randn(V) * 3, torch.randn(V) * 1e4, torch.zeros(V), tie, torch.randn(V) * 1e30,
                        torch.randn(V).bfloat16().float()])


def test_every_allowed_setting_gives_a_finite_distribution_and_a_token_from_it():
    logits = awkward_logits()
    top = logits == logits.amax(dim=-1, keepdim=True)  # (6, V) the most likely tokens
    generator = torch.Generator().manual_seed(0)
    for temperature in (5e-324, 1e-300, 1e-45, 1e-40, 1e-38, 9.99e-6, 1e-5, 1e-3, 1.0, 100.0):
        for top_k in (0, 1, 7, 30, 1_000_000):
            for top_p in (5e-324, 1e-300, 1e-40, 0.5, 1.0):  # 5e-324 and 1e-300: 0 in float32
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (6, 1)
                if temperature < GREEDY_BELOW:
                    assert torch.equal(token[:, 0], logits.argmax(dim=-1))
                    continue
                probs = next_token_probs(logits, temperature, top_k, top_p)
                assert torch.isfinite(probs).all() and (probs >= 0).all()
                torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(logits)))
                assert (probs.gather(1, token) > 0).all()  # drawn from what was kept
                assert ((probs > 0) & top).any(dim=-1).all()  # which always holds a most likely token
                if top_p < 1e-30:
                    assert ((probs == 1) & top).any(dim=-1).all()  # and only that


def test_a_temperature_too_small_to_matter_generates_what_greedy_does():
    model = tiny()
    prompt = torch.randint(0, 30, (2, 3))
    greedy = tokens(model, prompt, 20, temperature=0)
    for temperature in (5e-324, 1e-300, 1e-45, 1e-20, 9.9e-6):
        drawn = tokens(model, prompt, 20, temperature=temperature, generator=torch.Generator().manual_seed(1))
        assert torch.equal(drawn, greedy), temperature


@pytest.mark.parametrize("prompt_len", [1, 10, 16, 40])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_generation_give_identical_tokens(prompt_len, temperature):
    model = tiny(block_size=16).double()  # float64: no near-ties flipped by rounding
    prompt = torch.randint(0, 30, (3, prompt_len))  # batched: three samples at once
    kw = dict(temperature=temperature, top_k=20, top_p=0.95)
    cached = tokens(model, prompt, 50, kv_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    uncached = tokens(model, prompt, 50, kv_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("slabs", [True, False])
def test_in_float32_the_cached_logits_match_recomputing_whichever_cpu_product_runs(monkeypatch, slabs):
    import fast_linear

    monkeypatch.setattr(fast_linear, "slabs_pay", lambda threads: slabs)  # as if timed so on this CPU
    products = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: products.append(a) or real_bmm(*a))
    torch.manual_seed(0)  # width 256: c_attn, c_fc and the MLP's c_proj are large enough for the slab products
    model = GPT(GPTConfig(block_size=32, vocab_size=30, n_layer=2, n_head=4, n_embd=256)).eval()
    fast_linear.use_slab_products(model)
    with torch.no_grad():  # biases start at zero, where a product that dropped them would go unseen
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    idx = torch.randint(0, 30, (2, 24))
    with torch.inference_mode():
        full = model(idx)[0]  # (2, 24, V): every position at once, the usual product
        cache = model.new_cache(2)
        steps = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 24)]
    assert bool(products) == slabs
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_the_cache_feeds_one_position_per_step():
    model = tiny(block_size=16)
    lengths = []
    model.transformer.wte.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].size(1)))
    tokens(model, torch.randint(0, 30, (1, 5)), 30, temperature=0)
    # the prompt once (all but its last token, then that one, as every step feeds a row its newest token), then one
    # token per step; each time the 16 positions overflow, the last 12 are read again from position 0 the same way
    assert lengths == [4, 1] + [1] * 11 + ([11, 1] + [1] * 4) * 3 + [11, 1, 1, 1]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_cpu_path_for_one_token_computes_what_nn_linear_computes(monkeypatch, threads):
    import fast_linear

    slab_products = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: slab_products.append(a) or real_bmm(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(fast_linear, "slabs_pay", functools.cache(fast_linear.slabs_pay.__wrapped__))  # a fresh, empty cache
    torch.manual_seed(0)
    for out, inn, bias in [(1536, 384, True), (1001, 512, False), (50257, 64, False)]:  # 1001, 50257: ragged slabs
        layer = torch.nn.Linear(inn, out, bias=bias)
        fast_linear.use_slab_products(layer)
        for shape in [(1, 1, inn), (4, 1, inn), (2, 2, inn), (inn,)]:
            x = torch.randn(shape)
            reference = torch.nn.functional.linear(x, layer.weight.detach(), layer.bias)
            with torch.inference_mode():
                layer(x)  # the first use times the two products
                slab_products.clear()
                chosen = layer(x)  # whichever was faster here
                took_slabs = bool(slab_products)
                slabs = fast_linear.slab_linear(x, layer.weight, layer.bias)
            assert took_slabs == fast_linear.slabs_pay(threads) and slab_products
            assert slabs.shape == chosen.shape == reference.shape
            torch.testing.assert_close(slabs, reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chosen, reference, rtol=1e-5, atol=1e-5)
            slab_products.clear()
        with torch.inference_mode():  # more rows: the usual path
            layer(torch.randn(8, inn))
        assert not slab_products
        layer(torch.randn(1, inn)).sum().backward()  # training: the usual path, with gradients
        assert not slab_products and layer.weight.grad is not None
    assert fast_linear.slabs_pay.cache_info().misses == 1  # timed once per number of threads, not per weight


def test_the_one_token_path_takes_whichever_product_was_faster(monkeypatch):
    import fast_linear

    layer = torch.nn.Linear(384, 1536)
    fast_linear.use_slab_products(layer)
    x = torch.randn(1, 384)
    for slow, expect_slabs in (("bmm", False), ("linear", True)):
        monkeypatch.setattr(fast_linear, "slabs_pay", functools.cache(fast_linear.slabs_pay.__wrapped__))  # not timed yet
        used = []
        for name, module in (("bmm", torch), ("linear", torch.nn.functional)):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, real=real, name=name: used.append(name) or real(*a))

        def fake_repeat(stmt, number, repeat):  # a clock on which the `slow` product takes a second, no real timing
            used.clear()
            stmt()
            return [1.0 if slow in used else 0.001] * repeat

        monkeypatch.setattr(fast_linear.timeit, "repeat", fake_repeat)
        with torch.inference_mode():
            layer(x)  # the first call times both
            used.clear()
            layer(x)
        assert used == (["bmm"] if expect_slabs else ["linear"])
        monkeypatch.undo()


def test_a_model_loaded_for_sampling_takes_the_cpu_path_in_its_large_layers_only(tmp_path):
    import dataclasses

    import fast_linear
    import generate

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=4, n_embd=256))
    ckpt = dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                tokenizer=CharTokenizer("".join(chr(ord("a") + i) for i in range(30))).to_dict())
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded, tok = generate.load_for_sampling(str(tmp_path / "ckpt.pt"), "cpu", "float32")
    kinds = {name: type(m) for name, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"transformer.h.0.attn.c_attn": fast_linear.SlabLinear, "transformer.h.0.attn.c_proj": torch.nn.Linear,
                     "transformer.h.0.mlp.c_fc": fast_linear.SlabLinear, "transformer.h.0.mlp.c_proj": fast_linear.SlabLinear,
                     "lm_head": torch.nn.Linear}  # 256 x 256 and 30 x 256 stay in the caches: the plain product
    assert not loaded.training and tok.vocab_size == 30
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.state_dict().keys() == model.state_dict().keys()
    idx = torch.randint(0, 30, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def spread(model, scale=8.0):
    """The model with its final LayerNorm gain raised, so that its next-token distributions are far from uniform."""
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(scale)
    return model


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_temperature_reshapes_the_distribution_the_text_is_drawn_from():
    import io

    model = spread(tiny())
    tok = CharTokenizer("".join(chr(ord("a") + i) for i in range(30)))
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("abc")]))[0][0, -1].double()  # (V,) for the token after "abc"
    untempered = torch.softmax(logits, dim=-1)
    n = 20000
    for temperature in (0.5, 2.0):
        expected = torch.softmax(logits / temperature, dim=-1)
        assert total_variation(expected, untempered) > 0.2  # far enough apart to tell them from a sample
        texts = sample_text(model, tok, "abc", 1, num_samples=n, temperature=temperature, seed=0, out=io.StringIO())
        drawn = torch.bincount(torch.tensor(tok.encode("".join(t[-1] for t in texts))), minlength=30) / n
        assert total_variation(drawn.double(), expected) < 0.03, temperature  # sampling noise: about 0.015


def test_a_prompt_longer_than_the_block_is_cut_to_its_last_tokens():
    model = tiny(block_size=16).double()
    prompt = torch.randint(0, 30, (2, 40))
    out = tokens(model, prompt, 6, temperature=0)
    other_start = prompt.clone()
    other_start[:, :24] = torch.randint(0, 30, (2, 24))  # all but the last 16 tokens
    assert torch.equal(tokens(model, other_start, 6, temperature=0), out)
    other_end = prompt.clone()
    other_end[:, -1] = (prompt[:, -1] + 1) % 30
    assert not torch.equal(tokens(model, other_end, 6, temperature=0), out)
    keep = 16 - 16 // 4  # as generate()'s docstring says: the last 3/4 of the block
    assert torch.equal(tokens(model, prompt[:, -keep:], 6, temperature=0), out)


@pytest.mark.parametrize("text", ["a 🙂 and café, 🙂!", "ends mid-character 🙂"])
def test_streamed_text_is_the_decoded_text_when_tokens_split_characters(monkeypatch, text):
    import io

    import generate
    from tokenizer import BPETokenizer

    tok = BPETokenizer.train("plain words, over and over. " * 50, vocab_size=270)
    ids = tok.encode(text)
    assert len(tok.encode("🙂")) == 4 and len(tok.encode("é")) == 2  # byte tokens: characters split up
    if text.startswith("ends"):
        ids = ids[:-2]  # the generation stops halfway through the emoji's bytes
    monkeypatch.setattr(generate, "generate", lambda *args: (torch.tensor([i]) for i in ids))  # these tokens
    out = io.StringIO()
    texts = sample_text(tiny(vocab_size=tok.vocab_size), tok, "Say:", len(ids), out=out)
    assert out.getvalue() == "Say:" + tok.decode(ids) + "\n"
    assert texts == ["Say:" + tok.decode(ids)]
