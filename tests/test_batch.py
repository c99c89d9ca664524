"""Different prompts in one batch (generate.Batch): every row generates exactly what its prompt generates alone,
whatever the other rows' lengths, past block_size, with either position scheme and with or without the cache; pads
are never seen; rows join and leave between steps."""

import pytest
import torch

from generate import Batch, generate
from gpt import GPT, GPTConfig


def model_of(rope, block_size=16, vocab_size=40):
    """A random model in float64 whose logits are spread widely: greedy decoding meets no near-ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, rope=rope))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.double().eval()


def run(model, prompts, n, **kw):
    return torch.stack(list(generate(model, prompts, n, **kw)), dim=1).tolist()  # B lists of n tokens


PROMPTS = [[3], [5, 1, 7, 2, 9, 11, 4], [8, 8, 2, 30, 1, 5, 5, 6, 7, 21, 22, 23, 1, 2], list(range(20))]  # 1 to 20


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_each_row_of_a_batch_greedily_generates_what_its_prompt_generates_alone(rope, kv_cache):
    model = model_of(rope)
    together = run(model, PROMPTS, 30, temperature=0, kv_cache=kv_cache)  # 30 tokens: each row outgrows 16
    for prompt, row in zip(PROMPTS, together):
        assert row == run(model, [prompt], 30, temperature=0, kv_cache=True)[0]
        assert row == run(model, [prompt], 30, temperature=0, kv_cache=False)[0]


@pytest.mark.parametrize("rope", [False, True])
def test_sampled_rows_draw_what_their_prompts_draw_alone_from_the_same_seed(rope):
    model = model_of(rope)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    seeds = [7, 8, 9, 10]
    together = run(model, PROMPTS, 25, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    for prompt, seed, row in zip(PROMPTS, seeds, together):
        assert row == run(model, [prompt], 25, generator=torch.Generator().manual_seed(seed), **kw)[0]
    again = run(model, PROMPTS, 25, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    assert again == together and len({tuple(r) for r in together}) == 4


@pytest.mark.parametrize("fused", [True, False])
def test_the_pad_token_changes_nothing_in_either_attention(fused, monkeypatch):
    model = model_of(rope=True).use_fused_attention(fused)
    logits = []
    for pad in (0, 17, 39):  # whatever stands in the padding, no real token sees it
        monkeypatch.setattr(Batch, "pad", pad)
        for kv_cache in (True, False):
            batch = Batch(model, kv_cache)
            for prompt in PROMPTS:
                batch.add(prompt)
            with torch.inference_mode():
                logits.append(batch.logits())
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=1e-12, atol=1e-12)
    model.use_fused_attention(not fused)  # and the written-out attention agrees with the kernel on padded rows
    batch = Batch(model)
    for prompt in PROMPTS:
        batch.add(prompt)
    with torch.inference_mode():
        torch.testing.assert_close(batch.logits(), logits[0], rtol=1e-10, atol=1e-10)


def test_rows_join_and_leave_between_steps_and_each_still_generates_what_it_would_alone():
    model = model_of(rope=True)
    alone = {i: run(model, [p], 24, temperature=0)[0] for i, p in enumerate(PROMPTS)}
    batch, rows, made = Batch(model), [], {i: [] for i in range(len(PROMPTS))}
    plan = {0: [0, 1], 5: [2], 9: [3]}  # step: prompts that join; each leaves once it has 24 tokens
    with torch.inference_mode():
        for step in range(80):
            for i in plan.get(step, []):
                batch.add(PROMPTS[i])
                rows.append(i)
            if not rows:
                break
            tokens = batch.logits().argmax(dim=-1).tolist()
            batch.append(tokens)
            for i, token in zip(rows, tokens):
                made[i].append(token)
            for r in reversed(range(len(rows))):  # finished rows leave; the last row takes the place of each
                if len(made[rows[r]]) == 24:
                    batch.remove(r)
                    rows[r] = rows[-1]
                    rows.pop()
    assert made == alone
    assert len(batch.cache.lens) >= 3  # grew as rows joined


def test_one_generator_for_the_whole_batch_is_reproducible():
    model = model_of(rope=False)
    first = run(model, PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert first == run(model, PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def checkpoint(tmp_path):
    import dataclasses

    from tokenizer import CharTokenizer

    model = model_of(rope=True, block_size=32).float()
    tok = CharTokenizer("".join(chr(ord("a") + i) for i in range(26)) + " .,:;!?\n'-ABCD")
    assert tok.vocab_size == model.config.vocab_size
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), tokenizer=tok.to_dict()),
               tmp_path / "ckpt.pt")
    return tmp_path


def test_generate_py_continues_a_file_of_prompts_and_row_i_is_its_prompt_alone_with_seed_plus_i(checkpoint, capsys):
    import generate

    prompts = ["ab", "the king said: ", "ABC", "a longer prompt than the others, to pass the block"]
    (checkpoint / "prompts.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    (checkpoint / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts), encoding="utf-8")
    common = [f"--init_from={checkpoint / 'ckpt.pt'}", "--max_new_tokens=40", "--seed=5", "--device=cpu"]
    outputs = []
    for source in ("prompts.txt", "prompts.jsonl"):
        generate.main([*common, f"--prompts={checkpoint / source}"])
        outputs.append(capsys.readouterr().out.rstrip("\n").split("\n" + "-" * 80 + "\n"))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4
    for i, prompt in enumerate(prompts):
        generate.main([*common, f"--prompt={prompt}", f"--seed={5 + i}"])
        alone = capsys.readouterr().out.rstrip("\n")
        assert outputs[0][i] == alone and alone.startswith(prompt) and len(alone) == len(prompt) + 40


def test_bad_prompts_files_are_one_line_errors(checkpoint, script):
    (checkpoint / "empty.txt").write_text("\n\n", encoding="utf-8")
    (checkpoint / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    (checkpoint / "number.jsonl").write_text('{"prompt": 7}\n', encoding="utf-8")
    common = [f"--init_from={checkpoint / 'ckpt.pt'}", "--device=cpu"]
    for args, message in (([f"--prompts={checkpoint / 'empty.txt'}"], "holds no prompt; write one per line"),
                          ([f"--prompts={checkpoint / 'bad.jsonl'}"], "bad.jsonl line 2 is not a JSON object"),
                          ([f"--prompts={checkpoint / 'number.jsonl'}"], "line 1: the prompt must be a string"),
                          ([f"--prompts={checkpoint / 'none.txt'}"], "cannot read the prompts file"),
                          ([f"--prompts={checkpoint / 'empty.txt'}", "--prompt=x"], "--prompt or --prompts, not both")):
        with pytest.raises(SystemExit, match=message):
            script("generate", *common, *args)
