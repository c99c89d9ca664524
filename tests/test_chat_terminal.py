"""chat.py in the terminal, run in a pseudo-terminal as a user runs it: the conversation goes on from line to
line, commands and their errors, Ctrl-C stopping a reply and at the prompt (also on a busy machine, pressed many
times at every moment, with no second press to make up for a missed one), Ctrl-D leaving; and its command-line
errors."""

import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, one_error_line, run_script  # first: it puts the project on sys.path
from generate import generate, load_for_sampling
from test_chat import tiny_checkpoint

LETTERS = "\n abcdefghijklmnopqrstuvwxyz"  # no '>': the terminal's prompt cannot appear in a reply

class Terminal:
    """chat.py (or a Python program: "-c", "...") run in a pseudo-terminal, as a user runs it: `send` types,
    `expect` reads up to a pattern. With ignore_ctrl_c it starts with SIGINT ignored, as a shell without job
    control starts a command in the background (`python -m pytest &` in a script) and all it starts in turn."""

    def __init__(self, *args, ignore_ctrl_c=False):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: chat.py, with this terminal as its own (Ctrl-C sends it SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_ctrl_c else signal.SIG_DFL)
            program = [] if args[:1] == ("-c",) else [os.path.join(ROOT, "chat.py")]
            os.execve(sys.executable, [sys.executable, *program, *args], {**os.environ, "TERM": "dumb"})
        self.seen = ""

    def send(self, text):
        os.write(self.fd, text.encode())

    def expect(self, pattern, timeout=60):
        """Read until `pattern` (a regex) matches; return what came before it and consume it."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode().replace("\r\n", "\n")
                except OSError:  # the program has ended: its terminal is gone
                    raise AssertionError(f"it ended, waiting for {pattern!r}: {self.seen[-2000:]!r}") from None
        before, self.seen = self.seen[: match.start()], self.seen[match.end() :]
        return before

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
        term.send("/temperature 5e-324\n")  # 0 in float32, which the sampler takes as greedy
        assert term.expect("> ") == "/temperature 5e-324\ntemperature = 5e-324\n"
        term.send("the king\n")  # the conversation is gone: the first reply again
        assert term.expect("> ") == "the king\n" + tok.decode(first) + "\n" * (first[-1] != 0)
        term.send("/length 1000000\n")
        term.expect("> ")
        term.send("a\n")
        term.expect(r"a\n[a-z \n]{20}")  # it is replying
        term.send("\x03")  # Ctrl-C
        term.expect(r" \[stopped\]\n> ")
        term.send("\x03")  # Ctrl-C at the prompt: a fresh prompt
        term.expect("\n> ")
        term.send("/temperature\n")  # alone: shows the value
        assert term.expect("> ") == "/temperature\ntemperature = 5e-324\n"
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


def wide_checkpoint(path, chars=LETTERS, block_size=256):
    """A checkpoint of a random GPT large enough that its pass over a long conversation takes a while."""
    return tiny_checkpoint(path, chars, block_size, n_layer=4, n_head=4, n_embd=128)


def test_ctrl_c_stops_a_reply_whenever_it_is_pressed_on_a_busy_machine(tmp_path):
    """Every core (up to 8) busy with another process, and chat.py started with SIGINT ignored, as a shell's
    background job is: 16 replies, each stopped by one Ctrl-C pressed at a different moment (as the pass over the
    whole conversation begins, at the first token, mid-stream, after a random pause), then one Ctrl-C at the
    fresh prompt. A missed press leaves a reply of a million tokens streaming, and no prompt comes."""
    path = wide_checkpoint(tmp_path / "wide.pt")
    cores = min(os.cpu_count() or 2, 8)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    term = Terminal(f"--init_from={path}", "--device=cpu", "--length=1000000", "--max_length=1000000",
                    ignore_ctrl_c=True)
    pick = random.Random(0)
    try:
        term.expect("> ")
        for i in range(16):
            line = " ".join(pick.choice(["the", "king", "and", "queen", "spoke"]) for _ in range(6))
            term.send(line + "\n")
            term.expect(re.escape(line) + "\n")  # echoed: the line is taken, the model starts reading it all
            if i % 4 == 1:
                term.expect("[a-z \n]")  # the first token
            elif i % 4 == 2:
                term.expect("[a-z \n]{10}")  # mid-stream
            elif i % 4 == 3:
                time.sleep(pick.uniform(0, 0.05))
            term.send("\x03")  # the terminal echoes ^C where it lands, once readline has handed the line over
            before = term.expect("\n> ")
            stopped = re.fullmatch(r"[a-z \n]*(\^C[a-z \n]?)? \[stopped\]", before)  # a token at most after it
            at_the_prompt = i % 4 in (0, 3) and before in ("", "^C")  # pressed as input() was returning
            assert stopped or at_the_prompt, before[-200:]
            term.send("\x03")  # at the prompt: a fresh one
            assert term.expect("\n> ") == ""
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        term.close()


def test_a_ctrl_c_that_lands_before_readline_waits_for_a_key_still_gives_a_fresh_prompt():
    """CPython's input() with readline acts on a SIGINT only when it interrupts readline's wait for a key. Here
    each SIGINT comes from readline's pre-input hook, after the prompt is drawn and before that wait begins: the
    worst moment, where a plain input() would sit until the next key."""
    program = (f"import os, readline, signal, sys; sys.path.insert(0, {ROOT!r}); import chat\n"
               "readline.set_pre_input_hook(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
               "with chat.CtrlC() as ctrl_c:\n"
               "    for _ in range(3):\n"
               "        try:\n"
               "            ctrl_c.input('> ')\n"
               "        except KeyboardInterrupt:\n"
               "            print('a fresh prompt')\n")
    term = Terminal("-c", program)
    try:
        for _ in range(3):
            term.expect("a fresh prompt\n", timeout=30)
    finally:
        term.close()


def test_bad_command_line_settings_are_one_line_errors(tmp_path):
    path = tiny_checkpoint(tmp_path / "tiny.pt")
    assert "--top_p=0.0 is out of range" in one_error_line(run_script("chat.py", f"--init_from={path}",
                                                                      "--top_p=0", cwd=tmp_path))
    assert "--port=70000 must be from 0 to 65535" in one_error_line(run_script("chat.py", "--web", "--port=70000",
                                                                               cwd=tmp_path))
