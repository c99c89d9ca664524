"""
lora.py: low-rank adapters (LoRA): add them to a trained model, train only them, merge them into its weights.

    python train.py --init_from=gpt2 --lora_rank=8 ...     # fine-tune GPT-2 (or a train.py checkpoint) cheaply
    python lora.py --init_from=out/best.pt --out=merged.pt # that run's base + adapters as one plain checkpoint

Fine-tuning every weight of a big model needs the gradients and two AdamW moments of every weight, and writes a
checkpoint as big as the model. LoRA freezes the base model and gives each chosen linear layer (weight W, bias b)
a correction of low rank r:

    y = x W^T + b + (alpha / r) x A^T B^T        A: (r, in), B: (out, r), r much smaller than in and out

Only A and B train: r * (in + out) numbers per layer where W has in * out. B starts at zero, so the adapted model
starts as exactly the base model, and A starts random, so that B's gradient is not zero from the first step.
alpha / r scales the correction so that a different rank needs no other learning rate. Once trained, B A folds
into W (merge_adapters): the merged model is a plain GPT again, as fast as the base.

train.py adds the adapters (--lora_rank, --lora_alpha, --lora_layers) and saves only them, with a reference to
the base; checkpoint.py rebuilds base + adapters from such a checkpoint. The model is gpt.py's.
"""

import math
import os
import sys

import torch
import torch.nn as nn
from torch.nn import functional as F

import configurator
from configurator import UserError

# -----------------------------------------------------------------------------
# `python lora.py`: merge a LoRA run's checkpoint into a plain one
init_from = "out/best.pt"  # a checkpoint that train.py --lora_rank=R wrote (its base must be where it was)
out = "merged.pt"  # where to write the merged checkpoint: weights, shape and tokenizer, like train.py's
# -----------------------------------------------------------------------------

LAYERS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}  # per block, --lora_layers
LAYERS["all"] = LAYERS["attn"] + LAYERS["mlp"]
EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight")  # an untied lm_head is a table of its own


class LoRALinear(nn.Module):
    """A frozen nn.Linear (its weight and bias kept here under the same names) plus a trainable low-rank
    correction: x W^T + b + scale * x A^T B^T, scale = alpha / rank."""

    def __init__(self, linear, rank, alpha, generator=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the base's own tensors, frozen by add_adapters
        self.rank, self.scale = rank, alpha / rank
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default init: x A^T starts about as large as x
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory).uniform_(-bound, bound,
                                                                                           generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # zero: the base, exactly

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out): the base layer
        h = F.linear(x, self.lora_A)  # (..., in) -> (..., r)
        # y + scale * h B^T in one fused multiply-add (addmm), not three passes over a tensor of y's size
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_B.t(), alpha=self.scale).view_as(y)

    def merged(self):
        """A plain nn.Linear computing the same function: W + scale * B A, the same bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight + self.scale * (self.lora_B @ self.lora_A))  # (out, in)
        linear.bias = self.bias
        return linear


def add_adapters(model, rank, alpha, layers="all", generator=None, embeddings=False):
    """Freeze every parameter of `model` (a GPT) and put a LoRALinear of this rank around the linear layers
    `layers` names in every block ('attn', 'mlp' or 'all'); lm_head, tied to the token embedding, stays as it is.
    `generator` draws the A matrices (None: torch's global generator). embeddings: the token embedding (and an
    untied lm_head) train too, as a vocabulary grown by a chat template's tokens needs. Returns the model."""
    assert rank >= 1 and layers in LAYERS, (rank, layers)
    for name, p in model.named_parameters():
        p.requires_grad_(embeddings and name in EMBEDDINGS)
    for block in model.transformer.h:
        for path in LAYERS[layers]:
            parent, name = path.split(".")  # 'attn.c_attn' -> block.attn, 'c_attn'
            module = getattr(block, parent)
            setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, generator))
    return model


def adapter_state(model):
    """What a LoRA run trains, {name: tensor}, named as in model.state_dict() ('transformer.h.0.attn.c_attn.lora_A'):
    the adapters, and the embeddings when they train too."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or (name in EMBEDDINGS and p.requires_grad)}


def load_adapters(model, state):
    """Copy adapter tensors (as adapter_state gives them) into a model that add_adapters prepared; the names and
    shapes must match exactly. Raises ValueError naming the first mismatch."""
    own = adapter_state(model)
    if own.keys() != state.keys():
        names = sorted(own.keys() ^ state.keys())
        raise ValueError(f"the adapters do not match: {names[0]} is in one but not the other")
    for name, p in own.items():
        if state[name].shape != p.shape:
            raise ValueError(f"{name} is {list(state[name].shape)} where the model has {list(p.shape)}")
        with torch.no_grad():
            p.copy_(state[name])


def merge_adapters(model):
    """Fold every adapter into its layer's weight, W + (alpha / r) B A, giving a plain GPT with every parameter
    trainable again (a model without adapters comes back as it was). Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@configurator.script
def main(args):
    from checkpoint import load_base, load_checkpoint  # (checkpoint.py imports this file, so not at the top)
    from files import write_atomically

    configurator.configure(globals(), args)
    ckpt = load_checkpoint(init_from)
    if "lora" not in ckpt:
        raise UserError(f"{init_from} holds no adapters, so there is nothing to merge; it is already a "
                        f"plain checkpoint that generate.py reads as it is")
    model, _ = load_base(init_from)  # the base, checked against its sha256, with the adapters merged into it
    state = dict(model=model.state_dict(), model_config=ckpt["model_config"], tokenizer=ckpt["tokenizer"],
                 config=ckpt.get("config", {}))  # the settings of the run that trained the adapters
    write_atomically(out, lambda f: torch.save(state, f))
    print(f"wrote {out}: {init_from}'s base with its adapters merged ({os.path.getsize(out):,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
