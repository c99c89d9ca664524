"""
generate.py: sample text from a checkpoint that train.py wrote.

    python generate.py                                             # 500 tokens (characters) from out/best.pt
    python generate.py --prompt="ROMEO:" --num_samples=3 --max_new_tokens=200
    python generate.py --prompt=FILE:prompt.txt --temperature=0   # greedy: always the most likely token
    python generate.py --top_k=40 --top_p=0.9 --seed=7
    python generate.py --prompts=prompts.txt --max_new_tokens=100  # a prompt per line, all in one batch
    python generate.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # OpenAI's GPT-2 (downloaded once)
    python generate.py --quantize=int8                              # int8 weights: less memory, faster on a CPU

The checkpoint holds everything needed (weights, model shape, tokenizer); a LoRA run's holds the adapters and
names its base, and the adapters are merged into the base's weights as it loads. Text streams to stdout as it is
made; the speed goes to stderr. Each new token is one forward pass over one position, thanks to the key/value
cache in gpt.py; `--kv_cache=False` recomputes the whole context every step instead (same tokens, much slower).
Several prompts, or samples, are generated together in one batch, each row its own length (see Batch); row i
draws from --seed + i, so each row's text is what its prompt alone gives with that seed. A model tuned on
conversations (sft.py) takes each prompt as a user's turn, in the chat template stored in its checkpoint, and
prints the prompt, then its answer up to <|end|>.
"""

import codecs
import json
import sys
import time

import torch
from torch.nn import functional as F

import configurator
from configurator import UserError
from checkpoint import load_model
from fast_linear import quantize_int8, use_slab_products
from lora import merge_adapters
from tokenizer import ChatTokenizer

# -----------------------------------------------------------------------------
init_from = "out/best.pt"  # a checkpoint of train.py's, or GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
#                            folder with a GPT-2's config.json and model.safetensors (and vocab.json, merges.txt)
prompt = "\n"  # text to continue, or FILE:path to read it from a file
prompts = ""  # a file of prompts, one per line (or JSON Lines: {"prompt": "..."}), all continued together
num_samples = 1  # independent samples of each prompt, generated together as one batch
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 always takes the most likely token
top_k = 0  # sample only among the k most likely tokens (0: all)
top_p = 1.0  # sample only among the most likely tokens whose probabilities add up to p (1.0: all)
seed = 1337  # the same seed, checkpoint and settings give the same text
kv_cache = True  # reuse the keys and values of earlier positions
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'mps'
dtype = "auto"  # the weights' precision: 'auto' (bf16 or fp16 on a GPU, fp32 elsewhere), 'float32', 'bfloat16'
quantize = ""  # 'int8': every linear layer's weight in int8, a quarter of fp32's bytes (Int8Linear); '': as loaded
fused_attention = True  # attention in one fused kernel; False samples with your edited attend() in gpt.py
# -----------------------------------------------------------------------------


# The sampling settings' allowed values, written once: generate.py's flags, chat.py's commands and its web API all
# check them with check_sampling(). Within them every distribution the sampler draws from is finite.
SAMPLING_RANGES = {  # setting: (the test of a value, the allowed values in words); NaN fails every test
    "temperature": (lambda v: 0 <= v <= 100, "from 0 (greedy) to 100"),
    "top_k": (lambda v: 0 <= v <= 1_000_000, "from 0 (no limit) to 1000000"),
    "top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1 (1: no limit)"),
}
GREEDY_BELOW = 1e-5  # a smaller temperature samples as 0 does: see sample_next


