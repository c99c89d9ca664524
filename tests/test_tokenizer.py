import base64
import io
import json
import os
import random
import shutil
from collections import Counter

import pytest

import tokenizer
from configurator import UserError
from conftest import (GPT2_TIKTOKEN, SHAKESPEARE, gpt2_reference, oracle, shared_file, small_text,
                      write_vocab_and_merges)
from tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, bytes_to_unicode, compile_pattern, from_dict

TRICKY_TEXTS = [
    "",
    " ",
    "Hello, world! It's 3.14 o'clock.",
    "🙂👍🏽👨‍👩‍👧 🇫🇷 ❤️",
    "日本語 中文 한국어 مرحبا नमस्ते Привет",
    "\ud800",  # a lone surrogate: valid in a Python str, not in UTF-8
    "a\udfffb\ud83d\ude00",  # a lone low surrogate, then a surrogate pair written as two code units
    "tabs\tand\nnewlines\r\n  trailing   ",
    "\x00\x1c\x1f\x7f\x85\xa0\u3000",
    f"one{ENDOFTEXT}two {ENDOFTEXT}{ENDOFTEXT}<|endoftext|",
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(small_text() + "café 日本 🙂" + ENDOFTEXT + "next document\n", vocab_size=300)


# -----------------------------------------------------------------------------
# byte-level BPE trained here

@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("allowed_special", [False, True])
def test_bpe_round_trips_any_text(bpe, text, allowed_special):
    assert bpe.decode(bpe.encode(text, allowed_special=allowed_special)) == text


def test_special_tokens_are_one_id_only_when_allowed(bpe):
    eot = bpe.special_tokens[ENDOFTEXT]
    assert eot == bpe.vocab_size - 1
    assert bpe.encode(f"a{ENDOFTEXT}b", allowed_special=True) == bpe.encode("a") + [eot] + bpe.encode("b")
    assert eot not in bpe.encode(f"a{ENDOFTEXT}b")  # by default it is plain text: user text cannot forge it


def test_decode_of_any_ids_never_crashes(bpe):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(1, 8))]
        assert isinstance(bpe.decode(ids), str)
        assert bpe.decode_bytes(ids) == b"".join(bpe.decode_bytes([i]) for i in ids)
    assert bpe.decode(bpe.encode("日")[:1]) == "\ufffd"  # a character cut in two becomes U+FFFD


def test_decode_refuses_ids_outside_the_vocabulary(bpe):
    ids = bpe.encode("the cat")
    assert bpe.decode(iter(ids)) == "the cat"  # any iterable: the check must not use it up
    for bad in (-1, bpe.vocab_size):
        with pytest.raises(UserError, match=f"token id {bad} is not in this vocabulary"):
            bpe.decode([1, bad])


def test_vocab_size_counts_bytes_merges_and_specials(bpe):
    assert bpe.vocab_size == 256 + len(bpe.merges) + len(bpe.special_tokens) == 300
    assert len(bpe.vocab) == bpe.vocab_size


def random_corpus(seed, n_words=600):
    rng = random.Random(seed)
    letters = "aabcdeé日🙂" if seed % 2 else "ab"  # a tiny alphabet: many ties
    pieces = [" ", " ", "  ", "\n", ", ", ".", "'s ", "'LL ", "42", ENDOFTEXT]
    return "".join(("".join(rng.choices(letters, k=rng.randint(1, 6))) + rng.choice(pieces)) for _ in range(n_words))


@pytest.mark.parametrize("seed", range(6))
def test_training_matches_the_naive_trainer_merge_for_merge(seed):
    text = random_corpus(seed)
    assert BPETokenizer.train(text, vocab_size=357).merges == BPETokenizer.train_naive(text, vocab_size=357).merges


def test_the_naive_trainer_is_bpe_over_the_chunks_an_independent_regex_engine_finds():
    regex = oracle("regex")  # real \p{L} and \p{N}, as GPT2_PATTERN was written for
    text = random_corpus(1)
    chunks = [chunk for part in text.split(ENDOFTEXT) for chunk in regex.findall(GPT2_PATTERN, part)]
    assert tokenizer.chunks_of(text) == chunks
    merges = BPETokenizer.train_naive(text, vocab_size=300).merges
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    for new_id, pair in enumerate(merges, 256):  # each merge is the most frequent pair at its turn (ties: smallest)
        counts = Counter(p for ids in words for p in zip(ids, ids[1:]))
        assert pair == min(counts, key=lambda p: (-counts[p], p))
        words = [tokenizer.merge(ids, pair, new_id) for ids in words]
    assert len(merges) == 300 - 257


