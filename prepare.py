"""
prepare.py: turn a text file into training data.

    python prepare.py                          # input.txt (Tiny Shakespeare), one token per character -> data/char/
    python prepare.py --input=my_book.txt      # any UTF-8 text
    python prepare.py --input=https://www.gutenberg.org/cache/epub/100/pg100.txt   # a text downloaded first
    python prepare.py --tokenizer=bpe --vocab_size=4096   # byte-level BPE learned from the text -> data/bpe/
    python prepare.py --tokenizer=gpt2         # GPT-2's own 50,257-token BPE (vocabulary downloaded once)
    python prepare.py --tokenizer=gpt2 --gpt2_vocab=gpt2.tiktoken          # ... or read from a local file
    python prepare.py --input=code.txt --tokenizer=data/bpe --data_dir=data/code   # data/bpe's tokenizer, reused

Reads the text, splits it 90/10 into train and validation, encodes both, and writes to `data_dir`:

    train.bin, val.bin   the token ids as raw uint16 arrays (read_meta and load_split read them back, checked)
    meta.json            the tokenizer, vocabulary size, token counts and the source's sha256

With bpe and gpt2, `<|endoftext|>` written in the text is the special token that separates documents (one id),
not thirteen characters of text. BPE learns its merges from the train split only. A prepared data folder as the
tokenizer encodes a new text with that folder's tokenizer, as read from its meta.json: data a model trained on
the folder can be fine-tuned on (train.py --init_from=path/to/best.pt).
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

import configurator
from configurator import UserError
import tokenizer as tokenizers
from files import download, make_folder, os_error, remove_stale_temporaries, write_together

# -----------------------------------------------------------------------------
input = "input.txt"  # UTF-8 text to learn from: a file, or an http(s):// URL to download into data_dir first
tokenizer = "char"  # 'char': one token per character; 'bpe': byte-level BPE learned here; 'gpt2': GPT-2's BPE;
#                    or a prepared data folder (data/bpe), whose tokenizer encodes this text as well
vocab_size = 4096  # bpe only: 256 bytes + merges + <|endoftext|>; more merges, shorter sequences, bigger embeddings
gpt2_vocab = ""  # gpt2 only: a .tiktoken file, or a folder with vocab.json+merges.txt or encoder.json+vocab.bpe;
#                  empty: download vocab.json+merges.txt from Hugging Face once, into files.CACHE_DIR
data_dir = ""  # where to write; empty means data/<tokenizer>
val_fraction = 0.1  # the last 10% of the text is held out for validation
# -----------------------------------------------------------------------------

DEFAULT_INPUT = "input.txt"  # Tiny Shakespeare, which comes with the code; downloaded again if deleted
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def read_text(path, data_dir):
    """The text of `path` (downloaded into data_dir first if it is a URL) and the sha256 of its bytes, or a
    one-line error saying what is wrong with it."""
    if path.startswith(("http://", "https://")):
        url, path = path, os.path.join(data_dir, os.path.basename(path.split("?")[0]) or "input.txt")
        print(f"downloading {url} to {path}", file=sys.stderr)
        download(url, path, "check the URL, or download the text yourself and pass --input=FILE")
    elif not os.path.exists(path):
        if path != DEFAULT_INPUT:
            raise UserError(f"input file {path} not found; pass --input=FILE with a UTF-8 text file")
        print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
        download(SHAKESPEARE_URL, path, f"put a UTF-8 text file at {path} or pass --input=FILE", SHAKESPEARE_SHA256)
    if os.path.isdir(path):
        raise UserError(f"--input={path} is a directory; pass a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise os_error("read", path, e) from None
    if not raw.strip():
        raise UserError(f"{path} is empty; put some UTF-8 text in it or pass --input=FILE")
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is invalid); convert it to UTF-8 first")


def split_point(text, val_fraction):
    """Where the validation text starts. The text is split, not the tokens, so no token straddles the split;
    nor is <|endoftext|> cut in two: one that straddles it starts the val split instead."""
    n = int(len(text) * (1 - val_fraction))
    eot = text.find(tokenizers.ENDOFTEXT, max(0, n - len(tokenizers.ENDOFTEXT) + 1))
    return eot if 0 <= eot < n else n


def make_tokenizer(name, train_text, vocab_size=4096, gpt2_vocab=""):
    """A new tokenizer of kind `name`; BPE learns from the train text only (its bytes cover any other text). A
    data folder's name gives the tokenizer in its meta.json."""
    if os.path.isdir(name):
        return tokenizers.from_dict(read_meta(name)["tokenizer"])
    if name == "char":
        return tokenizers.CharTokenizer.train(train_text)
    if name == "bpe":
        return tokenizers.BPETokenizer.train(train_text, vocab_size)
    if name == "gpt2":
        return tokenizers.gpt2_tokenizer(gpt2_vocab)
    raise UserError(f"--tokenizer={name} is unknown; use char, bpe, gpt2, or a folder prepare.py wrote "
                    f"to reuse its tokenizer")


