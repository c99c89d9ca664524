"""
bigram.py: the simplest language model there is, in one self-contained file.

    python bigram.py      # reads input.txt (Tiny Shakespeare), trains for a few seconds, samples

Each token looks up a row of a (vocab_size, vocab_size) table and reads off scores for the next token: nothing
about earlier tokens, no attention, no layers. It still learns which characters tend to follow which, and brings
the validation loss from about 4.7 down to about 2.5. gpt.py starts from exactly this model and adds a
way for tokens to talk to each other: one line near the end swaps it in. Edit the numbers below and re-run.
"""

import os
import sys

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
batch_size = 32  # independent sequences per step
block_size = 8  # the longest context; a bigram model only ever uses the last character of it
max_iters = 3000  # training steps
eval_interval = 500  # estimate the losses every this many steps
eval_iters = 200  # batches per loss estimate: more is smoother and slower
learning_rate = 1e-2  # a table this small can take a large step size
seed = 1337  # the same seed gives the same batches, losses and sample; change it to see another run
# -----------------------------------------------------------------------------

if sys.argv[1:]:
    sys.exit(f"error: bigram.py takes no settings ({sys.argv[1]}); edit the numbers at the top of the file and re-run")
torch.manual_seed(seed)

# the data: every character of the text becomes an integer
if not os.path.exists("input.txt"):
    sys.exit("error: input.txt not found; run `python prepare.py` to download Tiny Shakespeare, or put a text file there")
try:
    with open("input.txt", encoding="utf-8") as f:
        text = f.read()
except UnicodeDecodeError as e:
    sys.exit(f"error: input.txt is not UTF-8 text (byte {e.start} is invalid); convert it to UTF-8 first")
except OSError as e:
    sys.exit(f"error: cannot read input.txt ({e.strerror}); put a UTF-8 text file there")
chars = sorted(set(text))
vocab_size = len(chars)
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
encode = lambda s: [stoi[c] for c in s]  # string -> list of integers
decode = lambda ids: "".join(itos[i] for i in ids)  # list of integers -> string

data = torch.tensor(encode(text), dtype=torch.long)
n = int(0.9 * len(data))  # the first 90% trains, the rest measures how well we generalise
train_data, val_data = data[:n], data[n:]
if min(len(train_data), len(val_data)) <= block_size:
    sys.exit(f"error: input.txt is too short for block_size={block_size}; use a longer text")


def get_batch(split):
    """A batch of inputs x and targets y, both (B, T): y is x shifted one position to the left."""
    data = train_data if split == "train" else val_data
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss():
    """The mean loss over eval_iters random batches of each split (a single batch is too noisy)."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            _, loss = model(*get_batch(split))
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


class BigramLanguageModel(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        # row i holds the scores (logits) for the token that follows token i
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T) -> (B, T, vocab_size)
        if targets is None:
            return logits, None
        B, T, C = logits.shape
        loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))  # how surprised we are by the truth
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Extend idx (B, T) by max_new_tokens, sampling each token from the model's distribution."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            logits = logits[:, -1, :]  # only the last position matters: (B, C)
            probs = F.softmax(logits, dim=-1)  # scores -> probabilities
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx


model = BigramLanguageModel(vocab_size)
# gpt.py's transformer trains in this same loop, its tokens attending to the ones before: uncomment the next line
# from gpt import GPT, GPTConfig; model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size))
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

for it in range(max_iters + 1):
    if it % eval_interval == 0:
        losses = estimate_loss()
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if it == max_iters:
        break
    xb, yb = get_batch("train")
    _, loss = model(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

# a sample, starting from token 0: the first character in sorted order (a newline, in Shakespeare)
context = torch.zeros((1, 1), dtype=torch.long)
print(decode(model.generate(context, max_new_tokens=500)[0].tolist()))