def test_ties_go_to_the_smallest_pair():
    # chunks "ab" and " cd": every pair occurs once, so they merge in the order of (id_a, id_b)
    assert BPETokenizer.train("ab cd", vocab_size=260).merges == [(32, 99), (97, 98), (256, 100)]


def test_training_stops_when_no_pair_is_left_and_never_merges_across_specials():
    tok = BPETokenizer.train(f"ab{ENDOFTEXT}ab", vocab_size=1000)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 258


@pytest.mark.parametrize("vocab_size", [0, 256, 65537])
def test_vocab_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(UserError, match=f"--vocab_size={vocab_size} must be between 257 .* and 65536"):
        BPETokenizer.train("some text", vocab_size)


def test_training_tiny_shakespeare_is_deterministic_and_compresses():
    text = open(shared_file(SHAKESPEARE), encoding="utf-8").read()[:200_000]
    a, b = BPETokenizer.train(text, 1024), BPETokenizer.train(text, 1024)
    assert a.merges == b.merges and a.vocab_size == 1024
    ids = a.encode(text)
    assert a.decode(ids) == text and len(ids) < len(text.encode("utf-8")) / 2.5


def test_to_dict_survives_json_and_torch_load_with_weights_only(bpe, tmp_path):
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"tokenizer": bpe.to_dict()}, buffer)
    buffer.seek(0)
    from_torch = torch.load(buffer, weights_only=True)["tokenizer"]
    from_json = json.loads(json.dumps(bpe.to_dict()))
    assert from_torch == from_json == bpe.to_dict()
    bpe.save(tmp_path / "tok.json")
    for tok in (from_dict(from_torch), from_dict(from_json), BPETokenizer.load(tmp_path / "tok.json")):
        assert tok.encode(TRICKY_TEXTS[4]) == bpe.encode(TRICKY_TEXTS[4]) and tok.vocab_size == bpe.vocab_size


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("merges"),
    lambda d: d.update(byte_order=[0] * 256),
    lambda d: d.update(merges=[[1, 999]]),
    lambda d: d.update(special_tokens={ENDOFTEXT: 7}),
])
def test_a_damaged_tokenizer_dict_is_a_clear_error(bpe, damage):
    d = bpe.to_dict()
    damage(d)
    with pytest.raises(UserError, match="tokenizer in this checkpoint or meta.json is damaged"):
        from_dict(d)


def test_the_pattern_uses_unicode_classes_not_pythons():
    split = compile_pattern(GPT2_PATTERN)
    assert split.findall("a\x1cb \x85c") == ["a", "\x1c", "b", " ", "\x85", "c"]  # \x1c is no White_Space
    assert split.findall("五十 ½² Ⅻ٣ 5五") == ["五十", " ½²", " Ⅻ٣", " 5", "五"]  # 五 is a letter (Lo); ½ ² Ⅻ ٣ numbers
    assert split.findall("x   y x  \ty") == ["x", "  ", " y", " x", "  ", "\t", "y"]  # a space goes with the word
    with pytest.raises(ValueError, match="not supported"):
        compile_pattern(r"\p{Lu}+")



def test_text_with_no_code_point_past_uffff_splits_alike_without_those_ranges():
    rng = random.Random(1)
    bmp = [chr(c) for c in range(0x10000)]
    rng.shuffle(bmp)
    text = "".join(c + rng.choice([" ", "\n", "1", "a", ".", "'", "  ", ""]) for c in bmp)
    assert compile_pattern(GPT2_PATTERN, astral=False).findall(text) == compile_pattern(GPT2_PATTERN).findall(text)
    assert tokenizer.pre_split("a\U0001d400b 1\U0001d7ce") == ["a\U0001d400b", " 1\U0001d7ce"]  # a letter, a digit


