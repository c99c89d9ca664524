"""
chat.py: talk to a model: type a text and watch the model continue it, or take turns with a chat model, in this
terminal or in a browser.

    python chat.py                                   # the model train.py wrote, out/best.pt, in this terminal
    python chat.py --init_from=gpt2 --temperature=0.7 --top_k=40      # OpenAI's GPT-2, as in generate.py
    python chat.py --web                             # the same behind a page at http://127.0.0.1:8000
    python chat.py --web --port=8080 --host=0.0.0.0  # reachable from other machines: only on a network you trust

In the terminal, each line you type joins the conversation and the model continues the whole conversation from
there (as much as its block_size holds: generate.py keeps the last 3/4 when it outgrows it). The text streams as
it is made; an empty line lets the model go on. Commands change the sampling: /temperature 0.7, /top_k 40,
/top_p 0.9, /length 200, /seed 7; /reset forgets the conversation; /help, /quit. Ctrl-C stops a reply and returns
to the prompt; Ctrl-D leaves.

A chat model (a checkpoint whose tokenizer is a ChatTokenizer, as sft.py tunes) takes turns instead: each line is
the user's message, the prompt is the whole conversation rendered with the chat template and <|assistant|> at the
end, and the reply streams until the model's <|end|> (not shown) or /length tokens; it then joins the conversation
as the assistant's turn, and so does a reply Ctrl-C stopped, as far as it was shown. An empty line does nothing.
/system Be brief. sets the system message (/system alone clears it); /reset forgets the turns but keeps it. When
the conversation and room for a reply (/length tokens, at most half of block_size) outgrow block_size, the oldest
turns are forgotten (a user's message with its reply; never the system message), with a line saying so; a message
too long to fit even alone is refused.
The page of --web does the same with a chat model: it keeps the conversation, sends all of it each time, and has a
system message and a Reset button.

With --web, web.py serves the page (chat.html) and a JSON API beside it, to several clients at once, batched;
its docstring describes the API.
"""

import json
import signal
import sys
from types import SimpleNamespace

try:
    import readline  # noqa: F401  (input() then edits lines and keeps a history, where the platform has it)
except ImportError:
    pass

import torch

import configurator
from configurator import UserError
from generate import SAMPLING_RANGES, check_sampling, generate, load_for_sampling, text_decoder
from tokenizer import ChatTokenizer

# -----------------------------------------------------------------------------
init_from = "out/best.pt"  # a checkpoint of train.py's, or GPT-2: gpt2, gpt2-medium, ..., or a GPT-2 folder
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 (or below 1e-5) takes the most likely token
top_k = 0  # sample only among the k most likely tokens (0: all)
top_p = 1.0  # sample only among the most likely tokens whose probabilities add up to p (1.0: all)
length = 200  # tokens per reply
seed = 1337  # the terminal's random generator: the same seed and the same lines give the same conversation
max_length = 2000  # the most tokens one reply may ask for
web = False  # serve a page and a JSON API instead of talking in this terminal
host = "127.0.0.1"  # the address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every network it is on
port = 8000  # 0: any free port (the address is printed at the start)
max_prompt = 10_000  # --web: the longest prompt a request may send, in characters
max_streams = 32  # --web: generations running at once; a request beyond them gets HTTP 503
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'mps'
dtype = "auto"  # the weights' precision: 'auto' (bf16 or fp16 on a GPU, fp32 elsewhere), 'float32', 'bfloat16'
quantize = ""  # 'int8': int8 weights, as generate.py --quantize=int8 (less memory, faster on a CPU); '': as loaded
fused_attention = True  # attention in one fused kernel; False runs your edited attend() in gpt.py
# -----------------------------------------------------------------------------

SAMPLING = ("temperature", "top_k", "top_p", "length", "seed")  # what a command or a request may change
INTEGERS = ("top_k", "length", "seed")  # the others are numbers


def ranges(max_length):
    """Each setting in SAMPLING: (the test of a value, the allowed values in words); generate.py's for sampling."""
    return SAMPLING_RANGES | {"length": (lambda v: 1 <= v <= max_length, f"from 1 to {max_length} (--max_length)"),
                              "seed": (lambda v: 0 <= v < 2**63, "from 0 to 2**63 - 1")}


