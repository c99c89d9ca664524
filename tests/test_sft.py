"""Supervised fine-tuning: the chat template, conversations read and prepared, the loss only where the assistant
speaks, a base model's vocabulary grown without changing its outputs, tuning through train.py (full, LoRA,
resume, GPT-2), the held-out tasks and their exact-match score."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import corpus
import prepare
import sft
import tokenizer
from checkpoint import load_model
from conftest import (GPT2_TIKTOKEN, SHAKESPEARE, one_error_line, random_gpt2, run_script, shared_file, small_text,
                      trained_folder, write_vocab_and_merges)
from gpt import GPT, GPTConfig

SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=48", "--batch_size=4", "--eval_iters=2",
         "--sample_length=0", "--log_interval=1000"]


def talk(*turns):
    """A conversation from alternating user and assistant texts."""
    return [dict(role=("user", "assistant")[i % 2], content=t) for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder with a small char model trained on small_text() (out/best.pt) and its data/char."""
    return trained_folder(tmp_path_factory, "sft-base", "--max_iters=30", "--eval_interval=30", *SMALL)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def conversations(n, long_every=0):
    """n short conversations in small_text()'s characters; every long_every-th one has three exchanges."""
    words = "king queen land bread wine war people".split()
    out = []
    for i in range(n):
        w = words[i % len(words)]
        turns = ["tell " + w, w + "!"] + (["again " + w, w + " " + w, "the end", "the end."]
                                           if long_every and i % long_every == 0 else [])
        out.append(dict(messages=talk(*turns)))
    return out


# ---- the template ------------------------------------------------------------------------------------------------


def test_the_template_marks_turns_with_tokens_no_text_can_produce():
    base = tokenizer.CharTokenizer.train("abc <|>end")
    tok = tokenizer.ChatTokenizer(base)
    assert tok.vocab_size == base.vocab_size + 4 and tok.end == tok.vocab_size - 1
    messages = [dict(role="system", content="a"), *talk("<|end|>", "ba")]
    ids, mask = tok.render(messages)
    s, u, a, e = (tok.special[n] for n in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    assert ids == [s, *base.encode("a"), e, u, *base.encode("<|end|>"), e, a, *base.encode("ba"), e]
    assert [i for i, m in zip(ids, mask) if m] == [*base.encode("ba"), e]  # the answer and its end, nothing else
    assert sum(i >= base.vocab_size for i in ids) == 6  # the user's "<|end|>" is plain text
    assert tok.decode(ids) == "<|system|>a<|end|><|user|><|end|><|end|><|assistant|>ba<|end|>"
    assert tok.render(talk("a"), reply=True)[0][-1] == a
    again = tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.render(messages) == (ids, mask)


def test_gpt2s_template_tokens_follow_its_vocabulary_and_endoftext_stays_text():
    tok = tokenizer.ChatTokenizer(tokenizer.gpt2_tokenizer(shared_file(GPT2_TIKTOKEN)))
    assert tok.special["<|system|>"] == 50257 and tok.vocab_size == 50261
    ids, _ = tok.render(talk("<|endoftext|><|user|>", "ok"))
    assert 50256 not in ids and ids.count(tok.special["<|user|>"]) == 1


@pytest.mark.parametrize("tie", [True, False])
def test_new_tokens_leave_the_old_tokens_logits_as_they_were(tie):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=16, tie_embeddings=tie)).eval()
    x = torch.randint(40, (3, 12))
    before, _ = model(x)
    old = model.transformer.wte.weight.detach().clone()
    model.add_tokens(44)
    after, _ = model(x)
    assert after.shape == (3, 12, 44) and torch.allclose(after[..., :40], before, atol=1e-6, rtol=0)
    assert torch.equal(model.transformer.wte.weight[40:], old.mean(0).expand(4, -1))
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    ids = torch.cat([x, torch.full((3, 1), 42)], 1)  # a new token reads as the mean row
    assert model(ids)[0].isfinite().all()


# ---- reading and preparing conversations -------------------------------------------------------------------------


def test_alpaca_records_become_one_question_and_its_answer():
    assert sft.checked_messages(dict(instruction="Add.", input="2 and 3", output="5")) == talk("Add.\n\n2 and 3", "5")
    assert sft.checked_messages(dict(instruction="Hi", output="Hello")) == talk("Hi", "Hello")


