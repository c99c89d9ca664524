"""
sft.py: from a model that continues text to one that answers. Supervised fine-tuning trains a base model further
on conversations, written with the special tokens of a chat template (tokenizer.ChatTokenizer), and counts the
loss only where the assistant speaks. This file reads conversations, makes some whose answers can be checked,
and measures how many a model gets exactly right.

    python sft.py                                   # tasks with checkable answers -> data/tasks/{train,test}.jsonl
    python prepare.py --conversations=True --input=data/tasks/train.jsonl --tokenizer=data/char --data_dir=data/sft
    python sft.py --what=eval --init_from=out/best.pt           # exact-match accuracy per task, before tuning
    python train.py --init_from=out/best.pt --data_dir=data/sft --out_dir=out-sft --max_iters=2500 \
        --learning_rate=2e-3 --warmup_iters=50 --eval_interval=500 --sample_length=0      # full fine-tuning
    python sft.py --what=eval --init_from=out-sft/best.pt       # ... and after
    python chat.py --init_from=out-sft/best.pt                  # a chat that takes turns

Conversations are JSON Lines of {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]},
the format most datasets use, or Alpaca's JSON: a list of {"instruction", "input", "output"}, each one user turn
(the instruction, then the input after a blank line) and the assistant's answer. prepare.py --conversations=True
turns either into training data; the tokenizer grows by the template's four tokens, and train.py grows the base
model's vocabulary to match (GPT.add_tokens), leaving its outputs on the old tokens as they were.

The tasks (--what=tasks) are made from input.txt, in its own characters: shout a word (upper case), reverse a
word, count a letter in a word, add two numbers written as words, and name the speaker of a line. The words,
number pairs and lines of the held-out prompts (test.jsonl) never occur in training prompts (train.jsonl).
--what=eval answers each held-out prompt greedily and counts the answers equal to the expected one. A tuned model
answers after <|assistant|> until <|end|>; a base model, which has no template, is asked the prompt followed by a
newline and answers up to the next newline.
"""

import collections
import gzip
import json
import os
import random
import re
import sys
import zlib

import torch

import configurator
from configurator import UserError
from files import make_folder, write_atomically
from tokenizer import ROLES

# -----------------------------------------------------------------------------
what = "tasks"  # 'tasks': write the task conversations; 'eval': a model's exact-match accuracy on the held-out ones
input = "input.txt"  # tasks: the text whose words and lines the tasks use
out_dir = "data/tasks"  # tasks: where train.jsonl and test.jsonl go
train_per_task = 2000  # tasks: training conversations of each task
test_per_task = 200  # tasks: held-out prompts of each task (fewer where the task has fewer distinct ones)
init_from = "out-sft/best.pt"  # eval: the model, as generate.py takes it
tests = "data/tasks/test.jsonl"  # eval: the held-out conversations, the last turn of each the expected answer
max_new_tokens = 24  # eval: the longest answer a model may give
seed = 1337
device = "auto"
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Reading conversations: every record checked, a line for each bad one