def checked(name, value, max_length):
    """`value` for setting `name` if it is a number (an integer for INTEGERS; a bool or a string is neither) in
    the setting's range (a length at most max_length), as a float or an int; else ValueError saying what is
    allowed."""
    integer = name in INTEGERS
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}")
    try:
        check_sampling(name, value, ranges(max_length))
    except UserError as e:
        raise ValueError(str(e)) from None
    return value if integer else float(value)


def parsed(name, text):
    """The value a command's text gives setting `name` (/length 100, /temperature 0.7), checked."""
    try:
        value = int(text) if name in INTEGERS else float(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if name in INTEGERS else 'a number'}, got {text!r}") from None
    return checked(name, value, max_length)


def encode(tok, text):
    """Text -> token ids, or ValueError naming the characters the model does not know."""
    try:
        return tok.encode(text, allowed_special=True)  # <|endoftext|> may start a text, as in generate.py
    except UserError as e:  # text the tokenizer cannot encode: here, one bad line or request
        raise ValueError(str(e)) from None


def tokens(model, ids, settings, generator):
    """The token ids (ints) of one reply to the conversation `ids`: generate.py's sampling and cache."""
    idx = torch.tensor([ids], dtype=torch.long, device=model.lm_head.weight.device)  # (1, T)
    for next_id in generate(model, idx, settings["length"], settings["temperature"], settings["top_k"],
                            settings["top_p"], generator):
        yield next_id.item()