def test_the_chunk_cache_stays_bounded_and_changes_no_id(bpe, monkeypatch):
    text = random_corpus(1)
    expected = bpe.encode(text)
    monkeypatch.setattr(tokenizer, "CACHE_LIMIT", 50)
    bpe.cache.clear()
    for line in text.split("\n"):
        chunks = tokenizer.pre_split(line)
        assert bpe.encode(line) == [i for chunk in chunks for i in bpe.encode_chunk(chunk)]  # no cache: plain BPE
        assert len(bpe.cache) <= max(50, len(set(chunks)))
    assert bpe.encode(text) == expected


# -----------------------------------------------------------------------------
# GPT-2's tokenizer, compared token for token with tiktoken

@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return gpt2_reference()


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer.gpt2_tokenizer(shared_file(GPT2_TIKTOKEN))


GPT2_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've gone, you're right, I'd say.",
    "IT'S HE'LL WE'VE THEY'RE I'M DON'T 'S 'LL 'Ve 're",  # GPT-2's contractions are lowercase only
    "def f(x):\n    return x**2 + 3  # comment\n\tif (a != b) { c[i] = d->e; }\n",
    "3.14159 1,000,000 2024-05-01 0x1F 1e-9 12345678901234567890 -42",
    "a  b   c\t\td\n\n\ne   \n  f \t \n",
    "end with spaces   ",
    "   start with spaces",
    "    ",
    "\n",
    "\r\n\r\n",
    "café naïve résumé Ångström Ñandú e\u0301",
    "日本語のテキストと中文字符，한국어 텍스트",
    "🙂👍🏽👨‍👩‍👧 flags 🇫🇷 ❤️ 🙂🙂",
    "مرحبا بالعالم ١٢٣ नमस्ते दुनिया ३ Привет, мир!",
    "½ ² Ⅻ ٣ ৩ 五 十二 ① x½y 五5 5五 ٣五",  # 五 is a letter (Lo) although str.isnumeric() says it is a number
    "a\x1cb\x1dc\x1e d\x1f e \x1c\x1c f \x1c\n\n\x1c g\n\n\x1f",  # Python's \s matches \x1c-\x1f; White_Space does not
    "\x85 \xa0 \u3000 x\u2028y\u2029z \u1680 \u200b",
    "\x00\x01\x7f\x0b\x0c",
    f"Hello{ENDOFTEXT}World {ENDOFTEXT} {ENDOFTEXT}{ENDOFTEXT}",
    "<|endoftext|  <|endoftext||> <|endoftext>",
    "",
]


@pytest.mark.parametrize("text", GPT2_TEXTS)
def test_gpt2_encodes_exactly_like_tiktoken(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text, allowed_special=True) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_encodes_random_unicode_exactly_like_tiktoken(gpt2, tiktoken_gpt2):
    import unicodedata

    rng = random.Random(0)
    # characters assigned in Unicode 14 (Python's), outside the surrogates (tiktoken cannot take them)
    pool = [chr(c) for c in range(0x20000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    common = list(" \n\t'sdmtlvre0123456789abcXYZ.,!?")
    for _ in range(300):
        text = "".join(rng.choice(rng.choice((common, pool))) for _ in range(rng.randint(1, 40)))
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=()), repr(text)


def test_gpt2_encodes_tiny_shakespeare_exactly_like_tiktoken(gpt2, tiktoken_gpt2):
    text = open(shared_file(SHAKESPEARE), encoding="utf-8").read()
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text)


def test_gpt2_loads_alike_from_tiktoken_vocab_json_and_encoder_json(gpt2, tmp_path, monkeypatch):
    oracle("tiktoken")
    import tiktoken.load

    write_vocab_and_merges(gpt2, tmp_path / ".", ("encoder.json", "vocab.bpe"))
    (tmp_path / "hf").mkdir()
    write_vocab_and_merges(gpt2, tmp_path / "hf")

    # tiktoken reads OpenAI's files with its own byte map and checks them: they must give GPT-2's ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache: these paths are reused between test runs
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert ranks == tiktoken.load.load_tiktoken_bpe(GPT2_TIKTOKEN)

    for folder in (tmp_path, tmp_path / "hf"):
        assert tokenizer.gpt2_tokenizer(str(folder)).to_dict() == gpt2.to_dict()


