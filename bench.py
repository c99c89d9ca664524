"""
bench.py: measure training and sampling speed the way a user meets it, and the speed figures train.py prints.

    python bench.py                                           # train.py's defaults, once
    python bench.py --target_loss=1.88 --repeat=3 -- --max_iters=1000     # time-to-loss, median of 3 runs
    python bench.py --variants=";--rope=True;--muon=True" --seeds=1,2,3 --target_loss=1.88 -- --max_iters=2000
    python bench.py --what=sample --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --max_new_tokens=500
    python bench.py --what=sample --quantize=int8 --repeat=5    # cached sampling, fp32 weights against int8
    python bench.py --what=batch --batches=1,8,32 --n_layer=6 --n_head=4 --n_embd=64 --block_size=64   # prompts together
    python bench.py --what=tokenize --gpt2_vocab=gpt2.tiktoken    # BPE training and encoding speed
    python bench.py --what=tokenize --gpt2_vocab=gpt2.tiktoken --corpus=docs.jsonl --workers=1,2 --kill_after=20 \
        -- --shard_tokens=5000000     # prepare.py on a corpus with 1 and 2 workers, and killed once
    python bench.py --what=chat --max_new_tokens=200         # chat.py's web API under 1, 4 and 16 clients at once

Training (--what=train) launches the real `python train.py <everything after -->` and timestamps its output
lines as they arrive, so process start-up, data loading, compilation and evaluation all count. It prints, per run
and as the median over runs: wall time, the time at which the val loss first reached --target_loss, the best val
loss, tokens/s, ms/iter, MFU and peak memory, plus the val-loss-vs-seconds curve. With --variants, it runs each
variant of the command once per seed, taking turns (so that a slower spell of a shared machine falls on all of
them), and prints a row per variant: the medians over seeds, and each seed's figures.

Sampling (--what=sample) times generate.generate() on a randomly initialised model of the given shape, with the
key/value cache and without it (recomputing the whole context every step), and prints both speeds and their ratio;
with --quantize=int8, cached sampling with the weights in --dtype and in int8 (fast_linear.Int8Linear) instead, and
the memory their weights take.

Batches (--what=batch) generates --max_new_tokens tokens for each of 1, 8, 32 (--batches) different random prompts
of random lengths (1 to 64 tokens, at most half of block_size) on a model of the given shape, all together in one
batch (generate.Batch) and one prompt at a time, taking turns, and prints the tokens/s of each and their ratio.

Tokenizing (--what=tokenize) times BPE training on input.txt, GPT-2's encoding of it, and the worst case for BPE:
one long chunk with no spaces (20,000 random letters), each the best of --repeat runs (tiktoken too, if installed).
With --corpus (any input prepare.py takes; JSON Lines for the comparisons), it encodes the corpus's documents with
GPT-2's tokenizer in this process and with tiktoken, then runs `python prepare.py --tokenizer=gpt2` on it with each
number of --workers (and the flags after --), and prints each run's wall time, MB/s and the peak memory of its
largest process; with --kill_after, one more run is killed (SIGKILL) that many seconds in and run again, and the
rerun is timed.

Chat (--what=chat) starts the real `python chat.py --web` on a free port with --init_from, then for each number
of --clients has that many clients send --requests_per_client generations of --max_new_tokens tokens each, all at
once, and prints requests/s, tokens/s, the failed requests, the median latency and time to the first token, and
the median and slowest time to connect.
"""

import concurrent.futures
import http.client
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import configurator
from configurator import UserError

