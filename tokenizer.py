"""
tokenizer.py: how text becomes token ids and back.

    CharTokenizer  one id per distinct character (the vocabulary is the sorted set of characters)

Every tokenizer has the same small API: `encode(text) -> list[int]`, `decode(ids) -> str`,
`decode_bytes(ids) -> bytes` (for streaming output a token at a time), `vocab_size`, and `to_dict()`, a plain
JSON-able dict that `from_dict` turns back into the tokenizer. That dict is what prepare.py writes to meta.json
and train.py stores inside every checkpoint, so a checkpoint alone is enough to sample from.
"""


class CharTokenizer:
    def __init__(self, chars):
        self.chars = chars  # a str: id i is the character chars[i]
        self.ids = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text):
        return cls("".join(sorted(set(text))))

    def encode(self, text):
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:20])
            raise SystemExit(f"error: the text has characters outside this model's vocabulary: {shown}; "
                             f"use only characters from its training text")
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def to_dict(self):
        return {"type": "char", "chars": self.chars}


def from_dict(d):
    """Rebuild a tokenizer from the dict that its `to_dict()` made."""
    if d.get("type") == "char":
        return CharTokenizer(d["chars"])
    raise SystemExit(f"error: unknown tokenizer type {d.get('type')!r} in this checkpoint or meta.json")