def check_sampling(name, value, ranges=SAMPLING_RANGES):
    """`value` if the setting `name` allows it, else UserError saying which values it allows."""
    test, allowed = ranges[name]
    if not test(value):
        shown = str(value) if len(str(value)) <= 24 else str(value)[:20] + "..."  # not all of a 4000-digit number
        raise UserError(f"{name}={shown} is out of range: give {allowed}")
    return value


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (B, V) -> the distribution (B, V) to sample the next token from, after temperature, top-k, top-p."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the largest is 0: no overflow to inf
    if 0 < top_k < logits.size(-1):  # keep exactly the k largest logits
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probabilities reach top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # the mass ranked above each token
        drop = above >= top_p  # (B, V), compared in float32, where a top_p below 1.4e-45 is 0
        drop[..., 0] = False  # the most likely token always stays, however small top_p is
        sorted_probs[drop] = 0.0
        sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The next token (B, 1) for each row of logits (B, V): the most likely one if temperature is 0, else drawn.

    A temperature below GREEDY_BELOW counts as 0. At 1e-5 a token other than the most likely one keeps a chance
    above 1e-9 only if its logit is within 2e-4 of the top one: closer than float32 rounding in the forward pass
    tells apart, so it is greedy in effect. (Far smaller ones, below float32's smallest number, 1.4e-45, are 0 in
    float32, and dividing the logits by them would make the distribution NaN.)
    """
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    try:
        return torch.multinomial(probs, 1, generator=generator)
    except RuntimeError:
        if torch.isfinite(probs).all():
            raise
        raise UserError("the model's outputs are not finite numbers (NaN or inf), so there is nothing to "
                        "sample from; its weights are damaged, or they overflowed in this --dtype (try float32)")


@torch.inference_mode()  # no autograd bookkeeping at all: less overhead per token than no_grad
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True):
    """Yield the next token of every sequence, (B,), max_new_tokens times, continuing `prompts`: a (B, T) tensor
    of ids, or B lists of ids of any lengths, generated together as one batch (see Batch). `generator` draws the
    samples: one generator for every row, or a list of one per row, with which each row draws exactly the tokens
    its prompt would draw alone."""
    batch = Batch(model, kv_cache, len(prompts))
    for ids in prompts:
        batch.add(ids)
    generators = generator if isinstance(generator, list) else [generator] * len(batch.contexts)
    for _ in range(max_new_tokens):
        logits = batch.logits()  # (B, V)
        if isinstance(generator, list):  # each row from its own generator
            next_ids = torch.cat([sample_next(logits[b : b + 1], temperature, top_k, top_p, generators[b])
                                  for b in range(len(generators))])
        else:
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield next_ids[:, 0]
        batch.append(next_ids[:, 0].tolist())


class Batch:
    """Sequences generated together: one forward pass gives every row the logits of its next token. Each row has
    a context of its own, of its own length; rows may join (add) and leave (remove) between steps, as chat.py's
    clients do.

    The model sees at most block_size positions. When a row's context outgrows them, it keeps its last 3/4 and
    reads them again from position 0 (the positions the model was trained on); its cache then fills again for
    block_size/4 more tokens. (A rolling window would leave every cached key encoded for a position it no longer
    has.) With kv_cache=False every step recomputes each context in full, so both see exactly the same tokens."""

    def __init__(self, model, kv_cache=True, rows=1):
        self.model, self.kv_cache = model, kv_cache
        self.device = model.lm_head.weight.device
        if self.device.type == "cuda":  # cuDNN's attention builds a plan for each new key length: one per token
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.contexts = []  # each row's tokens, as the model sees them
        self.cache = model.new_cache(rows) if kv_cache else None  # rows 0..len(contexts) - 1 in use, the rest spare

    def add(self, ids):
        """A new row that continues `ids`; it is read into the cache at the next logits()."""
        block_size = self.model.config.block_size
        ids = [int(i) for i in ids]
        self.contexts.append(ids if len(ids) <= block_size else ids[-(block_size - block_size // 4) :])
        if self.kv_cache and len(self.contexts) > len(self.cache.lens):  # out of rows: twice as many
            bigger, n = self.model.new_cache(2 * len(self.contexts)), len(self.cache.lens)
            bigger.k[:, :n], bigger.v[:, :n], bigger.lens[:n] = self.cache.k, self.cache.v, self.cache.lens
            self.cache = bigger
        if self.kv_cache:
            self.cache.lens[len(self.contexts) - 1] = 0  # nothing of it is cached yet

    def remove(self, row):
        """Drop a row; the last row moves into its place (in the cache too)."""
        last = len(self.contexts) - 1
        self.contexts[row] = self.contexts[last]
        self.contexts.pop()
        if self.kv_cache and row != last:
            for t in (self.cache.k, self.cache.v):
                t[:, row] = t[:, last]
            self.cache.lens[row] = self.cache.lens[last]

    def logits(self):
        """The logits (B, V) of every row's next token."""
        if not self.kv_cache:  # every context in full, every step
            return self.model.lm_head(self.last_hidden(self.contexts))
        cache, n = self.cache.rows(0, len(self.contexts)), len(self.contexts)
        cached = cache.lens.tolist()
        stale = [b for b in range(n) if cached[b] != len(self.contexts[b]) - 1]  # new rows, or rows just cut back
        if len(stale) == n:  # all of them (a new batch): every context but its newest token, in one pass
            self.read([c[:-1] for c in self.contexts], cache)
        for b in stale if len(stale) < n else ():  # one at a time, while the others wait for the step below
            self.read([self.contexts[b][:-1]], cache.rows(b, b + 1))
        newest = torch.tensor([[c[-1]] for c in self.contexts], device=self.device)  # (B, 1)
        return self.model.lm_head(self.model.hidden(newest, cache)[:, -1])  # each row at its own position

    def read(self, contexts, cache):
        """Read contexts into the rows of cache from position 0, right-padded to the longest: no real token sees a
        pad, and each row's length then leaves its pads out, for later tokens to overwrite."""
        lengths = torch.tensor([len(c) for c in contexts], device=self.device)
        cache.lens.zero_()
        if lengths.max() > 0:
            self.model.hidden(self.padded(contexts), cache)
        cache.lens.copy_(lengths)

    def last_hidden(self, contexts):
        """Without a cache: each context in full, right-padded; the hidden state (B, C) of each one's last token."""
        hidden = self.model.hidden(self.padded(contexts))  # (B, T, C)
        last = torch.tensor([len(c) - 1 for c in contexts], device=self.device)
        return hidden[torch.arange(len(contexts), device=self.device), last]

    pad = 0  # the id that fills the rows shorter than the longest: any id, since no real token sees it

    def padded(self, contexts):
        longest = max(len(c) for c in contexts)
        return torch.tensor([c + [self.pad] * (longest - len(c)) for c in contexts], device=self.device)  # (B, T)

    def append(self, tokens):
        """Each row's new token; a row that outgrows block_size keeps its last 3/4, to be read again."""
        block_size = self.model.config.block_size
        for context, token in zip(self.contexts, tokens):
            context.append(token)
            if len(context) > block_size:
                del context[: len(context) - (block_size - block_size // 4)]


def text_decoder(tok):
    """A function from one token id to the text it completes, for streaming: a character whose UTF-8 bytes span
    several tokens comes out whole with its last token ('' before), and bytes that are not UTF-8 become U+FFFD.
    Called with no token, at the end, it gives what a character cut off by the last token leaves (U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(token=None):
        return decoder.decode(b"" if token is None else tok.decode_bytes([token]), final=token is None)

    return decode


def sample_text(model, tok, prompt_text, max_new_tokens, num_samples=1, temperature=0.8, top_k=0, top_p=1.0,
                seed=1337, kv_cache=True, out=None):
    """Continue a prompt string, or each of a list of them, num_samples times, all in one batch; write the texts to
    `out` (stdout if None), streaming the text when there is one. Row i (prompt i // num_samples) draws from a
    generator seeded seed + i."""
    model.eval()
    out = out or sys.stdout
    device = model.lm_head.weight.device
    texts = [p for p in ([prompt_text] if isinstance(prompt_text, str) else prompt_text) for _ in range(num_samples)]
    rows = [tok.encode(text, allowed_special=True) for text in texts]  # a prompt may start with <|endoftext|>
    chat = isinstance(tok, ChatTokenizer)  # a tuned model (sft.py): each prompt is a user's turn, answered once
    if chat:
        rows = [tok.render([dict(role="user", content=text)], reply=True)[0] for text in texts]
        texts = [text + "\n" for text in texts]
    if not all(rows):
        raise UserError("a prompt is empty after encoding; give some text with --prompt or --prompts")
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(rows))]
    decoders = [text_decoder(tok) for _ in rows]
    stream, ended = len(rows) == 1, [False] * len(rows)
    if stream:
        out.write(texts[0])
    t0 = time.perf_counter()
    for step, next_ids in enumerate(generate(model, rows, max_new_tokens, temperature, top_k, top_p, generators,
                                             kv_cache)):
        if step == 0:
            first = time.perf_counter() - t0  # the prompts' pass, plus one-time warm-up (GPU; slabs_pay on a CPU)
        for i, token in enumerate(next_ids.tolist()):
            if chat and (token == tok.end or ended[i]):  # the answer is over: the rest of this row is not shown
                ended[i] = True
                continue
            piece = decoders[i](token)  # "" while a character's bytes are still incomplete
            texts[i] += piece
            if stream:
                out.write(piece)
                out.flush()
        if all(ended):
            break
    ends = [decode() for decode in decoders]  # a character the last token cut off: U+FFFD
    texts = [text + end for text, end in zip(texts, ends)]
    elapsed = time.perf_counter() - t0
    out.write(ends[0] if stream else ("\n" + "-" * 80 + "\n").join(texts))
    out.write("\n")
    out.flush()
    n = (step + 1) * len(rows)
    print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:,.0f} tokens/s; the first after {first:.2f} s]",
          file=sys.stderr)
    return texts


def read_prompts(path):
    """The prompts in a file: one per line, or, for a .jsonl file, a JSON object {"prompt": "..."} per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({type(e).__name__}); give a UTF-8 text file")
    if not path.endswith(".jsonl"):
        found = [line for line in lines if line]
    else:
        found = []
        for number, line in enumerate(lines, 1):
            try:
                found.append(json.loads(line)["prompt"] if line.strip() else "")
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} line {number} is not a JSON object with a \"prompt\"; write one like "
                                f"{{\"prompt\": \"ROMEO:\"}} per line") from None
            if not isinstance(found[-1], str):
                raise UserError(f"{path} line {number}: the prompt must be a string")
        found = [p for p in found if p]
    if not found:
        raise UserError(f"{path} holds no prompt; write one per line")
    return found


def load_for_sampling(init_from, device, dtype, quantize="", fused_attention=True):
    """The model and tokenizer from init_from (see checkpoint.py), on `device` in `dtype`, ready to sample from:
    a LoRA run's adapters merged into the weights, and those quantized to int8 if `quantize` says so; attention
    fused, or written out (gpt.py's attend()) if fused_attention is False."""
    if quantize not in ("", "int8"):
        raise UserError(f"--quantize={quantize} is unknown; use int8, or leave it empty for the weights as "
                        f"they are")
    model, tok = load_model(init_from)
    model = merge_adapters(model).to(device, getattr(torch, dtype)).eval()  # the same outputs as unmerged, faster
    model.use_fused_attention(fused_attention)
    if quantize:
        quantize_int8(model)
    else:
        use_slab_products(model)
    return model, tok


@configurator.script
def main(args):
    overridden = configurator.configure(globals(), args)
    configurator.check_at_least(globals(), dict(max_new_tokens=1, num_samples=1))
    if prompts and "prompt" in overridden:
        raise UserError("give --prompt or --prompts, not both")
    configurator.check_seed(seed)
    for name in SAMPLING_RANGES:
        try:
            check_sampling(name, globals()[name])
        except UserError as e:
            raise UserError(f"--{e}") from None
    text = read_prompts(prompts) if prompts else prompt
    if isinstance(text, str) and text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {text[5:]} ({type(e).__name__}); "
                            f"give a UTF-8 text file")
    dev = configurator.pick_device(device)
    model, tok = load_for_sampling(init_from, dev, configurator.pick_dtype(dtype, dev), quantize,  # fp32 off the GPU
                                   fused_attention)
    try:
        sample_text(model, tok, text, max_new_tokens, num_samples, temperature, top_k, top_p, seed, kv_cache)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
