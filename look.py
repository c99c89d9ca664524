"""
look.py: see what a model learned. Its exact loss on a text, the loss curves of its run, where each of its heads
looks, and which tokens its embeddings place together; for train.py's checkpoints (characters or BPE) and GPT-2.

    python look.py eval                                  # out/best.pt on the val split of the data it trained on
    python look.py eval --init_from=gpt2 --input=FILE    # any checkpoint on any UTF-8 text
    python look.py eval --quantize=int8                  # the same model with int8 weights, as generate.py uses them
    python look.py curves --runs=out,out2                # train and val loss of runs, against steps and seconds
    python look.py attention --prompt="ROMEO:"           # every layer's and head's attention on a prompt
    python look.py neighbours --tokens=aeT.              # the tokens whose embeddings lie nearest these
    python look.py hellaswag --init_from=gpt2            # HellaSwag's 10,042 validation questions: acc, acc_norm

eval predicts every token of the text but the first, once each, in windows of block_size tokens that start every
`stride` positions (the last one ends with the text). The first window predicts each of its tokens from all the
tokens before it; every later window predicts only the tokens no window has yet, its last `stride`, each from at
least block_size - stride + 1 tokens of context (--stride=1: every token after the first window sees the full
block_size). It reports the mean loss in nats per token, the perplexity e^loss, and the bits per byte of the
predicted text's UTF-8, loss x tokens / (ln 2 x bytes): the number that compares models with different tokenizers
(for a character model on ASCII text, bits per character).

hellaswag downloads HellaSwag's validation set once (hellaswag_val.jsonl, rowanz/hellaswag on GitHub) and, for each
question, scores each of its four endings (with a space before it) by the loss of the ending's tokens after the
context's: acc counts the questions whose right ending has the least total loss, acc_norm the least loss per
token, as the reference evaluation does.

curves reads the log.jsonl that train.py writes to its out_dir; curves and attention draw PNGs with matplotlib, an
optional extra for pictures (pip install matplotlib). The model is gpt.py's, loaded by checkpoint.py.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import configurator
from configurator import UserError
from files import CACHE_DIR, download
import prepare
import tokenizer as tokenizers
from checkpoint import load_checkpoint, load_model, model_from_checkpoint
from fast_linear import quantize_int8
from lora import merge_adapters
from gpt import GPT2_SIZES, CausalSelfAttention

# -----------------------------------------------------------------------------
init_from = "out/best.pt"  # a checkpoint of train.py's, or GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
#                            folder with a GPT-2's config.json and model.safetensors (and vocab.json, merges.txt)
# eval
input = ""  # a UTF-8 text file to evaluate on; '': the val split (val.bin) of data_dir
data_dir = ""  # prepared data whose val.bin to evaluate; '': the data the checkpoint was trained on
stride = 0  # positions from one window to the next; smaller gives more context and costs more (0: block_size // 2)
batch_tokens = 16384  # positions per forward pass: more is faster, until memory runs out
# curves
runs = "out"  # run folders (each with the log.jsonl train.py wrote) or log files, comma-separated: one figure
# attention
prompt = "ROMEO:\nWhat say you?"  # the text whose attention weights to draw (its last block_size tokens)
# hellaswag
hellaswag = ""  # HellaSwag's validation file; '': downloaded once into files.CACHE_DIR
limit = 0  # score only the first this many questions (0: all 10,042)
# neighbours
tokens = ""  # whose neighbours to list: each character for a character model, else words ('': a few examples)
top = 5  # neighbours per token
# output and system
png = ""  # where to write the picture; '': curves.png or attention.png in the current folder
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'mps'
dtype = "float32"  # the weights' precision: 'float32', or 'bfloat16' (faster on a GPU, a little less exact)
quantize = ""  # 'int8': int8 weights, as generate.py --quantize=int8 samples with them; '': as loaded
fused_attention = True  # attention in one fused kernel; False runs your edited attend() in gpt.py (maps always do)
# -----------------------------------------------------------------------------


def load(init_from, dev):
    """The model on `dev` in eval mode, its tokenizer, and the data_dir it was trained on ('' for GPT-2's weights).
    A LoRA run's model keeps its adapters beside the weights, as it trained, unless quantized (merged first)."""
    if quantize not in ("", "int8"):
        raise UserError(f"--quantize={quantize} is unknown; use int8, or leave it empty")
    if init_from in GPT2_SIZES or os.path.isdir(init_from):
        (model, tok), trained_on = load_model(init_from), ""
    else:  # a train.py checkpoint also knows its settings
        ckpt = load_checkpoint(init_from)
        model, tok = model_from_checkpoint(ckpt, init_from), tokenizers.from_dict(ckpt["tokenizer"])
        trained_on = ckpt.get("config", {}).get("data_dir", "")
    model = model.to(dev, getattr(torch, configurator.pick_dtype(dtype, dev))).eval()
    model.use_fused_attention(fused_attention)
    if quantize:
        quantize_int8(merge_adapters(model))  # the weights generate.py --quantize=int8 samples with
    return model, tok, trained_on


# -----------------------------------------------------------------------------
# eval: every token of a text, predicted once


@torch.inference_mode()
def token_losses(model, ids, stride, batch_tokens=16384):
    """-log p(ids[t] | the tokens before it in its window) for t = 1 .. len(ids) - 1, as a (len(ids) - 1,) tensor.
    Windows of block_size + 1 tokens start every `stride` positions, the last one where it ends with the text, and
    each token is predicted by the first window that holds it as a target."""
    T = min(model.config.block_size, len(ids) - 1)  # positions per window
    last = len(ids) - 1 - T
    starts = torch.tensor([*range(0, last, stride), last])
    seen = torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1] + T]) - starts  # targets earlier windows had
    ids = torch.as_tensor(ids, dtype=torch.long)
    device = model.lm_head.weight.device
    rows, chunk = max(1, batch_tokens // T), max(1, 2**24 // model.config.vocab_size)  # chunk: 64 MB of logits
    losses = []
    for i in range(0, len(starts), rows):
        window = ids[starts[i : i + rows, None] + torch.arange(T + 1)].to(device)  # (B, T + 1): inputs, targets
        new = (torch.arange(T) >= seen[i : i + rows, None]).to(device)  # (B, T): the targets no window had yet
        h, y = model.hidden(window[:, :-1])[new], window[:, 1:][new]  # (B, T, C) -> (N, C), and (N,), in order
        for j in range(0, len(y), chunk):  # the vocabulary-wide product only where it counts, a chunk at a time
            logits = model.lm_head(h[j : j + chunk]).float()  # (chunk, V)
            losses.append(F.cross_entropy(logits, y[j : j + chunk], reduction="none"))
    return torch.cat(losses).double().cpu()


def evaluate(model, tok, ids, stride, batch_tokens=16384):
    """The mean loss in nats per predicted token, the perplexity, the bits per byte, and the counts behind them."""
    losses = token_losses(model, ids, stride, batch_tokens)
    n_bytes = len(tok.decode_bytes(list(ids[1:])))  # the UTF-8 of the predicted tokens (all but the first)
    loss = losses.mean().item()
    return dict(loss=loss, perplexity=math.exp(loss), bits_per_byte=losses.sum().item() / (math.log(2) * n_bytes),
                tokens=len(losses), bytes=n_bytes)


def text_ids(tok, data_dir):
    """The token ids to evaluate, and where they come from: --input's text, or data_dir's val.bin."""
    if input:
        try:
            with open(input, encoding="utf-8") as f:
                ids, source = tok.encode(f.read(), allowed_special=True), input
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --input={input} ({type(e).__name__}); give a UTF-8 text file")
    else:
        if not data_dir:
            raise UserError("no data_dir is known for this model; pass --data_dir or --input=FILE")
        source = os.path.join(data_dir, "val.bin")
        if not os.path.isfile(os.path.join(data_dir, "meta.json")):
            raise UserError(f"no prepared data in {data_dir}; run python prepare.py --data_dir={data_dir}, "
                            f"or pass --input=FILE")
        meta = prepare.read_meta(data_dir)  # checked, as train.py checks it
        ids = np.asarray(prepare.load_split(data_dir, "val", meta), dtype=np.int64).tolist()
        if meta["tokenizer"] != tok.to_dict():
            raise UserError(f"the data in {data_dir} was tokenized differently from the model; pass the "
                            f"--data_dir it was trained on, or --input=FILE")
    if len(ids) < 2:
        raise UserError(f"{source} holds {len(ids)} token{'s' * (len(ids) != 1)}, and evaluating needs at "
                        f"least 2 (one to predict from, one to predict); give a longer text")
    return ids, source


def run_eval():
    if stride < 0:
        raise UserError(f"--stride={stride} must be at least 1, or 0 for block_size // 2")
    if batch_tokens < 1:
        raise UserError(f"--batch_tokens={batch_tokens} must be at least 1")
    if not (input or data_dir) and (init_from in GPT2_SIZES or os.path.isdir(init_from)):
        raise UserError("GPT-2's published weights come with no val split; pass --input=FILE, or the "
                        "--data_dir that python prepare.py --tokenizer=gpt2 wrote")
    model, tok, trained_on = load(init_from, configurator.pick_device(device))
    ids, source = text_ids(tok, data_dir or trained_on)
    T = min(model.config.block_size, len(ids) - 1)
    step = stride or max(1, T // 2)
    if step > T:
        raise UserError(f"--stride={stride} is longer than the windows ({T} tokens) and would skip tokens; "
                        f"give at most {T}")
    t0 = time.perf_counter()
    r = evaluate(model, tok, ids, step, batch_tokens)
    print(f"{init_from} on {source}: {r['tokens']:,} tokens predicted ({r['bytes']:,} bytes of UTF-8)")
    print(f"loss {r['loss']:.4f} nats per token, perplexity {r['perplexity']:.3f}, {r['bits_per_byte']:.4f} bits "
          f"per byte")
    if len(ids) - 1 > T:
        least = T - step + 1
        print(f"windows of {T} tokens every {step} positions: after the first {T}, every token is predicted from "
              f"at least {least} token{'s' * (least > 1)} of context")
    print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)


# -----------------------------------------------------------------------------
# hellaswag: which of four endings the model finds likeliest

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def read_hellaswag(path):
    """[(context, [4 endings], label)] from a HellaSwag file: one JSON object a line, with ctx, endings, label."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                q = json.loads(line)
                ctx, endings, label = q["ctx"], q["endings"], q["label"]
                assert isinstance(ctx, str) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
                assert label in range(4)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UserError(f"{path} line {n} is not a HellaSwag question (ctx, 4 endings, label 0-3); "
                                f"pass HellaSwag's own validation file, or none to download it")
            questions.append((ctx, endings, label))
    return questions


@torch.inference_mode()
def ending_losses(model, rows, batch_tokens=16384):
    """For each row (ids, start): the summed loss of ids[start:], each token predicted from the ones before it,
    and how many tokens that is. A row longer than the model's block loses its first tokens."""
    T, device = model.config.block_size, model.lm_head.weight.device
    rows = [(ids[-(T + 1):], start - max(0, len(ids) - T - 1)) for ids, start in rows]
    sums, counts = [], []
    per_batch = max(1, batch_tokens // max(len(ids) for ids, _ in rows))
    for i in range(0, len(rows), per_batch):
        batch = rows[i : i + per_batch]
        x = torch.zeros(len(batch), max(len(ids) for ids, _ in batch) - 1, dtype=torch.long)  # (B, T), 0-padded
        row, pos, target = [], [], []  # every position that predicts an ending's token
        for b, (ids, start) in enumerate(batch):
            x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            first = max(1, start)  # the ending's first token that has a position before it
            row += [b] * (len(ids) - first)
            pos += range(first - 1, len(ids) - 1)
            target += ids[first:]
        row, pos, target = (torch.tensor(v) for v in (row, pos, target))
        h = model.hidden(x.to(device))[row.to(device), pos.to(device)]  # (N, C): those positions only
        losses = F.cross_entropy(model.lm_head(h).float(), target.to(device), reduction="none").double().cpu()
        sums.append(torch.zeros(len(batch), dtype=torch.float64).index_add_(0, row, losses))
        counts.append(torch.bincount(row, minlength=len(batch)))
    return torch.cat(sums), torch.cat(counts)


def score_hellaswag(model, tok, questions, batch_tokens=16384):
    """acc and acc_norm over the questions, and each question's (4,) summed and mean losses."""
    rows = []
    for ctx, endings, _ in questions:
        context = tok.encode(ctx)
        rows += [(context + tok.encode(" " + ending), len(context)) for ending in endings]
    sums, counts = ending_losses(model, rows, batch_tokens)
    sums, means = sums.view(-1, 4), (sums / counts).view(-1, 4)  # (questions, 4)
    labels = torch.tensor([label for _, _, label in questions])
    return dict(acc=(sums.argmin(1) == labels).double().mean().item(),
                acc_norm=(means.argmin(1) == labels).double().mean().item(), sums=sums, means=means)


def run_hellaswag():
    if limit < 0:
        raise UserError(f"--limit={limit} must be at least 0 (0: every question)")
    path = hellaswag or os.path.join(CACHE_DIR, "hellaswag", "hellaswag_val.jsonl")
    if not hellaswag and not os.path.exists(path):
        print(f"downloading HellaSwag's validation set from {HELLASWAG_URL}", file=sys.stderr)
        download(HELLASWAG_URL, path, "download hellaswag_val.jsonl yourself and pass --hellaswag=FILE")
    if not os.path.isfile(path):
        raise UserError(f"--hellaswag={path} not found; pass HellaSwag's hellaswag_val.jsonl, or none to download it")
    questions = read_hellaswag(path)[: limit or None]
    model, tok, _ = load(init_from, configurator.pick_device(device))
    t0 = time.perf_counter()
    r = score_hellaswag(model, tok, questions, batch_tokens)
    print(f"{init_from} on HellaSwag ({len(questions):,} validation questions): acc {r['acc']:.4f}, "
          f"acc_norm {r['acc_norm']:.4f}")
    print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)


# -----------------------------------------------------------------------------
# pictures: matplotlib, only when asked for


def new_figure(**kw):
    """A matplotlib Figure, drawn without a window (no pyplot, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("pictures need matplotlib, which is not installed: pip install matplotlib")
    return Figure(**kw)


def read_log(run):
    """The rows of a run's log.jsonl (`run` is its out_dir or the file): train.py writes one per progress line
    (step, seconds, loss, lr, tokens_per_s) and one per evaluation (step, seconds, train_loss, val_loss)."""
    path = run if os.path.isfile(run) else os.path.join(run, "log.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the log {path} ({type(e).__name__}); train.py writes log.jsonl to "
                        f"its out_dir: pass --runs=OUT_DIR")
    if not rows:
        raise UserError(f"the log {path} is empty; train for at least log_interval steps first")
    return rows


def draw_curves(logs, path):
    """Train and val loss of each run in logs ({name: rows}) against steps and against seconds, saved as a PNG at
    path; returns the figure. Train is the loss of each progress line's batch, val each evaluation's."""
    fig = new_figure(figsize=(11, 4), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for i, (name, rows) in enumerate(logs.items()):
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        for ax, x in ((by_step, "step"), (by_time, "seconds")):
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=f"C{i}", lw=1, alpha=0.5,
                    label=f"{name}: train")
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], color=f"C{i}", marker="o", ms=3,
                    label=f"{name}: val")
    by_step.set(xlabel="step", ylabel="loss (nats per token)")
    by_time.set(xlabel="seconds of training")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.savefig(path, dpi=80)
    return fig


def run_curves():
    names = [r.strip() for r in runs.split(",") if r.strip()]
    if not names:
        raise UserError("--runs is empty; give run folders, comma-separated: --runs=out,out2")
    path = png or "curves.png"
    draw_curves({name: read_log(name) for name in names}, path)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# attention: where each head looks


@torch.inference_mode()
def attention_maps(model, ids):
    """The attention weights of every layer and head on ids, (n_layer, n_head, T, T): row i says how much the
    token at i takes from each token up to itself. Read from the written-out path (CausalSelfAttention.attend)."""
    modules = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    was = [m.fused for m in modules]
    model.use_fused_attention(False)
    try:
        model(torch.tensor([ids], device=model.lm_head.weight.device))
    finally:
        for m, fused in zip(modules, was):
            m.fused = fused
    return torch.stack([m.weights[0] for m in modules]).float().cpu()  # (L, nh, T, T)


def token_label(tok, i):
    """A token as an axis label: spaces and newlines made visible."""
    return tok.decode([i]).replace("\n", "\\n").replace(" ", "\u2423")


def draw_attention(maps, labels, path):
    """A grid of heatmaps, a row per layer and a column per head, tokens on the axes; saved at path, returned."""
    L, H, T, _ = maps.shape
    fig = new_figure(figsize=(max(4.0, 1.9 * H + 0.6), 1.9 * L + 0.7), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(T), labels if layer == L - 1 else [], fontsize=6)
            ax.set_yticks(range(T), labels if head == 0 else [], fontsize=6)
            ax.tick_params(length=0, pad=1)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    fig.suptitle("attention weights: each row a token, each column a token it looks at", fontsize=9)
    fig.savefig(path, dpi=90)
    return fig


def run_attention():
    model, tok, _ = load(init_from, configurator.pick_device(device))
    ids = tok.encode(prompt, allowed_special=True)[-model.config.block_size :]
    if not ids:
        raise UserError("the prompt is empty; give some text with --prompt")
    path = png or "attention.png"
    draw_attention(attention_maps(model, ids), [token_label(tok, i) for i in ids], path)
    print(f"wrote {path}: {model.config.n_layer} layers x {model.config.n_head} heads, {len(ids)} tokens")


# -----------------------------------------------------------------------------
# neighbours: which tokens the embedding table places together


@torch.no_grad()
def neighbours(model, ids, k):
    """For each id, the k other tokens whose embeddings (rows of wte) point the most the same way, by cosine
    similarity: a list per id of (token id, similarity) pairs, nearest first."""
    E = F.normalize(model.transformer.wte.weight.float(), dim=1)  # (V, C), every row of length 1
    sims = E[ids] @ E.T  # (n, C) @ (C, V) -> (n, V): the cosine of every pair
    sims[range(len(ids)), ids] = -math.inf  # a token is not its own neighbour
    values, indices = sims.topk(min(k, E.size(0) - 1), dim=1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]


def named_tokens(tok, text):
    """The ids that --tokens names: each character for a character model; otherwise each space-separated word, as
    it reads after a space (' king') where that is one token, or else as written."""
    if isinstance(tok, tokenizers.CharTokenizer):
        return tok.encode(text)
    ids = []
    for word in text.split():
        one = [t for t in (tok.encode(" " + word), tok.encode(word)) if len(t) == 1]
        if not one:
            raise UserError(f"{word!r} is {len(tok.encode(word))} tokens for this tokenizer, not one; "
                            f"name single tokens, such as --tokens='king day'")
        ids.append(one[0][0])
    return ids


def example_tokens(tok):
    """What neighbours shows unless told: a few characters, or words, that are tokens of this vocabulary."""
    if isinstance(tok, tokenizers.CharTokenizer):
        return "".join(c for c in "aotd." if c in tok.ids) or tok.chars[:5]
    words = "the king love day three".split()
    return " ".join(w for w in words if 1 in (len(tok.encode(" " + w)), len(tok.encode(w))))


def run_neighbours():
    if top < 1:
        raise UserError(f"--top={top} must be at least 1")
    model, tok, _ = load(init_from, configurator.pick_device(device))
    ids = named_tokens(tok, tokens or example_tokens(tok))
    if not ids:
        raise UserError("--tokens names no token; give some, such as --tokens=aeT")
    for i, near in zip(ids, neighbours(model, ids, top)):
        shown = "  ".join(f"{tok.decode([j])!r} {sim:.2f}" for j, sim in near)
        print(f"{tok.decode([i])!r:>10}:  {shown}")


# -----------------------------------------------------------------------------

COMMANDS = {"eval": run_eval, "curves": run_curves, "attention": run_attention, "neighbours": run_neighbours,
            "hellaswag": run_hellaswag}


@configurator.script
def main(args):
    command = args[0] if args and not args[0].startswith("-") else ""
    configurator.configure(globals(), args[1:] if command else args)  # --help lists the settings
    if command not in COMMANDS:
        raise UserError(f"{'unknown command ' + repr(command) if command else 'no command'}; use python "
                        f"look.py {' | '.join(COMMANDS)} [--key=value ...] (--help lists the settings)")
    COMMANDS[command]()


if __name__ == "__main__":
    main(sys.argv[1:])
