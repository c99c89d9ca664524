import io
import json
import random
from collections import Counter

import pytest

from conftest import SHAKESPEARE, oracle, shared_file, small_text
from tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, compile_pattern, from_dict

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
    for bad in (-1, bpe.vocab_size):
        with pytest.raises(SystemExit, match=f"token id {bad} is not in this vocabulary"):
            bpe.decode([1, bad])


def test_vocab_size_counts_bytes_merges_and_specials(bpe):
    assert bpe.vocab_size == 256 + len(bpe.merges) + len(bpe.special_tokens) == 300
    assert len(bpe.vocab) == bpe.vocab_size


def naive_merge(ids, pair, new_id):
    out = []
    for x in ids:  # new_id is never pair[0], so a merged pair cannot merge again
        if out and (out[-1], x) == pair:
            out[-1] = new_id
        else:
            out.append(x)
    return out


def naive_train(text, vocab_size):
    """The obvious BPE: recount every pair over the whole corpus before every merge (slow, plainly right)."""
    regex = oracle("regex")  # an independent engine for the pre-split, with real \p{L} and \p{N}
    chunks = [chunk for part in text.split(ENDOFTEXT) for chunk in regex.findall(GPT2_PATTERN, part)]
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    merges = []
    while len(merges) < vocab_size - 257:
        counts = Counter(pair for ids in words for pair in zip(ids, ids[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # the most frequent; ties: the smallest pair
        words = [naive_merge(ids, pair, 256 + len(merges)) for ids in words]
        merges.append(pair)
    return merges


def random_corpus(seed, n_words=600):
    rng = random.Random(seed)
    letters = "aabcdeé日🙂" if seed % 2 else "ab"  # a tiny alphabet: many ties
    pieces = [" ", " ", "  ", "\n", ", ", ".", "'s ", "'LL ", "42", ENDOFTEXT]
    return "".join(("".join(rng.choices(letters, k=rng.randint(1, 6))) + rng.choice(pieces)) for _ in range(n_words))


@pytest.mark.parametrize("seed", range(6))
def test_training_matches_a_naive_reference_merge_for_merge(seed):
    text = random_corpus(seed)
    assert BPETokenizer.train(text, vocab_size=357).merges == naive_train(text, vocab_size=357)


def test_ties_go_to_the_smallest_pair():
    # chunks "ab" and " cd": every pair occurs once, so they merge in the order of (id_a, id_b)
    assert BPETokenizer.train("ab cd", vocab_size=260).merges == [(32, 99), (97, 98), (256, 100)]


def test_training_stops_when_no_pair_is_left_and_never_merges_across_specials():
    tok = BPETokenizer.train(f"ab{ENDOFTEXT}ab", vocab_size=1000)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 258


@pytest.mark.parametrize("vocab_size", [0, 256, 65536])
def test_vocab_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(SystemExit, match=f"--vocab_size={vocab_size} must be between 257 .* and 65535"):
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
    with pytest.raises(SystemExit, match="tokenizer in this checkpoint or meta.json is damaged"):
        from_dict(d)


def test_the_pattern_uses_unicode_classes_not_pythons():
    split = compile_pattern(GPT2_PATTERN)
    assert split.findall("a\x1cb \x85c") == ["a", "\x1c", "b", " ", "\x85", "c"]  # \x1c is no White_Space
    assert split.findall("五十 ½² Ⅻ٣ 5五") == ["五十", " ½²", " Ⅻ٣", " 5", "五"]  # 五 is a letter (Lo); ½ ² Ⅻ ٣ numbers
    assert split.findall("x   y x  \ty") == ["x", "  ", " y", " x", "  ", "\t", "y"]  # a space goes with the word
    with pytest.raises(ValueError, match="not supported"):
        compile_pattern(r"\p{Lu}+")
