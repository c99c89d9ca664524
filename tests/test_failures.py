"""Every failure a user can cause ends in one clear line and a non-zero exit, and leaves nothing behind: the
scripts are run as a user runs them, and the checkpoints and data from before are hashed before and after."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import (GPT2_TIKTOKEN, ROOT, one_error_line, random_gpt2, run_script, shared_file, small_text,
                      write_vocab_and_merges)

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2", "--sample_length=0"]


def hashes(folder):
    """{relative path: sha256} of every file below `folder` but config.json and log.jsonl, which a run rewrites as
    it starts (a resume cuts the log back to its checkpoint)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return {k: v for k, v in out.items() if not k.endswith(("config.json", "log.jsonl"))}


def assert_failed_cleanly(result, folder, before):
    """One error line, no traceback, and `folder` as it was: no checkpoint or data changed, nothing left behind."""
    line = one_error_line(result)
    assert hashes(folder) == before
    return line


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    (folder / "input.txt").write_text(small_text(), encoding="utf-8")
    result = run_script("train.py", *TINY, "--max_iters=4", "--eval_interval=2", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def trained(trained_once, tmp_path):
    """A folder with input.txt, its data in data/char/ and a 4-step run in out/ (a fresh copy for each test)."""
    shutil.copytree(trained_once, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def main_of(monkeypatch):
    """Run a script's main() in this process, in `cwd`, and return the one-line error it exits with."""
    import importlib

    def run(name, *args, cwd):
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as e:
            importlib.import_module(name).main(list(args))
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        return message

    return run


def run_limited(script, *args, cwd, max_file_bytes):
    """Run a script that may not write any file larger than max_file_bytes: writes beyond it fail with EFBIG,
    as they would on a disk that fills up."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def mounted_tmpfs(path, options):
    """Mount a small tmpfs at `path` if this process may (root with CAP_SYS_ADMIN); False otherwise."""
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


# -----------------------------------------------------------------------------
# the file system says no


def test_a_checkpoint_that_does_not_fit_on_the_disk_leaves_the_old_one_and_no_temporary(trained):
    size = os.path.getsize(trained / "out" / "last.pt")
    before = hashes(trained)
    result = run_limited("train.py", "--init_from=resume", "--max_iters=6", cwd=trained, max_file_bytes=size // 2)
    line = assert_failed_cleanly(result, trained, before)
    assert "cannot write out/last.pt: File too large" in line


def test_prepared_data_that_does_not_fit_leaves_the_data_from_before(trained):
    before = hashes(trained)
    val_bytes = os.path.getsize(trained / "data" / "char" / "val.bin")  # train.bin fits, val.bin does, meta.json...
    result = run_limited("prepare.py", cwd=trained, max_file_bytes=val_bytes + 1)  # ... no: train.bin is 9x val.bin
    line = assert_failed_cleanly(result, trained, before)
    assert "cannot write data/char/" in line and "File too large" in line


def test_a_full_disk_is_named_and_leaves_nothing_behind(trained, tmp_path):
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "size=16k"):  # room for config.json, not for a checkpoint
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        result = run_script("train.py", *TINY, "--max_iters=2", f"--out_dir={disk}", cwd=trained)
        line = one_error_line(result)
        assert f"cannot write {disk}/" in line and "No space left on device" in line
        assert not [name for name in os.listdir(disk) if name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_read_only_out_dir_is_named(trained, tmp_path):
    folder = tmp_path / "read-only"
    if not mounted_tmpfs(folder, "ro,size=64k"):
        pytest.skip("mounting a read-only tmpfs needs root with CAP_SYS_ADMIN")
    try:
        result = run_script("train.py", *TINY, "--max_iters=2", f"--out_dir={folder}", cwd=trained)
        assert "Read-only file system; choose a folder you can write to" in one_error_line(result)
    finally:
        subprocess.run(["umount", str(folder)])


@pytest.mark.parametrize("script, flag", [("train.py", "--out_dir"), ("prepare.py", "--data_dir")])
def test_a_file_where_a_folder_should_be_is_named(trained, script, flag):
    (trained / "plain-file").write_text("not a folder")
    before = hashes(trained)
    args = [*TINY, "--max_iters=2"] if script == "train.py" else []
    result = run_script(script, *args, f"{flag}=plain-file/run", cwd=trained)
    line = assert_failed_cleanly(result, trained, before)
    assert "cannot create the folder plain-file/run: Not a directory" in line


def test_a_run_clears_the_temporaries_that_killed_runs_left_and_no_others(trained):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has exited: nothing can still be writing its temporary
    stale = [trained / "out" / f"last.pt.{dead}.tmp", trained / "data" / "char" / f"meta.json.{dead}.tmp"]
    alive = trained / "out" / f"best.pt.{os.getpid()}.tmp"  # this test process is alive
    for path in stale + [alive]:
        path.write_bytes(b"half a checkpoint")
    assert run_script("train.py", "--init_from=resume", "--max_iters=5", cwd=trained).returncode == 0
    assert run_script("prepare.py", cwd=trained).returncode == 0
    assert not any(path.exists() for path in stale) and alive.exists()


# -----------------------------------------------------------------------------
# prepared data and checkpoints that are not what they claim


def damage_meta(folder, damage):
    path = folder / "data" / "char" / "meta.json"
    path.write_text(damage(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
    return hashes(folder)


def test_a_meta_json_whose_vocabulary_contradicts_its_tokenizer_is_named(trained):
    before = damage_meta(trained, lambda meta: json.dumps({**meta, "vocab_size": meta["vocab_size"] + 5}))
    result = run_script("train.py", *TINY, "--max_iters=2", "--out_dir=other", cwd=trained)
    line = assert_failed_cleanly(result, trained, before)
    assert "data/char/meta.json says vocab_size" in line and "but its tokenizer has" in line


@pytest.mark.parametrize("damage, message", [
    (lambda meta: "{not json", "data/char/meta.json is not readable JSON"),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "val_tokens"}), "lacks the tokenizer or a count"),
    (lambda meta: json.dumps([meta]), "lacks the tokenizer or a count"),
    (lambda meta: json.dumps({**meta, "tokenizer": ["char"]}), "is not a tokenizer"),
    (lambda meta: json.dumps({**meta, "tokenizer": {"type": "char"}}), "tokenizer in this checkpoint or meta.json is damaged"),
])
def test_a_meta_json_that_is_not_what_it_claims_is_named(trained, main_of, damage, message):
    before = damage_meta(trained, damage)
    assert message in main_of("train", *TINY, "--max_iters=2", "--out_dir=other", cwd=trained)
    assert hashes(trained) == before


def damage_checkpoint(folder, damage):
    path = folder / "out" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    return hashes(folder)


def test_resuming_from_a_checkpoint_without_its_optimizer_is_named(trained):
    before = damage_checkpoint(trained, lambda ckpt: ckpt.pop("optimizers"))
    line = assert_failed_cleanly(run_script("train.py", "--init_from=resume", cwd=trained), trained, before)
    assert "out/last.pt lacks optimizers, so the run cannot continue exactly; sample from it with generate.py" in line


@pytest.mark.parametrize("key", ["rng", "iter_num", "best_val_loss", "scaler", "config"])
def test_resuming_from_a_checkpoint_without_its_run_state_is_named(trained, main_of, key):
    before = damage_checkpoint(trained, lambda ckpt: ckpt.pop(key))
    assert f"out/last.pt lacks {key}, so the run cannot continue" in main_of("train", "--init_from=resume", cwd=trained)
    assert hashes(trained) == before


@pytest.mark.parametrize("damage", [lambda c: c.update(rng={"python": [1, 2]}), lambda c: c.update(iter_num="four"),
                                    lambda c: c["optimizers"]["adamw"].update(state={0: {"step": "x"}})])
def test_resuming_from_a_damaged_run_state_is_named(trained, main_of, damage):
    before = damage_checkpoint(trained, damage)
    message = main_of("train", "--init_from=resume", cwd=trained)
    assert "out/last.pt holds a damaged optimizer, iteration or random state" in message
    assert hashes(trained) == before


@pytest.mark.parametrize("entry", ["data.pkl", "data/"])  # the pickled structure, and the tensors' bytes
def test_a_byte_flipped_inside_a_checkpoint_is_caught_by_its_crc(trained, entry):
    path = trained / "out" / "last.pt"
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if entry in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    local = info.header_offset  # a local header: 30 bytes, then the name and an extra field of the lengths it gives
    start = local + 30 + int.from_bytes(raw[local + 26 : local + 28], "little") + int.from_bytes(raw[local + 28 : local + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10  # one bit, in the middle of the entry's data
    path.write_bytes(bytes(raw))
    before = hashes(trained)
    for script, args in (("train.py", ["--init_from=resume"]), ("generate.py", ["--init_from=out/last.pt"])):
        line = assert_failed_cleanly(run_script(script, *args, cwd=trained), trained, before)
        assert "out/last.pt is damaged: its entry" in line and "fails its CRC check" in line


def test_weights_that_are_not_finite_are_named_on_load(trained):
    ckpt = torch.load(trained / "out" / "last.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    torch.save(ckpt, trained / "nan.pt")
    line = one_error_line(run_script("generate.py", "--init_from=nan.pt", cwd=trained))
    assert "nan.pt holds NaN or inf weights (in transformer.h.0.mlp.c_fc.weight)" in line


def test_outputs_that_overflow_are_named_instead_of_reaching_multinomial(trained):
    ckpt = torch.load(trained / "out" / "last.pt", weights_only=True)
    ckpt["model"]["transformer.wte.weight"] *= 1e37  # finite weights whose logits overflow to inf
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["transformer.wte.weight"]
    torch.save(ckpt, trained / "huge.pt")
    line = one_error_line(run_script("generate.py", "--init_from=huge.pt", "--max_new_tokens=5", cwd=trained))
    assert "the model's outputs are not finite numbers (NaN or inf)" in line


# -----------------------------------------------------------------------------
# numbers out of range, and the scripts that had no checks


@pytest.mark.parametrize("script, seed", [("train.py", 2**64), ("generate.py", -5)])
def test_a_seed_the_generator_cannot_take_is_named(trained, script, seed):
    args = [*TINY, "--max_iters=1", "--out_dir=other"] if script == "train.py" else []
    assert f"--seed={seed} must be between 0 and 2**63 - 1" in one_error_line(
        run_script(script, *args, f"--seed={seed}", cwd=trained))


@pytest.mark.parametrize("script, seed", [("train", -1), ("train", 2**63), ("generate", 2**70)])
def test_every_seed_out_of_range_is_named(trained, main_of, script, seed):
    args = [*TINY, "--max_iters=1", "--out_dir=other"] if script == "train" else []
    assert f"--seed={seed} must be between 0" in main_of(script, *args, f"--seed={seed}", cwd=trained)


def test_a_number_that_is_not_finite_is_refused(corpus, main_of):
    assert "--learning_rate=inf must be a finite number" in one_error_line(
        run_script("train.py", "--learning_rate=1e999", cwd=corpus))
    for flag in ("--dropout=-1e999", "--grad_clip=1" + "0" * 400, "--top_p=1e400"):
        assert "must be a finite number" in main_of("generate" if "top_p" in flag else "train", flag, cwd=corpus)


def test_bench_checks_its_settings_like_the_scripts_it_drives(corpus):
    cases = [(["--repeat=0"], "--repeat=0 must be at least 1"),
             (["--repeat=-3"], "--repeat=-3 must be at least 1"),
             (["--target_loss=-1"], "--target_loss=-1.0 must be at least 0.0"),
             (["--what=sample", "--max_new_tokens=0"], "--max_new_tokens=0 must be at least 1"),
             (["--what=sample", "--num_samples=0"], "--num_samples=0 must be at least 1"),
             (["--what=sample", "--n_layer=-1"], "--n_layer=-1 must be at least 1"),
             (["--what=sample", "--n_embd=30", "--n_head=4"], "--n_embd=30 must be a multiple of --n_head=4")]
    for args, message in cases:  # bench.py checks before it imports torch: each run takes a fraction of a second
        assert message in one_error_line(run_script("bench.py", *args, cwd=corpus))


def test_bigram_says_one_line_for_text_that_is_not_utf8_and_for_flags(tmp_path):
    (tmp_path / "input.txt").write_bytes(b"caf\xe9 au lait " * 100)
    assert "input.txt is not UTF-8 text (byte 3 is invalid)" in one_error_line(run_script("bigram.py", cwd=tmp_path))
    (tmp_path / "input.txt").write_text("plenty of text " * 100, encoding="utf-8")
    line = one_error_line(run_script("bigram.py", "--max_iters=10", cwd=tmp_path))
    assert "bigram.py takes no settings (--max_iters=10); edit the numbers at the top of the file" in line


# -----------------------------------------------------------------------------
# GPT-2 folders as other tools write them


@pytest.fixture(scope="module")
def gpt2_vocab():
    import tokenizer

    return tokenizer.gpt2_tokenizer(shared_file(GPT2_TIKTOKEN))


def test_a_gpt2_folder_whose_vocabulary_is_not_its_tokenizers_is_named(tmp_path, gpt2_vocab):
    random_gpt2(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=100).save_pretrained(tmp_path / "small")
    write_vocab_and_merges(gpt2_vocab, tmp_path / "small")
    line = one_error_line(run_script("generate.py", f"--init_from={tmp_path / 'small'}", cwd=tmp_path))
    assert "a vocabulary of 100 tokens but a tokenizer of 50257" in line


def test_a_gpt2_folder_without_a_vocabulary_offline_says_what_generate_can_use(tmp_path):
    random_gpt2(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257).save_pretrained(tmp_path / "g")
    offline = dict(os.environ, GPT_FROM_SCRATCH_CACHE=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9")
    line = one_error_line(run_script("generate.py", f"--init_from={tmp_path / 'g'}", cwd=tmp_path, env=offline))
    assert "could not download" in line and "--gpt2_vocab" not in line
    assert f"put GPT-2's vocab.json and merges.txt beside the weights in {tmp_path / 'g'}" in line


def test_a_variant_folder_loads_like_the_plain_one(tmp_path):
    from checkpoint import from_pretrained

    model = random_gpt2(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=100)
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "fp16", variant="fp16")
    model.save_pretrained(tmp_path / "fp16-sharded", variant="fp16", max_shard_size="20KB")
    idx = torch.randint(0, 100, (1, 32))
    expected = from_pretrained(str(tmp_path / "plain"))(idx)[0]
    for name in ("fp16", "fp16-sharded"):
        assert not (tmp_path / name / "model.safetensors").exists()
        assert torch.equal(from_pretrained(str(tmp_path / name))(idx)[0], expected)


def test_a_sharded_folder_missing_a_shard_names_it(tmp_path):
    random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100).save_pretrained(
        tmp_path / "g", max_shard_size="20KB")
    shards = sorted(name for name in os.listdir(tmp_path / "g") if name.endswith(".safetensors"))
    os.remove(tmp_path / "g" / shards[1])
    line = one_error_line(run_script("generate.py", f"--init_from={tmp_path / 'g'}", cwd=tmp_path))
    assert f"lists {len(shards)} shards, but {shards[1]} is not in" in line and len(line) < 300
