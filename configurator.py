"""
configurator.py: how every script here reads its settings.

Each script keeps its settings as plain globals at the top of the file, then calls

    overridden = configure(globals(), sys.argv[1:])

which applies, in order, any config files (plain `key = value` assignments) and `--key=value` flags:

    python train.py --n_layer=6 --learning_rate=1e-3
    python train.py my_config.py --max_iters=100

Values are Python literals, checked against the type of the default (an int may stand for a float; a string
setting takes the text as written; a bool setting alone, `--compile`, means True).

A user's mistake anywhere in this project (a bad setting, a missing or damaged file, a full disk) raises
UserError, whose message is one line saying what is wrong and what to do. Functions only raise it, so they work
from the Python prompt, a notebook, a test or a server thread; a script's main(), decorated with @script, turns it
into that line on stderr, `error: ...`, and exit code 1, never a traceback.
"""

import ast
import difflib
import functools
import math
import os
import sys


class UserError(Exception):
    """A mistake the user can put right; the message says what is wrong and what to do, in one line."""


def script(main):
    """Decorate a script's main(args): a UserError ends the program with `error: <message>` and exit code 1, and
    a Ctrl-C that the script does not handle itself with exit code 130 (the shell's code for it), no traceback."""

    @functools.wraps(main)
    def run(args):
        try:
            return main(args)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        except KeyboardInterrupt:
            print(file=sys.stderr)  # past the ^C the terminal shows
            raise SystemExit(130) from None

    return run


def setting_names(settings):
    """The globals that count as settings: public, not ALL_CAPS constants, holding a bool, int, float or str."""
    return [k for k, v in settings.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, (bool, int, float, str))]


def parse_value(key, text, default):
    """Turn the text of `--key=text` into a value of the default's type, or exit with a one-line error."""
    if isinstance(default, str):
        return text  # strings are taken as written: --device=cpu, --out_dir=runs/a
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--{key}={text} is not a Python literal; give a value like --{key}={default!r}")
    return check_type(key, value, default)


def check_type(key, value, default):
    if isinstance(default, bool) != isinstance(value, bool):  # bool is an int in Python: keep them apart
        raise UserError(f"--{key} must be {type(default).__name__} (like {default!r}), got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value) if abs(value) < 2**1000 else math.inf  # --learning_rate=1 means 1.0
    if type(value) is not type(default):
        raise UserError(f"--{key} must be {type(default).__name__} (like {default!r}), "
                        f"got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 is a literal for inf
        raise UserError(f"--{key}={value} must be a finite number")
    return value


def check_at_least(settings, lowest):
    """Exit with one line for the first setting below its lowest allowed value: lowest = {key: value}."""
    for key, least in lowest.items():
        if settings[key] < least:
            raise UserError(f"--{key}={settings[key]} must be at least {least}")


def check_seed(seed):
    """torch's generators take seeds from 0 to 2**64 - 1; a negative one would wrap around silently."""
    if not 0 <= seed < 2**63:  # room for train.py's seed + rank
        raise UserError(f"--seed={seed} must be between 0 and 2**63 - 1")


def unknown_key_error(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return UserError(f"unknown setting --{key}{hint}; known settings: {', '.join(sorted(known))}")


def read_config_file(path, known):
    """A config file holds plain assignments of literals, one per line: `n_layer = 6`."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found (settings are given as --key=value)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path} line {e.lineno}: not valid Python ({e.msg})")
    pairs = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path} line {node.lineno}: only plain `key = value` assignments are allowed")
        key = node.targets[0].id
        if key not in known:
            raise unknown_key_error(key, known)
        try:
            pairs.append((key, ast.literal_eval(node.value)))
        except ValueError:
            raise UserError(f"{path} line {node.lineno}: the value of {key} must be a literal (a number, string or bool)")
    return pairs


def configure(settings, args):
    """Apply config files and --key=value overrides to `settings` (a script's globals()); return the keys set.
    Each call starts again from the defaults written in the script (kept, at the first call, in `_defaults`),
    so a script's main() can run twice in one process."""
    known = setting_names(settings)
    settings.update(settings.setdefault("_defaults", {k: settings[k] for k in known}))
    if any(a in ("-h", "--help") for a in args):
        print((settings.get("__doc__") or "").strip(), "\nsettings:", file=sys.stderr)
        for k in known:
            print(f"  --{k}={settings[k]!r}", file=sys.stderr)
        raise SystemExit(0)
    overridden = set()
    for arg in args:
        if not arg.startswith("--"):  # a config file
            for key, value in read_config_file(arg, known):
                settings[key] = check_type(key, value, settings[key])
                overridden.add(key)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq and isinstance(settings.get(key), bool):
            text = "True"  # a bool setting alone switches it on: --web is --web=True
        elif not eq:
            raise UserError(f"{arg} needs a value: write --{key}=VALUE")
        if key not in known:
            raise unknown_key_error(key, known)
        settings[key] = parse_value(key, text, settings[key])
        overridden.add(key)
    return overridden


def pick_device(device):
    """'auto' -> cuda, then mps, then cpu; anything else must name a device this machine has."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device={device} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device} but this machine has no CUDA GPU; use --device=auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={device} but MPS is not available here; use --device=auto or cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None:
        if index >= torch.cuda.device_count():
            raise UserError(f"--device={device} but this machine has {torch.cuda.device_count()} "
                            f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them")
        torch.cuda.set_device(index)  # cuda:1 is then the default for everything, the generators included
    return device


def pick_dtype(dtype, device, default="float32"):
    """The precision to compute in: 'auto' -> bf16 on a GPU that has it, fp16 on an older GPU, `default` on
    other devices; anything else must be float32, bfloat16, or float16 on a CUDA GPU."""
    import torch

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype} is unknown; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError(f"--dtype=float16 needs a CUDA GPU, and this runs on {device}; use bfloat16 or float32")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return default
