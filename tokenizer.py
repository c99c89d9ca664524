"""
tokenizer.py: how text becomes token ids and back.

    CharTokenizer  one id per distinct character (the vocabulary is the sorted set of characters)
    BPETokenizer   byte-level BPE: GPT-2's regex pre-split, then merges of byte pairs learned by `train`
    ChatTokenizer  any of them plus a chat template's special tokens, which mark the turns of a conversation
    gpt2_tokenizer(source)
                   GPT-2's own BPE (50,257 tokens), from a tiktoken rank file, vocab.json + merges.txt (Hugging
                   Face) or encoder.json + vocab.bpe (OpenAI's release); downloaded once when no source is given

Every tokenizer has the API of `Tokenizer`: `encode(text) -> list[int]`, `decode(ids) -> str`,
`decode_bytes(ids) -> bytes` (for streaming output a token at a time), `vocab_size`, and `to_dict()`, a plain
JSON-able dict that `from_dict` turns back into the tokenizer (`save` and `load` write and read it as JSON).
That dict is what prepare.py writes to meta.json and train.py stores inside every checkpoint, so a checkpoint
alone is enough to sample from. `encode(text, allowed_special=True)` turns `<|endoftext|>` written in the text
into its one id (BPE only); by default it is plain text.

BPE is learned twice over: `BPETokenizer.train_naive` is the plain algorithm, easy to read and slow;
`BPETokenizer.train` gives the same merges, counting each distinct word once and updating counts incrementally.
Encoding is BPE as written (`encode_chunk`) with two shortcuts that change no id, in the section "Speed" below.
"""

import base64
import functools
import heapq
import itertools
import json
import os
import re
import sys
import unicodedata
from collections import Counter, defaultdict

from configurator import UserError
from files import CACHE_DIR, download


def checked(ids, vocab_size):
    """The ids as a list, once each is known to be in the vocabulary (a negative one would index from the end)."""
    ids = list(ids)
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UserError(f"token id {bad} is not in this vocabulary (0 to {vocab_size - 1}); "
                        f"use ids from this tokenizer")
    return ids


class Tokenizer:
    """The API every tokenizer here has; the subclasses fill in encode, decode_bytes and to_dict."""

    vocab_size = 0  # ids run from 0 to vocab_size - 1

    def encode(self, text, allowed_special=False):
        """Text -> a list of ids."""
        raise NotImplementedError

    def decode_bytes(self, ids):
        """Ids -> the UTF-8 bytes they stand for (a token may hold part of a character)."""
        raise NotImplementedError

    def decode(self, ids):
        """Ids -> text. Any ids decode: bytes that are not UTF-8 (a character cut in two) become U+FFFD."""
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", "surrogatepass")  # lone surrogates were encoded so: give them back
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    def to_dict(self):
        """A plain, JSON-able dict that from_dict() turns back into this tokenizer."""
        raise NotImplementedError

    def save(self, path):
        """Write the tokenizer as plain JSON (never pickle)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @staticmethod
    def load(path):
        with open(path, encoding="utf-8") as f:
            return from_dict(json.load(f))


class CharTokenizer(Tokenizer):
    def __init__(self, chars):
        self.chars = chars  # a str: id i is the character chars[i]
        self.ids = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text):
        return cls("".join(sorted(set(text))))

    def encode(self, text, allowed_special=False):  # no special tokens here: the argument is for a uniform API
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:20])
            raise UserError(f"the text has characters outside this model's vocabulary: {shown}; "
                            f"use only characters from its training text")
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in checked(ids, self.vocab_size))

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def to_dict(self):
        return {"type": "char", "chars": self.chars}


# -----------------------------------------------------------------------------
# The pre-split: text is cut into chunks (words with their leading space, numbers, punctuation runs, whitespace)
# and BPE works inside each chunk, so no token spans two words. This is GPT-2's pattern, written for the Rust
# regex engine that tiktoken uses: \p{L} is any letter, \p{N} any number, \s is Unicode's White_Space.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"

# Python's \s also matches \x1c-\x1f, which are not White_Space: spell the property out (it has been stable
# since Unicode 6.3)
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
               "\u2028\u2029\u202f\u205f\u3000")


@functools.cache
def character_classes(astral=True):
    """Python's `re` has no \\p{L} or \\p{N}: build them once from unicodedata, as the inside of a [...] class.
    Letters and numbers are those of Python's Unicode version (14.0 in Python 3.11); tiktoken's may be newer,
    so a character assigned since could split differently. astral=False leaves out the code points past
    U+FFFF (see the speed section below)."""
    members = {"L": [], "N": []}
    for c in range(0x110000 if astral else 0x10000):
        kind = unicodedata.category(chr(c))[0]
        if kind in members:
            members[kind].append(c)
    members["s"] = [ord(c) for c in WHITE_SPACE]
    return {k: "".join(f"\\U{a:08x}-\\U{b:08x}" if a != b else f"\\U{a:08x}" for a, b in runs(v))
            for k, v in members.items()}


def runs(codes):
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]]: sorted code points as inclusive ranges."""
    out = []
    for c in codes:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


