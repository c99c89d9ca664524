"""
prepare.py: turn text into training data, from one book to a corpus larger than memory.

    python prepare.py                          # input.txt (Tiny Shakespeare), one token per character -> data/char/
    python prepare.py --input=my_book.txt      # any UTF-8 text
    python prepare.py --input=https://www.gutenberg.org/cache/epub/100/pg100.txt   # a text downloaded first
    python prepare.py --tokenizer=bpe --vocab_size=4096   # byte-level BPE learned from the text -> data/bpe/
    python prepare.py --tokenizer=gpt2         # GPT-2's own 50,257-token BPE (vocabulary downloaded once)
    python prepare.py --tokenizer=gpt2 --gpt2_vocab=gpt2.tiktoken          # ... or read from a local file
    python prepare.py --input=code.txt --tokenizer=data/bpe --data_dir=data/code   # data/bpe's tokenizer, reused
    python prepare.py --input='web/*.jsonl.gz' --tokenizer=gpt2 --data_dir=data/web    # a corpus, on every core
    python prepare.py --conversations=True --input=chats.jsonl --tokenizer=data/char --data_dir=data/sft   # sft.py

One text file (plain or .gz) is split by text: its last 10% is held out for validation (never cutting
`<|endoftext|>` in two), and prepare.py writes to `data_dir`:

    train.bin, val.bin   the token ids as raw uint16 arrays (read_meta and load_split read them back, checked)
    meta.json            the tokenizer, vocabulary size, token counts and the source's sha256

Anything else is a corpus of documents: a folder (every file under it), a glob, @LIST (a file with a path or URL
on each line), or JSON Lines (.jsonl, one document a line, its text under --text_field), all of them plain or .gz.
A plain-text file is one document. Documents are held out whole, deterministically: one in every 1/val_fraction,
by its place in the corpus. With bpe and gpt2 each document ends with `<|endoftext|>`, the one special token (text
inside a document is plain text). The ids go to shards of at most --shard_tokens tokens, train_000000.bin, ...,
val_000000.bin, ..., listed in meta.json with their token counts and sha256, and train.py memory-maps them.

A corpus is streamed, never read whole, and encoded by --workers processes, whose ids are exactly one process's.
Killed at any moment and run again with the same command, prepare.py keeps the finished shards (progress.json
lists them; each is checked against its sha256) and goes on from the first unfinished one, to the output an
unbroken run writes. In a one-text file, `<|endoftext|>` written in the text separates documents (with bpe and
gpt2, as its one id, not thirteen characters). BPE learns its merges from the train split only (at most its first
BPE_TRAIN_CHARS characters). A prepared data folder as the tokenizer encodes a new text with that folder's
tokenizer, as read from its meta.json: data a model trained on the folder can be fine-tuned on.
"""

import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np

import configurator
from configurator import UserError
import corpus
import tokenizer as tokenizers
from files import download, make_folder, remove_stale_temporaries, write_atomically

# -----------------------------------------------------------------------------
input = "input.txt"  # what to learn from: a UTF-8 text file, or a corpus (see above), or an http(s):// URL of one
text_field = "text"  # JSON Lines: the field of each line's object that holds the document's text
tokenizer = "char"  # 'char': one token per character; 'bpe': byte-level BPE learned here; 'gpt2': GPT-2's BPE;
#                    or a prepared data folder (data/bpe), whose tokenizer encodes this text as well
vocab_size = 4096  # bpe only: 256 bytes + merges + <|endoftext|>; more merges, shorter sequences, bigger embeddings
gpt2_vocab = ""  # gpt2 only: a .tiktoken file, or a folder with vocab.json+merges.txt or encoder.json+vocab.bpe;
#                  empty: download vocab.json+merges.txt from Hugging Face once, into files.CACHE_DIR
data_dir = ""  # where to write; empty means data/<tokenizer>
val_fraction = 0.1  # held out for validation: the last 10% of one text, or one document in every 10 of a corpus
workers = 0  # processes that encode at once; 0: one per core (an input of a few MB is encoded in this process)
shard_tokens = 100_000_000  # a corpus's ids go to files of at most this many tokens (200 MB each)
conversations = False  # the input holds conversations for fine-tuning (sft.py): chat template, loss on the answers
# -----------------------------------------------------------------------------

