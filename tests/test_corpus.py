"""Corpora larger than memory (prepare.py and corpus.py): documents from many files, ids exactly tiktoken's on any
number of workers, held out by document, shards that a killed run keeps, bounded memory, and bad input."""

import gzip
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

import corpus
import prepare
from configurator import UserError
from conftest import GPT2_TIKTOKEN, ROOT, gpt2_reference, one_error_line, run_script, shared_file, small_text
from tokenizer import ENDOFTEXT

DOCUMENTS = [  # the hard cases for cutting a text into pieces, and plain-text <|endoftext|>
    small_text(60),
    "windows\r\nline ends\r\n\r\nand  runs   of spaces \n\n\n  at line starts\n" * 30,
    "",  # no text: no document
    f"a document that mentions {ENDOFTEXT} as text\nnext line\n",
    "café 🙂 日本語\nx\n\x1cfile separator is no white space\n\x1c\n" * 40,
    "def f(x):\n    return x\n\n\nclass A:\n\tpass\n" * 50,
    "no newline at all " * 200,
]


def write_corpus(folder):
    """A folder of JSON Lines (plain and gzipped, with a blank line), plain text and gzipped text; returns its
    documents' texts in the order prepare.py reads them (files by name, lines in order)."""
    (folder / "sub").mkdir(parents=True)
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for text in DOCUMENTS:
            f.write(json.dumps({"id": len(text), "text": text}) + "\n")
        f.write("\n")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in reversed(DOCUMENTS):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (folder / "c.txt").write_text(DOCUMENTS[1] + DOCUMENTS[4], encoding="utf-8", newline="")
    with gzip.open(folder / "sub" / "d.txt.gz", "wt", encoding="utf-8", newline="") as f:
        f.write(DOCUMENTS[5] * 3)
    texts = [*DOCUMENTS, *reversed(DOCUMENTS), DOCUMENTS[1] + DOCUMENTS[4], DOCUMENTS[5] * 3]
    return [t for t in texts if t]


def read_split(data_dir, split):
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    return np.concatenate([np.fromfile(data_dir / e["file"], dtype=np.uint16) for e in meta["shards"][split]])


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of a few hundred characters, read a few bytes at a time: every document is cut many times."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 97)


