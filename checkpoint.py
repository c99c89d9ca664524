"""
checkpoint.py: models in files: the checkpoints train.py writes, and GPT-2's published weights.

    model, tok = load_model("out/best.pt")    # a train.py checkpoint: weights, shape and tokenizer in one file
    model, tok = load_model("gpt2")           # OpenAI's GPT-2 124M, downloaded once (or a save_pretrained folder)
    model = from_pretrained("gpt2-medium")    # GPT-2's weights as a GPT, without the tokenizer

A train.py checkpoint is a plain dict of tensors and Python values: the model's weights and shape, the
tokenizer, the optimizer's state, the settings, and every random state (rng_state), so a run can continue
exactly. A LoRA run's checkpoint (train.py --lora_rank=R) holds only the adapters, with a reference to its base
(a GPT-2 size, or the absolute path of a checkpoint or folder) and the base's sha256; loading it loads the base,
checks that it is still the same, and adds the adapters (lora.py).

Nothing here runs code from a file: checkpoints load with torch.load(weights_only=True), and GPT-2's weights are
read from Hugging Face's model.safetensors, a format that holds only tensors (parsed here, without the safetensors
package). The model itself is gpt.py; used by train.py, generate.py, chat.py and look.py.
"""

import dataclasses
import hashlib
import json
import math
import mmap
import os
import pickle
import random
import re
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from configurator import UserError
import tokenizer as tokenizers
from files import CACHE_DIR, download, os_error
from gpt import GPT2_SIZES, GPT, GPTConfig
from lora import add_adapters, load_adapters, merge_adapters


def load_model(init_from):
    """The model and its tokenizer: from a train.py checkpoint, or GPT-2's published weights (a size or a folder)."""
    if init_from in GPT2_SIZES or os.path.isdir(init_from):
        model = from_pretrained(init_from)
        has_vocab = os.path.isdir(init_from) and any(os.path.isfile(os.path.join(init_from, names[0]))
                                                       for names in tokenizers.GPT2_FILES)
        hint = (f"put GPT-2's vocab.json and merges.txt beside the weights in {init_from}" if os.path.isdir(init_from)
                else "connect to the internet once, or pass --init_from=a folder holding the weights and vocabulary")
        tok = tokenizers.gpt2_tokenizer(init_from if has_vocab else "", hint)
    else:
        ckpt = load_checkpoint(init_from)
        model, tok = model_from_checkpoint(ckpt, init_from), tokenizers.from_dict(ckpt["tokenizer"])
    if tok.vocab_size != model.config.vocab_size:  # ids the model has no embedding for, or never predicts
        raise UserError(f"{init_from} holds a model with a vocabulary of {model.config.vocab_size} tokens "
                        f"but a tokenizer of {tok.vocab_size}; use weights and a vocabulary that belong together")
    return model, tok


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and Python literals, readable with torch.load(weights_only=True)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by train.py without running any pickled code; one-line errors otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one with `python train.py` or pass its path")
    try:  # torch.save writes a zip archive, which keeps a CRC of every entry: check them all
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:  # a cut-off one, say
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupted? {str(e)[:80]}); "
                        f"use another one, such as best.pt beside last.pt")
    if damaged:
        raise UserError(f"{path} is damaged: its entry {damaged} fails its CRC check; use another "
                        f"checkpoint, such as best.pt beside last.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"refusing to load {path}: it holds pickled Python objects, not just tensors "
                        f"and plain values ({first[:120]}); only load checkpoints from sources you trust")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupted?): {str(e)[:120]}")
    missing = [k for k in ("model", "model_config", "tokenizer")
               if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), dict)]
    if missing:
        raise UserError(f"{path} is not a gpt-from-scratch checkpoint (missing {', '.join(missing)}); "
                        f"pass a checkpoint that train.py wrote")
    return ckpt


def model_from_checkpoint(ckpt, path="the checkpoint", dropout=None):
    """Build the GPT a checkpoint describes and load its weights, refusing weights that are NaN, inf or integers
    (int8 weights quantized for sampling). A LoRA run's checkpoint gives its base with the adapters added.
    dropout: the model's dropout from now on (None: the checkpoint's own)."""
    quantized = next((k for k, t in ckpt["model"].items() if torch.is_tensor(t) and not t.is_floating_point()), None)
    if quantized:
        raise UserError(f"{path} holds {str(ckpt['model'][quantized].dtype)[6:]} weights ({quantized}), "
                        f"not float ones, so it cannot be trained or loaded as a model; use the float checkpoint "
                        f"they came from (generate.py --quantize=int8 quantizes weights as it loads them)")
    if "lora" in ckpt:
        return adapted_from_checkpoint(ckpt, path, dropout)
    try:
        config = checked_config(ckpt["model_config"])
        config.dropout = config.dropout if dropout is None else dropout
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError, OverflowError, MemoryError) as e:
        raise UserError(f"{path} does not match its own model_config ({str(e).splitlines()[0][:160]})")
    check_finite(model, path)
    return model


