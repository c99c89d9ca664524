"""Muon: its step is the gradient's momentum made (nearly) orthogonal, and it moves every direction alike."""

import pytest
import torch

from muon import Muon, orthogonalise


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 192), (384, 1536)])
def test_the_update_is_near_orthogonal_with_the_gradients_singular_vectors(shape):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    g = g * torch.logspace(0, 1, shape[1], dtype=torch.float64)  # singular values spread over a factor of ten
    o = orthogonalise(g)
    s = torch.linalg.svdvals(o)
    # near 1, where g's spread widely; only the few directions with almost no gradient (a square random matrix
    # has singular values down to about 0) stay below, since five iterations cannot lift them all the way
    assert s.max() < 1.25 and (s > 0.6).float().mean() > 0.9
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    exact = u @ vt  # the orthogonal matrix nearest to g
    cosine = (o * exact).sum() / (o.norm() * exact.norm())
    assert cosine > 0.97  # the polynomial leaves each singular value within about 0.3 of 1


def test_a_step_is_momentum_orthogonalised_and_scaled_for_tall_matrices():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(128, 32))
    before = w.detach().clone()
    optimizer = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    grads = [torch.randn(128, 32) for _ in range(2)]
    momentum = torch.zeros(128, 32)
    for g in grads:
        w.grad = g.clone()
        optimizer.step()
        momentum = 0.9 * momentum + g  # written out: Nesterov momentum, weight decay, the orthogonal step
        expected = before * (1 - 0.1 * 0.5) - 0.1 * orthogonalise(g + 0.9 * momentum) * (128 / 32) ** 0.5
        torch.testing.assert_close(w.detach(), expected)
        before = expected
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum"], momentum)
