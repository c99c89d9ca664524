"""
corpus.py: the machinery prepare.py uses for text larger than memory. Many files read as one stream of documents,
a piece at a time; the pieces encoded on every core; the ids written as shards that a killed run keeps.

    input_files(input, download_dir)  the files --input names: a file, a folder (every file under it, in name
                                      order), a glob ('data/**/*.jsonl.gz'), @LIST (a file with a path or URL on
                                      each line), or an http(s):// URL, downloaded once into download_dir
    Reader(files, text_field, cut)    iterating gives (document, text, last) for every piece of every document
    encoded(tok, tasks, workers)      the ids of each task's texts, in order, from `workers` processes
    SplitWriter                       one split's ids, appended as they come, in shards with their sha256

A file whose name ends in .jsonl or .json (before an optional .gz) holds one JSON object a line, a document each,
its text under `text_field`; any other file is one document of UTF-8 text. `.gz` files are read through gzip.
Nothing is read whole: a text is decoded a megabyte at a time and cut into pieces only where the tokenizer's
pre-split would cut it too (cut_points), so the pieces' ids, put together, are the ids of the whole text.
"""

import codecs
import collections
import glob
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from configurator import UserError
import tokenizer as tokenizers
from files import download, os_error

PIECE_CHARS = 1 << 20  # a text is encoded in pieces of about a million characters, and sent to workers so
BLOCK_BYTES = 1 << 20  # bytes read from a file at a time


# -----------------------------------------------------------------------------
# Inputs: the files, and the documents in them


def input_files(spec, download_dir):
    """The files `spec` names, in order, each checked to be there (see the docstring at the top)."""
    files = named_files(spec, download_dir)
    for path in files:
        try:
            os.stat(path)
        except OSError as e:  # a link to nowhere, a file that went away
            raise os_error("read", path, e) from None
    return files


def named_files(spec, download_dir):
    if spec.startswith("@"):
        listing = spec[1:]
        try:
            with open(listing, encoding="utf-8") as f:
                entries = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the list {listing} ({str(e)[:80]}); give a UTF-8 file with one path or "
                            f"URL a line")
        if not entries:
            raise UserError(f"the list {listing} names no file; put one path or URL on each line")
        here = os.path.dirname(listing)
        return [path for entry in entries for path in
                named_files(entry if "://" in entry else os.path.join(here, entry), download_dir)]
    if spec.startswith(("http://", "https://")):
        path = os.path.join(download_dir, os.path.basename(spec.split("?")[0]) or "input.txt")
        if not os.path.exists(path):  # download() renames a file into place only once it is whole
            print(f"downloading {spec} to {path}", file=sys.stderr)
            download(spec, path, "check the URL, or download the file yourself and pass --input=FILE")
        return [path]
    if os.path.isdir(spec):
        files = []
        for folder, subfolders, names in os.walk(spec):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise UserError(f"the folder {spec} holds no files; put text or .jsonl files in it")
        return files
    if any(c in spec for c in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
        if not files:
            raise UserError(f"--input={spec} matches no file; check the pattern (quote it, so the shell leaves it)")
        return files
    if not os.path.exists(spec):
        raise UserError(f"input file {spec} not found; pass --input=FILE with a UTF-8 text file")
    return [spec]


def is_json_lines(path):
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


SPACE = frozenset(tokenizers.WHITE_SPACE)


def newline_cut(text):
    """The last place where `text` may be cut without changing its GPT-2 pre-split: after a newline between two
    non-spaces (0: nowhere). No chunk holds such a newline with what comes after it, and no chunk before it looks
    past it, so the chunks of the two parts are the chunks of the whole. (A run of several spaces or newlines
    splits one way at the end of a text and another before a word: it is never cut.)"""
    i = text.rfind("\n", 1, len(text) - 1)
    while i > 0 and (text[i - 1] in SPACE or text[i + 1] in SPACE):
        i = text.rfind("\n", 1, i)
    return i + 1 if i > 0 else 0


def cut_points(tok):
    """cut(text) -> the last place where `text` may be cut so that the ids of the two parts, put together, are the
    ids of the whole (0: nowhere). Characters cut anywhere; GPT-2's pattern at newline_cut; another, nowhere."""
    if isinstance(tok, tokenizers.CharTokenizer):
        return len
    return newline_cut if tok.pattern == tokenizers.GPT2_PATTERN else (lambda text: 0)


class Reader:
    """Iterating gives (document, text, last) for every piece of every document of `files`, in order: document
    counts from 0 over all files (a document with no text is left out), and last marks a document's last piece.
    `done` and `total` are the bytes of the files read so far and in all (compressed, for .gz files)."""

    def __init__(self, files, text_field="text", cut=len):
        self.files, self.text_field, self.cut = files, text_field, cut
        self.total = sum(os.path.getsize(p) for p in files if os.path.isfile(p))
        self.done = 0

    def __iter__(self):
        doc, before = 0, 0
        for path in self.files:
            try:
                with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw) as f:
                    self.position = lambda: before + raw.tell()
                    texts = self.json_lines(path, f) if is_json_lines(path) else [self.plain_text(path, f)]
                    for text in texts:
                        for piece, last in self.pieces(text):
                            if piece:  # a document with no text is none: its one piece is empty
                                yield doc, piece, last
                                doc += last
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: first
                raise UserError(f"{path} is not a whole gzip file ({str(e)[:60]}); download it again")
            except OSError as e:
                raise os_error("read", path, e) from None
            before += os.path.getsize(path)
            self.done = before

    def json_lines(self, path, f):
        """The text of each line's object (a blank line is no document)."""
        for n, line in enumerate(f, 1):
            self.done = self.position()
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise UserError(f"{path} line {n} is not UTF-8 text; convert the file to UTF-8")
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg}, column {e.colno}); fix or remove that line")
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = ", ".join(list(record)[:8]) if isinstance(record, dict) else "none: not an object"
                raise UserError(f"{path} line {n} has no text field {self.text_field!r} (its fields: {fields}); "
                                f"pass --text_field=NAME")
            yield [text]

    def plain_text(self, path, f):
        """The file's text, decoded a block at a time: an iterator of strings."""
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        while True:
            block = f.read(BLOCK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (byte {offset - pending + e.start} is invalid); "
                                f"convert it to UTF-8 first")
            offset += len(block)
            self.done = self.position()
            if not block:
                return

    def pieces(self, blocks):
        """(piece, last) for the text that `blocks` (strings) make: pieces of PIECE_CHARS or more, cut where
        self.cut allows, the last one whatever is left."""
        text, searched = "", 0
        for block in blocks:
            text += block
            if len(text) >= PIECE_CHARS:  # cut before the last character: a piece never ends a document empty
                at = self.cut(text[searched:-1])  # the part before `searched` has no cut: look only at the rest
                if at:
                    yield text[: searched + at], False
                    text = text[searched + at :]
                searched = max(0, len(text) - 2)  # a newline at the end is looked at again, with its neighbour
        yield text, True