def checked_config(fields):
    """GPTConfig(**fields), each field of its default's type (a float may be given as an int); TypeError if not."""
    config = GPTConfig(**fields)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if type(value) is not type(field.default) and not (type(field.default) is float and type(value) is int):
            raise TypeError(f"{field.name} is {value!r}")
    return config


def check_finite(model, source):
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise UserError(f"{source} holds NaN or inf weights (in {bad}); use another checkpoint")


# -----------------------------------------------------------------------------
# Bases to fine-tune or adapt, and the LoRA checkpoints that point to them


def load_base(init_from, dropout=None):
    """The model to fine-tune or to adapt, as a plain GPT with every parameter trainable: GPT-2's weights (a size
    or a folder) or a train.py checkpoint's (adapters in it merged into the weights); and the tokenizer of that
    checkpoint as a dict (None for GPT-2, whose vocabulary is GPT-2's). dropout: None keeps the checkpoint's."""
    if init_from in GPT2_SIZES or os.path.isdir(init_from):
        return from_pretrained(init_from, dropout=dropout or 0.0), None
    ckpt = load_checkpoint(init_from)
    return merge_adapters(model_from_checkpoint(ckpt, init_from, dropout)), ckpt["tokenizer"]


def base_reference(init_from):
    """How a LoRA run's checkpoints name their base: a GPT-2 size as it is, a path made absolute (so that the
    checkpoint can be read from anywhere), and the sha256 of the base's weights."""
    base = init_from if init_from in GPT2_SIZES else os.path.abspath(init_from)
    return dict(base=base, base_sha256=weights_sha256(base))


def weights_sha256(init_from):
    """The sha256 of the file(s) holding init_from's weights, read a MiB at a time: a train.py checkpoint, a GPT-2
    size's model.safetensors in the cache (downloaded first if missing), or a folder's safetensors files in turn."""
    if init_from in GPT2_SIZES:
        paths = [gpt2_file(init_from)]
    elif os.path.isdir(init_from):
        paths = [os.path.join(init_from, name) for name in weight_files(init_from)]
    else:
        paths = [init_from]
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                while chunk := f.read(2**20):
                    digest.update(chunk)
        except OSError as e:
            raise os_error("read", path, e) from None
    return digest.hexdigest()


def adapted_from_checkpoint(ckpt, path, dropout=None):
    """A LoRA run's model: its base, checked against the sha256 the run recorded and cropped as the run cropped
    it, with the adapters added and loaded. dropout: None keeps the run's."""
    try:
        lora = ckpt["lora"]
        base, sha256, rank, alpha, layers = (lora[k] for k in ("base", "base_sha256", "rank", "alpha", "layers"))
        config = checked_config(ckpt["model_config"])
        config.dropout = config.dropout if dropout is None else dropout
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} holds a damaged LoRA record ({type(e).__name__}: {str(e)[:80]}); use "
                        f"another checkpoint of the run, or train the adapters again")
    if base not in GPT2_SIZES and not os.path.exists(base):
        raise UserError(f"{path} holds adapters for the base model {base}, which is not there any more; put "
                        f"the base back at that path (the adapters mean nothing without it)")
    if weights_sha256(base) != sha256:
        raise UserError(f"{base}, the base model that {path} adapts, has changed since the adapters were "
                        f"trained (its sha256 is no longer {sha256[:16]}...); put the original base back, or train "
                        f"new adapters on this one")
    model, _ = load_base(base, config.dropout)
    grown = config.vocab_size > model.config.vocab_size  # tuned on conversations: a chat template's tokens added
    if grown:
        model.add_tokens(config.vocab_size)
    if dataclasses.asdict(model.config) | dict(block_size=config.block_size) != dataclasses.asdict(config) or (
            config.block_size > model.config.block_size):
        raise UserError(f"{path} describes a model of another shape than its base {base}; use the base "
                        f"its adapters were trained on")
    model.crop_block_size(config.block_size)
    add_adapters(model, rank, alpha, layers, torch.Generator(), grown)  # the random A is overwritten next
    try:
        load_adapters(model, ckpt["model"])
    except ValueError as e:
        raise UserError(f"{path} does not hold the adapters its LoRA record describes ({str(e)[:120]})")
    check_finite(model, path)
    return model


