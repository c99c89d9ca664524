import math

import pytest
import torch

from gpt import GPT2_SIZES, GPT, GPTConfig, parameter_table, rotary


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


def test_every_parameter_starts_as_gpt2_initialises_it():
    # wide and deep enough that each matrix's sample std is within 1% of the true one (its error is 1/sqrt(2 n))
    L = 6
    model = tiny(n_layer=L, n_embd=256, vocab_size=512, block_size=256)
    residual = 0.02 / math.sqrt(2 * L)  # the two projections per block that write into the residual stream
    expected = {"transformer.wte.weight": 0.02, "transformer.wpe.weight": 0.02}
    for i in range(L):
        expected |= {f"transformer.h.{i}.attn.c_attn.weight": 0.02, f"transformer.h.{i}.attn.c_proj.weight": residual,
                     f"transformer.h.{i}.mlp.c_fc.weight": 0.02, f"transformer.h.{i}.mlp.c_proj.weight": residual}
    for name, p in model.named_parameters():
        if name in expected:
            assert abs(p.mean().item()) < 0.05 * expected[name], name
            assert p.std().item() == pytest.approx(expected[name], rel=0.03), name
        elif name.endswith("bias"):  # of every Linear and LayerNorm
            assert torch.all(p == 0), name
        else:  # LayerNorm gains
            assert name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) and torch.all(p == 1), name
    assert set(expected) <= {name for name, _ in model.named_parameters()}


def test_cropping_the_block_keeps_the_first_positions():
    model = tiny(block_size=32).eval()
    wpe = model.transformer.wpe.weight.detach().clone()
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model(idx)[0]
        model.crop_block_size(8)
        after = model(idx)[0]
    assert model.config.block_size == 8 and torch.equal(model.transformer.wpe.weight, wpe[:8])
    assert torch.equal(after, before)  # positions 0..7 mean what they meant before


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


def written_out(model, fused=False):
    return model.use_fused_attention(fused)


@pytest.mark.parametrize("prompt_len", [1, 7, 16])
def test_the_written_out_attention_equals_the_fused_kernel_with_and_without_the_cache(prompt_len):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # biases start at zero, where a wrong mask or scale could hide less well
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        fast = model(idx)[0]
        slow = written_out(model)(idx)[0]
        torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
        # with the cache: the prompt in one pass, then one token at a time up to the block, both ways
        for use_fast in (True, False):
            written_out(model, use_fast)
            cache = model.new_cache(3)
            steps = [model(idx[:, :prompt_len], cache=cache)[0]]
            steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(prompt_len, 16)]
            torch.testing.assert_close(torch.cat(steps, dim=1), fast, rtol=1e-5, atol=1e-5)


def test_the_written_out_attention_keeps_weights_that_are_causal_and_sum_to_one():
    model = written_out(tiny().eval())
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 16)))
    for block in model.transformer.h:
        weights = block.attn.weights  # (B, nh, T, T)
        assert weights.shape == (2, 2, 16, 16)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 16))
        assert torch.all(weights.triu(diagonal=1) == 0) and torch.all(weights.diagonal(dim1=-2, dim2=-1) > 0)


def test_the_written_out_attention_trains_like_the_fused_kernel():
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    grads = []
    for fast in (True, False):
        model = written_out(tiny(), fast)
        model(x, y)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


SWITCHES = dict(rope=True, rmsnorm=True, qk_norm=True, relu2=True, zero_init=True, tie_embeddings=False)


def test_rotary_scores_depend_only_on_how_far_apart_a_query_and_a_key_are():
    from gpt import rotary, rotate

    def at(x, start):  # x (1, 2, 8, 16) at positions start, ..., start + 7
        return rotate(x, rotary(torch.arange(start, start + 8), 16, x.dtype))

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16, dtype=torch.float64), torch.randn(1, 2, 8, 16, dtype=torch.float64)
    scores = at(q, 0) @ at(k, 0).transpose(-2, -1)  # (1, 2, 8, 8): query i, key j at positions i, j
    for shift in (1, 5, 1000):  # the same tokens further along: every distance is the same, so every score is
        torch.testing.assert_close(at(q, shift) @ at(k, shift).transpose(-2, -1), scores)
    assert not torch.allclose(at(q, 0) @ at(k, 3).transpose(-2, -1), scores)  # other distances differ
    torch.testing.assert_close(at(q, 7).norm(dim=-1), q.norm(dim=-1))  # a rotation: lengths stay