# -----------------------------------------------------------------------------
# Encoding on every core: tasks go to worker processes, and their ids come back in the order they went


def encode_texts(tok, texts, allowed_special):
    return [np.array(tok.encode(t, allowed_special=allowed_special), dtype=np.uint16) for t in texts]


WORKER = {}  # the tokenizer a worker process encodes with


def start_worker(tok, allowed_special):
    WORKER.update(tok=tok, allowed_special=allowed_special)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()


def exit_with_parent(parent):
    """A worker whose parent was killed (SIGKILL leaves it no time to say so) would wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def work(texts):
    return encode_texts(WORKER["tok"], texts, WORKER["allowed_special"])


def worker_context():
    """How workers start. 'fork' copies this process, so a worker begins at once with the tokenizer built here;
    'spawn' starts a fresh interpreter, which imports, gets the tokenizer pickled and compiles its pattern before
    its first task. But fork copies only the calling thread: a lock that another thread holds (a Python thread's,
    torch's thread pools', a process group's) would stay locked in the copy for ever. So fork only on Linux
    (macOS's system libraries are not safe to fork), with no other Python thread and no torch loaded (train.py
    prepares its data with torch loaded). The idle thread pool of numpy's BLAS is no matter: workers never call
    BLAS."""
    if sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def encoded(tok, tasks, workers, allowed_special=False):
    """(info, [ids of each text]) for each (info, texts) of `tasks`, in order; ids as uint16 arrays. One worker
    encodes here; more are processes of their own (worker_context), with two tasks each at most in flight, so
    memory stays bounded."""
    if workers == 1:
        for info, texts in tasks:
            yield info, encode_texts(tok, texts, allowed_special)
        return
    pool = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=start_worker,
                               initargs=(tok, allowed_special))
    pending = collections.deque()
    try:
        for info, texts in tasks:
            pending.append((info, pool.submit(work, texts)))
            while len(pending) > 2 * workers or pending and pending[0][1].done():
                info, future = pending.popleft()
                yield info, future.result()
        while pending:
            info, future = pending.popleft()
            yield info, future.result()
    except BrokenProcessPool:
        raise UserError(f"a worker process died (out of memory?); run again with fewer --workers than {workers}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tasks_of(pieces):
    """Pieces [(info, text)] grouped into tasks ([infos], [texts]) of about PIECE_CHARS characters each."""
    infos, texts, size = [], [], 0
    for info, text in pieces:
        infos.append(info)
        texts.append(text)
        size += len(text)
        if size >= PIECE_CHARS:
            yield infos, texts
            infos, texts, size = [], [], 0
    if infos:
        yield infos, texts


# -----------------------------------------------------------------------------
# Shards: one split's ids in files of at most shard_tokens tokens, each renamed into place once whole


def shard_name(split, index, shard_tokens):
    return f"{split}_{index:06d}.bin" if shard_tokens else f"{split}.bin"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class SplitWriter:
    """One split's ids, appended document by document. A shard is written to a temporary file, flushed to disk
    and renamed into place when it holds shard_tokens tokens (shard_tokens=0: a single file, {split}.bin, at
    finish()); `done` then records its name, token count, sha256, and `next`: where the next shard starts,
    as [document, tokens of that document already written]. A writer made with the `done` of a killed run's
    writer drops those tokens again and goes on from there; on_shard() is called after each shard."""

    def __init__(self, folder, split, shard_tokens, done=(), on_shard=lambda: None):
        self.folder, self.split, self.shard_tokens, self.on_shard = folder, split, shard_tokens, on_shard
        self.done = list(done)
        # (document, tokens of it to drop): where this writer's finished shards end; past every document if the
        # last one was the split's last, partial shard (next: None)
        self.resume = tuple(self.done[-1]["next"] or (math.inf, 0)) if self.done else (0, 0)
        self.doc, self.offset = self.resume[0], 0  # the document being written, and its tokens seen so far
        self.file = None

    @property
    def tokens(self):
        return sum(entry["tokens"] for entry in self.done) + (self.in_shard if self.file else 0)

    def write(self, doc, ids):
        if doc != self.doc:
            self.doc, self.offset = doc, 0
        start, self.offset = self.offset, self.offset + len(ids)
        if doc == self.resume[0]:
            ids = ids[max(0, self.resume[1] - start) :]
        while len(ids):
            if self.file is None:
                self.path = os.path.join(self.folder, shard_name(self.split, len(self.done), self.shard_tokens))
                self.tmp, self.hash, self.in_shard = f"{self.path}.{os.getpid()}.tmp", hashlib.sha256(), 0
                self.file = self.opened(self.tmp)
            room = self.shard_tokens - self.in_shard if self.shard_tokens else len(ids)
            part, ids = ids[:room], ids[room:]
            self.append(part.tobytes())
            self.in_shard += len(part)
            if self.in_shard == self.shard_tokens:
                self.close_shard([doc, self.offset - len(ids)])

    def opened(self, path):
        try:
            return open(path, "wb")
        except OSError as e:
            raise os_error("write", path, e) from None

    def append(self, data):
        try:
            self.file.write(data)
        except OSError as e:
            raise os_error("write", self.path, e) from None
        self.hash.update(data)

    def close_shard(self, next_position):
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise os_error("write", self.path, e) from None
        self.file = None
        self.done.append({"file": os.path.basename(self.path), "tokens": self.in_shard,
                          "sha256": self.hash.hexdigest(), "next": next_position})
        self.on_shard()

    def finish(self):
        """Put the last, partial shard in place; the list of shards, as meta.json gives them."""
        if self.file is not None:
            self.close_shard(None)
        return [{k: entry[k] for k in ("file", "tokens", "sha256")} for entry in self.done]

    def abort(self):
        """Remove the shard being written (the finished ones stay, for a rerun to keep)."""
        if self.file is not None:
            try:
                self.file.close()  # its buffer may not fit either
            except OSError:
                pass
            os.remove(self.tmp)
            self.file = None


def kept_shards(folder, done):
    """The longest start of `done` (a killed run's finished shards) whose files are there, whole: size and sha256."""
    kept = []
    for entry in done:
        path = os.path.join(folder, entry["file"])
        if not (os.path.isfile(path) and os.path.getsize(path) == 2 * entry["tokens"]
                and sha256_of(path) == entry["sha256"]):
            break
        kept.append(entry)
    return kept
