"""Seeing what a model learned (look.py): exact evaluation, the run log and its curves, attention maps, embedding
neighbours, and samples during training."""

import importlib
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import look
from configurator import UserError
from conftest import GPT2_TIKTOKEN, one_error_line, oracle, random_gpt2, run_script, shared_file, write_vocab_and_merges
from gpt import GPT, GPTConfig
from test_safety import start, wait_for
from tokenizer import BPETokenizer, CharTokenizer, gpt2_tokenizer

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--warmup_iters=2", "--learning_rate=1e-2", "--sample_length=0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sharp(block_size=8, vocab_size=30, n_layer=2, seed=0):
    """A small random GPT whose predictions depend strongly on the context (GPT-2's init is nearly uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# eval


def brute_force_losses(model, ids, stride):
    """-log p of each token after the first, one forward pass per token, over the context its window gives it:
    the window that first predicts token t starts at the first multiple of stride with start + T >= t (the last
    window ends with the text)."""
    T = min(model.config.block_size, len(ids) - 1)
    losses = []
    for t in range(1, len(ids)):
        start = 0 if t <= T else min(math.ceil((t - T) / stride) * stride, len(ids) - 1 - T)
        logits, _ = model(torch.tensor([ids[start:t]]))
        losses.append(-F.log_softmax(logits[0, -1].double(), dim=-1)[ids[t]].item())
    return losses


@pytest.mark.parametrize("n, stride, batch_tokens", [(50, 1, 20), (50, 3, 8), (50, 8, 1000), (41, 5, 16), (6, 4, 100)])
def test_eval_equals_a_token_by_token_computation(n, stride, batch_tokens):
    model = sharp()
    ids = torch.randint(0, 30, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    losses = look.token_losses(model, ids, stride, batch_tokens)
    assert losses.shape == (n - 1,)
    assert torch.allclose(losses, torch.tensor(brute_force_losses(model, ids, stride), dtype=torch.float64),
                          atol=1e-5)


def test_with_stride_1_every_token_after_the_first_window_sees_the_full_block():
    model = sharp()
    ids = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    full = [-F.log_softmax(model(torch.tensor([ids[max(0, t - 8) : t]]))[0][0, -1], -1)[ids[t]].item()
            for t in range(1, 40)]  # the textbook definition: the last block_size tokens before t
    assert torch.allclose(look.token_losses(model, ids, 1).float(), torch.tensor(full), atol=1e-5)
    assert not torch.allclose(look.token_losses(model, ids, 8).float(), torch.tensor(full), atol=1e-3)  # it matters


def test_bits_per_byte_is_loss_times_tokens_over_ln2_times_bytes():
    text = "éte naïve — café, crème brûlée! " * 3  # more bytes than characters, the first one two bytes long
    tok = CharTokenizer.train(text)
    model = sharp(vocab_size=tok.vocab_size)
    r = look.evaluate(model, tok, tok.encode(text), stride=4)
    tokens, n_bytes = len(text) - 1, len(text.encode("utf-8")) - len("é".encode("utf-8"))
    assert (r["tokens"], r["bytes"]) == (tokens, n_bytes) and n_bytes > tokens
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * tokens / (math.log(2) * n_bytes), rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_eval_of_a_bpe_model_counts_the_bytes_of_its_text(corpus):
    text = (corpus / "input.txt").read_text(encoding="utf-8")[:1000]
    tok = BPETokenizer.train(text, 300)
    ids = tok.encode(text)
    model = sharp(block_size=16, vocab_size=tok.vocab_size)
    r = look.evaluate(model, tok, ids, stride=8)
    n_bytes = len(text.encode("utf-8")) - len(tok.decode_bytes(ids[:1]))
    assert r["tokens"] == len(ids) - 1 < n_bytes == r["bytes"]
    assert r["bits_per_byte"] == pytest.approx(sum(brute_force_losses(model, ids, 8)) / (math.log(2) * n_bytes))


def test_eval_of_a_checkpoint_reads_the_val_split_it_was_trained_on(script, corpus, capsys):
    importlib.import_module("prepare").prepare(data_dir="data/mine")
    script("train", *TINY, "--max_iters=5", "--data_dir=data/mine")
    capsys.readouterr()
    script("look", "eval", "--init_from=out/last.pt", "--stride=16")
    out = capsys.readouterr().out
    model, tok, _ = look.load("out/last.pt", "cpu")
    ids = np.fromfile(corpus / "data" / "mine" / "val.bin", dtype=np.uint16).tolist()
    loss = look.token_losses(model, ids, 16).mean().item()  # held to the token-by-token computation above
    assert f"out/last.pt on data/mine/val.bin: {len(ids) - 1:,} tokens predicted" in out
    assert f"loss {loss:.4f} nats per token" in out and "at least 1 token of context" in out


def test_eval_of_a_gpt2_folder_gives_the_loss_transformers_computes(tmp_path, monkeypatch, capsys):
    hf = random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf.save_pretrained(tmp_path / "random-gpt2", safe_serialization=True)
    write_vocab_and_merges(gpt2_tokenizer(shared_file(GPT2_TIKTOKEN)), tmp_path / "random-gpt2")
    model, tok, trained_on = look.load(str(tmp_path / "random-gpt2"), "cpu")
    ids = tok.encode("The king and queen spoke to their people about bread, wine and war.")
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # one window: every token
    assert look.evaluate(model, tok, ids, stride=32)["loss"] == pytest.approx(expected, abs=1e-5)
    assert trained_on == ""

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="GPT-2's published weights come with no val split; pass --input=FILE"):
        look.main(["eval", "--init_from=gpt2"])  # before any download
    look.main(["neighbours", "--init_from=random-gpt2", "--tokens=king war", "--top=2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["' king'", "' war'"]


def test_bad_checkpoint_empty_text_and_unknown_characters_are_one_line_errors(script, corpus):
    script("train", *TINY, "--max_iters=1")
    (corpus / "bad.pt").write_bytes(os.urandom(3000))
    (corpus / "empty.txt").write_text("", encoding="utf-8")
    (corpus / "foreign.txt").write_text("The king 日本", encoding="utf-8")
    for args, message in [(["--init_from=bad.pt"], "bad.pt is not a readable checkpoint"),
                          (["--init_from=out/last.pt", "--input=empty.txt"], "empty.txt holds 0 tokens"),
                          (["--init_from=out/last.pt", "--input=foreign.txt"], "outside this model's vocabulary")]:
        assert message in one_error_line(run_script("look.py", "eval", *args, cwd=corpus))


@pytest.mark.parametrize("args, message", [
    ([], "no command; use python look.py eval | curves | attention | neighbours"),
    (["evaluate"], "unknown command 'evaluate'"),
    (["eval", "--stride=17"], "--stride=17 is longer than the windows (16 tokens)"),
    (["eval", "--input=missing.txt"], "cannot read --input=missing.txt"),
    (["eval", "--data_dir=nowhere"], "no prepared data in nowhere"),
    (["curves", "--runs=nowhere"], "cannot read the log nowhere/log.jsonl"),
    (["neighbours", "--tokens=日"], "outside this model's vocabulary"),
    (["attention", "--prompt="], "the prompt is empty"),
])
def test_look_rejects_bad_settings(script, args, message):
    script("train", *TINY, "--max_iters=1")
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        script("look", *args[:1], "--init_from=out/last.pt", *args[1:])


# -----------------------------------------------------------------------------
# the run log, and its picture


def test_the_log_holds_every_progress_line_and_evaluation_once(script, corpus, capsys):
    script("train", *TINY, "--max_iters=20", "--eval_interval=10")
    printed = capsys.readouterr().out.splitlines()
    rows = read_rows(corpus / "out" / "log.jsonl")
    steps = [(r["step"], "val_loss" in r) for r in rows]
    assert steps == [(0, True), (5, False), (10, False), (10, True), (15, False), (20, False), (20, True)]
    shown = [f"iter {r['step']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}," if "lr" in r else
             f"step {r['step']}: train loss {r['train_loss']:.4f}, val loss {r['val_loss']:.4f}" for r in rows]
    assert shown == [line[: len(s)] for line, s in zip([p for p in printed if p.startswith(("iter", "step"))], shown)]
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and all(r["tokens_per_s"] > 0 for r in rows if "lr" in r)


def test_after_a_kill_and_a_resume_the_log_has_every_step_once(script, corpus):
    args = [*TINY, "--log_interval=1", "--eval_interval=10", "--lr_decay_iters=400", "--dropout=0.1"]
    process = start([*args, "--max_iters=400", "--out_dir=broken"], corpus)
    wait_for(process, "iter 13:")  # the checkpoint is at step 10; the log has rows past it
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert torch.load(corpus / "broken" / "last.pt", weights_only=True)["iter_num"] < 40
    script("train", "--init_from=resume", "--max_iters=40", "--out_dir=broken")
    script("train", *args, "--max_iters=40", "--out_dir=straight")

    def content(rows):  # all but the timings
        return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]

    broken, straight = read_rows(corpus / "broken" / "log.jsonl"), read_rows(corpus / "straight" / "log.jsonl")
    assert [r["step"] for r in broken if "lr" in r] == list(range(1, 41))
    assert [r["step"] for r in broken if "val_loss" in r] == [0, 10, 20, 30, 40]
    assert content(broken) == content(straight)  # the resumed run goes on exactly, and so does its log
    seconds = [r["seconds"] for r in broken]
    assert seconds == sorted(seconds)  # the clock goes on from the checkpoint's


def write_log(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_log(scale):
    """The rows train.py would log with log_interval 10 and eval_interval 50, made up."""
    rows = []
    for step in range(0, 101, 10):
        if step:
            rows.append(dict(step=step, seconds=step * scale, loss=4 - step / 50, lr=1e-3, tokens_per_s=1e3))
        if step % 50 == 0:
            rows.append(dict(step=step, seconds=step * scale + 0.5, train_loss=4 - step / 60, val_loss=4 - step / 70))
    return rows


def test_the_curves_plot_the_logs_numbers_and_write_a_png(script, corpus):
    oracle("matplotlib")
    write_log(str(corpus / "a" / "log.jsonl"), fake_log(0.1))
    write_log(str(corpus / "b" / "run.jsonl"), fake_log(0.3)[:8])
    script("look", "curves", "--runs=a,b/run.jsonl", "--png=both.png")
    assert (corpus / "both.png").read_bytes()[:8] == PNG_SIGNATURE

    logs = {"a": look.read_log("a"), "b": look.read_log("b/run.jsonl")}
    fig = look.draw_curves(logs, str(corpus / "again.png"))
    by_step, by_time = fig.axes
    assert by_step.get_xlabel() == "step" and by_time.get_xlabel() == "seconds of training"
    assert by_step.get_ylabel() == "loss (nats per token)"
    for ax, x in ((by_step, "step"), (by_time, "seconds")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"a: train", "a: val", "b: train", "b: val"}
        for name, rows in logs.items():
            train, val = lines[f"{name}: train"], lines[f"{name}: val"]
            assert list(train.get_xdata()) == [r[x] for r in rows if "lr" in r]
            assert list(train.get_ydata()) == [r["loss"] for r in rows if "lr" in r]
            assert list(val.get_xdata()) == [r[x] for r in rows if "val_loss" in r]
            assert list(val.get_ydata()) == [r["val_loss"] for r in rows if "val_loss" in r]


def test_without_matplotlib_a_picture_is_a_one_line_error_saying_how_to_install_it(corpus):
    write_log(str(corpus / "out" / "log.jsonl"), fake_log(0.1))
    hidden = corpus / "no_matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=str(hidden.parent))
    assert "pip install matplotlib" in one_error_line(run_script("look.py", "curves", cwd=corpus, env=env))


# -----------------------------------------------------------------------------
# attention


def test_attention_rows_sum_to_1_see_no_future_and_give_the_fast_paths_output():
    model = sharp(block_size=16, n_layer=3)
    ids = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    hooks = [block.attn.register_forward_hook(keep) for block in model.transformer.h]
    with torch.no_grad():
        model(torch.tensor([ids]))  # the fast path (SDPA): what each attention layer takes in and puts out
    for h in hooks:
        h.remove()

    maps = look.attention_maps(model, ids)
    assert maps.shape == (3, 2, 12, 12)
    assert torch.allclose(maps.sum(-1), torch.ones(3, 2, 12))
    assert torch.equal(maps.triu(diagonal=1), torch.zeros_like(maps))
    assert all(m.fused for m in (b.attn for b in model.transformer.h))  # put back as it was
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            v = block.attn.c_attn(inputs[layer]).split(16, dim=-1)[2]  # (1, T, C): the values
            v = v.view(1, 12, 2, 8).transpose(1, 2)  # (1, nh, T, hs)
            y = (maps[layer : layer + 1] @ v).transpose(1, 2).reshape(1, 12, 16)  # weights @ values, heads joined
            assert torch.allclose(block.attn.c_proj(y), outputs[layer], atol=1e-5)


def test_the_attention_picture_shows_every_layer_and_head_with_the_tokens(script, corpus):
    oracle("matplotlib")
    script("train", *TINY, "--max_iters=1", "--n_layer=2")
    script("look", "attention", "--init_from=out/last.pt", "--prompt=The king\nspoke")
    assert (corpus / "attention.png").read_bytes()[:8] == PNG_SIGNATURE
    model, tok, _ = look.load("out/last.pt", "cpu")
    ids = tok.encode("The king\nspoke")
    labels = [look.token_label(tok, i) for i in ids]
    assert labels[:4] == ["T", "h", "e", "\u2423"] and labels[8] == "\\n"
    maps = look.attention_maps(model, ids)
    fig = look.draw_attention(maps, labels, str(corpus / "again.png"))
    assert len(fig.axes) == 2 * 2
    for k, ax in enumerate(fig.axes):
        assert np.array_equal(ax.get_images()[0].get_array(), maps[k // 2, k % 2].numpy())
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == labels  # the bottom row names the keys
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels  # the left column the queries


# -----------------------------------------------------------------------------
# neighbours


def test_planted_embeddings_give_the_neighbours_they_were_built_to_give():
    model = sharp(vocab_size=8)
    table = torch.zeros(8, 16)
    table[0, 0] = 1.0
    table[1, :2] = torch.tensor([0.9, 0.1])  # nearest to 0 by angle
    table[2, :2] = torch.tensor([50.0, 20.0])  # second: its dot product with 0 is the largest, its angle is not
    table[3, 0] = -1.0  # opposite to 0: the farthest
    table[4, 1] = 1.0  # at right angles to 0
    table[5, 1:3] = torch.tensor([1.0, 0.2])  # nearest to 4
    table[6, 2], table[7, 3] = 1.0, 1.0
    with torch.no_grad():
        model.transformer.wte.weight.copy_(table)
    near = look.neighbours(model, [0, 4], 2)
    assert [[i for i, _ in row] for row in near] == [[1, 2], [5, 2]]
    unit = table.double() / table.double().norm(dim=1, keepdim=True)
    for query, row in zip([0, 4], near):
        for i, sim in row:
            assert sim == pytest.approx((unit[query] @ unit[i]).item(), abs=1e-6)
    assert [i for i, _ in look.neighbours(model, [0], 7)[0]][-1] == 3


def test_named_tokens_are_characters_for_a_char_model_and_words_after_a_space_for_bpe(corpus):
    char = CharTokenizer.train("abc .\n")
    assert look.named_tokens(char, "a.\n") == char.encode("a.\n")
    bpe = BPETokenizer.train((corpus / "input.txt").read_text(encoding="utf-8"), 400)
    assert look.named_tokens(bpe, "king the") == [bpe.encode(" king")[0], bpe.encode(" the")[0]]
    with pytest.raises(UserError, match="'kingqueenbread' is .* tokens for this tokenizer, not one"):
        look.named_tokens(bpe, "kingqueenbread")


def test_neighbours_prints_each_named_token_with_its_nearest(script, capsys):
    script("train", *TINY, "--max_iters=1")
    capsys.readouterr()
    script("look", "neighbours", "--init_from=out/last.pt", "--tokens=ak", "--top=3")
    lines = capsys.readouterr().out.splitlines()
    model, tok, _ = look.load("out/last.pt", "cpu")
    for line, char in zip(lines, "ak"):
        expected = "  ".join(f"{tok.decode([j])!r} {s:.2f}" for j, s in look.neighbours(model, tok.encode(char), 3)[0])
        assert line == f"{char!r:>10}:  {expected}"
    assert len(lines) == 2


# -----------------------------------------------------------------------------
# samples during training


def test_samples_at_each_evaluation_leave_the_run_exactly_as_it_was(script, corpus, capsys):
    args = [*TINY, "--max_iters=12", "--eval_interval=4", "--dropout=0.1"]  # dropout: it must stay in train mode
    script("train", *args, "--out_dir=quiet")
    capsys.readouterr()
    script("train", *args, "--out_dir=talking", "--eval_sample_length=30")
    assert capsys.readouterr().out.count("a sample") == 4  # steps 0, 4, 8 and 12
    a, b = (torch.load(corpus / d / "last.pt", weights_only=True) for d in ("quiet", "talking"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# -----------------------------------------------------------------------------
# HellaSwag

HELLASWAG = [  # in the format of rowanz/hellaswag's hellaswag_val.jsonl: the first is its documented example
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour and sugar in a bowl.",
     "ctx_b": "she", "ctx": "A woman mixes flour and sugar in a bowl. she", "split": "val", "split_type": "zeroshot",
     "label": 0, "endings": ["cracks two eggs into it.", "paints the fence", "drives away quickly, honking.", "sings"],
     "source_id": "made-up~1"},
    {"ind": 7, "activity_label": "Long context", "ctx_a": "word " * 70, "ctx_b": "then", "ctx": "word " * 70 + "then",
     "split": "val", "split_type": "indomain", "label": 2,  # longer than the model's 64 positions: cut from the left
     "endings": ["a b c", "stops.", "the end of a very long ending that goes on", "x"], "source_id": "made-up~2"},
]


def reference_hellaswag(hf, enc, questions, block_size):
    """Each ending's summed and mean loss, one transformers forward pass per ending, tokens from tiktoken."""
    sums, means = [], []
    for q in questions:
        for ending in q["endings"]:
            context, tail = enc.encode(q["ctx"]), enc.encode(" " + ending)
            ids = (context + tail)[-(block_size + 1):]
            with torch.no_grad():
                logits = hf(torch.tensor([ids[:-1]])).logits[0]  # (T, V)
            losses = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")[-len(tail):]
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
    return torch.tensor(sums).view(-1, 4), torch.tensor(means).view(-1, 4)