@pytest.mark.parametrize("record, what", [
    ([1, 2], "not a JSON object"),
    (dict(text="hi"), 'no "messages" list'),
    (dict(messages=[]), 'no "messages" list'),
    (dict(messages=[dict(role="bot", content="x")]), "message 1 is not"),
    (dict(messages=[dict(role="user", content=3)]), "message 1 is not"),
    (dict(messages=talk("a")), "does not end with an assistant"),
    (dict(messages=[*talk("a", "b"), dict(role="system", content="s"), dict(role="assistant", content="c")]),
     "message 3 is a system message"),
    (dict(instruction="", output="x"), "non-empty string instruction"),
    (dict(instruction="a", input=5, output="x"), "non-empty string instruction"),
])
def test_each_kind_of_malformed_record_is_named(record, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        sft.checked_messages(record)


def test_prepare_leaves_out_malformed_records_with_a_line_each_and_writes_the_rest(base, tmp_path):
    good = conversations(30)
    lines = [json.dumps(r) for r in good[:10]] + ["{not json", json.dumps(dict(messages=talk("a"))),
                                                  json.dumps(dict(messages=talk("tell 7", "SEVEN")))]
    lines += [json.dumps(r) for r in good[10:]]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_script("prepare.py", "--conversations=True", f"--input={tmp_path / 'c.jsonl'}",
                        f"--tokenizer={base / 'data' / 'char'}", f"--data_dir={tmp_path / 'sft'}", cwd=base)
    assert result.returncode == 0, result.stderr
    bad = [line for line in result.stderr.splitlines() if "left out" in line]
    assert len(bad) == 3 and all(str(tmp_path / "c.jsonl") in line for line in bad)
    assert "line 11 is not valid JSON" in bad[0] and "line 12 does not end with an assistant" in bad[1]
    assert "line 13" in bad[2] and "'7'" in bad[2]  # a character the base model never saw
    meta = prepare.read_meta(str(tmp_path / "sft"))
    assert meta["conversations"] == dict(train=27, val=3) and meta["tokenizer"]["type"] == "chat"
    assert meta["tokenizer"]["base"] == prepare.read_meta(str(base / "data" / "char"))["tokenizer"]


def test_a_conversation_is_one_row_with_targets_only_where_the_assistant_speaks(tmp_path):
    records = conversations(40, long_every=4)
    write_jsonl(tmp_path / "c.jsonl", records)
    prepare.prepare(str(tmp_path / "c.jsonl"), "char", str(tmp_path / "sft"), conversations=True)
    meta = prepare.read_meta(str(tmp_path / "sft"))
    tok = tokenizer.from_dict(meta["tokenizer"])
    train = [r["messages"] for i, r in enumerate(records) if not prepare.is_val(i, 0.1)]
    data = prepare.load_split(str(tmp_path / "sft"), "train", meta, block_size=96)
    assert len(data) == len(train) and (data.cut, data.skipped) == (0, 0)
    x, y = data.rows(np.arange(len(train)), 96)
    for row, messages in enumerate(train):
        ids = tok.render(messages)[0]
        assert x[row, : len(ids) - 1].tolist() == ids[:-1] and not x[row, len(ids) - 1 :].any()
        # written out: the next token is a target exactly when it is inside an answer, or the <|end|> after one
        answer, expected = False, []
        for token in ids:
            expected.append(token if answer else -1)
            if token == tok.special["<|assistant|>"]:
                answer = True
            elif token == tok.end:
                answer = False
        assert y[row].tolist() == expected[1:] + [-1] * (96 - len(ids) + 1)


def test_a_conversation_longer_than_the_block_is_cut_after_an_answer_or_left_out(tmp_path):
    tok = tokenizer.ChatTokenizer(tokenizer.CharTokenizer.train(small_text()))
    long = conversations(1, long_every=1)[0]["messages"]  # three exchanges
    ids = [tok.render(long)[0]]
    ends = [i for i, t in enumerate(ids[0]) if t == tok.end][1::2]  # where each answer ends
    block = ends[1] + 3  # the second answer ends inside the window, the third does not
    ids.append(tok.render(talk("a" * block, "b"))[0])  # its first answer ends past the block
    mask = [tok.render(long)[1], tok.render(talk("a" * block, "b"))[1]]
    flat = lambda rows, dtype: np.array([v for r in rows for v in r], dtype=dtype)
    data = prepare.Conversations(flat(ids, np.uint16), flat(mask, np.uint8),
                                 np.array([len(r) for r in ids], np.uint32), tok.end, block)
    assert (len(data), data.cut, data.skipped) == (1, 1, 1)
    x, y = data.rows([0], block)
    assert x[0, : ends[1]].tolist() == ids[0][: ends[1]] and (x[0, ends[1] :] == 0).all()
    assert y[0, ends[1] - 1] == tok.end and (y[0, ends[1] :] == -1).all()


# ---- tuning through train.py -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_data(base):
    write_jsonl(base / "chats.jsonl", conversations(60, long_every=5))
    prepare.prepare(str(base / "chats.jsonl"), str(base / "data" / "char"), str(base / "data" / "sft"),
                    conversations=True)
    return base


def tune(folder, out, *args):
    return run_script("train.py", "--init_from=out/best.pt", "--data_dir=data/sft", f"--out_dir={out}",
                      "--block_size=48", "--batch_size=4", "--eval_iters=2", "--sample_length=0", "--learning_rate=1e-3", *args,
                      cwd=folder)


def test_tuning_grows_the_vocabulary_keeps_the_base_and_resumes_exactly(sft_data):
    result = tune(sft_data, "out-full", "--max_iters=6", "--eval_interval=3")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(sft_data / "out-full" / "last.pt", weights_only=True)
    base = torch.load(sft_data / "out" / "best.pt", weights_only=True)
    assert ckpt["tokenizer"]["type"] == "chat" and ckpt["tokenizer"]["base"] == base["tokenizer"]
    v = base["model_config"]["vocab_size"]
    assert ckpt["model_config"]["vocab_size"] == v + 4 and ckpt["model"]["transformer.wte.weight"].shape[0] == v + 4
    resumed = tune(sft_data, "out-half", "--max_iters=3", "--eval_interval=3")
    assert resumed.returncode == 0, resumed.stderr
    resumed = run_script("train.py", "--init_from=resume", "--out_dir=out-half", "--max_iters=6", cwd=sft_data)
    assert resumed.returncode == 0, resumed.stderr
    again = torch.load(sft_data / "out-half" / "last.pt", weights_only=True)
    assert all(torch.equal(again["model"][k], t) for k, t in ckpt["model"].items())
    model, tok = load_model(str(sft_data / "out-full" / "last.pt"))
    assert isinstance(tok, tokenizer.ChatTokenizer) and model.config.vocab_size == tok.vocab_size
    # generate.py takes the prompt as a user's turn and prints the answer up to <|end|>
    answer = sft.answers(model.eval(), tok, [talk("tell king")], 30)[0]
    result = run_script("generate.py", "--init_from=out-full/last.pt", "--prompt=tell king", "--temperature=0",
                        "--max_new_tokens=30", cwd=sft_data)
    assert result.returncode == 0 and result.stdout == f"tell king\n{answer}\n", result.stderr


def test_the_loss_counts_only_the_answers(sft_data):
    """The loss is the mean over the answers' targets alone, and the padding after each conversation, whatever it
    holds, changes nothing."""
    import train

    meta = prepare.read_meta(str(sft_data / "data" / "sft"))
    data = prepare.load_split(str(sft_data / "data" / "sft"), "train", meta, 48)
    x, y = map(torch.from_numpy, data.rows(np.arange(8), 48))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16, block_size=48))
    _, loss = model(x, y)
    picked = torch.nn.functional.cross_entropy(model(x)[0][y >= 0], y[y >= 0])  # over the answers' targets alone
    assert torch.allclose(loss, picked)
    x2 = x.clone()
    for row, n in enumerate(data.lengths[:8]):
        x2[row, n - 1 :] = 5
    assert torch.equal(model(x2, y)[1], loss)
    assert train.rows_in(data) == len(data)