DEFAULT_INPUT = "input.txt"  # Tiny Shakespeare, which comes with the code; downloaded again if deleted
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BPE_TRAIN_CHARS = 100_000_000  # bpe learns from at most this much train text: its memory grows with what it reads
PROGRESS_SECONDS = 3.0  # a progress line on stderr this often


def prepare(input=DEFAULT_INPUT, tokenizer="char", data_dir="", val_fraction=0.1, vocab_size=4096, gpt2_vocab="",
            text_field="text", workers=0, shard_tokens=100_000_000, conversations=False):
    """Encode `input` with a new `tokenizer` (or a data folder's) and write it to `data_dir`: train.bin, val.bin
    and meta.json for one text file, shards and meta.json for a corpus. Returns data_dir."""
    if os.path.isdir(tokenizer) and (not data_dir or os.path.realpath(data_dir) == os.path.realpath(tokenizer)):
        raise UserError(f"--tokenizer={tokenizer} reuses that folder's tokenizer; pass --data_dir=NEW_DIR "
                        f"for the new data, so that {tokenizer}'s own stays as it is")
    data_dir = data_dir or os.path.join("data", tokenizer)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction={val_fraction} must be between 0 and 1, like 0.1")
    configurator.check_at_least(dict(workers=workers, shard_tokens=shard_tokens), dict(workers=0, shard_tokens=1))
    if input == DEFAULT_INPUT and not os.path.exists(input):
        print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
        download(SHAKESPEARE_URL, input, f"put a UTF-8 text file at {input} or pass --input=FILE", SHAKESPEARE_SHA256)
    files = corpus.input_files(input, data_dir)
    workers = workers or worker_count(files)
    if conversations:
        return prepare_conversations(files, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab)
    one_file = len(files) == 1 and (input == files[0] or input.startswith(("http://", "https://")))
    if one_file and not corpus.is_json_lines(files[0]):
        return prepare_text(files[0], tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab, workers)
    return prepare_corpus(input, files, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab, text_field,
                          workers, shard_tokens)


