"""checkpoint.from_pretrained and read_safetensors, checked against the transformers library's GPT-2 and the safetensors
format. Everything runs offline on tiny random models: the network is never touched."""

import json
import os
import shutil

import pytest
import torch

import checkpoint
import gpt
from checkpoint import from_pretrained, read_safetensors
from configurator import UserError
from conftest import oracle, random_gpt2
from generate import generate

SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(the reference model, the folder its save_pretrained wrote)."""
    model = random_gpt2(**TINY)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def write_safetensors(path, tensors, metadata=None):
    """A .safetensors file written by hand from the format's description: the header's length as 8 little-endian
    bytes, the JSON header, then each tensor's bytes back to back, in the order given (no alignment padding)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode("utf-8")
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def folder_with(tmp_path, tensors, config):
    """A folder like save_pretrained's, from tensors and a config dict."""
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def error_of(call, *args):
    """The message of the UserError that call(*args) raises, checked to be one line."""
    with pytest.raises(UserError) as e:
        call(*args)
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


def greedy(model, prompt, n):
    return torch.stack(list(generate(model, prompt, n, temperature=0)), dim=1)  # (B, n)


# -----------------------------------------------------------------------------
# exactness against transformers


def test_logits_match_transformers_gpt2_within_1e_5(hf):
    reference, folder = hf
    model = from_pretrained(str(folder)).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, _ = model(idx)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers_token_for_token(hf):
    reference, folder = hf
    model = from_pretrained(str(folder)).eval()
    prompt = torch.randint(0, 100, (2, 6))
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=26, pad_token_id=0)[:, 6:]  # 6 + 26 = n_positions
    assert len(set(expected.flatten().tolist())) > 10  # a real sequence, not one token repeated
    assert torch.equal(greedy(model, prompt, 26), expected)


def test_generation_past_n_positions_completes(hf):
    _, folder = hf
    model = from_pretrained(str(folder)).eval()
    prompt = torch.randint(0, 100, (2, 6))
    tokens = greedy(model, prompt, 80)  # 86 positions for a model that holds 32
    assert tokens.shape == (2, 80) and torch.equal(tokens[:, :26], greedy(model, prompt, 26))


def test_half_precision_weights_load_as_the_same_numbers_in_float32(tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        reference = random_gpt2(**TINY).to(dtype)
        reference.save_pretrained(tmp_path / str(dtype), safe_serialization=True)
        model = from_pretrained(str(tmp_path / str(dtype)))
        assert model.transformer.wte.weight.dtype == torch.float32
        assert torch.equal(model.transformer.wte.weight, reference.transformer.wte.weight.float())
        c_fc = reference.transformer.h[1].mlp.c_fc.weight  # Conv1D: (in, out)
        assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, c_fc.float().t())


def test_a_sharded_folder_loads_the_same_model(hf, tmp_path):
    reference, folder = hf
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    idx = torch.randint(0, 100, (1, 32))
    sharded, single = from_pretrained(str(tmp_path)), from_pretrained(str(folder))
    assert torch.equal(sharded(idx)[0], single(idx)[0])