def test_every_document_gets_tiktokens_ids_and_a_separator_on_any_number_of_workers(tmp_path, small_pieces,
                                                                                    monkeypatch):
    texts = write_corpus(tmp_path / "in")
    enc = gpt2_reference()
    outputs = []
    for workers, start in ((1, None), (2, "fork"), (2, "spawn")):  # workers copied from this process, or fresh
        monkeypatch.setattr(corpus, "worker_context", lambda: multiprocessing.get_context(start))
        out = tmp_path / f"out{workers}{start}"
        prepare.prepare(input=str(tmp_path / "in"), tokenizer="gpt2", gpt2_vocab=shared_file(GPT2_TIKTOKEN),
                        data_dir=str(out), val_fraction=0.25, workers=workers, shard_tokens=1000)
        outputs.append(folder_bytes(out))
    assert outputs[0] == outputs[1] == outputs[2]  # the same shards, byte for byte, and the same meta.json

    # one in every four documents is held out, whole: the 4th, the 8th, ...
    for split, docs in (("train", [t for i, t in enumerate(texts) if i % 4 != 3]),
                        ("val", [t for i, t in enumerate(texts) if i % 4 == 3])):
        expected = [i for text in docs for i in enc.encode_ordinary(text) + [enc.eot_token]]
        assert read_split(out, split).tolist() == expected
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["documents"] == {"train": len(texts) - len(texts) // 4, "val": len(texts) // 4}
    shards = meta["shards"]["train"]
    assert [e["file"] for e in shards] == [f"train_{i:06d}.bin" for i in range(len(shards))]
    assert [e["tokens"] for e in shards[:-1]] == [1000] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 1000
    import hashlib
    assert all(hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"] for e in shards)
    assert not (out / "progress.json").exists()

    # characters: each piece cut anywhere, the documents one after another
    prepare.prepare(input=str(tmp_path / "in"), data_dir=str(tmp_path / "chars"), val_fraction=0.25, workers=2,
                    shard_tokens=1000)
    tok = __import__("tokenizer").from_dict(prepare.read_meta(tmp_path / "chars")["tokenizer"])
    assert tok.decode(read_split(tmp_path / "chars", "val").tolist()) == "".join(texts[3::4])
    assert prepare.read_meta(tmp_path / "chars")["documents"] == meta["documents"]


def test_workers_are_copies_of_this_process_only_when_nothing_else_runs_in_it():
    """fork copies one thread: a process with another Python thread, or with torch's thread pools, gets fresh
    interpreters instead (train.py prepares data with torch loaded)."""
    def start_method(setup):
        code = f"import threading, time, corpus; {setup}; print(corpus.worker_context().get_start_method())"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert start_method("pass") == ("fork" if sys.platform == "linux" else "spawn")
    assert start_method("threading.Thread(target=time.sleep, args=(5,), daemon=True).start()") == "spawn"
    assert start_method("import torch") == "spawn"


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "gpt2"])
def test_one_text_read_in_pieces_splits_90_10_by_characters_as_it_always_has(tmp_path, small_pieces, tokenizer):
    tail = small_text(5)
    head = ((small_text(40) + "\n\nx\r\ny  \n z\n") * 3)[: 9 * len(tail) + 45] + "\nA"
    text = head + ENDOFTEXT + tail
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    n = int(len(text) * 0.9)
    assert text.find(ENDOFTEXT) < n < text.find(ENDOFTEXT) + len(ENDOFTEXT)  # the split point falls inside it
    prepare.prepare(input=str(path), tokenizer=tokenizer, data_dir=str(tmp_path / "d"), vocab_size=300,
                    **({"gpt2_vocab": shared_file(GPT2_TIKTOKEN)} if tokenizer == "gpt2" else {}))
    meta = prepare.read_meta(tmp_path / "d")
    tok = __import__("tokenizer").from_dict(meta["tokenizer"])
    n = text.find(ENDOFTEXT)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        assert np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16).tolist() == tok.encode(part, True)
    if tokenizer == "bpe":  # the merges learned from the pieces are the merges of the whole train text
        assert tok.merges == __import__("tokenizer").BPETokenizer.train(text[:n], 300).merges


