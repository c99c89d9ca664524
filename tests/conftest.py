"""Shared test helpers: the project root on sys.path, a small corpus, a way to run the scripts, and the reference
libraries and files that tests compare against (skipped where missing, but never on CI)."""

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
GPT2_TIKTOKEN = os.path.join(ROOT, "..", "shared", "data", "gpt2", "gpt2.tiktoken")


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


@pytest.fixture
def corpus(tmp_path):
    """A working directory holding input.txt with small_text()."""
    (tmp_path / "input.txt").write_text(small_text(), encoding="utf-8")
    return tmp_path


def one_error_line(result):
    """Assert a script failed with exactly one line on stderr that starts with 'error:'; return that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