# -----------------------------------------------------------------------------
# What a checkpoint fixes for the run that goes on from it: train.py applies these with its flags

RUN_STATE = ("optimizers", "scaler", "rng", "iter_num", "best_val_loss", "config")  # besides the model
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]  # train.py's model settings
SWITCHES = MODEL_KEYS[MODEL_KEYS.index("rope"):]  # past GPT-2: rope, rmsnorm, ..., tie_embeddings


def resumed_settings(ckpt, path, flags):
    """The settings of the run that `ckpt` (read from `path`) continues: the ones it saved, except those given
    now as `flags` ({name: value}, like a larger max_iters). A flag that contradicts what the saved state fixes
    (the model's shape, its switches, Muon or not, the adapters) is a UserError."""
    missing = [k for k in RUN_STATE if k not in ckpt and not (k == "optimizers" and "optimizer" in ckpt)]
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"{path} lacks {', '.join(missing) or 'its settings'}, so the run cannot continue exactly; "
                        f"sample from it with generate.py, or start a new run with --init_from=scratch "
                        f"--out_dir=NEW_DIR")
    settings = {k: v for k, v in ckpt["config"].items() if k not in flags and k != "init_from"}
    if flags.get("dtype", settings.get("dtype")) == "auto" and "precision" in ckpt:
        settings["dtype"] = ckpt["precision"]  # the precision the run chose, not a new choice by a new probe
    fixed = {k: ckpt["model_config"].get(k, getattr(GPTConfig, k)) for k in MODEL_KEYS}
    fixed["muon"] = ckpt["config"].get("muon", False)  # which optimizer holds which moments
    lora = ckpt.get("lora")
    fixed.update(dict(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_layers=lora["layers"]) if lora
                 else dict(lora_rank=0))  # which weights train
    clash = [k for k in fixed if k in flags and flags[k] != fixed[k]]
    if clash:
        saved = ", ".join(f"{k}={fixed[k]}" for k in clash)
        raise UserError(f"the checkpoint in {os.path.dirname(path) or '.'} has {saved}; drop those flags to resume, "
                        f"or start a new run with --init_from=scratch --out_dir=NEW_DIR")
    return settings


def base_settings(init_from, flags):
    """What the base model `init_from` (a train.py checkpoint, or GPT-2: a size or a folder) fixes for a run that
    fine-tunes it: its shape and its switches, and AdamW (muon=False) unless `flags` ask for Muon. A flag that
    would change its architecture is a UserError; block_size may crop its positions."""
    if init_from in GPT2_SIZES or os.path.isdir(init_from):
        config = GPTConfig(**gpt2_shape(init_from))
    else:
        config = checked_config(load_checkpoint(init_from)["model_config"])
    changed = [k for k in SWITCHES if k in flags and flags[k] != getattr(config, k)]
    if changed:
        raise UserError(f"--{changed[0]}={flags[changed[0]]} changes the architecture, and the weights of "
                        f"{init_from} need their own; drop it to fine-tune them")
    shape = {k: getattr(config, k) for k in MODEL_KEYS if k not in ("block_size", "dropout")}
    return dict(shape, muon=flags.get("muon", False))


def optimizer_states(ckpt, optimizers):
    """{name: state_dict} for each of `optimizers` (train.py's names), from a checkpoint's `optimizers`, or from
    the `optimizer` (AdamW) and `muon` entries that checkpoints held before optimizers had names."""
    states = ckpt["optimizers"] if "optimizers" in ckpt else {"adamw": ckpt["optimizer"], "muon": ckpt.get("muon")}
    return {name: states[name] for name in optimizers}


# -----------------------------------------------------------------------------
# Random states: a resumed run draws the same numbers as an unbroken one