# -----------------------------------------------------------------------------
what = "train"  # 'train', 'sample', 'batch', 'tokenize' or 'chat'
repeat = 1  # runs to take the median of
target_loss = 0.0  # report when the val loss first reaches this (0: don't)
# --what=train, side by side: variants of the command, each run once per seed, in turn
variants = ""  # train.py flags added to the command, one set per variant, split by ';' ('' in it: the plain command)
seeds = ""  # seeds for the variants' runs, comma-separated, like 1,2,3 ('': --repeat runs of train.py's own seed)
within_seconds = 0.0  # also report the best val loss reached within this many seconds of launch (0: don't)
# --what=sample: the model's shape (random weights: speed does not depend on what they learned) and the generation
n_layer = 6  # the classic 6-layer, 384-wide character model by default
n_head = 6
n_embd = 384  # the width sets how many weights each token reads: the main cost per token here
block_size = 256  # the longer the context, the dearer each uncached step, and the more the cache gains
vocab_size = 65  # Tiny Shakespeare's characters
max_new_tokens = 500  # enough tokens to outgrow the block and re-prefill at least once
num_samples = 1  # sequences generated together in one batch
dtype = "float32"  # the weights' precision for --what=sample: auto, float32, bfloat16 or float16
quantize = ""  # --what=sample: 'int8' compares cached sampling with dtype's weights against int8 ones
batches = "1,8,32"  # --what=batch: how many different prompts to generate together, a round for each
device = "auto"
# --what=tokenize: BPE trained on input.txt, and GPT-2's tokenizer (from this file or folder; empty: downloaded)
gpt2_vocab = ""
corpus = ""  # a corpus to time prepare.py on, with each number of workers ('': input.txt only)
workers = "1,2"  # prepare.py --workers for each timed run, comma-separated
compare = True  # with --corpus: also encode its JSON Lines documents in this process, ours and tiktoken's
kill_after = 0.0  # with --corpus: kill one more run this many seconds in, and time the run that resumes it (0: don't)
# --what=chat: a chat.py server (its settings and the model's), under load
init_from = "out/best.pt"  # the model the server loads
clients = "1,4,16"  # how many clients send requests at once, one round for each number
requests_per_client = 4  # generations each client asks for, one after another
# -----------------------------------------------------------------------------

EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_LINE = re.compile(r"^iter (\d+): .* ([\d.]+) ms/iter, ([\d,]+) tok/s, mfu ([\d.]+%|n/a)")
DONE_LINE = re.compile(r"^done: .*, ([\d,]+ MiB [^,]*)$")


