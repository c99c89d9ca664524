import json
import os

import numpy as np
import pytest

import files
import prepare
from configurator import UserError
from conftest import GPT2_TIKTOKEN, gpt2_reference, one_error_line, run_script, shared_file, small_text
from tokenizer import ENDOFTEXT, CharTokenizer, from_dict


def test_char_tokenizer_round_trips_any_text_including_non_ascii():
    text = "Hello, wörld! Ça va? 日本語 🙂 tabs\tand\nnewlines"
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text
    assert list(tok.chars) == sorted(set(text))  # the vocabulary is the sorted set of characters
    assert from_dict(json.loads(json.dumps(tok.to_dict()))).encode(text) == tok.encode(text)


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.train("abc")
    with pytest.raises(UserError, match="outside this model's vocabulary: 'x' 'é'"):
        tok.encode("abxé")


def test_prepare_writes_uint16_splits_and_metadata(tmp_path):
    text = small_text() + "Ünïcödé ✓ 日本\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare.prepare(input=str(tmp_path / "book.txt"), data_dir=str(out))

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert meta["vocab_size"] == len(set(text))
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val)) == (int(len(text) * 0.9),
                                                                                  len(text) - int(len(text) * 0.9))
    assert meta["source_sha256"] == __import__("hashlib").sha256(text.encode("utf-8")).hexdigest()
    tok = from_dict(meta["tokenizer"])
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text  # nothing lost, nothing added


def test_prepare_bpe_learns_from_train_text_and_keeps_endoftext_one_token(tmp_path):
    text = small_text(200) + ENDOFTEXT + "A second document, café 🙂.\n" + small_text(30)
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare.prepare(input=str(tmp_path / "book.txt"), tokenizer="bpe", vocab_size=300, data_dir=str(out))

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    train = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    tok = from_dict(meta["tokenizer"])
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["tokenizer"]["type"] == "bpe"
    assert tok.decode(train) + tok.decode(val) == text
    assert train.count(tok.special_tokens[ENDOFTEXT]) == 1  # the separator, not 13 characters of text


def test_bpe_learns_its_merges_from_the_train_split_only(tmp_path):
    # the held-out tenth ends in a run of "zx", letters the train text never has: merging them would leak it
    text = small_text(300) + "zx" * 400 + "\n"
    assert "z" not in text[: int(0.9 * len(text))] and "x" not in text[: int(0.9 * len(text))]
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare.prepare(input=str(tmp_path / "book.txt"), tokenizer="bpe", vocab_size=300, data_dir=str(out))
    tok = from_dict(json.loads((out / "meta.json").read_text(encoding="utf-8"))["tokenizer"])
    merged = [tok.decode_bytes([i]) for i in range(256, 256 + len(tok.merges))]
    assert len(merged) == 299 - 256 and not [t for t in merged if b"z" in t or b"x" in t]
    assert np.fromfile(out / "val.bin", dtype=np.uint16).tolist()[-801:] == list(b"zx" * 400 + b"\n")  # bytes


def test_the_split_never_cuts_endoftext_in_two(tmp_path):
    head = "x" * 86
    text = head + ENDOFTEXT + "y" * 1  # 100 characters: the 90% point falls inside <|endoftext|>
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare.prepare(input=str(tmp_path / "book.txt"), tokenizer="bpe", vocab_size=258, data_dir=str(out))
    tok = from_dict(json.loads((out / "meta.json").read_text(encoding="utf-8"))["tokenizer"])
    train = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    assert tok.decode(train) == head and val == [tok.special_tokens[ENDOFTEXT], *tok.encode("y")]


def test_char_decode_refuses_ids_outside_the_vocabulary():
    tok = CharTokenizer.train("abc")
    assert tok.decode([2, 0, 1]) == "cab" and tok.decode(iter([2, 0, 1])) == "cab"  # any iterable, read once
    for bad in (3, -1):
        with pytest.raises(UserError, match=f"token id {bad} is not in this vocabulary"):
            tok.decode([0, bad])


def test_prepare_gpt2_writes_the_ids_tiktoken_gives(tmp_path):
    text = small_text(50) + ENDOFTEXT + "Ünïcödé ✓ 日本 🙂\n" * 20
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare.prepare(input=str(tmp_path / "book.txt"), tokenizer="gpt2", gpt2_vocab=shared_file(GPT2_TIKTOKEN),
                    data_dir=str(out))

    enc = gpt2_reference()
    n = int(len(text) * 0.9)
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == enc.encode(text[:n], allowed_special="all")
    assert np.fromfile(out / "val.bin", dtype=np.uint16).tolist() == enc.encode(text[n:], allowed_special="all")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 50257 and from_dict(meta["tokenizer"]).encode("Hello world") == [15496, 995]


