"""Shared test helpers: the project root on sys.path, a small corpus, a way to run the scripts, and the reference
libraries and files that tests compare against (skipped where missing, but never on CI)."""

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAKESPEARE = os.path.join(ROOT, "input.txt")  # Tiny Shakespeare, committed with the code
GPT2_TIKTOKEN = os.path.join(ROOT, "..", "shared", "data", "gpt2", "gpt2.tiktoken")
GPT2_RECIPE = ["--rope=False", "--zero_init=False", "--muon=False"]  # train.py's defaults go past GPT-2's


def oracle(module):
    """Import a library a test compares against; skip the test where it is missing, except on CI (env CI set),
    where a silently skipped reference would hide a failure."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def gpt2_reference():
    """GPT-2's tokenizer as tiktoken builds it from the shared rank file and GPT-2's published pattern."""
    oracle("tiktoken")
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(shared_file(GPT2_TIKTOKEN))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-reference", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def shared_file(path):
    """`path` from the shared data folder; skip the test where it is missing, except on CI, where it fails."""
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI; the tests need the shared data folder")
        pytest.skip(f"{path} is not here")
    return path


def run_script(script, *args, cwd, timeout=300, env=None):
    """Run one of the project's scripts in a fresh Python, as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def small_text(n_lines=400):
    """A deterministic, mildly repetitive English-like text of a few tens of kilobytes."""
    words = "the king and queen of the land spoke to their people about bread wine and war".split()
    lines = []
    for i in range(n_lines):
        line = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5))
        lines.append(line.capitalize() + ("." if i % 3 else "!"))
    return "\n".join(lines) + "\n"


def trained_folder(tmp_path_factory, name, *args):
    """A new folder holding small_text() as input.txt, its data/char, and what train.py's main() wrote there when
    run with args (quietly)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp(name)
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(folder)
        importlib.import_module("train").main(list(args))
    return folder


@pytest.fixture
def script(monkeypatch, corpus):
    """Run a script's main() in this process, in the corpus folder (main() starts from the file's settings)."""
    monkeypatch.chdir(corpus)

    def run(name, *args):
        return importlib.import_module(name).main(list(args))

    return run


@pytest.fixture
def corpus(tmp_path):
    """A working directory holding input.txt with small_text()."""
    (tmp_path / "input.txt").write_text(small_text(), encoding="utf-8")
    return tmp_path


def one_error_line(result):
    """Assert a script failed with no traceback and one 'error: ...' line, the last thing it printed to stderr
    (progress lines such as 'downloading ...' may come before it); return that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    return lines[-1]


def random_gpt2(seed=0, **shape):
    """A transformers GPT2LMHeadModel with every parameter random, LayerNorms and biases included, and logits
    spread widely enough that greedy decoding meets no near-ties."""
    import torch

    transformers = oracle("transformers")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, initializer_range=0.3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_vocab_and_merges(tok, folder, names=("vocab.json", "merges.txt")):
    """Write `tok` the way Hugging Face (or, with other names, OpenAI's release) publishes GPT-2."""
    from tokenizer import bytes_to_unicode

    show = bytes_to_unicode()
    text = ["".join(show[b] for b in token) for token in tok.vocab]
    vocab = {text[i]: i for i in range(256 + len(tok.merges))} | tok.special_tokens
    (folder / names[0]).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [f"{text[a]} {text[b]}" for a, b in tok.merges]
    (folder / names[1]).write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