def checked_messages(record):
    """The messages of one record, {"messages": [...]} or Alpaca's {"instruction", "input", "output"}; raises
    ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("is not a JSON object")
    if "messages" not in record and "instruction" in record:  # Alpaca: one question, one answer
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad or not fields["instruction"].strip() or not fields["output"].strip():
            raise ValueError("needs a non-empty string instruction and output (and a string input, or none)")
        question = fields["instruction"] + ("\n\n" + fields["input"] if fields["input"].strip() else "")
        return [dict(role="user", content=question), dict(role="assistant", content=fields["output"])]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('has no "messages" list (or Alpaca\'s "instruction" and "output")')
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i} is not {{"role": "system" | "user" | "assistant", "content": "..."}}')
        if m["role"] == "system" and i > 1:
            raise ValueError(f"message {i} is a system message; only the first may be one")
    if messages[-1]["role"] != "assistant":
        raise ValueError("does not end with an assistant's message, which is what training learns")
    return [dict(role=m["role"], content=m["content"]) for m in messages]


def read_conversations(path):
    """[(where, messages or the error text, the record)] for each record in a JSON Lines file, or in a JSON file
    holding one list of records (Alpaca's), plain or gzip-compressed."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e)[:80]}); give a UTF-8 JSON Lines or "
                        f"JSON file of conversations")
    if text.lstrip().startswith("["):  # one JSON list
        try:
            records = [(f"record {i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); give a list of records, or one record a line")
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append((f"line {i}", e))
    found = []
    for where, record in records:
        try:
            if isinstance(record, Exception):
                raise ValueError(f"is not valid JSON ({record.msg})")
            found.append((f"{path} {where}", checked_messages(record), record))
        except ValueError as e:
            found.append((f"{path} {where}", str(e), record))
    return found


# -----------------------------------------------------------------------------
# Tasks whose answers can be checked exactly, in the characters of input.txt (its only digit is 3)

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
          "seventeen eighteen".split()


def make_tasks(text, train_per_task, test_per_task, seed):
    """{'train': [...], 'test': [...]}: conversations {"task", "messages"}, a user prompt and the answer. What the
    prompts are made of (words, number pairs, lines) is split by a hash into a fifth held out and the rest for
    training, so a held-out word is new to every task's training prompts."""
    rng = random.Random(seed)
    words = sorted({w for w in re.findall(r"[a-z]+", text.lower()) if 3 <= len(w) <= 7})
    speeches = re.findall(r"\n\n([A-Z][A-Za-z ]*):\n([^\n]{10,32})\n", text)  # (speaker, first line) of a speech
    speeches = sorted({line: name for name, line in speeches}.items())  # a line said by two speakers: the last
    tasks = {
        "shout": (words, lambda w: (f"shout: {w}", w.upper())),
        "reverse": (words, lambda w: (f"reverse: {w}", w[::-1])),
        "count": (words, lambda w: (lambda c: (f"how many {c} in {w}?", NUMBERS[w.count(c)]))(rng.choice(w))),
        "add": ([(a, b) for a in range(10) for b in range(10)],
                lambda ab: (f"{NUMBERS[ab[0]]} plus {NUMBERS[ab[1]]}?", NUMBERS[sum(ab)])),
        "speaker": (speeches, lambda s: (f"who says: {s[0]}", s[1])),
    }
    out = {"train": [], "test": []}
    for name, (items, ask) in tasks.items():
        held = [item for item in items if zlib.crc32(repr(item).encode()) % 5 == 0]  # a fifth, the same in every task
        rest = [item for item in items if zlib.crc32(repr(item).encode()) % 5 != 0]
        rng.shuffle(held)
        for split, part, n in (("test", held, test_per_task), ("train", rest, train_per_task)):
            chosen = part[:n] if split == "test" else [rng.choice(part) for _ in range(n)]
            for item in chosen:
                prompt, answer = ask(item)
                out[split].append(dict(task=name, messages=[dict(role="user", content=prompt),
                                                            dict(role="assistant", content=answer)]))
    rng.shuffle(out["train"])
    return out


def write_tasks():
    try:
        with open(input, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {input} ({type(e).__name__}); pass --input=FILE, a UTF-8 text")
    made = make_tasks(text, train_per_task, test_per_task, seed)
    make_folder(out_dir)
    for split, records in made.items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        write_atomically(os.path.join(out_dir, f"{split}.jsonl"), lambda f: f.write(lines.encode("utf-8")))
        counts = collections.Counter(r["task"] for r in records)
        print(f"{out_dir}/{split}.jsonl: {len(records)} conversations ({', '.join(f'{t} {n}' for t, n in counts.items())})")


# -----------------------------------------------------------------------------
# Exact match: the model's greedy answer to each held-out prompt, against the expected one


@torch.no_grad()
def answers(model, tok, questions, max_new_tokens, batch_size=256):
    """The model's greedy answer to each question (a list of messages ending with the user's turn): what follows
    <|assistant|> up to <|end|> for a tuned model; for a base model, what follows `question + "\\n"` up to "\\n"."""
    from generate import generate
    from tokenizer import ChatTokenizer

    chat = isinstance(tok, ChatTokenizer)
    prompts = [tok.render(q, reply=True)[0] if chat else tok.encode(q[-1]["content"] + "\n") for q in questions]
    stop = tok.end if chat else tok.encode("\n")[-1]
    replies = []
    for i in range(0, len(prompts), batch_size):
        rows = [[] for _ in prompts[i : i + batch_size]]
        for next_ids in generate(model, prompts[i : i + batch_size], max_new_tokens, temperature=0.0):
            for row, token in zip(rows, next_ids.tolist()):
                row.append(token)
        replies += [tok.decode(row[: row.index(stop)] if stop in row else row) for row in rows]
    return replies


def evaluate(model, tok, records, max_new_tokens):
    """{task: (right, asked)} over the records, each {"task", "messages"} whose last message is the answer."""
    replies = answers(model, tok, [r["messages"][:-1] for r in records], max_new_tokens)
    scores = collections.defaultdict(lambda: [0, 0])
    for record, reply in zip(records, replies):
        scores[record["task"]][0] += reply == record["messages"][-1]["content"]
        scores[record["task"]][1] += 1
    return dict(scores)


def run_eval():
    from generate import load_for_sampling

    records = []
    for where, messages, record in read_conversations(tests):
        if isinstance(messages, str):
            raise UserError(f"{where} {messages}; give the test.jsonl that python sft.py wrote")
        records.append(dict(task=str(record.get("task") or "all"), messages=messages))
    dev = configurator.pick_device(device)
    model, tok = load_for_sampling(init_from, dev, "float32")
    scores = evaluate(model, tok, records, max_new_tokens)
    print(f"{init_from}: exact match on {tests}")
    for task, (right, asked) in scores.items():
        print(f"  {task:10s} {right:5d} / {asked:<5d} {right / asked:7.1%}")
    right, asked = (sum(s[i] for s in scores.values()) for i in (0, 1))
    print(f"  {'all':10s} {right:5d} / {asked:<5d} {right / asked:7.1%}")
    return scores


@configurator.script
def main(args):
    configurator.configure(globals(), args)
    configurator.check_at_least(globals(), dict(train_per_task=1, test_per_task=1, max_new_tokens=1))
    configurator.check_seed(seed)
    if what == "tasks":
        write_tasks()
    elif what == "eval":
        run_eval()
    else:
        raise UserError(f"--what={what} is unknown; use tasks or eval")


if __name__ == "__main__":
    main(sys.argv[1:])