@functools.cache
def compile_pattern(pattern, astral=True):
    """A Rust-regex-style pattern (\\p{L}, \\p{N}, \\s, \\S) as a compiled Python pattern with the same meaning
    (astral=False: the same on text with no code point past U+FFFF)."""
    classes = character_classes(astral)
    known = {r"\p{L}": ("L", ""), r"\p{N}": ("N", ""), r"\s": ("s", ""), r"\S": ("s", "^")}
    out, in_class = [], False
    for token in re.findall(r"\\[pP]\{\w*\}|\\.|\[\^?|\]|.", pattern, flags=re.DOTALL):
        if token in known and not (in_class and known[token][1]):
            name, negate = known[token]
            out.append(classes[name] if in_class else f"[{negate}{classes[name]}]")
        elif token[:2] in (r"\p", r"\P", r"\S"):
            raise ValueError(f"{token} in {pattern!r} is not supported: only \\p{{L}}, \\p{{N}}, \\s and \\S")
        else:
            out.append(token)
            in_class = token.startswith("[") or in_class and token != "]"
    return re.compile("".join(out))


# -----------------------------------------------------------------------------
# Byte-level BPE: a chunk starts as its UTF-8 bytes, and pairs of ids merge into new ids, in the learned order.

def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`: [1, 2, 1, 2] -> [9, 9]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def apply_merges(ids, ranks):
    """The ids after BPE: merge the adjacent pair learned earliest ({pair: new id}, a lower id is earlier),
    wherever it occurs, left to right, and again, until no pair left was learned. For example, with
    {(97, 97): 256, (256, 97): 257}, "aaaaa" [97, 97, 97, 97, 97] -> [256, 256, 97] -> [256, 257].

    Done that way, a chunk of n bytes costs up to n passes of n steps: a 20,000-letter chunk with no space in it
    takes seconds. So the same merges run in O(n log n): the positions form a linked list, and a heap holds
    (rank, position) for every adjacent pair that was learned. Popping the pairs of one rank in position order
    merges them left to right, as one pass would; a pair that a merge creates holds the new id, so it ranks
    after the pass in progress (a merge's id is larger than both of its ids)."""
    ids = list(ids) + [None]  # ids[i]: the token at position i; None marks a merged-away position, and the end
    n = len(ids) - 1
    prev, next_ = list(range(-1, n)), list(range(1, n + 2))  # each live position's neighbours (-1 and n: ends)
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(ids, ids[1:n])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = next_[i]
        if ids[i] is None or ranks.get((ids[i], ids[j])) != rank:  # outdated: a merge beside it changed the pair
            continue
        ids[i], ids[j] = rank, None  # merge: i takes the new id, j leaves the list
        k = next_[i] = next_[j]
        prev[k] = i
        h = prev[i]  # the new id makes new pairs with both neighbours
        if h >= 0 and (ids[h], rank) in ranks:
            heapq.heappush(heap, (ranks[ids[h], rank], h))
        if (rank, ids[k]) in ranks:
            heapq.heappush(heap, (ranks[rank, ids[k]], i))
    return [t for t in ids if t is not None]


def chunks_of(text, special_tokens=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """The pre-split chunks of `text`, in order; special tokens only separate them (no merge crosses one)."""
    parts = re.split("|".join(map(re.escape, special_tokens)), text) if special_tokens else [text]
    return [chunk for part in parts for chunk in pre_split(part, pattern)]


def merges_wanted(vocab_size, special_tokens):
    """How many merges make a vocabulary of vocab_size: 256 bytes + merges + special tokens."""
    if not 256 + len(special_tokens) <= vocab_size <= 65536:
        raise UserError(f"--vocab_size={vocab_size} must be between {256 + len(special_tokens)} "
                        f"(256 bytes + {len(special_tokens)} special) and 65536 (ids up to 65,535 fit in uint16)")
    return vocab_size - 256 - len(special_tokens)


class BPETokenizer(Tokenizer):
    """Byte-level BPE. Ids 0..255 are single bytes (in `byte_order`), merge i makes id 256 + i from a pair of
    earlier ids, and the special tokens come last. Any text, even one with lone surrogates, round-trips."""

    def __init__(self, merges, byte_order=range(256), special_tokens=None, pattern=GPT2_PATTERN):
        self.pattern = pattern
        self.byte_order = list(byte_order)  # byte_order[i] is the byte that id i stands for
        self.merges = [tuple(p) for p in merges]
        self.special_tokens = dict(special_tokens or {})  # str -> id
        self.vocab_size = 256 + len(self.merges) + len(self.special_tokens)
        if sorted(self.byte_order) != list(range(256)):
            raise ValueError("byte_order must hold each of the 256 byte values once")
        if sorted(self.special_tokens.values()) != list(range(256 + len(self.merges), self.vocab_size)):
            raise ValueError("the special tokens must take the ids right after the merges")

        # the bytes of every id, and the tables encode() needs
        self.vocab = [bytes([b]) for b in self.byte_order]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} uses an id that does not exist yet: {[a, b]}")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.vocab += [s.encode("utf-8") for s in sorted(self.special_tokens, key=self.special_tokens.get)]
        self.byte_ids = {b: i for i, b in enumerate(self.byte_order)}
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # an earlier merge has a lower id
        specials = "|".join(map(re.escape, self.special_tokens))
        self.special_split = re.compile(f"({specials})") if specials else None
        self.cache = {}  # chunk -> its ids (encode_chunks): real text repeats the same words again and again

    # -- training --------------------------------------------------------------------------------------------

    @classmethod
    def train_naive(cls, text, vocab_size, special_tokens=(ENDOFTEXT,), pattern=GPT2_PATTERN):
        """BPE as it is defined: start from every chunk's bytes; again and again, count every adjacent pair of
        ids in the whole text, and merge the most frequent one (ties: the smallest pair (id_a, id_b)) into a new
        id. Slow, since every merge recounts everything, and plainly right: `train` is tested against it."""
        n_merges = merges_wanted(vocab_size, special_tokens)
        words = [list(chunk.encode("utf-8", "surrogatepass")) for chunk in chunks_of(text, special_tokens, pattern)]
        merges = []
        while len(merges) < n_merges:
            counts = Counter(pair for ids in words for pair in zip(ids, ids[1:]))
            if not counts:
                break
            pair = min(counts, key=lambda p: (-counts[p], p))  # the most frequent, then the smallest
            words = [merge(ids, pair, 256 + len(merges)) for ids in words]
            merges.append(pair)
        return cls(merges, range(256), {s: 256 + len(merges) + i for i, s in enumerate(special_tokens)}, pattern)

    @classmethod
    def train(cls, text, vocab_size, special_tokens=(ENDOFTEXT,), pattern=GPT2_PATTERN):
        """The merges of train_naive, learned fast. Each distinct chunk is counted once (equal chunks merge
        alike), and a merge updates only the counts of the pairs it touches, in the words that hold it. `text` may
        also be an iterable of texts, each pre-split on its own (prepare.py streams a corpus so)."""
        n_merges = merges_wanted(vocab_size, special_tokens)
        chunks = Counter()
        for part in [text] if isinstance(text, str) else text:
            chunks.update(chunks_of(part, special_tokens, pattern))
        words = [list(chunk.encode("utf-8", "surrogatepass")) for chunk in chunks]
        freqs = list(chunks.values())

        # how often each pair occurs, which words hold it, and a max-heap of (-count, pair)
        counts, where = defaultdict(int), defaultdict(set)
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                counts[pair] += freqs[w]
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            if counts.get(pair) != -neg_count:  # an outdated entry: the pair's count changed since
                continue
            new_id = 256 + len(merges)
            merges.append(pair)

            # merge the pair in the words that hold it; only their pairs change, by the word's frequency
            delta = defaultdict(int)
            for w in where.pop(pair):
                ids = words[w]
                new_ids = merge(ids, pair, new_id)
                if len(new_ids) == len(ids):  # the index may still name words the pair has left
                    continue
                for p in zip(ids, ids[1:]):
                    delta[p] -= freqs[w]
                for p in zip(new_ids, new_ids[1:]):
                    delta[p] += freqs[w]
                    where[p].add(w)
                words[w] = new_ids
            for p, d in delta.items():
                if d:
                    counts[p] += d
                    if counts[p]:
                        heapq.heappush(heap, (-counts[p], p))
                    else:
                        del counts[p]
        return cls(merges, range(256), {s: 256 + len(merges) + i for i, s in enumerate(special_tokens)}, pattern)

    # -- encoding and decoding -------------------------------------------------------------------------------

    def encode_chunk(self, chunk):
        """The ids of one pre-split chunk: its bytes, then the earliest-learned merge, again and again."""
        return apply_merges([self.byte_ids[b] for b in chunk.encode("utf-8", "surrogatepass")], self.ranks)

    def encode(self, text, allowed_special=False):
        """Text -> ids. With allowed_special=True a special token written in the text (like <|endoftext|>)
        becomes its one id; by default it is encoded as plain text, so that no user text can forge one."""
        parts = self.special_split.split(text) if allowed_special and self.special_split else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the separators it captured at the odd places
                ids.append(self.special_tokens[part])
            else:  # each chunk's ids, encode_chunk's, remembered for the next time the chunk comes (below)
                ids.extend(encode_chunks(self, pre_split(part, self.pattern)))
        return ids

    def decode_bytes(self, ids):
        return b"".join(self.vocab[i] for i in checked(ids, self.vocab_size))

    def to_dict(self):
        return {"type": "bpe", "pattern": self.pattern, "byte_order": list(self.byte_order),
                "merges": [list(p) for p in self.merges], "special_tokens": dict(self.special_tokens)}


# -----------------------------------------------------------------------------
# Speed: the same ids, faster. Encoding spends its time in two places, and each has a shortcut that changes no id.
#
# The pre-split: Python's `re` tests a character against a class's code points below U+10000 with one table look-up,
# but against the ranges above it (\p{L} has about 480 of them) one by one, for every character the class rejects.
# Text with no such code point (no emoji, no rare scripts) is split with classes that leave those ranges out: the
# same chunks, five times as fast.
#
# The merges: most chunks of real text are words seen before. Each distinct chunk of a text is merged once, with
# encode_chunk, and kept in the tokenizer's cache; the ids of the whole text are then look-ups, chained together.

ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # any code point past U+FFFF
CACHE_LIMIT = 200_000  # chunks kept: the memory stays bounded on endless, varied text


def pre_split(text, pattern=GPT2_PATTERN):
    """findall(text) of the pattern compile_pattern(pattern) gives, without the ranges `text` has no use for."""
    return compile_pattern(pattern, astral=ASTRAL.search(text) is not None).findall(text)


def encode_chunks(tok, chunks):
    """tok.encode_chunk(chunk) for each chunk, in order, as one iterator of ids."""
    cache = tok.cache
    new = set(chunks).difference(cache)
    if len(cache) + len(new) > CACHE_LIMIT:  # start afresh, keeping only this text's chunks
        cache.clear()
        new = set(chunks)
    for chunk in new:
        cache[chunk] = tok.encode_chunk(chunk)
    return itertools.chain.from_iterable(map(cache.__getitem__, chunks))


# -----------------------------------------------------------------------------
# GPT-2's vocabulary, from the files it is published as. Its ids 0..255 are the bytes, in the order of
# bytes_to_unicode below; 50,000 merges follow, then <|endoftext|> = 50256.

GPT2_VOCAB_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/"  # + vocab.json, merges.txt
GPT2_FILES = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]  # Hugging Face's names, OpenAI's


def gpt2_tokenizer(source="", hint=None):
    """GPT-2's tokenizer from `source`: a tiktoken rank file, or a folder with vocab.json + merges.txt or
    encoder.json + vocab.bpe. Empty: vocab.json and merges.txt from Hugging Face, downloaded once to CACHE_DIR.
    `hint` says what to do when none is found (by default, prepare.py's --gpt2_vocab)."""
    hint = hint or ("pass --gpt2_vocab=PATH: a local gpt2.tiktoken file, or a folder with vocab.json+merges.txt or "
                    "encoder.json+vocab.bpe")
    if not source:
        source = os.path.join(CACHE_DIR, "gpt2")
        for name in GPT2_FILES[0]:
            if not os.path.exists(os.path.join(source, name)):
                print(f"downloading GPT-2's {name} from {GPT2_VOCAB_URL}", file=sys.stderr)
                download(GPT2_VOCAB_URL + name, os.path.join(source, name), hint)
    if os.path.isfile(source):
        tok = gpt2_from_tiktoken(source)
    elif os.path.isdir(source):
        found = [names for names in GPT2_FILES if all(os.path.isfile(os.path.join(source, n)) for n in names)]
        if not found:
            raise UserError(f"{source} has neither vocab.json+merges.txt nor encoder.json+vocab.bpe; {hint}")
        tok = gpt2_from_vocab_and_merges(*(os.path.join(source, n) for n in found[0]))
    else:
        raise UserError(f"--gpt2_vocab={source} not found; {hint}")

    # a well-formed file may still hold another vocabulary: GPT-2's has 50,257 tokens and knows "Hello world"
    if tok.vocab_size != 50257 or tok.encode("Hello world") != [15496, 995]:
        raise UserError(f"{source} holds a BPE vocabulary, but not GPT-2's; {hint}")
    return tok


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, used to write tokens in vocab.json and merges.txt:
    printable Latin-1 bytes stand for themselves, the other 68 (controls, space, soft hyphen) become U+0100...
    The order of this dict is also the order of GPT-2's 256 byte tokens."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def file_error(path, what):
    return UserError(f"{path} is not {what}; pass GPT-2's own file (see prepare.py --gpt2_vocab)")


def gpt2_from_tiktoken(path):
    """GPT-2 from a tiktoken rank file: one `base64(token bytes) rank` line per token, ranks 0, 1, 2, ...
    The file has no merges, only tokens in the order they were learned: each token's pair is found by running
    BPE on its bytes with the tokens learned before it, which leaves exactly two."""
    tokens = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                token, rank = line.split()
                tokens.append(base64.b64decode(token, validate=True))
                rank = int(rank)
            except ValueError:
                raise file_error(path, f"a tiktoken rank file (line {n} is not `base64 rank`)")
            if rank != n - 1:
                raise file_error(path, f"a tiktoken rank file (line {n} has rank {rank}, not {n - 1})")
    if len(tokens) < 256 or sorted(len(t) for t in tokens[:256]) != [1] * 256:
        raise file_error(path, "a byte-level BPE rank file (its first 256 tokens are not the 256 bytes)")

    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens[256:], 256):
        parts = [token[i:i + 1] for i in range(len(token))]
        pair_ranks = [ranks.get(token[i:i + 2], rank) for i in range(len(token) - 1)]  # rank: no such token
        while len(parts) > 2:  # merge the earliest-learned adjacent pair (the leftmost of equals), as BPE does
            best = min(pair_ranks)
            if best >= rank:  # no token learned before this one joins any two parts
                break
            i = pair_ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]  # and only the pairs beside the new part change
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], rank)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], rank)
        if len(parts) != 2:
            raise file_error(path, f"a BPE rank file (token {rank} is not a merge of two earlier tokens)")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
    return BPETokenizer(merges, [t[0] for t in tokens[:256]], {ENDOFTEXT: len(tokens)})


def gpt2_from_vocab_and_merges(vocab_path, merges_path):
    """GPT-2 from vocab.json (token -> id) and merges.txt (one `token token` pair a line, in order), both with
    tokens written through bytes_to_unicode. Hugging Face names them so; OpenAI's release names them
    encoder.json and vocab.bpe. Entries of vocab.json past the merges are the special tokens."""
    try:
        with open(merges_path, encoding="utf-8") as f:
            pairs = [line.split() for line in f.read().split("\n")[1:] if line.strip()]  # after "#version: 0.2"
    except UnicodeDecodeError:
        raise file_error(merges_path, "a merges.txt / vocab.bpe (it is not UTF-8 text)")
    try:
        with open(vocab_path, encoding="utf-8") as f:
            entries = json.load(f)
        n_tokens = 256 + len(pairs)
        specials = {token: i for token, i in entries.items() if i >= n_tokens}
        decode = {c: b for b, c in bytes_to_unicode().items()}
        ids = {bytes(decode[c] for c in token): i for token, i in entries.items() if i < n_tokens}
    except (ValueError, KeyError, AttributeError, TypeError):
        raise file_error(vocab_path, "a GPT-2 vocab.json / encoder.json (a JSON map from token to id)")

    # merge n joins two tokens into the token with id 256 + n
    merges = []
    for n, pair in enumerate(pairs):
        try:
            a, b = (bytes(decode[c] for c in token) for token in pair)
            merges.append((ids[a], ids[b]))
        except (ValueError, KeyError):
            raise file_error(merges_path, f"a merges.txt / vocab.bpe for {vocab_path} (see line {n + 2})")
        if ids.get(a + b) != 256 + n:
            raise file_error(merges_path, f"in the order of {vocab_path} (merge {n} does not make id {256 + n})")
    byte_order = [token[0] for token, i in sorted(ids.items(), key=lambda kv: kv[1]) if i < 256]
    try:
        return BPETokenizer(merges, byte_order, specials)
    except ValueError as e:
        raise file_error(vocab_path, f"a byte-level BPE vocabulary ({e})")


# -----------------------------------------------------------------------------
# Conversations: any tokenizer above, plus the special tokens of a chat template (sft.py tunes a model on them)

ROLES = ("system", "user", "assistant")


class ChatTokenizer(Tokenizer):
    """A base tokenizer with four special tokens after its ids: <|system|>, <|user|> and <|assistant|> open a
    turn, <|end|> closes it. encode() is the base's, so no text, a user's included, can produce them (as with
    <|endoftext|>): only render() puts them in. A conversation renders as

        <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

    and a model learns to answer by predicting what follows <|assistant|>, up to and including its <|end|>."""

    SPECIAL = tuple(f"<|{role}|>" for role in ROLES) + ("<|end|>",)

    def __init__(self, base):
        self.base = base
        self.vocab_size = base.vocab_size + len(self.SPECIAL)
        self.special = {name: base.vocab_size + i for i, name in enumerate(self.SPECIAL)}  # name -> id
        self.end = self.special["<|end|>"]

    def encode(self, text, allowed_special=False):
        return self.base.encode(text)

    def decode_bytes(self, ids):
        names = {i: name.encode() for name, i in self.special.items()}
        pieces, run = [], []
        for i in checked(ids, self.vocab_size) + [self.end]:  # a special token ends the run of text before it
            if i in names:
                pieces += [self.base.decode_bytes(run), names[i]]
                run = []
            else:
                run.append(i)
        return b"".join(pieces[:-1])

    def render(self, messages, reply=False):
        """(ids, mask) of a conversation, a list of {"role", "content"}: mask is 1 on the assistant's tokens (its
        words and the <|end|> after them, what training learns to predict), 0 elsewhere. reply: end with
        <|assistant|>, the prompt for the next answer."""
        ids, mask = [], []
        for message in messages:
            words = self.encode(message["content"]) + [self.end]
            ids += [self.special[f"<|{message['role']}|>"]] + words
            mask += [0] + [int(message["role"] == "assistant")] * len(words)
        if reply:
            ids.append(self.special["<|assistant|>"])
            mask.append(0)
        return ids, mask

    def to_dict(self):
        return {"type": "chat", "base": self.base.to_dict()}


def from_dict(d):
    """Rebuild a tokenizer from the dict that its `to_dict()` made."""
    where = "in this checkpoint or meta.json"
    if not isinstance(d, dict):
        raise UserError(f"{str(d)[:40]} is not a tokenizer ({where} is damaged); prepare the data again")
    if d.get("type") == "char":
        if not isinstance(d.get("chars"), str) or len(set(d["chars"])) != len(d["chars"]):
            raise UserError(f"the char tokenizer {where} is damaged; prepare the data again")
        return CharTokenizer(d["chars"])
    if d.get("type") == "chat" and isinstance(d.get("base"), dict) and d["base"].get("type") != "chat":
        return ChatTokenizer(from_dict(d["base"]))
    if d.get("type") == "bpe":
        try:
            return BPETokenizer(d["merges"], d["byte_order"], d["special_tokens"], d["pattern"])
        except (KeyError, TypeError, ValueError, AttributeError, re.error) as e:
            raise UserError(f"the BPE tokenizer {where} is damaged ({str(e)[:80]}); prepare the data again")
    raise UserError(f"unknown tokenizer type {str(d.get('type'))[:40]!r} {where}; prepare the data again")