def worker_count(files):
    """One process per core, but only as many as the input keeps busy: a few MB each pays for starting one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return max(1, min(cores, size // (4 * corpus.PIECE_CHARS)))


def make_tokenizer(name, chars, train_texts, vocab_size=4096, gpt2_vocab=""):
    """A new tokenizer of kind `name`: char takes the characters `chars`; bpe learns from the texts that
    train_texts() gives. A data folder's name gives the tokenizer in its meta.json."""
    if os.path.isdir(name):
        tok = tokenizers.from_dict(read_meta(name)["tokenizer"])
    elif name == "char":
        tok = tokenizers.CharTokenizer("".join(sorted(chars())))
    elif name == "bpe":
        t0 = time.perf_counter()
        tok = tokenizers.BPETokenizer.train(train_texts(), vocab_size)
        print(f"bpe tokenizer learned in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    elif name == "gpt2":
        tok = tokenizers.gpt2_tokenizer(gpt2_vocab)
    else:
        raise UserError(f"--tokenizer={name} is unknown; use char, bpe, gpt2, or a folder prepare.py wrote "
                        f"to reuse its tokenizer")
    if tok.vocab_size > 2**16:  # ids 0..65535 fit in uint16
        raise UserError(f"the text has {tok.vocab_size:,} distinct tokens, but uint16 holds ids up to 65,535; "
                        f"use a smaller text or a tokenizer with a smaller vocabulary")
    return tok


def characters(texts):
    chars = set()
    for text in texts:
        chars.update(text)
    return chars


def limited(texts, chars):
    """The texts, until `chars` characters have gone by."""
    for text in texts:
        if chars <= 0:
            return
        yield text[:chars]
        chars -= len(text)


# -----------------------------------------------------------------------------
# One text: split 90/10 by characters, written as train.bin and val.bin


def prepare_text(path, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab, workers):
    """One text file: its first 1 - val_fraction of characters to train.bin, the rest to val.bin. The pieces are
    cut after a newline between non-spaces (corpus.newline_cut), which suits every tokenizer and never cuts
    `<|endoftext|>` in two."""
    length, chars, blank = 0, set(), True
    for _, piece, _ in corpus.Reader([path], cut=corpus.newline_cut):  # the length, the characters
        length, blank = length + len(piece), blank and not piece.strip()
        chars.update(piece)
    if blank:
        raise UserError(f"{path} is empty; put some UTF-8 text in it or pass --input=FILE")
    n = int(length * (1 - val_fraction))

    def split_pieces(cut):  # ('train' or 'val', text) for each piece, the one that holds the split point cut there
        start = 0
        for _, piece, _ in corpus.Reader([path], cut=cut):
            end, at = start + len(piece), n - start
            if end <= n or start >= n:
                yield ("train" if end <= n else "val"), piece
            else:  # a <|endoftext|> that straddles the split point starts the val split instead
                eot = piece.find(tokenizers.ENDOFTEXT, max(0, at - len(tokenizers.ENDOFTEXT) + 1))
                at = eot if 0 <= eot < at else at
                yield from (("train", piece[:at]), ("val", piece[at:]))
            start = end

    train_texts = (text for split, text in split_pieces(corpus.newline_cut) if split == "train")
    tok = make_tokenizer(tokenizer, lambda: chars, lambda: limited(train_texts, BPE_TRAIN_CHARS), vocab_size,
                         gpt2_vocab)
    cut = corpus.newline_cut if isinstance(tok, tokenizers.CharTokenizer) else corpus.cut_points(tok)
    make_folder(data_dir)
    remove_stale_temporaries(data_dir)
    writers = {split: corpus.SplitWriter(data_dir, split, 0) for split in ("train", "val")}
    try:
        tasks = corpus.tasks_of((split, text) for split, text in split_pieces(cut) if text)
        for splits, ids in corpus.encoded(tok, tasks, workers, allowed_special=True):
            for split, piece_ids in zip(splits, ids):
                writers[split].write(0, piece_ids)
        for split, writer in writers.items():
            if writer.tokens < 2:  # one (input, target) pair is the least a block can hold
                raise UserError(f"{path} is too short: its {split} split has {writer.tokens} tokens, "
                                f"not enough for one block; use a longer text")
        # the files, renamed into place together at the end: a failure part of the way leaves the data from before
        meta = {"tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "train_tokens": writers["train"].tokens,
                "val_tokens": writers["val"].tokens, "source": os.path.abspath(path),
                "source_sha256": corpus.sha256_of(path)}
        for writer in writers.values():
            writer.finish()
    finally:
        for writer in writers.values():
            writer.abort()
    write_json(os.path.join(data_dir, "meta.json"), meta)
    remove_shards(data_dir)  # a corpus prepared here before
    print(f"{path}: {length:,} characters -> {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocabulary {tok.vocab_size:,} ({tokenizer}), written to {data_dir}/", file=sys.stderr)
    return data_dir


# -----------------------------------------------------------------------------
# A corpus: documents in, shards out, every core busy, and a killed run picked up where it stopped


def is_val(doc, val_fraction):
    """Whether document `doc` (counting from 0) is held out: one in every 1/val_fraction, the last of each run."""
    return math.floor((doc + 1) * val_fraction) > math.floor(doc * val_fraction)


def prepare_corpus(input, files, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab, text_field, workers,
                   shard_tokens):
    """Every document of `files`, encoded by `workers` processes, to train and val shards in data_dir."""
    # what the output depends on: a rerun of the same command on the same files goes on from progress.json
    source = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    settings = [input, source, text_field, val_fraction, shard_tokens, tokenizer, vocab_size if tokenizer == "bpe"
                else None, read_meta(tokenizer)["tokenizer"] if os.path.isdir(tokenizer) else None]
    fingerprint = hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()
    make_folder(data_dir)
    remove_stale_temporaries(data_dir)
    progress_path, meta_path = os.path.join(data_dir, "progress.json"), os.path.join(data_dir, "meta.json")
    state = read_json(progress_path)
    if state.get("fingerprint") == fingerprint:
        tok = tokenizers.from_dict(state["tokenizer"])
        done = {split: corpus.kept_shards(data_dir, state["shards"][split]) for split in ("train", "val")}
        print(f"resuming: {len(done['train'])} train and {len(done['val'])} val shards kept (sha256 checked)",
              file=sys.stderr)
    else:  # a new corpus: the folder's old data goes first, so that nothing half-written is ever read as data
        for name in ("meta.json", "progress.json", "train.bin", "val.bin"):
            if os.path.exists(os.path.join(data_dir, name)):
                os.remove(os.path.join(data_dir, name))
        remove_shards(data_dir)
        documents = corpus.Reader(files, text_field, corpus.newline_cut)
        tok = make_tokenizer(tokenizer, lambda: characters(text for _, text, _ in documents),
                             lambda: limited((text for doc, text, _ in documents if not is_val(doc, val_fraction)),
                                             BPE_TRAIN_CHARS), vocab_size, gpt2_vocab)
        done = {"train": [], "val": []}
    remove_shards(data_dir, keep={entry["file"] for entries in done.values() for entry in entries})

    def save_progress():
        state = {"fingerprint": fingerprint, "tokenizer": tok.to_dict(),
                 "shards": {split: writer.done for split, writer in writers.items()}}
        write_json(progress_path, state)

    writers = {split: corpus.SplitWriter(data_dir, split, shard_tokens, done[split], save_progress)
               for split in ("train", "val")}
    save_progress()
    try:
        documents = write_shards(tok, files, text_field, writers, val_fraction, workers)
        for split, writer in writers.items():
            if writer.tokens < 2:
                raise UserError(f"{input}: the {split} split has {writer.tokens} tokens ({documents[split]:,} "
                                f"documents), not enough for one block; add documents or change --val_fraction")
        shards = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.abort()
    meta = {"tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "train_tokens": writers["train"].tokens,
            "val_tokens": writers["val"].tokens, "source": input, "documents": documents, "shards": shards}
    write_json(meta_path, meta)
    os.remove(progress_path)
    print(f"{input}: {documents['train'] + documents['val']:,} documents -> {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens in {len(shards['train'])} + {len(shards['val'])} shards, vocabulary "
          f"{tok.vocab_size:,} ({tokenizer}), written to {data_dir}/", file=sys.stderr)
    return data_dir


def write_shards(tok, files, text_field, writers, val_fraction, workers):
    """Read every document, encode those not already in a finished shard, and give each split's writer its ids
    (with <|endoftext|> after each document, if the tokenizer has it). Returns the documents in each split."""
    reader = corpus.Reader(files, text_field, corpus.cut_points(tok))
    specials = getattr(tok, "special_tokens", {})  # none for characters: their documents just follow each other
    eot = np.array([specials[tokenizers.ENDOFTEXT]] if tokenizers.ENDOFTEXT in specials else [], dtype=np.uint16)
    documents = {"train": 0, "val": 0}

    def pieces():  # ((document, split, ends it), text) for each piece still to encode
        for doc, text, last in reader:
            split = "val" if is_val(doc, val_fraction) else "train"
            documents[split] += last
            if doc >= writers[split].resume[0]:
                yield (doc, split, last), text

    t0 = shown = time.perf_counter()
    for infos, ids in corpus.encoded(tok, corpus.tasks_of(pieces()), workers):
        for (doc, split, last), piece_ids in zip(infos, ids):
            writers[split].write(doc, piece_ids)
            if last:
                writers[split].write(doc, eot)
        if time.perf_counter() - shown > PROGRESS_SECONDS:
            shown = time.perf_counter()
            rate = reader.done / 1e6 / (shown - t0)
            left = (reader.total - reader.done) / 1e6 / max(rate, 1e-9)
            print(f"  {sum(documents.values()):,} documents, {reader.done / 1e6:,.1f} of {reader.total / 1e6:,.1f} "
                  f"MB, {rate:.2f} MB/s, {sum(w.tokens for w in writers.values()):,} tokens, {left:,.0f} s left",
                  file=sys.stderr)
    print(f"  read {reader.total / 1e6:,.1f} MB in {time.perf_counter() - t0:.1f} s "
          f"({reader.total / 1e6 / (time.perf_counter() - t0):.2f} MB/s) with {workers} worker(s)", file=sys.stderr)
    return documents


def write_json(path, data):
    write_atomically(path, lambda f: f.write(json.dumps(data, ensure_ascii=False).encode("utf-8")))


def read_json(path):
    """The JSON object in `path`, or {} if there is none to read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remove_shards(data_dir, keep=()):
    """Delete the shard files in data_dir (train_000000.bin, ...) whose names are not in `keep`."""
    for name in os.listdir(data_dir):
        if re.fullmatch(r"(train|val)_\d{6}\.bin", name) and name not in keep:
            os.remove(os.path.join(data_dir, name))


# -----------------------------------------------------------------------------
# Conversations: one a row, and the loss only where the assistant speaks


def prepare_conversations(files, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab):
    """Conversations (sft.read_conversations) rendered with the chat template over the tokenizer given: a data
    folder's (that of the model to tune), gpt2, or a new char or bpe one. See the docstring for the files."""
    import sft

    found = [item[:2] for path in files for item in sft.read_conversations(path)]
    for where, error in found:
        if isinstance(error, str):
            print(f"{where} {error}; left out", file=sys.stderr)
    good = [(where, messages) for where, messages in found if not isinstance(messages, str)]
    texts = lambda: (m["content"] for _, messages in good for m in messages)
    tok = make_tokenizer(tokenizer, lambda: characters(texts()), texts, vocab_size, gpt2_vocab)
    tok = tokenizers.ChatTokenizer(getattr(tok, "base", tok))  # a tuned model's data folder: its base, once
    splits = {"train": [], "val": []}
    for where, messages in good:
        try:
            ids, mask = tok.render(messages)
        except UserError as e:  # a character the base model has never seen
            print(f"{where} {e}; left out", file=sys.stderr)
            continue
        n = sum(map(len, splits.values()))
        splits["val" if is_val(n, val_fraction) else "train"].append((ids, mask))
    if not splits["train"] or not splits["val"]:
        raise UserError(f"{sum(map(len, splits.values()))} usable conversations are too few to hold one in every {1 / val_fraction:g} "
                        f"out for validation; give more, or a larger --val_fraction")
    make_folder(data_dir)
    meta = dict(tokenizer=tok.to_dict(), vocab_size=tok.vocab_size, conversations={})
    for split, rows in splits.items():
        arrays = dict(ids=np.concatenate([ids for ids, _ in rows]).astype(np.uint16),
                      mask=np.concatenate([mask for _, mask in rows]).astype(np.uint8),
                      lengths=np.array([len(ids) for ids, _ in rows], dtype=np.uint32))
        for name, array in arrays.items():
            path = os.path.join(data_dir, f"{split}{'' if name == 'ids' else '_' + name}.bin")
            write_atomically(path, lambda f: f.write(array.tobytes()))
        meta[f"{split}_tokens"], meta["conversations"][split] = len(arrays["ids"]), len(rows)
    write_json(os.path.join(data_dir, "meta.json"), meta)
    left_out = len(found) - sum(meta["conversations"].values())
    print(f"{meta['conversations']['train']:,} train and {meta['conversations']['val']:,} val conversations "
          f"({meta['train_tokens']:,} and {meta['val_tokens']:,} tokens, {left_out} left out), vocabulary "
          f"{tok.vocab_size:,} with the chat template's tokens, written to {data_dir}/")
    return data_dir


# -----------------------------------------------------------------------------
# Reading the data back (train.py does), checked against what meta.json says


def read_meta(data_dir):
    """data_dir/meta.json, checked: JSON with the counts, a vocabulary its own tokenizer agrees with, and for a
    corpus, shards whose token counts add up."""
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
    for split in ("train", "val") if "shards" in meta else ():
        entries = meta["shards"].get(split) if isinstance(meta["shards"], dict) else None
        if not (isinstance(entries, list) and all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] == os.path.basename(e["file"])
                and type(e.get("tokens")) is int and e["tokens"] > 0 for e in entries)
                and sum(e["tokens"] for e in entries) == meta[f"{split}_tokens"]):
            raise UserError(f"{path} lists the {split} shards wrongly (names, or counts that do not add up to "
                            f"{split}_tokens); run prepare.py again")
    return meta