def test_gpt2_vocabulary_is_downloaded_once_into_the_cache(gpt2, tmp_path, monkeypatch):
    published = tmp_path / "published"
    published.mkdir()
    write_vocab_and_merges(gpt2, published)
    fetched = []

    def download(url, path, hint, sha256=None):
        fetched.append(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(published / os.path.basename(path), path)

    monkeypatch.setattr(tokenizer, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenizer, "download", download)
    for _ in range(2):
        assert tokenizer.gpt2_tokenizer().to_dict() == gpt2.to_dict()
    assert fetched == [tokenizer.GPT2_VOCAB_URL + "vocab.json", tokenizer.GPT2_VOCAB_URL + "merges.txt"]


def test_gpt2_download_offline_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(tokenizer, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(UserError, match=r"could not download https://huggingface.co/openai-community/gpt2/"
                                         r"resolve/main/vocab.json \(ConnectionError\); pass --gpt2_vocab=PATH"):
        tokenizer.gpt2_tokenizer()


def rank_file(tokens):
    """A tiktoken rank file holding `tokens` (bytes) in order."""
    return "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))


BYTES = [bytes([b]) for b in range(256)]
SHOWN_BYTES = {c: i for i, c in enumerate(bytes_to_unicode().values())}  # a vocab.json of GPT-2's 256 bytes


@pytest.mark.parametrize("source, message", [
    (None, "--gpt2_vocab=.*bad not found; pass --gpt2_vocab=PATH"),
    ({}, "has neither vocab.json\\+merges.txt nor encoder.json\\+vocab.bpe"),
    ("hello\n", "is not a tiktoken rank file \\(line 1 is not `base64 rank`"),
    ("IQ== 5\n", "line 1 has rank 5, not 0"),
    (rank_file(BYTES[1:] + [b"ab"]), "first 256 tokens are not the 256 bytes"),
    (rank_file(BYTES + [b"abc"]), "token 256 is not a merge of two earlier tokens"),
    (rank_file(BYTES + [b"abc", b"ab", b"bc"]), "token 256 is not a merge of two earlier tokens"),  # later ones
    (rank_file(BYTES + [b"ab"]), "holds a BPE vocabulary, but not GPT-2's"),
    ({"vocab.json": "[1, 2]", "merges.txt": "#version: 0.2\n"}, "is not a GPT-2 vocab.json"),
    ({"encoder.json": json.dumps(SHOWN_BYTES), "vocab.bpe": "#version: 0.2\nzz q\n"}, "see line 2"),
    ({"vocab.json": json.dumps(SHOWN_BYTES | {"ab": 256}), "merges.txt": "#version: 0.2\nb c\n"},
     "merge 0 does not make id 256"),
])
def test_bad_gpt2_vocabulary_sources_are_one_clear_line(tmp_path, source, message):
    bad = tmp_path / "bad"
    if isinstance(source, str):
        bad.write_text(source, encoding="utf-8")
    elif isinstance(source, dict):
        bad.mkdir()
        for name, content in source.items():
            (bad / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        tokenizer.gpt2_tokenizer(str(bad))


def quadratic_merges(ids, ranks):
    """BPE's merging as it is usually written: find the pair learned first, merge it everywhere, repeat."""
    while len(ids) > 1:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            return ids
        ids = tokenizer.merge(ids, pair, ranks[pair])
    return ids


@pytest.mark.parametrize("seed", range(4))
def test_merging_in_n_log_n_gives_the_ids_of_the_quadratic_loop(seed):
    rng = random.Random(seed)
    tok = BPETokenizer.train(random_corpus(seed), vocab_size=300 + 50 * seed)
    for _ in range(300):  # long runs of few letters: overlapping pairs like "aaa", "abab", where order matters
        ids = [rng.choice([97, 98, 99, 32][: 2 + seed % 3]) for _ in range(rng.randint(0, 120))]
        assert tokenizer.apply_merges(ids, tok.ranks) == quadratic_merges(ids, tok.ranks)
    assert tokenizer.apply_merges([97] * 5, {(97, 97): 256, (256, 97): 257}) == [256, 257]


def test_a_long_chunk_without_spaces_encodes_like_tiktoken(gpt2, tiktoken_gpt2):
    rng = random.Random(0)
    for letters in ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "ab", "0123456789"):
        blob = "".join(rng.choices(letters, k=20_000))  # one chunk: the worst case for BPE's merging
        assert gpt2.encode(blob) == tiktoken_gpt2.encode(blob)