def run_train(train_args):
    """One run of train.py: its val curve [(seconds since launch, step, val loss)] and its speed figures."""
    t_launch = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-u", os.path.join(os.path.dirname(__file__), "train.py"),
                                *train_args, "--sample_length=0"], stdout=subprocess.PIPE, text=True)
    curve, iters, memory = [], [], "n/a"
    for line in process.stdout:
        seconds = time.perf_counter() - t_launch
        line = line.rstrip("\n")
        print(f"  {seconds:6.1f} s | {line}", flush=True)
        if m := EVAL_LINE.match(line):
            curve.append((seconds, int(m[1]), float(m[3])))
        elif m := ITER_LINE.match(line):
            iters.append((float(m[2]), float(m[3].replace(",", "")), m[4]))
        elif m := DONE_LINE.match(line):
            memory = m[1]
    if process.wait():
        raise UserError(f"train.py failed (exit code {process.returncode}); its output is above")
    wall = time.perf_counter() - t_launch
    reached = [s for s, _, val in curve if target_loss and val <= target_loss]
    steady = iters[1:] or iters  # the first interval includes warm-up
    return {
        "wall s": wall,
        f"s to val<={target_loss}": reached[0] if reached else float("nan"),
        "best val": min(val for _, _, val in curve) if curve else float("nan"),
        "ms/iter": statistics.median(ms for ms, _, _ in steady) if steady else float("nan"),
        "tok/s": statistics.median(tps for _, tps, _ in steady) if steady else float("nan"),
        "mfu": sorted(steady)[len(steady) // 2][2] if steady else "n/a",  # the line with the median ms/iter
        "memory": memory,
        "curve": curve,
    }


def bench_train(train_args):
    runs = []
    for i in range(repeat):
        print(f"run {i + 1}/{repeat}: python train.py {' '.join(train_args)}")
        runs.append(run_train(train_args))
    keys = [k for k in runs[0] if k not in ("curve", "mfu", "memory") and (target_loss or not k.startswith("s to"))]
    print(f"\n{'':10s}" + "".join(f"{k:>16s}" for k in keys) + f"{'mfu':>8s}   memory")
    for i, r in enumerate(runs):
        print(f"run {i + 1:<6d}" + "".join(f"{r[k]:16,.3f}" for k in keys) + f"{r['mfu']:>8s}   {r['memory']}")
    if repeat > 1:
        print(f"{'median':10s}" + "".join(f"{statistics.median(r[k] for r in runs):16,.3f}" for k in keys))
    print("\nval loss vs seconds since launch, run 1:")
    print("  " + ", ".join(f"{s:.1f} s: {val:.3f}" for s, _, val in runs[0]["curve"]))


def bench_variants(train_args):
    """Each variant of the command once per seed, in turn; a row per variant of medians and per-seed figures."""
    flag_sets = [v.split() for v in variants.split(";")]
    seed_list = [int(x) for x in seeds.split(",")] if seeds else [None] * repeat
    results = {i: [] for i in range(len(flag_sets))}
    for seed in seed_list:
        for i, flags in enumerate(flag_sets):
            args = [*train_args, *flags, *([f"--seed={seed}"] if seed is not None else [])]
            print(f"variant {i + 1}/{len(flag_sets)}, seed {seed}: python train.py {' '.join(args)}")
            results[i].append(run_train(args))
    reach, best = f"s to val<={target_loss}", f"best val in {within_seconds:g} s"
    print(f"\n{'variant':44s}{reach:>16s}{'best val':>10s}" + (f"{best:>18s}" if within_seconds else "")
          + f"{'ms/iter':>9s}   per seed: {reach}, best val" + (", within" if within_seconds else ""))
    for i, flags in enumerate(flag_sets):
        runs = results[i]
        for r in runs:  # the best val loss among the evaluations logged within the time
            r[best] = min((val for s, _, val in r["curve"] if s <= within_seconds), default=float("nan"))
        median = {k: statistics.median(r[k] for r in runs) for k in (reach, "best val", best, "ms/iter")}
        each = "; ".join(f"{r[reach]:.1f}, {r['best val']:.3f}" + (f", {r[best]:.3f}" if within_seconds else "")
                         for r in runs)
        print(f"{' '.join(flags) or '(the command as given)':44s}{median[reach]:16.1f}{median['best val']:10.3f}"
              + (f"{median[best]:18.3f}" if within_seconds else "") + f"{median['ms/iter']:9.1f}   {each}")


def bench_sample():
    import copy

    import torch

    from fast_linear import quantize_int8, use_slab_products
    from generate import generate
    from gpt import GPT, GPTConfig

    dev = configurator.pick_device(device)
    precision = configurator.pick_dtype(dtype, dev)  # checked: one line for a name torch lacks, or fp16 on a CPU
    torch.manual_seed(0)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    model = GPT(config).to(dev, getattr(torch, precision)).eval()
    int8 = quantize_int8(copy.deepcopy(model)) if quantize else None
    use_slab_products(model)  # as generate.py samples
    prompt = torch.zeros((num_samples, 1), dtype=torch.long, device=dev)
    print(f"{model.num_params() / 1e6:.2f}M parameters, block_size {block_size}, {max_new_tokens} new tokens, "
          f"batch {num_samples}, {precision}, on {dev} with {torch.get_num_threads()} threads")
    # what is timed: (model, kv_cache), with the cache and without it, or two precisions of the weights
    ways = {precision: (model, True), "int8": (int8, True)} if quantize else {
        "kv_cache=True": (model, True), "kv_cache=False": (model, False)}
    speeds = {way: [] for way in ways}
    for i in range(repeat):  # alternate the two, so that a noisy neighbour slows both alike
        for way, (m, kv_cache) in ways.items():
            for _ in generate(m, prompt, 8, kv_cache=kv_cache):  # warm up
                pass
            t0 = time.perf_counter()
            for _ in generate(m, prompt, max_new_tokens, kv_cache=kv_cache):
                pass
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            speeds[way].append(max_new_tokens * num_samples / (time.perf_counter() - t0))
            print(f"  run {i + 1}, {way:14s}: {speeds[way][-1]:8,.0f} tokens/s")
    first, second = (statistics.median(s) for s in speeds.values())
    if quantize:
        print(f"median of {repeat}: {first:,.0f} tokens/s {precision}, {second:,.0f} int8: {second / first:.2f}x")
        print(f"weights: {weight_bytes(model) / 2**20:,.1f} MiB {precision}, {weight_bytes(int8) / 2**20:,.1f} MiB "
              f"int8 (with the scales, and the float embedding table that lookups read)")
    else:
        print(f"median of {repeat}: {first:,.0f} tokens/s with the cache, {second:,.0f} without: "
              f"{first / second:.2f}x")


def bench_batch():
    """Different prompts together in one batch against the same prompts one at a time, for each size in batches."""
    import random

    import torch

    from fast_linear import use_slab_products
    from generate import generate
    from gpt import GPT, GPTConfig

    dev = configurator.pick_device(device)
    precision = configurator.pick_dtype(dtype, dev)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    model = GPT(config).to(dev, getattr(torch, precision)).eval()
    use_slab_products(model)  # as generate.py samples
    print(f"{model.num_params() / 1e6:.2f}M parameters, block_size {block_size}, {max_new_tokens} new tokens per "
          f"prompt, {precision}, on {dev} with {torch.get_num_threads()} threads")
    print(f"{'prompts':>8s}{'together tok/s':>16s}{'one at a time':>15s}{'ratio':>8s}")
    rng = random.Random(0)
    for n in (int(b) for b in batches.split(",")):
        prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, min(64, block_size // 2)))]
                   for _ in range(n)]  # 1 to 64 tokens (at most half the block): a chat's prompts, not a book's
        ways = {"together": [prompts], "one at a time": [[p] for p in prompts]}
        speeds = {way: [] for way in ways}
        for _ in range(repeat):  # taking turns, so that a noisy neighbour slows both alike
            for way, runs in ways.items():
                t0 = time.perf_counter()
                for batch in runs:
                    for _ in generate(model, batch, max_new_tokens):
                        pass
                speeds[way].append(n * max_new_tokens / (time.perf_counter() - t0))
        together, alone = (statistics.median(s) for s in speeds.values())
        print(f"{n:8d}{together:16,.0f}{alone:15,.0f}{together / alone:7.1f}x", flush=True)


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, each tensor once (a tied lm_head is the embedding)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench_tokenize():
    import random

    import tokenizer

    text = open("input.txt", encoding="utf-8").read()
    blob = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", k=20_000))
    gpt2 = tokenizer.gpt2_tokenizer(gpt2_vocab)
    try:
        import tiktoken.load  # for scale only: the Rust tokenizer GPT-2's ids are checked against

        ranks = tiktoken.load.load_tiktoken_bpe(gpt2_vocab) if gpt2_vocab.endswith(".tiktoken") else None
        fast = ranks and tiktoken.Encoding("gpt2", pat_str=tokenizer.GPT2_PATTERN, mergeable_ranks=ranks,
                                           special_tokens={tokenizer.ENDOFTEXT: 50256})
    except ImportError:
        fast = None

    def best(work):  # seconds, the best of `repeat` runs, each on a fresh tokenizer cache
        times = []
        for _ in range(repeat):
            gpt2.cache.clear()
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        return min(times)

    mb = len(text.encode("utf-8")) / 1e6
    print(f"input.txt: {mb:.2f} MB; {len(blob):,} random letters in one chunk")
    print(f"  BPE training, vocab 4096:      {best(lambda: tokenizer.BPETokenizer.train(text, 4096)):8.2f} s")
    print(f"  GPT-2 encoding input.txt:      {mb / best(lambda: gpt2.encode(text)):8.2f} MB/s")
    print(f"  GPT-2 encoding the long chunk: {best(lambda: gpt2.encode(blob)):8.3f} s")
    if fast:
        print(f"  tiktoken, input.txt:           {mb / best(lambda: fast.encode(text)):8.2f} MB/s")
        print(f"  tiktoken, the long chunk:      {best(lambda: fast.encode(blob)):8.3f} s")


def documents(path):
    """The text of each line of a JSON Lines file, one at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def bench_corpus(prepare_args):
    """tiktoken and our GPT-2 tokenizer in this process, then prepare.py with each number of workers (and
    prepare_args, the flags after --); each the best of --repeat rounds, taken in turn, so that a busy spell of a
    shared machine falls on all of them. Then one run killed and resumed."""
    import tokenizer

    best = {}  # name -> (seconds, the line to print)
    if compare:
        import tiktoken.load

        texts = list(documents(corpus))
        mb = sum(len(text.encode("utf-8")) for text in texts) / 1e6
        fast = tiktoken.Encoding("gpt2", pat_str=tokenizer.GPT2_PATTERN, mergeable_ranks=tiktoken.load.
                                 load_tiktoken_bpe(gpt2_vocab), special_tokens={tokenizer.ENDOFTEXT: 50256})
        ours = tokenizer.gpt2_tokenizer(gpt2_vocab)
        HALVES.update(tok=ours, texts=texts)
        encoders = {"tiktoken, one process": lambda: [fast.encode_ordinary(text) for text in texts],
                    "ours, one process": lambda: [ours.encode(text) for text in texts],
                    "ours, two processes": encode_halves}
    measured = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); " \
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    command = [sys.executable, "-c", measured, sys.executable, os.path.join(os.path.dirname(__file__), "prepare.py"),
               f"--input={corpus}", "--tokenizer=gpt2", f"--gpt2_vocab={gpt2_vocab}", *prepare_args]

    def keep(name, seconds, line):
        if name not in best or seconds < best[name][0]:
            best[name] = (seconds, line)

    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeat):
            for name, encode in encoders.items() if compare else ():
                ours.cache.clear()  # every round starts cold, as a fresh process does
                t0 = time.perf_counter()
                encode()
                seconds = time.perf_counter() - t0
                keep(name, seconds, f"{mb / seconds:6.2f} MB/s")
            for n in workers.split(","):
                wall, line = run_prepare([*command, f"--data_dir={out}/run", f"--workers={n}"], f"{out}/run")
                keep(f"prepare.py --workers={n}", wall, line)
        print(f"{corpus}: {'%.1f MB of documents, ' % mb if compare else ''}the best of {repeat} round(s)")
        first = best[f"prepare.py --workers={workers.split(',')[0]}"][0]  # the run the others are compared with
        for name, (seconds, line) in best.items():
            if name == "ours, two processes":  # what two workers could gain here, with nothing to read or write
                line += f", {best['ours, one process'][0] / seconds:.2f}x ours in one"
            elif name.startswith("ours"):
                line += f", {best['tiktoken, one process'][0] / seconds:.2f}x tiktoken"
            elif name.startswith("prepare"):
                line += f", {first / seconds:.2f}x the first"
            print(f"  {name + ':':24} {line}")
        if kill_after:
            run = [*command, f"--data_dir={out}/killed", f"--workers={workers.split(',')[-1]}"]
            process = subprocess.Popen(run[3:], stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(kill_after)
            os.killpg(process.pid, 9)  # the run and its workers, at once
            process.wait()
            left = os.listdir(f"{out}/killed") if os.path.isdir(f"{out}/killed") else []
            print(f"  killed after {kill_after:g} s, with {len([f for f in left if f.endswith('0.bin')])} shards in "
                  f"place; the run that resumed it: {run_prepare(run, f'{out}/killed')[1]}")


HALVES = {}  # the tokenizer and the texts that encode_halves' two processes copy


def encode_halves():
    """Two copies of this process (fork) encode every other text each, with a cold cache: the speed two workers
    would have if nothing were read, sent or written, which is what this machine's two cores allow."""
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(encode_half, [0, 1])


def encode_half(k):
    HALVES["tok"].cache.clear()
    for text in HALVES["texts"][k::2]:
        HALVES["tok"].encode(text)


def run_prepare(run, data_dir):
    """Run prepare.py through `run` (which prints the peak RSS of its largest process); (wall seconds, the line
    to print). The data it wrote is removed."""
    t0 = time.perf_counter()
    result = subprocess.run(run, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak, code = result.stdout.split()
    reading = re.search(r"read ([\d,.]+) MB in ([\d.]+) s", result.stderr)
    if code != "0" or not reading:
        raise UserError(f"prepare.py failed: {result.stderr.strip().splitlines()[-1:]}")
    shutil.rmtree(data_dir)
    size, seconds = float(reading[1].replace(",", "")), float(reading[2])
    return wall, (f"{wall:7.1f} s wall, {size / wall:6.2f} MB/s ({size / seconds:6.2f} MB/s past start-up), "
                  f"largest process {int(peak) / 1024:,.0f} MiB peak RSS")


# -----------------------------------------------------------------------------
# chat.py's web API under load


def bench_chat():
    """Start `python chat.py --web` on a free port, and load it with each number of clients in turn."""
    counts = [int(n) for n in clients.split(",")]
    log = tempfile.TemporaryFile("w+")  # the server's stderr: a line per request, and its error if it fails
    server = subprocess.Popen([sys.executable, "-u", os.path.join(os.path.dirname(__file__), "chat.py"), "--web",
                               "--port=0", f"--init_from={init_from}", f"--device={device}", f"--dtype={dtype}",
                               f"--length={max_new_tokens}", f"--max_length={max_new_tokens}",
                               f"--max_streams={max(counts)}"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines = []
        while not (m := re.search(r"serving http://[^/]+:(\d+)/", lines[-1] if lines else "")):
            lines.append(server.stdout.readline())
            if not lines[-1]:
                server.wait()
                log.seek(0)
                error = log.read().strip() or f"error: chat.py stopped (exit code {server.returncode})"
                raise UserError(error.splitlines()[-1].removeprefix("error: "))  # chat.py's own one-line error
        print(f"{lines[0].strip()}\n{max_new_tokens} tokens per request, {requests_per_client} per client; "
              f"after one request to warm up:")
        chat_request(int(m[1]), seed=0)
        print(f"{'clients':>8s}{'requests':>10s}{'failed':>8s}{'requests/s':>12s}{'tokens/s':>10s}"
              f"{'latency s':>11s}{'first token s':>15s}{'connect s':>12s}{'slowest s':>13s}")
        for n in counts:
            load_chat(int(m[1]), n)
    finally:
        server.terminate()
        server.wait()


def load_chat(port, n):
    """n clients at once, each sending requests_per_client requests one after another; one line of figures."""
    def client(i):
        return [chat_request(port, seed=i * requests_per_client + r) for r in range(requests_per_client)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = [r for rs in pool.map(client, range(n)) for r in rs]
    wall = time.perf_counter() - t0
    done = [r for r in results if r]
    median = [statistics.median(r[i] for r in done) if done else 0 for i in range(3)]
    print(f"{n:8d}{len(results):10d}{len(results) - len(done):8d}{len(done) / wall:12.2f}"
          f"{len(done) * max_new_tokens / wall:10,.0f}{median[2]:11.3f}{median[1]:15.3f}{median[0]:12.4f}"
          f"{max((r[0] for r in done), default=0):13.4f}", flush=True)


def chat_request(port, seed):
    """One streamed generation: (seconds to connect, to its first token, in all), or None if it failed or fell
    short. Connecting counts: a connection the server's listen queue has no room for waits a second to retry."""
    t0, first, tokens, done = time.perf_counter(), None, 0, False
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.connect()
        connected = time.perf_counter() - t0
        body = json.dumps({"prompt": "\n", "length": max_new_tokens, "seed": seed})
        connection.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        for line in response if response.status == 200 else []:
            event = json.loads(line[6:]) if line.startswith(b"data: ") else {}
            if "token" in event:
                tokens += 1
                first = first or time.perf_counter() - t0
            done = done or event.get("done", False)
        connection.close()
    except OSError:
        return None
    return (connected, first, time.perf_counter() - t0) if done and tokens == max_new_tokens else None


def check_settings():
    configurator.check_at_least(globals(), dict(repeat=1, target_loss=0.0, within_seconds=0.0))
    if seeds and not all(x.strip().isdigit() for x in seeds.split(",")):
        raise UserError(f"--seeds={seeds} must be seeds separated by commas, like 1,2,3")
    if what in ("sample", "batch"):
        if quantize not in ("", "int8"):
            raise UserError(f"--quantize={quantize} is unknown; use int8, or leave it empty")
        configurator.check_at_least(globals(), dict(n_layer=1, n_head=1, n_embd=1, block_size=2, vocab_size=1,
                                                    max_new_tokens=1, num_samples=1))
        if n_embd % n_head:
            raise UserError(f"--n_embd={n_embd} must be a multiple of --n_head={n_head}")
        if what == "batch" and not all(b.strip().isdigit() and int(b) > 0 for b in batches.split(",")):
            raise UserError(f"--batches={batches} must be numbers of prompts above 0, like 1,8,32")
    if what == "chat":
        configurator.check_at_least(globals(), dict(max_new_tokens=1, requests_per_client=1))
        if not all(n.strip().isdigit() and int(n) > 0 for n in clients.split(",")):
            raise UserError(f"--clients={clients} must be numbers of clients above 0, like 1,4,16")


@configurator.script
def main(args):
    own, passed = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    configurator.configure(globals(), own)
    check_settings()
    if what == "train" and (variants or seeds):
        bench_variants(passed)
    elif what == "train":
        bench_train(passed)
    elif what == "sample":
        bench_sample()
    elif what == "batch":
        bench_batch()
    elif what == "tokenize" and corpus:
        bench_corpus(passed)
    elif what == "tokenize":
        bench_tokenize()
    elif what == "chat":
        bench_chat()
    else:
        raise UserError(f"--what={what} is unknown; use train, sample, batch, tokenize or chat")


if __name__ == "__main__":
    main(sys.argv[1:])