def test_lora_tuning_trains_the_new_rows_and_loads_them_with_the_adapters(sft_data):
    result = tune(sft_data, "out-lora", "--max_iters=4", "--eval_interval=4", "--lora_rank=4")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(sft_data / "out-lora" / "last.pt", weights_only=True)
    base = torch.load(sft_data / "out" / "best.pt", weights_only=True)
    wte = ckpt["model"]["transformer.wte.weight"]
    v = base["model_config"]["vocab_size"]
    assert wte.shape[0] == v + 4 and not torch.equal(wte[v:], wte[v:].mean(0).expand(4, -1))  # the new rows learned
    assert {k for k in ckpt["model"] if "lora" not in k} == {"transformer.wte.weight"}
    model, tok = load_model(str(sft_data / "out-lora" / "last.pt"))
    assert torch.equal(model.transformer.wte.weight, wte)
    ids = torch.tensor([tok.render(talk("tell king"), reply=True)[0]])
    assert model(ids)[0].shape[-1] == v + 4


def test_tuning_a_base_on_conversations_for_another_tokenizer_is_a_clear_error(sft_data, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", conversations(20))
    prepare.prepare(str(tmp_path / "c.jsonl"), "char", str(sft_data / "data" / "other"), conversations=True)
    result = run_script("train.py", "--init_from=out/best.pt", "--data_dir=data/other", "--out_dir=out-x",
                        "--block_size=48", "--max_iters=1", cwd=sft_data)
    assert "tokenized differently" in one_error_line(result)


# ---- the tasks and their score -----------------------------------------------------------------------------------


def test_the_tasks_have_right_answers_and_held_out_prompts_that_training_never_shows():
    text = open(SHAKESPEARE, encoding="utf-8").read()
    made = sft.make_tasks(text, train_per_task=300, test_per_task=50, seed=3)
    chars = set(text)
    numbers = {w: i for i, w in enumerate(sft.NUMBERS)}
    for split, records in made.items():
        for r in records:
            (question, answer) = (m["content"] for m in r["messages"])
            assert set(question + answer) <= chars  # a char model of input.txt can read and write them
            word = question.split()[-1].rstrip("?")
            if r["task"] == "shout":
                assert answer == word.upper()
            elif r["task"] == "reverse":
                assert answer == word[::-1]
            elif r["task"] == "count":
                letter, word = re.fullmatch(r"how many (\w) in (\w+)\?", question).groups()
                assert numbers[answer] == word.count(letter) >= 1
            elif r["task"] == "add":
                a, b = re.fullmatch(r"(\w+) plus (\w+)\?", question).groups()
                assert numbers[answer] == numbers[a] + numbers[b]
            else:
                line = question.removeprefix("who says: ")
                assert f"\n\n{answer}:\n{line}\n" in text
    prompts = {split: {r["messages"][0]["content"] for r in records} for split, records in made.items()}
    assert not prompts["train"] & prompts["test"]
    words = {s: {r["messages"][0]["content"].split()[-1] for r in made[s] if r["task"] in ("shout", "reverse")}
             for s in made}
    assert not words["train"] & words["test"]  # the held-out words are new to training, whatever the task
    tasks = {r["task"] for r in made["test"]}
    assert tasks == {"shout", "reverse", "count", "add", "speaker"}


def greedy(model, ids, stop, n):
    """Written out: the most likely token, one at a time over the whole context, until `stop`."""
    out = []
    for _ in range(n):
        token = int(model(torch.tensor([ids + out]))[0][0, -1].argmax())
        if token == stop:
            break
        out.append(token)
    return out


def test_exact_match_scores_the_greedy_answer_cut_at_the_end_token():
    tok = tokenizer.ChatTokenizer(tokenizer.CharTokenizer.train("abcdefgh :?"))
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    with torch.no_grad():  # make <|end|> likely, so that some answers end early
        model.lm_head.weight[tok.end] *= 0
        model.transformer.wte.weight[tok.end] += 0.05
    questions = [talk(q) for q in ("abc", "dd", "h?", "a b", "ge", "cafe")]
    replies = sft.answers(model, tok, questions, max_new_tokens=6)
    expected = [tok.decode(greedy(model, tok.render(q, reply=True)[0], tok.end, 6)) for q in questions]
    assert replies == expected
    records = [dict(task="t" if i % 2 else "u", messages=q + [dict(role="assistant", content=a if i < 3 else a + "x")])
               for i, (q, a) in enumerate(zip(questions, expected))]
    assert sft.evaluate(model, tok, records, 6) == {"u": [2, 3], "t": [1, 3]}


def test_sft_py_writes_the_tasks_and_scores_a_base_model_by_its_next_line(base, tmp_path):
    result = run_script("sft.py", f"--out_dir={tmp_path}", "--train_per_task=5", "--test_per_task=2",
                        f"--input={SHAKESPEARE}", cwd=base)
    assert result.returncode == 0, result.stderr
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(test) == 10 and len((tmp_path / "train.jsonl").read_text().splitlines()) == 25
    small = [r for r in test if set("".join(m["content"] for m in r["messages"])) <= set(small_text())]
    write_jsonl(tmp_path / "small.jsonl", small or [dict(task="shout", messages=talk("king", "KING"))])
    result = run_script("sft.py", "--what=eval", "--init_from=out/best.pt", f"--tests={tmp_path / 'small.jsonl'}",
                        cwd=base)
    assert result.returncode == 0, result.stderr
    assert re.search(r"all\s+\d+ /\s+\d+", result.stdout)
    assert "--what=fly is unknown" in one_error_line(run_script("sft.py", "--what=fly", cwd=base))


# ---- GPT-2 on an Alpaca file: the recipe of docs/sft.md, on a small random GPT-2 -----------------------------------


def test_a_gpt2_folder_tunes_on_alpaca_records_from_a_url_and_answers_in_turns(tmp_path, monkeypatch):
    model = random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    folder = tmp_path / "gpt2-random"
    model.save_pretrained(folder, safe_serialization=True)
    write_vocab_and_merges(tokenizer.gpt2_tokenizer(shared_file(GPT2_TIKTOKEN)), folder)
    alpaca = [dict(instruction=f"Name a number after {i}.", input="" if i % 2 else "Be brief.", output=str(i + 1))
              for i in range(30)]
    (tmp_path / "served.json").write_text(json.dumps(alpaca), encoding="utf-8")
    url = "https://example.com/data/alpaca_data.json"

    def download(address, path, hint, sha256=None):  # the network, played by a local file
        assert address == url
        os.makedirs(os.path.dirname(path), exist_ok=True)  # as files.download does
        shutil.copy(tmp_path / "served.json", path)

    monkeypatch.setattr(corpus, "download", download)
    prepare.prepare(url, "gpt2", str(tmp_path / "data" / "alpaca"), gpt2_vocab=str(folder), conversations=True)
    assert prepare.read_meta(str(tmp_path / "data" / "alpaca"))["conversations"] == dict(train=27, val=3)
    for extra in ([], ["--lora_rank=4"]):
        result = run_script("train.py", f"--init_from={folder}", "--data_dir=data/alpaca", "--out_dir=out",
                            "--block_size=48", "--batch_size=2", "--max_iters=2", "--eval_interval=2",
                            "--eval_iters=1", "--sample_length=0", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        tuned, tok = load_model(str(tmp_path / "out" / "last.pt"))
        assert tuned.config.vocab_size == 50261 and tok.special["<|end|>"] == 50260
        ids = torch.tensor([tok.render(talk("Name a number after 3."), reply=True)[0]])
        assert tuned(ids)[0].shape == (1, ids.shape[1], 50261)


def test_two_processes_tune_on_conversations_as_one_process_does_with_the_same_micro_batches(sft_data):
    """Under torchrun each process takes every other micro-batch of conversations; one process taking them all
    in turn makes the same step."""
    from test_ddp import load, logged_losses, torchrun

    common = ["--init_from=out/best.pt", "--data_dir=data/sft", "--block_size=48", "--batch_size=2",
              "--gradient_accumulation_steps=2", "--max_iters=2", "--eval_interval=100", "--eval_iters=1",
              "--log_interval=1", "--sample_length=0", "--learning_rate=1e-3", "--device=cpu"]
    one = run_script("train.py", *common, "--out_dir=out-one", cwd=sft_data)
    two = torchrun(*common, "--out_dir=out-two", cwd=sft_data)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert logged_losses(one.stdout) == logged_losses(two.stdout) and len(logged_losses(one.stdout)) == 2
    a, b = load(sft_data / "out-one" / "last.pt")["model"], load(sft_data / "out-two" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