def rng_state(data_rng):
    """Every random state a training step can touch (Python, NumPy, torch, CUDA, and the batch sampler
    `data_rng`), as tensors and plain values. Dropout differs per process, so under torchrun every process's
    torch state is gathered: every process must call this."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)
    states = [(torch.get_rng_state(), cuda)]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (torch.get_rng_state(), cuda))
    _, keys, *rest = np.random.get_state()  # ('MT19937', 624 uint32 keys, position, gauss flag, gauss)
    return {"python": list(random.getstate()[1]), "numpy": [torch.from_numpy(keys.astype(np.int64)), *rest],
            "torch": [s[0] for s in states], "cuda": [s[1] for s in states], "data": data_rng.get_state()}


def set_rng_state(state, data_rng, rank=0):
    """Put back what rng_state saved; process `rank` takes its own torch states."""
    random.setstate((3, tuple(state["python"]), None))
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    r = rank if rank < len(state["torch"]) else 0  # resuming on more processes than saved: reuse the first
    torch.set_rng_state(state["torch"][r])
    if torch.cuda.is_available() and state["cuda"][r].numel():
        torch.cuda.set_rng_state(state["cuda"][r])
    data_rng.set_state(state["data"])


# -----------------------------------------------------------------------------
# GPT-2's pretrained weights: OpenAI's four sizes from Hugging Face's hub, or a folder save_pretrained wrote

GPT2_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"


def from_pretrained(name_or_folder, dropout=0.0):
    """GPT-2's published weights by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or those in a folder
    that Hugging Face's save_pretrained wrote, as a float32 GPT on the CPU, giving the logits of the transformers
    library's GPT-2."""
    config, tensors, source = gpt2_checkpoint(name_or_folder)
    with torch.device("meta"):  # shapes only: every weight comes from the file, so skip the random init
        model = GPT(GPTConfig(**config, dropout=dropout))
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty made the tied pair two tensors: tie again
    model.load_state_dict(gpt2_state_dict(tensors, model, source))  # copies, converting fp16/bf16 to fp32
    check_finite(model, source)
    return model


SAFETENSORS_DTYPES = {  # the format's dtype names (all little-endian, like every machine PyTorch runs on)
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path):
    """The tensors in a .safetensors file, {name: tensor}, memory-mapped rather than read into memory.

    The format is deliberately simple, and unlike a pickle it cannot run code: 8 bytes giving the header's length
    n (little-endian), n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}},
    then the tensors' raw bytes, with begin and end counted from the end of the header."""

    def bad(why):
        return UserError(f"{path} is not a valid safetensors file ({why}); "
                         f"delete it and download or save it again")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, 100_000_000):  # the format's own limit on the header is 100 MB
            raise bad(f"header length {n} does not fit a file of {size:,} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not JSON: {e}")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never changed
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, such as {"format": "pt"}
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
            assert all(type(d) is int and d >= 0 for d in shape) and type(begin) is type(end) is int
        except (KeyError, TypeError, ValueError, AssertionError):
            raise bad(f"tensor {name!r} has a malformed entry {str(info)[:100]}")
        if type(dtype) is not str or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has dtype {str(dtype)[:20]}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[dtype]
        itemsize = dtype.itemsize
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} lies at bytes {begin}..{end} of a data section of {data_size:,} bytes: "
                      f"truncated?")
        if end - begin != numel * itemsize:
            raise bad(f"tensor {name!r} has {end - begin} bytes, but {info['dtype']}{shape} needs {numel * itemsize}")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)  # no copy
        if (8 + n + begin) % itemsize:
            raw = raw.clone()  # a misaligned tensor: copy it to memory where its numbers start on a boundary
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def gpt2_config(folder):
    """GPTConfig's fields from a Hugging Face config.json, refusing any GPT-2 variant this GPT cannot compute."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        shape = dict(n_layer=cfg.get("n_layer", 12), n_head=cfg.get("n_head", 12), n_embd=cfg.get("n_embd", 768),
                     block_size=cfg.get("n_positions", 1024), vocab_size=cfg.get("vocab_size", 50257))
    except FileNotFoundError:
        raise UserError(f"no config.json in {folder}; put the config.json that came with the weights there")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path} is not a JSON object ({str(e)[:100]}); use the one save_pretrained wrote")
    if not all(type(v) is int and v > 0 for v in shape.values()) or shape["n_embd"] % shape["n_head"]:
        raise UserError(f"{path} gives an impossible shape {shape}; use the one save_pretrained wrote")
    # each setting as GPT2Config defaults it when absent, and the values under which the two compute the same
    for key, default, same in [
        ("model_type", "gpt2", ["gpt2"]),
        ("activation_function", "gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),  # GELU's tanh approximation
        ("layer_norm_epsilon", 1e-5, [1e-5]),
        ("n_inner", None, [None, 4 * shape["n_embd"]]),  # the MLP's width
        ("scale_attn_weights", True, [True]),
        ("scale_attn_by_inverse_layer_idx", False, [False]),
        ("reorder_and_upcast_attn", False, [False]),
        ("add_cross_attention", False, [False]),
        ("tie_word_embeddings", True, [True]),
    ]:
        if cfg.get(key, default) not in same:
            raise UserError(f"{path} sets {key}={cfg[key]!r}, a GPT-2 variant this GPT cannot represent "
                            f"exactly (it needs {' or '.join(map(json.dumps, same))}); use a standard GPT-2")
    return shape


def gpt2_shape(name_or_folder):
    """GPTConfig's fields for one of GPT2_SIZES, or from the config.json of a folder that holds a GPT-2."""
    if name_or_folder in GPT2_SIZES:  # a folder with the same name can be passed as ./gpt2
        return dict(vocab_size=50257, block_size=1024, **GPT2_SIZES[name_or_folder])
    folder = name_or_folder
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is neither a GPT-2 size ({', '.join(GPT2_SIZES)}) nor a folder; pass "
                        f"one of those sizes, or a folder with the config.json and model.safetensors of a GPT-2")
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("best.pt", "last.pt")):
        raise UserError(f"{folder} is a train.py run, not a GPT-2; sample from it with python generate.py "
                        f"--init_from={os.path.join(folder, 'best.pt')}, continue it with python train.py "
                        f"--init_from=resume --out_dir={folder}")
    return gpt2_config(folder)