def load_split(data_dir, split, meta, block_size=1):
    """A split's token ids ('train' or 'val'), checked against meta.json and long enough for one block of
    block_size + 1 tokens: a read-only memmap of {split}.bin, or for a corpus, Shards over its memory-mapped files.
    (A corpus's ids are not scanned for ones past the vocabulary, which would read every shard: prepare.py wrote
    them, and meta.json holds each shard's sha256.)"""
    if "conversations" in meta:
        return load_conversations(data_dir, split, meta, block_size)
    files = [e["file"] for e in meta["shards"][split]] if "shards" in meta else [f"{split}.bin"]
    counts = [e["tokens"] for e in meta["shards"][split]] if "shards" in meta else [meta[f"{split}_tokens"]]
    arrays = []
    for name, expected_tokens in zip(files, counts):
        path = os.path.join(data_dir, name)
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size % 2 or size // 2 != expected_tokens:
            raise UserError(f"{path} has {size} bytes but meta.json says {expected_tokens} uint16 tokens "
                            f"(truncated or corrupted?); run prepare.py again")
        arrays.append(np.memmap(path, dtype=np.uint16, mode="r"))
    data = arrays[0] if len(arrays) == 1 else Shards(arrays)
    if "shards" not in meta and data.max() >= meta["vocab_size"]:
        raise UserError(f"{path} holds token id {data.max()} >= vocab_size {meta['vocab_size']}; "
                        f"run prepare.py again")
    if len(data) <= block_size:
        raise UserError(f"the {split} split of {data_dir} has {len(data)} tokens, too few for "
                        f"--block_size={block_size}; use a smaller --block_size or more text")
    return data


