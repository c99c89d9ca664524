"""GPT-2 from the command line, offline: sample from a GPT-2 folder, and fine-tune one on GPT-2-tokenized text.
The folder holds a small random GPT-2 with GPT-2's real vocabulary (50,257 tokens), saved by transformers."""

import hashlib
import json

import pytest
import torch

import prepare
import tokenizer
from conftest import GPT2_TIKTOKEN, one_error_line, random_gpt2, run_script, shared_file, write_vocab_and_merges


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """(the transformers model, a folder with its config.json, model.safetensors, vocab.json and merges.txt)."""
    model = random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    folder = tmp_path_factory.mktemp("gpt2-random")
    model.save_pretrained(folder, safe_serialization=True)
    write_vocab_and_merges(tokenizer.gpt2_tokenizer(shared_file(GPT2_TIKTOKEN)), folder)
    return model, folder


def test_generate_from_a_gpt2_folder_gives_transformers_greedy_text(gpt2_folder, tmp_path):
    hf, folder = gpt2_folder
    tok = tokenizer.gpt2_tokenizer(str(folder))
    prompt = "Hello, I'm a language model,"
    ids = tok.encode(prompt)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids) :]
    result = run_script("generate.py", f"--init_from={folder}", f"--prompt={prompt}", "--temperature=0",
                        "--max_new_tokens=12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + tok.decode_bytes(expected.tolist()).decode("utf-8", "replace") + "\n"


def test_train_fine_tunes_a_gpt2_folder_and_generate_samples_from_the_result(gpt2_folder, corpus):
    _, folder = gpt2_folder
    prepare.prepare(input=str(corpus / "input.txt"), tokenizer="gpt2", data_dir=str(corpus / "data" / "gpt2"),
                    gpt2_vocab=shared_file(GPT2_TIKTOKEN))
    result = run_script("train.py", f"--init_from={folder}", "--data_dir=data/gpt2", "--block_size=32",
                        "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
                        "--learning_rate=1e-3", "--sample_length=8", cwd=corpus)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(corpus / "out" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["block_size"] == 32 and ckpt["model_config"]["vocab_size"] == 50257
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 32)  # GPT-2's 64 positions, cropped
    config = json.loads((corpus / "out" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"]) == (2, 32)  # the shape that was loaded, not the defaults
    # GPT-2's architecture and AdamW, though train.py's own defaults go past them (RoPE, Muon, ...)
    assert not any(config[k] for k in ("rope", "rmsnorm", "qk_norm", "relu2", "zero_init", "muon"))
    assert config["tie_embeddings"] and ckpt["optimizers"].keys() == {"adamw"}

    sample = run_script("generate.py", "--init_from=out/last.pt", "--prompt=The king", "--max_new_tokens=5",
                        cwd=corpus)
    assert sample.returncode == 0 and sample.stdout.startswith("The king"), sample.stderr


def test_fine_tuning_gpt2_with_another_architecture_is_a_clear_error(gpt2_folder, corpus):
    _, folder = gpt2_folder
    prepare.prepare(input=str(corpus / "input.txt"), tokenizer="gpt2", data_dir=str(corpus / "data" / "gpt2"),
                    gpt2_vocab=shared_file(GPT2_TIKTOKEN))
    line = one_error_line(run_script("train.py", f"--init_from={folder}", "--data_dir=data/gpt2", "--rope=True",
                                     "--max_iters=1", cwd=corpus))
    assert f"--rope=True changes the architecture, and the weights of {folder} need their own" in line


def test_fine_tuning_gpt2_on_character_data_is_a_clear_error(gpt2_folder, corpus):
    _, folder = gpt2_folder
    line = one_error_line(run_script("train.py", f"--init_from={folder}", "--max_iters=1", cwd=corpus))
    assert "has a vocabulary of 50257 but the data in data/char has" in line and "--data_dir=data/gpt2" in line


def test_lora_on_a_gpt2_folder_saves_the_adapters_and_finds_the_same_weights_again(gpt2_folder, corpus):
    _, folder = gpt2_folder
    prepare.prepare(input=str(corpus / "input.txt"), tokenizer="gpt2", data_dir=str(corpus / "data" / "gpt2"),
                    gpt2_vocab=shared_file(GPT2_TIKTOKEN))
    result = run_script("train.py", f"--init_from={folder}", "--data_dir=data/gpt2", "--block_size=32",
                        "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--lora_rank=2",
                        "--learning_rate=1e-2", "--sample_length=0", cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert f"({2 * 2 * (4 * 32 + 2 * 32 + 5 * 32 + 5 * 32):,} of them trainable)" in result.stdout  # r(in+out)
    ckpt = torch.load(corpus / "out" / "last.pt", weights_only=True)
    assert ckpt["model"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["model"])
    weights = (folder / "model.safetensors").read_bytes()
    assert ckpt["lora"]["base"] == str(folder) and ckpt["lora"]["base_sha256"] == hashlib.sha256(weights).hexdigest()

    from checkpoint import from_pretrained, load_model

    adapted, _ = load_model(str(corpus / "out" / "last.pt"))
    gpt2 = from_pretrained(str(folder))
    gpt2.crop_block_size(32)
    frozen = {k: v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == gpt2.state_dict().keys()
    assert all(torch.equal(v, gpt2.state_dict()[k]) for k, v in frozen.items())