def gpt2_checkpoint(name_or_folder):
    """(GPTConfig fields, {name: tensor}, where they came from) for one of GPT2_SIZES, downloaded into
    CACHE_DIR the first time, or for a folder holding config.json and model.safetensors."""
    config = gpt2_shape(name_or_folder)
    if name_or_folder in GPT2_SIZES:
        path = gpt2_file(name_or_folder)
        return config, read_safetensors(path), path
    tensors = {}
    for file in weight_files(name_or_folder):
        tensors.update(read_safetensors(os.path.join(name_or_folder, file)))
    return config, tensors, name_or_folder


def gpt2_file(name):
    """The path of a GPT-2 size's model.safetensors in CACHE_DIR, downloaded there the first time."""
    path = os.path.join(CACHE_DIR, name, "model.safetensors")
    if not os.path.exists(path):
        url = GPT2_URL.format(name)
        print(f"downloading {name} from {url} to {path}", file=sys.stderr)
        download(url, path, f"connect to the internet, or download model.safetensors and config.json from "
                            f"https://huggingface.co/openai-community/{name} yourself and pass the folder: "
                            f"--init_from=path/to/folder")
    return path


def weight_files(folder):
    """The safetensors files that hold a folder's weights: model.safetensors, or the shards its index lists, or
    the same under a variant's name (save_pretrained(variant="fp16") writes model.fp16.safetensors)."""
    names = set(os.listdir(folder))
    indexes = sorted(n for n in names if re.fullmatch(r"model\.safetensors\.index(\.\w+)?\.json", n))
    singles = sorted(n for n in names if re.fullmatch(r"model(\.\w+)?\.safetensors", n))  # not a shard
    if "model.safetensors" in names:
        return ["model.safetensors"]
    if len(indexes) + len(singles) > 1:
        raise UserError(f"{folder} holds its weights in more than one form ({', '.join(indexes + singles)}); "
                        f"keep one of them there")
    if singles:
        return singles
    if not indexes:
        raise UserError(f"no model.safetensors in {folder}; weights in .bin or .pt files are pickles, which "
                        f"can run arbitrary code when loaded, so they are not read: convert them with transformers' "
                        f"save_pretrained(folder, safe_serialization=True)")
    index = os.path.join(folder, indexes[0])  # a large model that save_pretrained split into shards
    try:
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} does not map tensors to files ({str(e)[:100]}); save the model again")
    missing = [file for file in files if file not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{index} lists {len(files)} shards, but {missing[0]}{more} is not in {folder}; "
                        f"copy the missing shards there")
    return files


def gpt2_state_dict(tensors, model, source):
    """GPT-2's tensors under our names and in nn.Linear's layout, checked name by name and shape by shape
    against `model`. The names already match, up to an optional `transformer.` prefix."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state, lm_head = {}, None
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask kept as a buffer; is_causal=True does its job here
        if name == "lm_head.weight":
            lm_head = t  # the output layer, tied to wte: checked below
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        state[key] = t.t() if key.endswith(conv1d) else t  # GPT-2's Conv1D stores (in, out); Linear is (out, in)

    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}

    def first(names):
        return ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "") or "none"

    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise UserError(f"{source} does not hold the tensors of a GPT-2 (missing: {first(missing)}; "
                        f"unexpected: {first(unexpected)}); use the model.safetensors of a GPT2LMHeadModel")
    for key, t in state.items():
        if t.shape != expected[key] or not t.is_floating_point():
            raise UserError(f"{source}: {key} is {str(t.dtype)[6:]}{list(t.shape)} where this model needs "
                            f"float{list(expected[key])}; use the config.json that came with the weights")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        raise UserError(f"{source} holds an lm_head.weight different from wte.weight; this GPT ties the two "
                        f"tables, as GPT-2 does, so it cannot hold these weights")
    return {**state, "lm_head.weight": state["transformer.wte.weight"]}
