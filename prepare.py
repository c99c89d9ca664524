"""
prepare.py: turn a text file into training data.

    python prepare.py                          # Tiny Shakespeare, one token per character -> data/char/
    python prepare.py --input=my_book.txt      # any UTF-8 text

Reads `input` (downloading Tiny Shakespeare into input.txt when it is the default and missing), splits the text
90/10 into train and validation, encodes both, and writes to `data_dir`:

    train.bin, val.bin   the token ids as raw uint16 arrays (read them with np.memmap)
    meta.json            the tokenizer, vocabulary size, token counts and the source's sha256
"""

import hashlib
import json
import os
import sys

import numpy as np

import configurator
import tokenizer as tokenizers

# -----------------------------------------------------------------------------
input = "input.txt"  # UTF-8 text to learn from; the default is downloaded if missing
tokenizer = "char"  # 'char': one token per character
data_dir = ""  # where to write; empty means data/<tokenizer>
val_fraction = 0.1  # the last 10% of the text is held out for validation
# -----------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_INPUT = "input.txt"


def write_atomically(path, write):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one. train.py saves checkpoints so."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def download_shakespeare(path):
    import requests  # only needed here

    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
    try:
        response = requests.get(SHAKESPEARE_URL, timeout=30)
        response.raise_for_status()
    except requests.RequestException as e:
        raise SystemExit(f"error: could not download {SHAKESPEARE_URL} ({type(e).__name__}); "
                         f"put a UTF-8 text file at {path} or pass --input=FILE")
    if hashlib.sha256(response.content).hexdigest() != SHAKESPEARE_SHA256:
        raise SystemExit(f"error: the download from {SHAKESPEARE_URL} is not Tiny Shakespeare (sha256 mismatch); "
                         f"put a UTF-8 text file at {path} or pass --input=FILE")
    write_atomically(path, lambda f: f.write(response.content))


def read_text(path):
    """The text of `path`, or a one-line error saying what is wrong with it."""
    if not os.path.exists(path):
        if path != DEFAULT_INPUT:
            raise SystemExit(f"error: input file {path} not found; pass --input=FILE with a UTF-8 text file")
        download_shakespeare(path)
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


def make_tokenizer(name, text):
    if name == "char":
        return tokenizers.CharTokenizer.train(text)
    raise SystemExit(f"error: --tokenizer={name} is unknown; use char")


def prepare(input=DEFAULT_INPUT, tokenizer="char", data_dir="", val_fraction=0.1):
    """Encode `input` with a new `tokenizer` and write train.bin, val.bin and meta.json to `data_dir`."""
    data_dir = data_dir or os.path.join("data", tokenizer)
    if not 0 < val_fraction < 1:
        raise SystemExit(f"error: --val_fraction={val_fraction} must be between 0 and 1, like 0.1")
    text, sha256 = read_text(input)
    tok = make_tokenizer(tokenizer, text)
    if tok.vocab_size > 2**16 - 1:
        raise SystemExit(f"error: {input} has {tok.vocab_size} distinct tokens, more than uint16 can hold (65535); "
                         f"use a smaller text or a tokenizer with a smaller vocabulary")

    # split the text (not the tokens) so that no token straddles the boundary
    n = int(len(text) * (1 - val_fraction))
    splits = {"train": tok.encode(text[:n]), "val": tok.encode(text[n:])}
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


if __name__ == "__main__":
    configurator.configure(globals(), sys.argv[1:])
    prepare(input, tokenizer, data_dir, val_fraction)