def load_conversations(data_dir, split, meta, block_size):
    """A split of conversations (prepare_conversations wrote it) as Conversations, its files checked."""
    n = meta["conversations"].get(split) if isinstance(meta["conversations"], dict) else None
    parts = {}
    for name, dtype, count in (("", np.uint16, meta[f"{split}_tokens"]), ("_mask", np.uint8, meta[f"{split}_tokens"]),
                               ("_lengths", np.uint32, n)):
        path = os.path.join(data_dir, f"{split}{name}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if type(count) is not int or size != count * np.dtype(dtype).itemsize:
            raise UserError(f"{path} does not hold the {count} values meta.json says (truncated or corrupted?); run "
                            f"prepare.py again")
        parts[name] = np.fromfile(path, dtype=dtype)
    ids, mask, lengths = parts.values()
    if lengths.sum() != len(ids) or ids.max() >= meta["vocab_size"]:
        raise UserError(f"the {split} conversations in {data_dir} do not add up to their ids, or hold an id past "
                        f"the vocabulary; run prepare.py again")
    data = Conversations(ids, mask, lengths, tokenizers.from_dict(meta["tokenizer"]).end, block_size)
    if not len(data):
        raise UserError(f"no {split} conversation of {data_dir} has an answer that ends within --block_size="
                        f"{block_size} tokens; use a larger --block_size or shorter conversations")
    return data


class Conversations:
    """A split of conversations, each one a row of its own. One longer than block_size + 1 tokens is cut after
    the last of the assistant's turns that ends within them (`cut` counts them); one whose first answer ends
    later is left out (`skipped`). Never is an answer split in two."""

    def __init__(self, ids, mask, lengths, end, block_size):
        self.ids, self.mask, self.cut, self.skipped = ids, mask, 0, 0
        kept = []  # (start, length)
        for start, n in zip(np.cumsum(lengths, dtype=np.int64) - lengths, lengths.astype(np.int64)):
            if n > block_size + 1:
                window = slice(start, start + block_size + 1)
                ends = np.flatnonzero((ids[window] == end) & (mask[window] == 1))  # where an answer ends
                self.cut, self.skipped = self.cut + (len(ends) > 0), self.skipped + (len(ends) == 0)
                if not len(ends):
                    continue
                n = ends[-1] + 1
            kept.append((start, n))
        self.starts, self.lengths = np.array(kept, dtype=np.int64).reshape(-1, 2).T

    def __len__(self):
        return len(self.starts)

    def rows(self, index, block_size):
        """(x, y), both (B, block_size) int64 arrays: conversation index[b] in row b from position 0, then
        padding. y is the next token where the assistant speaks and -1 (no loss) everywhere else. Attention is
        causal, so no position of a conversation ever sees the padding after it."""
        x = np.zeros((len(index), block_size), dtype=np.int64)
        y = np.full((len(index), block_size), -1, dtype=np.int64)
        for b, i in enumerate(index):
            start, n = self.starts[i], self.lengths[i]
            ids, learn = self.ids[start : start + n].astype(np.int64), self.mask[start + 1 : start + n]
            x[b, : n - 1] = ids[:-1]
            y[b, : n - 1] = np.where(learn == 1, ids[1:], -1)
        return x, y


class Shards:
    """Several memory-mapped shards read as one sequence of ids: len(), and data[index] for an array of indices
    (any shape), which may run from one shard into the next; np.asarray(data) copies them all out."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])  # where each shard starts; the total, last

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"an index is outside 0..{len(self) - 1}")
        shard = np.searchsorted(self.starts, index, side="right") - 1  # which shard holds each index
        out = np.empty(index.shape, dtype=np.uint16)
        for k in np.unique(shard):
            where = shard == k
            out[where] = self.arrays[k][index[where] - self.starts[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        return np.concatenate(self.arrays).astype(dtype or np.uint16)


@configurator.script
def main(args):
    overridden = configurator.configure(globals(), args)
    for key, owner in (("vocab_size", "bpe"), ("gpt2_vocab", "gpt2")):
        if key in overridden and tokenizer != owner:
            raise UserError(f"--{key} only applies to --tokenizer={owner}; drop it or add --tokenizer={owner}")
    try:
        prepare(input, tokenizer, data_dir, val_fraction, vocab_size, gpt2_vocab, text_field, workers, shard_tokens,
                conversations)
    except KeyboardInterrupt:  # Ctrl-C: nothing half-written is ever read, and a corpus's finished shards are kept
        print("\ninterrupted; run the same command again to go on (a corpus keeps its finished shards)",
              file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
