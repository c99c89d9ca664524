"""
muon.py: Muon, an optimizer for weight matrices: momentum, orthogonalised.

SGD with momentum moves a weight matrix along its (averaged) gradient, in which a few directions usually dominate.
Muon replaces that step by the nearest orthogonal matrix, U V^T for the step's singular value decomposition
U S V^T: every direction the gradient points in moves by the same amount, so the rare ones learn as fast as the
common ones. An SVD per step would be slow, so five iterations of a Newton-Schulz polynomial push the singular
values close to 1 instead, with matrix products only.

    python train.py --muon=True            # Muon for the blocks' matrices, AdamW for embeddings, gains, biases

Used by train.py, which makes one Muon for the 2-D weights inside the transformer blocks and one AdamW for the rest.
"""

import torch

# the quintic's coefficients: its iteration drives singular values in (0, 1] towards 1 quickly, settling them
# between about 0.7 and 1.2 rather than at 1 exactly, which trains as well as an exact orthogonalisation
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(g, steps=5):
    """A matrix with g's singular vectors and singular values near 1: about U V^T, for g = U S V^T. g may be a
    stack of matrices (..., rows, cols), each orthogonalised on its own."""
    a, b, c = NEWTON_SCHULZ
    x = g.float() / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value now at most 1
    tall = x.size(-2) > x.size(-1)
    if tall:  # work with the smaller Gram matrix x x^T
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x  # on each singular value s: a s + b s^3 + c s^5
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, for 2-D parameters. The step is scaled by sqrt(rows / cols) when a
    matrix has more rows than columns, so that its rows move as far as a square matrix's would. Weight decay is
    decoupled, as in AdamW."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, steps=steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            assert all(p.dim() == 2 for p in params), "Muon is for matrices; give vectors and embeddings to AdamW"
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p.grad)
                state["momentum"].mul_(group["momentum"]).add_(p.grad)
                updates.append(p.grad.add(state["momentum"], alpha=group["momentum"]))  # Nesterov: a step ahead
            for shape in {p.shape for p in params}:  # the matrices of one shape (a layer's c_fc, say) together
                same = [i for i, p in enumerate(params) if p.shape == shape]
                orthogonal = orthogonalise(torch.stack([updates[i] for i in same]), group["steps"])
                for i, update in zip(same, orthogonal):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