def test_a_hub_name_downloads_once_into_the_cache_and_then_reads_it(tmp_path, monkeypatch):
    # the hub's own layout: no `transformer.` prefix, the causal-mask buffers, a saved (tied) lm_head
    reference = random_gpt2(n_layer=1, n_head=2, n_embd=8, n_positions=1024, vocab_size=50257)
    hub = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items()}
    hub["h.0.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
    hub["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    hub["lm_head.weight"] = hub["wte.weight"]
    downloads = []

    def download(url, path, hint, sha256=None):
        downloads.append((url, path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_safetensors(path, hub)

    monkeypatch.setattr(checkpoint, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoint, "download", download)
    monkeypatch.setitem(gpt.GPT2_SIZES, "gpt2", dict(n_layer=1, n_head=2, n_embd=8))  # a tiny stand-in
    first, second = from_pretrained("gpt2"), from_pretrained("gpt2")
    assert downloads == [("https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors",
                          str(tmp_path / "gpt2" / "model.safetensors"))]
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = reference(idx).logits
        assert (first(idx)[0] - expected).abs().max().item() <= 1e-5
        assert torch.equal(first(idx)[0], second(idx)[0])


# -----------------------------------------------------------------------------
# the safetensors reader


def test_read_safetensors_reads_a_hand_written_file_of_every_dtype(tmp_path):
    tensors = {  # the odd-sized F16 first leaves every later tensor misaligned
        "half": torch.tensor([1.5, -2.0, 65504.0], dtype=torch.float16),
        "float": torch.randn(2, 3),
        "bf16": torch.tensor([[3.140625, -1e30], [1e-30, 0.0]], dtype=torch.bfloat16),  # beyond fp16's range
        "double": torch.randn(4, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(7.0),
        "ints": torch.tensor([-(2**62), 2**62]),
        "i32": torch.tensor([-5, 5], dtype=torch.int32), "i16": torch.tensor([-3], dtype=torch.int16),
        "i8": torch.tensor([-1, 1], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt", "note": "by hand"})
    read = read_safetensors(tmp_path / "x.safetensors")
    assert read.keys() == tensors.keys()
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and read[name].shape == t.shape and torch.equal(read[name], t), name


def test_read_safetensors_agrees_with_the_safetensors_library(hf, tmp_path):
    safetensors_torch = oracle("safetensors.torch")
    tensors = {str(dtype): (torch.randn(3, 5) * 50).to(dtype) for dtype in SAFETENSORS_NAMES}
    safetensors_torch.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    read = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())

    reference, folder = hf  # and transformers' own file
    expected = safetensors_torch.load_file(str(folder / "model.safetensors"))
    read = read_safetensors(folder / "model.safetensors")
    assert read.keys() == expected.keys() and all(torch.equal(read[k], v) for k, v in expected.items())


def damage(path, how):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])

    def with_header(h):
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + raw[8 + n :]

    return {
        "truncated": raw[:-10],
        "tiny": raw[:5],
        "header length": (10**12).to_bytes(8, "little") + raw[8:],
        "not JSON": raw[:8] + b"{" + b" " * (n - 1) + raw[8 + n :],
        "not an object": with_header([1, 2]),
        "offsets": with_header({**header, "a": {**header["a"], "data_offsets": [0, 4]}}),
        "dtype": with_header({**header, "a": {**header["a"], "dtype": "F8_E9M9"}}),
        "shape": with_header({**header, "a": {**header["a"], "shape": "six"}}),
    }[how]


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"), ("tiny", "header length"), ("header length", "header length"),
    ("not JSON", "not JSON"), ("not an object", "not a JSON object"),
    ("offsets", "has 4 bytes, but F32[2, 3] needs 24"),
    ("dtype", "dtype F8_E9M9, not one of F64, F32"), ("shape", "malformed entry"),
])
def test_a_damaged_safetensors_file_is_one_clear_error(tmp_path, how, message):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.randn(2, 3), "b": torch.randn(4)})
    path.write_bytes(damage(path, how))
    assert f"{path} is not a valid safetensors file" in error_of(read_safetensors, path)
    assert message in error_of(read_safetensors, path)


# -----------------------------------------------------------------------------
# what a user can get wrong


def test_a_hub_name_offline_with_an_empty_cache_names_the_url_and_the_folder_option(tmp_path, monkeypatch):
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(checkpoint, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", offline)
    message = error_of(from_pretrained, "gpt2-medium")
    url = "https://huggingface.co/openai-community/gpt2-medium/resolve/main/model.safetensors"
    assert f"could not download {url}" in message
    assert "--init_from=path/to/folder" in message
    assert not (tmp_path / "gpt2-medium" / "model.safetensors").exists()


def test_an_unknown_name_lists_the_sizes(tmp_path):
    message = error_of(from_pretrained, str(tmp_path / "gpt3"))
    assert "is neither a GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) nor a folder" in message


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"n_inner": 100}, "n_inner=100"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
    ({"model_type": "gpt_neo"}, "model_type='gpt_neo'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"n_head": 5}, "impossible shape"),
])
def test_a_config_this_gpt_cannot_represent_is_refused(hf, tmp_path, change, message):
    _, folder = hf
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}), encoding="utf-8")
    assert message in error_of(from_pretrained, str(tmp_path))


def test_a_folder_without_safetensors_says_why_pickles_are_not_read(hf, tmp_path):
    _, folder = hf
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    message = error_of(from_pretrained, str(tmp_path))
    assert "no model.safetensors in" in message and "pickles, which can run arbitrary code" in message
    os.remove(tmp_path / "config.json")
    assert "no config.json in" in error_of(from_pretrained, str(tmp_path))


@pytest.mark.parametrize("how, message", [
    ("missing", "missing: transformer.h.1.mlp.c_proj.bias; unexpected: none"),
    ("unexpected", "missing: none; unexpected: transformer.h.0.attn.rotary"),
    ("shape", "transformer.wpe.weight is float32[32, 64] where this model needs float[16, 64]"),
    ("untied", "holds an lm_head.weight different from wte.weight"),
])
def test_weights_that_do_not_fit_are_refused(hf, tmp_path, how, message):
    reference, folder = hf
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = dict(reference.state_dict())
    if how == "missing":
        del tensors["transformer.h.1.mlp.c_proj.bias"]
    if how == "unexpected":
        tensors["transformer.h.0.attn.rotary"] = torch.zeros(3)
    if how == "shape":
        config["n_positions"] = 16
    if how == "untied":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    folder_with(tmp_path, tensors, config)
    assert message in error_of(from_pretrained, str(tmp_path))
