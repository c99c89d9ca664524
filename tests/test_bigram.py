"""bigram.py is a script that trains as soon as it runs, for a minute or more: here its first part (settings, data,
get_batch and the model, everything above the training) runs alone, on a small text; and its whole loop trains
gpt.py's transformer once its one commented line is swapped in."""

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from conftest import ROOT


def bigram_before_training(folder, monkeypatch):
    """The globals of bigram.py run up to the line that creates the model, in `folder` (which holds input.txt)."""
    with open(os.path.join(ROOT, "bigram.py"), encoding="utf-8") as f:
        source = f.read()
    head, found, _ = source.partition("\nmodel = BigramLanguageModel(")
    assert found, "bigram.py no longer creates its model with `model = BigramLanguageModel(...)`"
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.argv", ["bigram.py"])  # as `python bigram.py` runs it: no flags
    script = {"__name__": "bigram"}
    exec(compile(head, "bigram.py", "exec"), script)
    return script


def test_bigram_targets_are_the_inputs_shifted_by_one(corpus, monkeypatch):
    script = bigram_before_training(corpus, monkeypatch)
    B, T = script["batch_size"], script["block_size"]
    for split, data in (("train", script["train_data"]), ("val", script["val_data"])):
        before = torch.get_rng_state()
        x, y = script["get_batch"](split)
        torch.set_rng_state(before)
        starts = torch.randint(len(data) - T, (B,))  # the window starts get_batch drew
        positions = starts[:, None] + torch.arange(T)  # (B, T)
        assert torch.equal(x, data[positions]) and torch.equal(y, data[positions + 1]), split


def test_bigram_loss_is_the_cross_entropy_of_the_next_token_under_its_table(corpus, monkeypatch):
    script = bigram_before_training(corpus, monkeypatch)
    torch.manual_seed(0)
    model = script["BigramLanguageModel"](script["vocab_size"])
    x, y = script["get_batch"]("train")
    logits, loss = model(x, y)
    table = model.token_embedding_table.weight  # row i: the scores of the token after token i
    assert torch.equal(logits, table[x])
    log_probs = F.log_softmax(table[x], dim=-1)  # (B, T, V)
    torch.testing.assert_close(loss, -log_probs.gather(-1, y[..., None]).mean())


def test_bigram_s_own_loop_trains_gpt_s_transformer_after_its_one_line_swap(corpus):
    """The commented line in bigram.py puts gpt.GPT in place of the bigram table; the file's loop, evaluation and
    sampling then train and sample it unchanged (here for fewer steps, on the small text)."""
    with open(os.path.join(ROOT, "bigram.py"), encoding="utf-8") as f:
        source = f.read()
    swap = "# from gpt import GPT, GPTConfig; model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size))"
    assert source.count(swap) == 1 and source.index("\nmodel = BigramLanguageModel(") < source.index(swap)
    smaller = swap[2:].replace("block_size=block_size)", "block_size=block_size, n_layer=2, n_embd=64)")  # quicker
    source = source.replace(swap, smaller).replace("max_iters = 3000", "max_iters = 200")
    source = source.replace("eval_interval = 500", "eval_interval = 200").replace("eval_iters = 200", "eval_iters = 20")
    (corpus / "bigram_gpt.py").write_text(source, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "bigram_gpt.py"], cwd=corpus, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first, last = (float(line.split("val loss ")[1]) for line in (lines[0], lines[1]))
    assert lines[0].startswith("step 0:") and lines[1].startswith("step 200:")
    assert first > 3.0 and last < 0.75 * first  # from about ln(vocab_size) to well below it: it learns
    sample = "\n".join(lines[2:])
    assert len(sample) >= 500 and set(sample) <= set((corpus / "input.txt").read_text(encoding="utf-8"))
