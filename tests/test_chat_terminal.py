"""chat.py in the terminal, run in a pseudo-terminal as a user runs it: the conversation goes on from line to
line, commands and their errors, Ctrl-C stopping a reply and at the prompt, Ctrl-D leaving; and its command-line
errors."""

import os
import pty
import re
import select
import signal
import sys
import time

import torch

from conftest import ROOT, one_error_line, run_script  # first: it puts the project on sys.path
from generate import generate, load_for_sampling
from test_chat import tiny_checkpoint

LETTERS = "\n abcdefghijklmnopqrstuvwxyz"  # no '>': the terminal's prompt cannot appear in a reply

class Terminal:
    """chat.py run in a pseudo-terminal, as a user runs it: `send` types, `expect` reads up to a pattern."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: chat.py, with this terminal as its own (Ctrl-C sends it SIGINT)
            os.execve(sys.executable, [sys.executable, os.path.join(ROOT, "chat.py"), *args],
                      {**os.environ, "TERM": "dumb"})
        self.seen = ""

    def send(self, text):
        os.write(self.fd, text.encode())

    def expect(self, pattern, timeout=60):
        """Read until `pattern` (a regex) matches; return what came before it and consume it."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], 0.1)[0]:
                self.seen += os.read(self.fd, 4096).decode().replace("\r\n", "\n")
        before, self.seen = self.seen[: match.start()], self.seen[match.end() :]
        return before

    def ctrl_c_at_the_prompt(self):
        """Press Ctrl-C at the prompt until a fresh one comes.

        CPython's input() with readline misses a SIGINT that lands after the prompt is drawn but before it
        waits on the terminal (it then acts on it at the next key). On a busy machine that window is wide
        enough for a test to hit, so, like a user, press again if nothing comes.
        """
        for _ in range(10):
            self.send("\x03")
            try:
                return self.expect("\n> ", timeout=3)
            except AssertionError:
                continue
        raise AssertionError(f"Ctrl-C at the prompt gave no fresh prompt: {self.seen[-500:]!r}")

    def close(self):
        os.close(self.fd)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def test_the_terminal_chat_continues_the_conversation_takes_commands_and_ctrl_c_stops_a_reply(tmp_path):
    path = tiny_checkpoint(tmp_path / "letters.pt", LETTERS, block_size=24)
    model, tok = load_for_sampling(path, "cpu", "float32")

    def greedy(ids, n=30):  # generate.py's loop, always the most likely token
        out = generate(model, torch.tensor([ids]), n, temperature=0)
        return [t.item() for t in out]

    term = Terminal(f"--init_from={path}", "--device=cpu", "--length=30", "--temperature=0", "--max_length=1000000")
    try:
        assert "0.03M parameters" in term.expect("> ")
        term.send("/top_k 1.5\n")
        assert term.expect("> ") == "/top_k 1.5\nerror: top_k must be an integer, got '1.5'\n"
        term.send("/nonsense\n")
        assert "error: unknown command /nonsense; /help lists the commands" in term.expect("> ")
        term.send("the king\n")  # a reply, then a second line that continues the whole conversation
        first = greedy(tok.encode("the king"))
        assert term.expect("> ") == "the king\n" + tok.decode(first) + "\n" * (first[-1] != 0)
        term.send("and\n")
        second = greedy(tok.encode("the king") + first + tok.encode("and"))
        assert term.expect("> ") == "and\n" + tok.decode(second) + "\n" * (second[-1] != 0)
        term.send("/reset\n")
        assert "forgotten" in term.expect("> ")
        term.send("the king\n")  # the conversation is gone: the first reply again
        assert term.expect("> ") == "the king\n" + tok.decode(first) + "\n" * (first[-1] != 0)
        term.send("/length 1000000\n")
        term.expect("> ")
        term.send("a\n")
        term.expect(r"a\n[a-z \n]{20}")  # it is replying
        term.send("\x03")  # Ctrl-C
        term.expect(r" \[stopped\]\n> ")
        term.ctrl_c_at_the_prompt()  # a fresh prompt
        term.send("/temperature\n")  # alone: shows the value
        assert term.expect("> ") == "/temperature\ntemperature = 0.0\n"
        term.send("\x04")  # Ctrl-D leaves
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(term.pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waited[0] == term.pid and os.waitstatus_to_exitcode(waited[1]) == 0
    finally:
        try:
            term.close()
        except ChildProcessError:  # already waited for
            pass


def test_bad_command_line_settings_are_one_line_errors(tmp_path):
    path = tiny_checkpoint(tmp_path / "tiny.pt")
    assert "--top_p=0.0 is out of range" in one_error_line(run_script("chat.py", f"--init_from={path}",
                                                                      "--top_p=0", cwd=tmp_path))
    assert "--port=70000 must be from 0 to 65535" in one_error_line(run_script("chat.py", "--web", "--port=70000",
                                                                               cwd=tmp_path))