def test_rotary_turns_each_pair_of_dimensions_as_a_complex_number_times_its_phase():
    from gpt import rotary, rotate

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    z = torch.complex(x[..., :4], x[..., 4:])  # pair (i, i + 4) as x_i + j x_{i+4}
    position = torch.arange(10, 15, dtype=torch.float64)[:, None]  # (5, 1): positions 10..14
    frequency = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)  # 10000^(-2i/8)
    turned = z * torch.polar(torch.ones(5, 4, dtype=torch.float64), position * frequency)  # times e^(j angle)
    expected = torch.cat([turned.real, turned.imag], dim=-1)
    torch.testing.assert_close(rotate(x, rotary(torch.arange(10, 15), 8, x.dtype)), expected, rtol=1e-12, atol=1e-12)


def test_rmsnorm_is_x_over_its_root_mean_square_times_a_gain():
    from gpt import norm

    layer = norm(GPTConfig(rmsnorm=True), 32)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, 32, dtype=torch.float64) * 3 + 1
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * layer.weight.double()
    torch.testing.assert_close(layer.double()(x), expected)
    assert isinstance(norm(GPTConfig(), 32), torch.nn.LayerNorm)


@pytest.mark.parametrize("switch", list(SWITCHES) + ["all"])
def test_each_switch_keeps_the_model_causal_and_the_cache_exact(switch):
    torch.manual_seed(0)
    kw = SWITCHES if switch == "all" else {switch: SWITCHES[switch]}
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **kw)).double().eval()
    with torch.no_grad():  # past zero-initialised projections, so that every block does something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        full = model(idx)[0]
        changed = idx.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 50
        assert torch.equal(model(changed)[0][:, :9], full[:, :9])  # the future does not reach the past
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full)
        written = written_out(model)(idx)[0]
        torch.testing.assert_close(written, full)


def test_the_switches_change_what_they_say():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **SWITCHES))
    names = dict(model.named_parameters())
    assert "transformer.wpe.weight" not in names  # RoPE: no position table
    assert model.lm_head.weight is not model.transformer.wte.weight and "lm_head.weight" in names  # untied
    assert all(torch.all(p == 0) for n, p in names.items() if n.endswith("c_proj.weight"))  # zero-initialised
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    baseline = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    assert model.num_params() == baseline.num_params() - 16 * 32 + 50 * 32 - 2 * 2 * 32 - 32  # no wpe, a head, no biases in norms


def test_use_fused_attention_reaches_every_block():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16))
    assert [b.attn.fused for b in model.transformer.h] == [True] * 3  # the kernel by default
    assert model.use_fused_attention(False) is model
    assert [b.attn.fused for b in model.transformer.h] == [False] * 3


def test_generate_crops_its_context_to_the_block_and_appends_one_sampled_token_per_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    seen = []
    real = model.forward
    model.forward = lambda idx, targets=None: seen.append(idx.shape) or real(idx, targets)
    idx = torch.randint(0, 50, (3, 5))
    out = model.generate(idx, max_new_tokens=6)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], idx)
    assert seen == [(3, 5), (3, 6), (3, 7), (3, 8), (3, 8), (3, 8)]  # at most block_size positions, the latest
    torch.manual_seed(1)
    first = model.generate(idx, 1)[:, -1]
    torch.manual_seed(1)
    probs = torch.softmax(real(idx)[0][:, -1], dim=-1)
    assert torch.equal(first, torch.multinomial(probs, 1)[:, 0])  # drawn from the last position's softmax


def test_relu2_mlp_is_the_projection_of_relu_squared():
    torch.manual_seed(0)
    mlp = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16, relu2=True)).transformer.h[0].mlp
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mlp = mlp.double()
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    expected = torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_attention_turns_queries_and_keys_by_position_and_leaves_values_alone(qk_norm):
    """The attention layer against its definition, written out here: q, k, v from c_attn; with qk_norm, each
    head's q and k divided by their root mean square; each pair (i, i + hs/2) of q and k turned as a complex
    number by the angle position * 10000^(-2i/hs); v as it is; softmax(q k^T / sqrt(hs)) over the past; c_proj."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, rope=True, qk_norm=qk_norm)
    model = GPT(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    attn, (B, T, C, nh, hs) = model.transformer.h[0].attn, (2, 7, 16, 2, 8)
    x = torch.randn(B, T, C, dtype=torch.float64)
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=-1)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    if qk_norm:
        q, k = (t / torch.sqrt((t * t).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps) for t in (q, k))
    angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    phase = torch.polar(torch.ones_like(angle), angle)  # (T, hs/2): e^(j angle)

    def turned(t):
        z = torch.complex(t[..., : hs // 2], t[..., hs // 2 :]) * phase
        return torch.cat([z.real, z.imag], dim=-1)

    scores = turned(q) @ turned(k).transpose(-2, -1) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    expected = y @ attn.c_proj.weight.T + attn.c_proj.bias
    with torch.no_grad():
        for fused in (True, False):
            model.use_fused_attention(fused)
            out = attn(x, rotation=rotary(torch.arange(T), hs, x.dtype))
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