def conversation_prompt(tok, messages, length, block_size):
    """A chat model's prompt for its next reply, as (ids, dropped): the messages (a system message first, if
    any, then the turns, the last one the user's) rendered with <|assistant|> at the end. While the prompt and a
    reply of `length` tokens, or half of block_size if that is less, do not fit in block_size, the oldest turn
    goes (a user's message with the replies after it; the system message stays): `dropped` messages in all.
    ValueError if even the last turn does not fit. (A reply that runs past block_size goes on as generate.py's
    do: from the last 3/4 of its context.)"""
    system = leading_system(messages)
    length = min(length, block_size // 2)  # room kept for the reply
    try:
        pieces = [tok.render([message])[0] for message in messages]  # the prompt is their ids one after another
    except UserError as e:  # text the tokenizer cannot encode
        raise ValueError(str(e)) from None
    first = system  # the first turn kept
    while (size := sum(map(len, pieces[:system] + pieces[first:])) + 1 + length) > block_size:  # 1: <|assistant|>
        if first == len(messages) - 1:
            raise ValueError(f"the last message{' with the system message' if system else ''} and a reply of "
                             f"{length} tokens need {size} positions, more than this model's block_size of "
                             f"{block_size}; write less, or ask for a shorter reply (length)")
        first += 1
        while first < len(messages) - 1 and messages[first]["role"] != "user":
            first += 1
    ids = [i for piece in pieces[:system] + pieces[first:] for i in piece] + [tok.special["<|assistant|>"]]
    return ids, first - system


def leading_system(messages):
    """1 if the conversation starts with a system message, else 0."""
    return int(bool(messages) and messages[0]["role"] == "system")


def describe(model, tok, init_from):
    turns = "; a chat model: it takes turns with you" if isinstance(tok, ChatTokenizer) else ""
    return (f"{init_from}: {model.num_params() / 1e6:.2f}M parameters, {tok.vocab_size:,} tokens, "
            f"block_size {model.config.block_size}, on {model.lm_head.weight.device}{turns}")


# -----------------------------------------------------------------------------
# The terminal

SETTINGS_HELP = """commands:
  /temperature 0.7   < 1 sharpens the distribution, > 1 flattens it; 0 always takes the most likely token
  /top_k 40          sample only among the 40 most likely tokens (0: all)
  /top_p 0.9         sample only among the most likely tokens that add up to 0.9 (1: all)
  /length 200        tokens per reply
  /seed 7            start the random generator again from seed 7
  /settings          show the settings"""
HELP = SETTINGS_HELP + """
  /reset             forget the conversation
  /help, /quit       this text; leave (as does Ctrl-D)
a line of text joins the conversation and the model continues it; an empty line lets it go on; Ctrl-C stops it"""
TURNS_HELP = SETTINGS_HELP + """
  /system Be brief.  the system message, which the model reads before the conversation (/system alone: none)
  /reset             forget the conversation (the system message stays)
  /help, /quit       this text; leave (as does Ctrl-D)
a line is your turn: the model replies until its <|end|> or /length tokens; Ctrl-C stops a reply, which stays"""


def chat(model, tok):
    """Read lines until Ctrl-D or /quit: each one is a command, or text that the model continues (a chat model:
    a turn, which the model answers)."""
    settings = {name: globals()[name] for name in SAMPLING}
    turns = isinstance(tok, ChatTokenizer)
    history = []  # the conversation so far: token ids, or a chat model's messages (the system message first)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    you = "type a message and the model replies" if turns else "type a text and the model continues it"
    print(f"{describe(model, tok, init_from)}\n{you}; /help lists the commands")
    with CtrlC() as ctrl_c:
        while True:
            try:
                line = ctrl_c.input("> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in Python's own
                print()
                continue
            except EOFError:  # Ctrl-D
                print()
                return
            if line.startswith("/"):
                if not command(line, settings, history, generator, tok):
                    return
                continue
            if turns:
                if line:  # an empty line is no turn
                    turn(model, tok, history, line, settings, generator, ctrl_c)
                continue
            try:
                history += encode(tok, line)
            except ValueError as e:
                print(f"error: {e}")
                continue
            if not history:
                print("type some text first: the model continues what you write")
                continue
            reply(model, tok, history, settings, generator, ctrl_c)


def command(line, settings, history, generator, tok):
    """Run one /command; False when it is /quit."""
    name, _, value = line[1:].strip().partition(" ")
    value, turns = value.strip(), isinstance(tok, ChatTokenizer)
    if name == "quit":
        return False
    if name == "help":
        print(TURNS_HELP if turns else HELP)
    elif name == "reset":
        del history[leading_system(history) if turns else 0 :]
        print("(the conversation is forgotten)")
    elif name == "system" and not turns:
        print("error: /system is for a chat model, which takes turns; this one continues text")
    elif name == "system":
        try:
            encode(tok, value)
        except ValueError as e:
            print(f"error: {e}")
            return True
        del history[: leading_system(history)]
        if value:
            history.insert(0, {"role": "system", "content": value})
        print(f"(the system message is now: {value})" if value else "(no system message)")
    elif name == "settings":
        print(", ".join(f"{k} = {v}" for k, v in settings.items()))
    elif name in settings:
        try:
            settings[name] = parsed(name, value) if value else settings[name]  # no value: just show it
        except ValueError as e:
            print(f"error: {e}")
            return True
        if name == "seed":
            generator.manual_seed(settings["seed"])
        print(f"{name} = {settings[name]}")
    else:
        print(f"error: unknown command /{name}; /help lists the commands")
    return True


def turn(model, tok, history, line, settings, generator, ctrl_c):
    """One exchange with a chat model: the line is the user's turn, and the reply (until <|end|>) the assistant's,
    kept in the history even if Ctrl-C stopped it. The oldest turns go when the conversation outgrows block_size."""
    history.append({"role": "user", "content": line})
    block_size = model.config.block_size
    try:
        ids, dropped = conversation_prompt(tok, history, settings["length"], block_size)
    except ValueError as e:
        history.pop()
        print(f"error: {e}")
        return
    if dropped:
        del history[leading_system(history) : leading_system(history) + dropped]
        room = min(settings["length"], block_size // 2)
        print(f"(the oldest {dropped} messages are forgotten: with room for a reply of {room} tokens, the "
              f"conversation outgrew block_size {block_size})")
    prompt = len(ids)
    reply(model, tok, ids, settings, generator, ctrl_c, end=tok.end)
    history.append({"role": "assistant", "content": tok.decode(ids[prompt:])})


def reply(model, tok, history, settings, generator, ctrl_c, end=None):
    """Continue the conversation, printing each token's text as it comes, until the length, the token `end` (a
    chat model's <|end|>, which is not shown) or Ctrl-C."""
    decode = text_decoder(tok)
    text = ""
    for token in tokens(model, history, settings, generator):
        if ctrl_c.pressed:  # during the prompt's pass or since the last token: this one is not shown
            text += " [stopped]"
            print(" [stopped]", end="")
            break
        if token == end:
            break
        history.append(token)  # what was shown is part of the conversation, even if stopped
        piece = decode(token)
        text += piece
        print(piece, end="", flush=True)
    print("" if text.endswith("\n") else "\n", end="", flush=True)


class CtrlC:
    """Ctrl-C in the terminal chat: at the prompt, a fresh prompt; during a reply, the reply stops before its next
    token. It is taken over for the whole conversation, even where chat.py started with SIGINT ignored (as a
    shell starts a job in the background), and the handlers found come back at the end.

    The handler sets `pressed`, which a reply checks at every token, so no press is lost wherever it lands:
    inside a torch op (Python runs the handler when the op returns), between tokens, or in code that would
    swallow an exception. Only inside input() does it raise KeyboardInterrupt, which ends input(). CPython's
    input() with readline runs handlers only when a signal interrupts its wait for a key; one that lands just
    before that wait (the prompt drawn, a key being read) would wait for the next key. So while input() runs, a
    timer interrupts the wait every 0.1 s, and its handler raises for such a press.
    """

    ticks = hasattr(signal, "setitimer")  # not on Windows, where a Ctrl-C ends the console's read anyway

    def __enter__(self):
        self.pressed, self.waiting = False, None
        self.old = {signal.SIGINT: signal.signal(signal.SIGINT, self.on_ctrl_c)}
        if self.ticks:
            self.old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self.on_tick)
            signal.siginterrupt(signal.SIGALRM, False)  # the timer interrupts readline's wait, no read or write
        return self

    def __exit__(self, *exc):
        self.tick(0)
        for signum, handler in self.old.items():
            signal.signal(signum, handler)

    def on_ctrl_c(self, signum, frame):
        self.pressed = True
        self.on_tick(signum, frame)

    def on_tick(self, signum, frame):
        if self.pressed and self.waiting is not None and frame is self.waiting:  # inside input(): end it
            raise self.interrupt  # made beforehand: input() may run this again with it set, and a call then fails

    def input(self, prompt):
        """input(prompt), which a Ctrl-C ends with KeyboardInterrupt."""
        self.pressed, self.interrupt = False, KeyboardInterrupt()
        self.waiting = sys._getframe()  # this call's frame, the one handlers see while input() runs
        self.tick(0.1)
        try:
            return input(prompt)
        finally:
            self.waiting = None
            self.tick(0)

    def tick(self, seconds):
        if self.ticks:
            signal.setitimer(signal.ITIMER_REAL, seconds, seconds)


def settings():
    """This file's settings as they are now (--key=value applied), for web.py's server."""
    return SimpleNamespace(**{name: globals()[name] for name in configurator.setting_names(globals())})


@configurator.script
def main(args):
    configurator.configure(globals(), args)
    for name in SAMPLING:
        try:
            checked(name, globals()[name], max_length)
        except ValueError as e:
            raise UserError(f"--{e}")
    for name, lowest, highest in (("max_length", 1, 10**9), ("max_prompt", 1, 10**9), ("max_streams", 1, 10**6),
                                  ("port", 0, 65535)):
        if not lowest <= globals()[name] <= highest:
            raise UserError(f"--{name}={globals()[name]} must be from {lowest} to {highest}")
    dev = configurator.pick_device(device)
    model, tok = load_for_sampling(init_from, dev, configurator.pick_dtype(dtype, dev), quantize,  # fp32 off the GPU
                                   fused_attention)
    if web:
        import web as server  # the page and the API, only with --web (the name web is the setting)

        server.serve(model, tok, settings())
    else:
        chat(model, tok)


if __name__ == "__main__":
    main(sys.argv[1:])