def test_hellaswag_scores_endings_as_transformers_does_and_downloads_the_file_once(tmp_path, monkeypatch, capsys):
    from conftest import gpt2_reference
    from test_prepare import RangeServer

    hf = random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf.save_pretrained(tmp_path / "random-gpt2", safe_serialization=True)
    write_vocab_and_merges(gpt2_tokenizer(shared_file(GPT2_TIKTOKEN)), tmp_path / "random-gpt2")
    questions = HELLASWAG * 2  # 6 questions, 24 rows: several batches at batch_tokens=200
    for i, q in enumerate(questions):
        questions[i] = dict(q, label=i % 4)
    sums, means = reference_hellaswag(hf, gpt2_reference(), questions, 64)

    model, tok, _ = look.load(str(tmp_path / "random-gpt2"), "cpu")
    r = look.score_hellaswag(model, tok, [(q["ctx"], q["endings"], q["label"]) for q in questions], batch_tokens=200)
    torch.testing.assert_close(r["sums"], sums.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r["means"], means.double(), rtol=1e-5, atol=1e-4)
    labels = torch.tensor([q["label"] for q in questions])
    acc, acc_norm = ((x.argmin(1) == labels).double().mean().item() for x in (sums, means))
    assert (r["acc"], r["acc_norm"]) == (acc, acc_norm)

    # the command: the file downloaded once, into the cache, and read again from there
    server = RangeServer("".join(json.dumps(q) + "\n" for q in questions).encode("utf-8"))
    try:
        monkeypatch.setattr(look, "HELLASWAG_URL", server.url)
        monkeypatch.setattr(look, "CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path)
        acc, acc_norm = ((x[:3].argmin(1) == labels[:3]).double().mean().item() for x in (sums, means))
        for _ in range(2):
            look.main(["hellaswag", "--init_from=random-gpt2", "--device=cpu", "--limit=3"])
            assert capsys.readouterr().out.strip() == (f"random-gpt2 on HellaSwag (3 validation questions): "
                                                       f"acc {acc:.4f}, acc_norm {acc_norm:.4f}")
        assert server.ranges == [0]  # one request: the second run read the cached file
        (tmp_path / "bad.jsonl").write_text(json.dumps(dict(HELLASWAG[0], endings=["one"])) + "\n")
        with pytest.raises(SystemExit, match="bad.jsonl line 1 is not a HellaSwag question"):
            look.main(["hellaswag", "--init_from=random-gpt2", "--hellaswag=bad.jsonl"])
    finally:
        server.httpd.shutdown()
