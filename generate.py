"""
generate.py: sample text from a checkpoint that train.py wrote.

    python generate.py                                             # 500 tokens (characters) from out/best.pt
    python generate.py --prompt="ROMEO:" --num_samples=3 --max_new_tokens=200
    python generate.py --prompt=FILE:prompt.txt --temperature=0   # greedy: always the most likely token
    python generate.py --top_k=40 --top_p=0.9 --seed=7
    python generate.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # OpenAI's GPT-2 (downloaded once)
    python generate.py --quantize=int8                              # int8 weights: less memory, faster on a CPU

The checkpoint holds everything needed (weights, model shape, tokenizer); a LoRA run's holds the adapters and
names its base, and the adapters are merged into the base's weights as it loads. Text streams to stdout as it is
made; the speed goes to stderr. Each new token is one forward pass over one position, thanks to the key/value
cache in gpt.py; `--kv_cache=False` recomputes the whole context every step instead (same tokens, much slower).
"""

import codecs
import sys
import time

import torch
from torch.nn import functional as F

import configurator
from configurator import UserError
from checkpoint import load_model
from fast_linear import quantize_int8, use_slab_products
from lora import merge_adapters

# -----------------------------------------------------------------------------
init_from = "out/best.pt"  # a checkpoint of train.py's, or GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a
#                            folder with a GPT-2's config.json and model.safetensors (and vocab.json, merges.txt)
prompt = "\n"  # text to continue, or FILE:path to read it from a file
num_samples = 1  # independent samples, generated together as one batch
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 always takes the most likely token
top_k = 0  # sample only among the k most likely tokens (0: all)
top_p = 1.0  # sample only among the most likely tokens whose probabilities add up to p (1.0: all)
seed = 1337  # the same seed, checkpoint and settings give the same text
kv_cache = True  # reuse the keys and values of earlier positions
device = "auto"  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'mps'
dtype = "auto"  # the weights' precision: 'auto' (bf16 or fp16 on a GPU, fp32 elsewhere), 'float32', 'bfloat16'
quantize = ""  # 'int8': every linear layer's weight in int8, a quarter of fp32's bytes (Int8Linear); '': as loaded
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
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True):
    """Yield the next token of every sequence, (B,), max_new_tokens times, continuing the prompts idx (B, T).

    The model sees at most block_size positions. When the context outgrows them, we keep its last 3/4 and
    start again from position 0 (the positions it was trained on), re-reading those tokens in one batched pass;
    the cache then fills again for block_size/4 more tokens. (A rolling window would leave every cached key
    encoded for a position it no longer has.) With kv_cache=False every step recomputes that same context in
    full, so both paths see exactly the same tokens.
    """
    if idx.is_cuda:  # cuDNN's attention builds a plan for each new key length, and here every token brings one
        torch.backends.cuda.enable_cudnn_sdp(False)
    block_size = model.config.block_size
    keep = block_size - block_size // 4
    context = idx if idx.size(1) <= block_size else idx[:, -keep:]  # (B, T) what the model sees
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            hidden = model.hidden(context)  # (B, T, C): the whole context, every step
        elif cache is None:
            cache = model.new_cache(context.size(0))
            hidden = model.hidden(context, cache)  # read the context once, filling the cache
        else:
            hidden = model.hidden(context[:, -1:], cache)  # only the newest token: (B, 1, C)
        logits = model.lm_head(hidden[:, -1, :])  # (B, V): only the last position predicts the next token
        next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield next_id[:, 0]
        context = torch.cat([context, next_id], dim=1)
        if context.size(1) > block_size:  # outgrown: keep the most recent tokens, start over at position 0
            context, cache = context[:, -keep:], None


def text_decoder(tok):
    """A function from one token id to the text it completes, for streaming: a character whose UTF-8 bytes span
    several tokens comes out whole with its last token ('' before), and bytes that are not UTF-8 become U+FFFD.
    Called with no token, at the end, it gives what a character cut off by the last token leaves (U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(token=None):
        return decoder.decode(b"" if token is None else tok.decode_bytes([token]), final=token is None)

    return decode


def sample_text(model, tok, prompt_text, max_new_tokens, num_samples=1, temperature=0.8, top_k=0, top_p=1.0,
                seed=1337, kv_cache=True, out=sys.stdout):
    """Generate from a prompt string and write the text to `out`, streaming it when there is one sample."""
    model.eval()
    device = model.lm_head.weight.device
    ids = tok.encode(prompt_text, allowed_special=True)  # a prompt may start with <|endoftext|>, as GPT-2's do
    if not ids:
        raise UserError("the prompt is empty after encoding; give some text with --prompt")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (B, T)
    generator = torch.Generator(device).manual_seed(seed)
    decoders = [text_decoder(tok) for _ in range(num_samples)]
    texts = [prompt_text for _ in range(num_samples)]
    if num_samples == 1:
        out.write(prompt_text)
    t0 = time.perf_counter()
    for step, next_ids in enumerate(generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                             kv_cache)):
        if step == 0:
            first = time.perf_counter() - t0  # the prompt's pass, plus one-time warm-up (GPU; slabs_pay on a CPU)
        for i, token in enumerate(next_ids.tolist()):
            piece = decoders[i](token)  # "" while a character's bytes are still incomplete
            texts[i] += piece
            if num_samples == 1:
                out.write(piece)
                out.flush()
    ends = [decode() for decode in decoders]  # a character the last token cut off: U+FFFD
    texts = [text + end for text, end in zip(texts, ends)]
    if num_samples == 1:
        out.write(ends[0])
    elapsed = time.perf_counter() - t0
    if num_samples > 1:
        out.write(("\n" + "-" * 80 + "\n").join(texts))
    out.write("\n")
    out.flush()
    n = max_new_tokens * num_samples
    print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:,.0f} tokens/s; the first after {first:.2f} s]",
          file=sys.stderr)
    return texts


def load_for_sampling(init_from, device, dtype, quantize=""):
    """The model and tokenizer from init_from (see checkpoint.py), on `device` in `dtype`, ready to sample from:
    a LoRA run's adapters merged into the weights, and those quantized to int8 if `quantize` says so."""
    if quantize not in ("", "int8"):
        raise UserError(f"--quantize={quantize} is unknown; use int8, or leave it empty for the weights as "
                         f"they are")
    model, tok = load_model(init_from)
    model = merge_adapters(model).to(device, getattr(torch, dtype)).eval()  # the same outputs as unmerged, faster
    if quantize:
        quantize_int8(model)
    else:
        use_slab_products(model)
    return model, tok


@configurator.script
def main(args):
    configurator.configure(globals(), args)
    configurator.check_at_least(globals(), dict(max_new_tokens=1, num_samples=1))
    configurator.check_seed(seed)
    for name in SAMPLING_RANGES:
        try:
            check_sampling(name, globals()[name])
        except UserError as e:
            raise UserError(f"--{e}") from None
    text = prompt
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {text[5:]} ({type(e).__name__}); "
                             f"give a UTF-8 text file")
    dev = configurator.pick_device(device)
    model, tok = load_for_sampling(init_from, dev, configurator.pick_dtype(dtype, dev), quantize)  # fp32 off the GPU
    try:
        sample_text(model, tok, text, max_new_tokens, num_samples, temperature, top_k, top_p, seed, kv_cache)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