def prepare(input=DEFAULT_INPUT, tokenizer="char", data_dir="", val_fraction=0.1, vocab_size=4096, gpt2_vocab=""):
    """Encode `input` with a new `tokenizer` (or a data folder's) and write train.bin, val.bin and meta.json to
    `data_dir`."""
    if os.path.isdir(tokenizer) and (not data_dir or os.path.realpath(data_dir) == os.path.realpath(tokenizer)):
        raise UserError(f"--tokenizer={tokenizer} reuses that folder's tokenizer; pass --data_dir=NEW_DIR "
                        f"for the new data, so that {tokenizer}'s own stays as it is")
    data_dir = data_dir or os.path.join("data", tokenizer)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction={val_fraction} must be between 0 and 1, like 0.1")
    text, sha256 = read_text(input, data_dir)
    n = split_point(text, val_fraction)

    # the tokenizer: a char vocabulary must cover the val text too
    t0 = time.perf_counter()
    tok = make_tokenizer(tokenizer, text if tokenizer == "char" else text[:n], vocab_size, gpt2_vocab)
    if tokenizer != "char":
        print(f"{tokenizer} tokenizer ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if tok.vocab_size > 2**16:  # ids 0..65535 fit in uint16
        raise UserError(f"{input} has {tok.vocab_size:,} distinct tokens, but uint16 holds ids up to 65,535; "
                        f"use a smaller text or a tokenizer with a smaller vocabulary")

    # the token ids: <|endoftext|> in the text separates documents, and with BPE it is the one special token
    splits = {"train": tok.encode(text[:n], allowed_special=True), "val": tok.encode(text[n:], allowed_special=True)}
    for split, ids in splits.items():
        if len(ids) < 2:  # one (input, target) pair is the least a block can hold
            raise UserError(f"{input} is too short: its {split} split has {len(ids)} tokens, "
                            f"not enough for one block; use a longer text")

    # the files, written together: a failure part of the way leaves the data that was there before
    meta = {"tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "train_tokens": len(splits["train"]),
            "val_tokens": len(splits["val"]), "source": os.path.abspath(input), "source_sha256": sha256}
    contents = {f"{split}.bin": np.array(ids, dtype=np.uint16).tobytes() for split, ids in splits.items()}
    contents["meta.json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    make_folder(data_dir)
    remove_stale_temporaries(data_dir)
    write_together({os.path.join(data_dir, name): lambda f, data=data: f.write(data) for name, data in contents.items()})
    print(f"{input}: {len(text):,} characters -> {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocabulary {tok.vocab_size:,} ({tokenizer}), written to {data_dir}/", file=sys.stderr)
    return data_dir


# -----------------------------------------------------------------------------
# Reading the data back (train.py does), checked against what meta.json says


def read_meta(data_dir):
    """data_dir/meta.json, checked: JSON with the counts, and a vocabulary its own tokenizer agrees with."""
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({str(e)[:80]}); run prepare.py again")
    counts = ("vocab_size", "train_tokens", "val_tokens")
    if not isinstance(meta, dict) or "tokenizer" not in meta or not all(type(meta.get(k)) is int and meta[k] > 0
                                                                        for k in counts):
        raise UserError(f"{path} lacks the tokenizer or a count ({', '.join(counts)}); run prepare.py again")
    tok = tokenizers.from_dict(meta["tokenizer"])
    if tok.vocab_size != meta["vocab_size"]:
        raise UserError(f"{path} says vocab_size {meta['vocab_size']}, but its tokenizer has "
                        f"{tok.vocab_size} tokens; run prepare.py again")
    return meta


def load_split(data_dir, split, meta, block_size=1):
    """A split's token ids ('train' or 'val') as a read-only memmap, checked against meta.json and long enough
    for one block of block_size + 1 tokens."""
    path = os.path.join(data_dir, f"{split}.bin")
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    vocab_size, expected_tokens = meta["vocab_size"], meta[f"{split}_tokens"]
    if size % 2 or size // 2 != expected_tokens:
        raise UserError(f"{path} has {size} bytes but meta.json says {expected_tokens} uint16 tokens "
                        f"(truncated or corrupted?); run prepare.py again")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if data.max() >= vocab_size:
        raise UserError(f"{path} holds token id {data.max()} >= vocab_size {vocab_size}; run prepare.py again")
    if len(data) <= block_size:
        raise UserError(f"{path} has {len(data)} tokens, too few for --block_size={block_size}; "
                        f"use a smaller --block_size or more text")
    return data


@configurator.script
def main(args):
    overridden = configurator.configure(globals(), args)
    for key, owner in (("vocab_size", "bpe"), ("gpt2_vocab", "gpt2")):
        if key in overridden and tokenizer != owner:
            raise UserError(f"--{key} only applies to --tokenizer={owner}; drop it or add --tokenizer={owner}")
    prepare(input, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab)


if __name__ == "__main__":
    main(sys.argv[1:])