def test_inputs_are_named_by_folder_glob_list_or_url(tmp_path, monkeypatch):
    write_corpus(tmp_path / "in")
    files = [str(tmp_path / "in" / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt", os.path.join("sub", "d.txt.gz"))]
    assert corpus.input_files(str(tmp_path / "in"), "unused") == files
    assert corpus.input_files(str(tmp_path / "in" / "**" / "*.gz"), "unused") == [files[1], files[3]]
    (tmp_path / "list.txt").write_text("# a comment\nin/c.txt\n\nin/a.jsonl\nhttp://example.com/x/web.jsonl?x=1\n")
    fetched = []

    def download(url, path, hint):
        fetched.append((url, path))
        open(path, "w").close()

    monkeypatch.setattr(corpus, "download", download)
    listed = [files[2], files[0], str(tmp_path / "web.jsonl")]
    assert corpus.input_files(f"@{tmp_path / 'list.txt'}", str(tmp_path)) == listed
    assert corpus.input_files(f"@{tmp_path / 'list.txt'}", str(tmp_path)) == listed  # downloaded once
    assert fetched == [("http://example.com/x/web.jsonl?x=1", str(tmp_path / "web.jsonl"))]


# -----------------------------------------------------------------------------
# killed at any moment, run again: the same output as an unbroken run

KILLED_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import corpus, prepare
where, n = sys.argv[1], int(sys.argv[2])
calls = []

def kill_at(owner, name, before):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        calls.append(name)
        if before and len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if not before and len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapped)

if where == "writing a shard":
    kill_at(corpus.SplitWriter, "append", before=False)
else:  # a shard is in place, and progress.json is about to say so, or has just said so
    kill_at(prepare, "write_atomically", before=where == "before its progress")
prepare.main(sys.argv[3:])
"""


@pytest.mark.parametrize("where, n", [("writing a shard", 9), ("before its progress", 4), ("after its progress", 6),
                                      ("writing a shard", 40)])
def test_a_run_killed_at_any_moment_and_run_again_writes_what_an_unbroken_run_does(tmp_path, where, n):
    write_corpus(tmp_path / "in")
    args = ["--input=in", "--tokenizer=bpe", "--vocab_size=300", "--shard_tokens=1500", "--val_fraction=0.25"]
    assert run_script("prepare.py", *args, "--data_dir=straight", cwd=tmp_path).returncode == 0

    killed = subprocess.run([sys.executable, "-c", KILLED_AT.format(root=ROOT), where, str(n), *args,
                             "--data_dir=broken"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # it died where it was told to
    assert not (tmp_path / "broken" / "meta.json").exists()  # nothing that reads as data
    left = set(os.listdir(tmp_path / "broken"))
    recorded = json.loads((tmp_path / "broken" / "progress.json").read_text())["shards"]
    listed = {entry["file"] for entries in recorded.values() for entry in entries}
    if where == "before its progress":  # a shard was in place that progress.json did not list yet
        assert {name for name in left if name.endswith("0.bin")} - listed
    again = run_script("prepare.py", *args, "--data_dir=broken", "--workers=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(recorded['train'])} train and {len(recorded['val'])} val shards kept" in again.stderr
    assert folder_bytes(tmp_path / "broken") == folder_bytes(tmp_path / "straight")


INTERRUPTED_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import corpus, prepare
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if this test's caller ignores it
original, calls = corpus.SplitWriter.append, []

def append(*args):  # Ctrl-C, from the outside, while the 9th piece of ids is written
    calls.append(1)
    if len(calls) == 9:
        os.kill(os.getpid(), signal.SIGINT)
    return original(*args)

corpus.SplitWriter.append = append
prepare.main(sys.argv[1:])
"""


def test_ctrl_c_is_one_line_and_the_same_command_goes_on(tmp_path):
    write_corpus(tmp_path / "in")
    args = ["--input=in", "--tokenizer=bpe", "--vocab_size=300", "--shard_tokens=1500", "--workers=2"]
    assert run_script("prepare.py", *args, "--data_dir=straight", cwd=tmp_path).returncode == 0
    stopped = subprocess.run([sys.executable, "-c", INTERRUPTED_AT.format(root=ROOT), *args, "--data_dir=stopped"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == ("interrupted; run the same command again to go on "
                                                      "(a corpus keeps its finished shards)")
    assert not (tmp_path / "stopped" / "meta.json").exists()
    again = run_script("prepare.py", *args, "--data_dir=stopped", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert folder_bytes(tmp_path / "stopped") == folder_bytes(tmp_path / "straight")


def test_a_damaged_finished_shard_is_written_again(tmp_path):
    write_corpus(tmp_path / "in")
    args = ["--input=in", "--tokenizer=char", "--shard_tokens=2000", "--data_dir=d"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT.format(root=ROOT), "after its progress", "5", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    progress = json.loads((tmp_path / "d" / "progress.json").read_text())
    assert len(progress["shards"]["train"]) >= 2
    with open(tmp_path / "d" / "train_000001.bin", "r+b") as f:  # same size, one byte changed
        f.seek(10)
        f.write(bytes([f.read(1)[0] ^ 1]))
    again = run_script("prepare.py", *args, cwd=tmp_path)
    assert "resuming: 1 train" in again.stderr, again.stderr
    assert run_script("prepare.py", *args[:-1], "--data_dir=straight", cwd=tmp_path).returncode == 0
    assert folder_bytes(tmp_path / "d") == folder_bytes(tmp_path / "straight")


# -----------------------------------------------------------------------------
# memory, and sharded data read back

MEASURED = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    line = json.dumps({"text": small_text(3000)}) + "\n"  # 0.2 MB a document
    for name, copies in (("small", 20), ("large", 200)):  # 4 MB and 40 MB
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.write(line * copies)
    peak = {}
    for name in ("small", "large"):
        result = subprocess.run([sys.executable, "-c", MEASURED, sys.executable, os.path.join(ROOT, "prepare.py"),
                                 f"--input={name}.jsonl", f"--data_dir={name}", "--workers=1"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peak[name] = int(result.stdout.split()[-1]) / 1024  # MiB
    tokens = {name: prepare.read_meta(tmp_path / name)["train_tokens"] for name in peak}
    assert tokens["large"] > 9 * tokens["small"]
    assert peak["large"] - peak["small"] < 12, peak  # 36 MB more text: read whole, it would be 36 MB and more


def test_shards_index_like_one_array_across_their_boundaries():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 65536, n).astype(np.uint16) for n in (5, 1, 17, 3)]
    shards, whole = prepare.Shards(parts), np.concatenate(parts)
    assert len(shards) == len(whole) == 26
    offsets = rng.integers(0, 26 - 6, 40)
    index = offsets[:, None] + np.arange(7)  # (40, 7) windows, as train.py takes them
    assert np.array_equal(shards[index], whole[index]) and np.array_equal(np.asarray(shards), whole)
    with pytest.raises(IndexError):
        shards[np.array([26])]


# -----------------------------------------------------------------------------
# bad input: one line, and nothing half-written


def error_of(tmp_path, *args):
    result = run_script("prepare.py", *args, "--data_dir=out", cwd=tmp_path)
    left = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert "meta.json" not in left and not [name for name in left if name.endswith(".tmp")]
    return one_error_line(result)


def test_bad_input_is_one_line_naming_the_file_and_the_place(tmp_path, monkeypatch):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "fine"}\n\n{"text": "fine"\n', encoding="utf-8")
    assert "bad/a.jsonl line 3 is not JSON" in error_of(tmp_path, "--input=bad")
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "fine"}\n{"content": "x", "id": 2}\n', encoding="utf-8")
    line = error_of(tmp_path, "--input=bad")
    assert "bad/a.jsonl line 2 has no text field 'text' (its fields: content, id); pass --text_field=NAME" in line
    (tmp_path / "bad" / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert "bad/a.jsonl line 2 is not UTF-8 text" in error_of(tmp_path, "--input=bad")
    (tmp_path / "bad" / "a.jsonl").unlink()
    (tmp_path / "bad" / "b.txt").write_bytes("fine text é\n".encode() * 500 + b"caf\xe9\n")
    assert "bad/b.txt is not UTF-8 text (byte 6503 is invalid)" in error_of(tmp_path, "--input=bad")
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 7)  # é cut in two at many a block's end; the same byte is named
    with pytest.raises(UserError, match="b.txt is not UTF-8 text \\(byte 6503 is invalid\\)"):
        list(corpus.Reader([str(tmp_path / "bad" / "b.txt")]))
    (tmp_path / "bad" / "b.txt").write_text("fine text\n", encoding="utf-8")
    os.symlink(tmp_path / "nowhere", tmp_path / "bad" / "c.txt")
    assert "cannot read " in (line := error_of(tmp_path, "--input=bad")) and "bad/c.txt: No such file" in line
    (tmp_path / "bad" / "c.txt").unlink()
    (tmp_path / "bad" / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:-20])
    assert "bad/d.jsonl.gz is not a whole gzip file" in error_of(tmp_path, "--input=bad")
    (tmp_path / "empty").mkdir()
    assert "the folder empty holds no files" in error_of(tmp_path, "--input=empty")
    assert "matches no file" in error_of(tmp_path, "--input=bad/*.parquet")


def test_a_disk_that_fills_up_is_one_line_and_the_run_goes_on_when_there_is_room(tmp_path):
    import resource
    import signal

    write_corpus(tmp_path / "in")
    args = ["--input=in", "--tokenizer=char", "--shard_tokens=3000", "--data_dir=d"]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))  # room for 2,500 tokens: not one whole shard

    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    line = one_error_line(result)
    assert "cannot write d/train_000000.bin: File too large" in line
    assert not (tmp_path / "d" / "meta.json").exists() and not [n for n in os.listdir(tmp_path / "d") if ".tmp" in n]
    assert run_script("prepare.py", *args, cwd=tmp_path).returncode == 0
    assert run_script("prepare.py", *args[:-1], "--data_dir=straight", cwd=tmp_path).returncode == 0
    assert folder_bytes(tmp_path / "d") == folder_bytes(tmp_path / "straight")


def test_train_reads_shards_as_it_reads_one_file_and_resumes_exactly(tmp_path, monkeypatch):
    import torch

    import train
    from test_safety import TINY, assert_same_state

    write_corpus(tmp_path / "in")
    prepare.prepare(input=str(tmp_path / "in"), data_dir=str(tmp_path / "shards"), shard_tokens=300)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text(encoding="utf-8"))
    assert len(meta["shards"]["train"]) > 10  # windows of 17 tokens often run from one shard into the next
    (tmp_path / "single").mkdir()  # the same ids, as one train.bin and one val.bin
    for split in ("train", "val"):
        read_split(tmp_path / "shards", split).tofile(tmp_path / "single" / f"{split}.bin")
    del meta["shards"]
    (tmp_path / "single" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    monkeypatch.chdir(tmp_path)
    args = [*TINY, "--device=cpu", "--eval_interval=4", "--lr_decay_iters=8"]
    train.main([*args, "--data_dir=single", "--max_iters=8", "--out_dir=single_run"])
    train.main([*args, "--data_dir=shards", "--max_iters=8", "--out_dir=shards_run"])
    train.main([*args, "--data_dir=shards", "--max_iters=3", "--out_dir=resumed"])
    train.main(["--init_from=resume", "--max_iters=8", "--out_dir=resumed"])
    runs = [torch.load(tmp_path / run / "last.pt", weights_only=True)
            for run in ("single_run", "shards_run", "resumed")]
    for run in runs[1:]:
        assert run["iter_num"] == 8 and run["best_val_loss"] == runs[0]["best_val_loss"]
        assert_same_state(run["model"], runs[0]["model"])


def test_the_gpt2_124m_recipe_runs_through_prepare_and_train_when_made_tiny(tmp_path, monkeypatch):
    import configurator
    import train

    recipe = os.path.join(ROOT, "config", "gpt2_124m.py")
    settings = dict(configurator.read_config_file(recipe, configurator.setting_names(vars(train))))
    assert settings["batch_size"] * settings["block_size"] * settings["gradient_accumulation_steps"] == 2**19
    assert settings["max_iters"] == 10**10 // 2**19 and (settings["n_layer"], settings["n_embd"]) == (12, 768)

    # the README's commands, on a few documents shaped like FineWeb-Edu's JSON Lines
    with open(tmp_path / "fineweb-edu-10BT.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(DOCUMENTS * 40):
            f.write(json.dumps({"text": text, "id": f"<urn:{i}>", "score": 3.1}) + "\n")
    monkeypatch.chdir(tmp_path)
    prepare.main(["--input=fineweb-edu-10BT.jsonl", "--tokenizer=gpt2", f"--gpt2_vocab={shared_file(GPT2_TIKTOKEN)}",
                  "--data_dir=data/fineweb-edu", "--val_fraction=0.1", "--shard_tokens=20000"])
    train.main([recipe, "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2",
                "--gradient_accumulation_steps=2", "--max_iters=2", "--warmup_iters=1", "--eval_interval=2",
                "--eval_iters=1", "--sample_length=0", "--device=cpu", "--dtype=float32", "--compile=False"])
    config = json.loads((tmp_path / "out-gpt2-124m" / "config.json").read_text())
    assert (config["beta2"], config["warmup_iters"], config["rope"], config["data_dir"]) == (0.95, 1, False,
                                                                                             "data/fineweb-edu")
    assert len(json.loads((tmp_path / "data" / "fineweb-edu" / "meta.json").read_text())["shards"]["train"]) > 1