def test_prepare_downloads_nothing_when_input_txt_exists(corpus):
    result = run_script("prepare.py", cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert "downloading" not in result.stderr
    assert (corpus / "data" / "char" / "train.bin").exists()


class RangeServer:
    """A local HTTP server for one file that honours Range requests, and records the ranges asked for."""

    def __init__(self, content):
        import http.server
        import threading

        server = self
        self.content, self.ranges = content, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                server.ranges.append(start)
                if start >= len(server.content):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(server.content) - start))
                self.end_headers()
                self.wfile.write(server.content[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/file"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = RangeServer(os.urandom(3_000_000))
    yield s
    s.httpd.shutdown()


def test_download_fetches_the_file_and_checks_its_sha256(server, tmp_path):
    import hashlib

    path = tmp_path / "sub" / "file.bin"
    files.download(server.url, str(path), "hint", hashlib.sha256(server.content).hexdigest())
    assert path.read_bytes() == server.content and not (tmp_path / "sub" / "file.bin.part").exists()
    with pytest.raises(UserError, match="sha256 mismatch\\); use a local copy"):
        files.download(server.url, str(tmp_path / "other.bin"), "use a local copy", "0" * 64)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    path = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(server.content[:1_234_567])
    files.download(server.url, str(path), "hint")
    assert server.ranges == [1_234_567]  # only the rest was asked for
    assert path.read_bytes() == server.content


def test_a_part_file_longer_than_the_file_starts_over(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(server.content + b"junk")
    files.download(server.url, str(tmp_path / "file.bin"), "hint")
    assert (tmp_path / "file.bin").read_bytes() == server.content


def test_offline_download_failure_says_how_to_provide_text(tmp_path, monkeypatch):
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(UserError, match=r"could not download https://raw.githubusercontent.com/karpathy/char-rnn/"
                                         r".*put a UTF-8 text file at input.txt or pass --input=FILE"):
        prepare.prepare()
    assert not (tmp_path / "input.txt").exists()


@pytest.mark.parametrize("content, message", [
    (None, "input file missing.txt not found"),
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    (b"caf\xe9 au lait, " * 10, "is not UTF-8 text"),
    (b"ab", "too short"),
])
def test_bad_input_gives_one_clear_line(tmp_path, content, message):
    name = "missing.txt" if content is None else "bad.txt"
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = run_script("prepare.py", f"--input={name}", cwd=tmp_path)
    assert message in one_error_line(result)


@pytest.mark.parametrize("args, message", [
    (["--tokenizer=bpe", "--vocab_size=256"], "--vocab_size=256 must be between 257 (256 bytes + 1 special) and 65536"),
    (["--tokenizer=bpe", "--vocab_size=65537"], "--vocab_size=65537 must be between 257"),
    (["--vocab_size=300"], "--vocab_size only applies to --tokenizer=bpe"),
    (["--tokenizer=bpe", "--gpt2_vocab=x"], "--gpt2_vocab only applies to --tokenizer=gpt2"),
    (["--tokenizer=gpt2", "--gpt2_vocab=nowhere"], "--gpt2_vocab=nowhere not found; pass --gpt2_vocab=PATH"),
    (["--tokenizer=wordpiece"], "--tokenizer=wordpiece is unknown; use char, bpe, gpt2, or a folder prepare.py wrote"),
])
def test_bad_tokenizer_settings_give_one_clear_line(corpus, args, message):
    assert message in one_error_line(run_script("prepare.py", *args, cwd=corpus))


def test_uint16_holds_a_vocabulary_of_65536_and_not_one_more(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c < 0xE000]
    (tmp_path / "full.txt").write_text("".join(chars[:65536]), encoding="utf-8")
    out = prepare.prepare(input=str(tmp_path / "full.txt"), data_dir=str(tmp_path / "full"))
    ids = np.concatenate([np.fromfile(f"{out}/{split}.bin", dtype=np.uint16) for split in ("train", "val")])
    assert ids.tolist() == list(range(65536))  # sorted distinct characters: id i is the i-th, up to 65,535
    (tmp_path / "big.txt").write_text("".join(chars[:65537]), encoding="utf-8")
    with pytest.raises(UserError, match="uint16 holds ids up to 65,535"):
        prepare.prepare(input=str(tmp_path / "big.txt"), data_dir=str(tmp_path / "data"))


def test_tiny_shakespeare_comes_with_the_code_so_a_fresh_clone_needs_no_network():
    import hashlib

    from conftest import ROOT

    with open(os.path.join(ROOT, prepare.DEFAULT_INPUT), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == prepare.SHAKESPEARE_SHA256


def test_a_data_folder_as_the_tokenizer_encodes_a_new_text_with_that_folders_tokenizer(tmp_path):
    (tmp_path / "book.txt").write_text(small_text(), encoding="utf-8")
    prepare.prepare(input=str(tmp_path / "book.txt"), tokenizer="bpe", vocab_size=300, data_dir=str(tmp_path / "bpe"))
    code = "def f(x):\n    return {x: [1, 2, 3]}  # café 🙂\n" * 50  # characters and words the BPE never saw
    (tmp_path / "code.txt").write_text(code, encoding="utf-8")
    prepare.prepare(input=str(tmp_path / "code.txt"), tokenizer=str(tmp_path / "bpe"), data_dir=str(tmp_path / "code"))

    old, new = (json.loads((tmp_path / d / "meta.json").read_text(encoding="utf-8")) for d in ("bpe", "code"))
    assert new["tokenizer"] == old["tokenizer"] and new["vocab_size"] == 300
    tok = from_dict(old["tokenizer"])
    train = np.fromfile(tmp_path / "code" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "code" / "val.bin", dtype=np.uint16).tolist()
    n = int(len(code) * 0.9)
    assert (train, val) == (tok.encode(code[:n]), tok.encode(code[n:]))
    assert tok.decode(train) + tok.decode(val) == code


def test_reusing_a_folders_tokenizer_needs_a_data_dir_of_its_own(tmp_path):
    (tmp_path / "input.txt").write_text(small_text(), encoding="utf-8")
    assert run_script("prepare.py", cwd=tmp_path).returncode == 0  # data/char
    for args in ([], ["--data_dir=data/char"]):
        line = one_error_line(run_script("prepare.py", "--tokenizer=data/char", *args, cwd=tmp_path))
        assert "reuses that folder's tokenizer; pass --data_dir=NEW_DIR" in line
    (tmp_path / "other.txt").write_text("XYZ " * 100, encoding="utf-8")
    line = one_error_line(run_script("prepare.py", "--input=other.txt", "--tokenizer=data/char",
                                     "--data_dir=data/other", cwd=tmp_path))
    assert "characters outside this model's vocabulary: 'X' 'Y' 'Z'" in line
