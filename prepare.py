"""
prepare.py: turn a text file into training data.

    python prepare.py                          # Tiny Shakespeare, one token per character -> data/char/
    python prepare.py --input=my_book.txt      # any UTF-8 text
    python prepare.py --tokenizer=bpe --vocab_size=4096   # byte-level BPE learned from the text -> data/bpe/
    python prepare.py --tokenizer=gpt2         # GPT-2's own 50,257-token BPE (vocabulary downloaded once)
    python prepare.py --tokenizer=gpt2 --gpt2_vocab=gpt2.tiktoken          # ... or read from a local file

Reads `input` (downloading Tiny Shakespeare into input.txt when it is the default and missing), splits the text
90/10 into train and validation, encodes both, and writes to `data_dir`:

    train.bin, val.bin   the token ids as raw uint16 arrays (read them with np.memmap)
    meta.json            the tokenizer, vocabulary size, token counts and the source's sha256

With bpe and gpt2, `<|endoftext|>` written in the text is the special token that separates documents (one id),
not thirteen characters of text. BPE learns its merges from the train split only.
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

import configurator
import tokenizer as tokenizers

# -----------------------------------------------------------------------------
input = "input.txt"  # UTF-8 text to learn from; the default is downloaded if missing
tokenizer = "char"  # 'char': one token per character; 'bpe': byte-level BPE learned here; 'gpt2': GPT-2's BPE
vocab_size = 4096  # bpe only: 256 bytes + merges + <|endoftext|>; more merges, shorter sequences, bigger embeddings
gpt2_vocab = ""  # gpt2 only: a .tiktoken file, or a folder with vocab.json+merges.txt or encoder.json+vocab.bpe;
#                  empty: download vocab.json+merges.txt from Hugging Face once, into CACHE_DIR
data_dir = ""  # where to write; empty means data/<tokenizer>
val_fraction = 0.1  # the last 10% of the text is held out for validation
# -----------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_INPUT = "input.txt"
CACHE_DIR = os.environ.get("GPT_FROM_SCRATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt-from-scratch"))
GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/"  # + vocab.json, merges.txt
GPT2_FILES = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]  # Hugging Face's names, OpenAI's


def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one. train.py saves checkpoints so."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers sharing a disk never write one temporary
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: flush the directory entry too, so the rename survives a power cut
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def download(url, path, hint, sha256=None):
    """Fetch `url` into `path` with progress on stderr. An interrupted download resumes from its .part file;
    the size is checked against the server's, and the sha256 too when given. Offline: one line naming the URL
    and `hint` (what to do instead)."""
    import requests  # only needed here

    part = f"{path}.part"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=30) as r:
            if r.status_code == 416:  # the .part file is not a prefix of this file: start over
                os.remove(part)
                return download(url, path, hint, sha256)
            r.raise_for_status()
            if r.status_code != 206:  # the server sent the whole file, not the rest of it
                have = 0
            total = have + int(r.headers.get("Content-Length", 0))
            shown = 0
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if total > 1e6 and (have - shown > total / 20 or have == total):
                        print(f"  {os.path.basename(path)}: {have / 1e6:,.1f} of {total / 1e6:,.1f} MB", file=sys.stderr)
                        shown = have
    except requests.RequestException as e:
        raise SystemExit(f"error: could not download {url} ({type(e).__name__}); {hint}")
    if total and have != total:
        raise SystemExit(f"error: the download of {url} stopped at {have:,} of {total:,} bytes; run again to resume")
    if sha256:
        with open(part, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                os.remove(part)
                raise SystemExit(f"error: the file at {url} is not the expected one (sha256 mismatch); {hint}")
    os.replace(part, path)
    return path


def read_text(path):
    """The text of `path`, or a one-line error saying what is wrong with it."""
    if not os.path.exists(path):
        if path != DEFAULT_INPUT:
            raise SystemExit(f"error: input file {path} not found; pass --input=FILE with a UTF-8 text file")
        print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
        download(SHAKESPEARE_URL, path, f"put a UTF-8 text file at {path} or pass --input=FILE", SHAKESPEARE_SHA256)
    if os.path.isdir(path):
        raise SystemExit(f"error: --input={path} is a directory; pass a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise SystemExit(f"error: {path} is empty; put some UTF-8 text in it or pass --input=FILE")
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start} is invalid); convert it to UTF-8 first")


def gpt2_tokenizer(source=""):
    """GPT-2's tokenizer from `source`: a tiktoken rank file, or a folder with vocab.json + merges.txt or
    encoder.json + vocab.bpe. Empty: vocab.json and merges.txt from Hugging Face, downloaded once to CACHE_DIR."""
    hint = ("pass --gpt2_vocab=PATH: a local gpt2.tiktoken file, or a folder with vocab.json+merges.txt or "
            "encoder.json+vocab.bpe")
    if not source:
        source = os.path.join(CACHE_DIR, "gpt2")
        for name in GPT2_FILES[0]:
            if not os.path.exists(os.path.join(source, name)):
                print(f"downloading GPT-2's {name} from {GPT2_URL}", file=sys.stderr)
                download(GPT2_URL + name, os.path.join(source, name), hint)
    if os.path.isfile(source):
        tok = tokenizers.gpt2_from_tiktoken(source)
    elif os.path.isdir(source):
        found = [names for names in GPT2_FILES if all(os.path.isfile(os.path.join(source, n)) for n in names)]
        if not found:
            raise SystemExit(f"error: {source} has neither vocab.json+merges.txt nor encoder.json+vocab.bpe; {hint}")
        tok = tokenizers.gpt2_from_vocab_and_merges(*(os.path.join(source, n) for n in found[0]))
    else:
        raise SystemExit(f"error: --gpt2_vocab={source} not found; {hint}")

    # a well-formed file may still hold another vocabulary: GPT-2's has 50,257 tokens and knows "Hello world"
    if tok.vocab_size != 50257 or tok.encode("Hello world") != [15496, 995]:
        raise SystemExit(f"error: {source} holds a BPE vocabulary, but not GPT-2's; {hint}")
    return tok


def make_tokenizer(name, text, vocab_size=4096, gpt2_vocab=""):
    if name == "char":
        return tokenizers.CharTokenizer.train(text)
    if name == "bpe":
        return tokenizers.BPETokenizer.train(text, vocab_size)
    if name == "gpt2":
        return gpt2_tokenizer(gpt2_vocab)
    raise SystemExit(f"error: --tokenizer={name} is unknown; use char, bpe or gpt2")


def prepare(input=DEFAULT_INPUT, tokenizer="char", data_dir="", val_fraction=0.1, vocab_size=4096, gpt2_vocab=""):
    """Encode `input` with a new `tokenizer` and write train.bin, val.bin and meta.json to `data_dir`."""
    data_dir = data_dir or os.path.join("data", tokenizer)
    if not 0 < val_fraction < 1:
        raise SystemExit(f"error: --val_fraction={val_fraction} must be between 0 and 1, like 0.1")
    text, sha256 = read_text(input)
    n = int(len(text) * (1 - val_fraction))  # split the text (not the tokens): no token straddles the boundary
    eot = text.find(tokenizers.ENDOFTEXT, max(0, n - len(tokenizers.ENDOFTEXT) + 1))
    if 0 <= eot < n:  # nor is <|endoftext|> cut in two: it starts the val split instead
        n = eot

    # the char vocabulary must cover the val text too; BPE learns from the train text only (bytes cover the rest)
    t0 = time.perf_counter()
    tok = make_tokenizer(tokenizer, text if tokenizer == "char" else text[:n], vocab_size, gpt2_vocab)
    if tokenizer != "char":
        print(f"{tokenizer} tokenizer ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if tok.vocab_size > 2**16:  # ids 0..65535 fit in uint16
        raise SystemExit(f"error: {input} has {tok.vocab_size:,} distinct tokens, but uint16 holds ids up to 65,535; "
                         f"use a smaller text or a tokenizer with a smaller vocabulary")

    # <|endoftext|> in the text separates documents: with BPE it is the one special token
    splits = {"train": tok.encode(text[:n], allowed_special=True), "val": tok.encode(text[n:], allowed_special=True)}
    for split, ids in splits.items():
        if len(ids) < 2:  # one (input, target) pair is the least a block can hold
            raise SystemExit(f"error: {input} is too short: its {split} split has {len(ids)} tokens, "
                             f"not enough for one block; use a longer text")

    os.makedirs(data_dir, exist_ok=True)
    for split, ids in splits.items():
        write_atomically(os.path.join(data_dir, f"{split}.bin"), np.array(ids, dtype=np.uint16).tofile)
    meta = {
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "train_tokens": len(splits["train"]),
        "val_tokens": len(splits["val"]),
        "source": os.path.abspath(input),
        "source_sha256": sha256,
    }
    meta_json = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    write_atomically(os.path.join(data_dir, "meta.json"), lambda f: f.write(meta_json))
    print(f"{input}: {len(text):,} characters -> {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocabulary {tok.vocab_size:,} ({tokenizer}), written to {data_dir}/", file=sys.stderr)
    return data_dir


def main(args):
    overridden = configurator.configure(globals(), args)
    for key, owner in (("vocab_size", "bpe"), ("gpt2_vocab", "gpt2")):
        if key in overridden and tokenizer != owner:
            raise SystemExit(f"error: --{key} only applies to --tokenizer={owner}; drop it or add --tokenizer={owner}")
    prepare(input, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab)


if __name__ == "__main__":
    main(sys.argv[1:])
