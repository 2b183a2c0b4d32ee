"""normalize's scaling (``stages._ScaleByPeak``, a written-out backward) against autograd through
the composed ``norm_scale`` and against finite differences."""

import pytest
import torch

from fastmax_hf import stages
from conftest import randn


def composed(x, lim, causal, valid):
    """x * lim / (running) max ||x_n|| as autograd differentiates it, op by op."""
    return x * stages.norm_scale(x, lim, causal, valid)[0]


def cases(gen, dtype):
    x = randn(gen, 2, 3, 23, 5).to(dtype)
    x[0, 1, 4] = 0  # a zero vector: no gradient through its norm
    x[1, 2, :3] = 0  # the peak is 0 for the first rows: factor 0
    valid = torch.rand(2, 23, generator=gen) > 0.3
    valid[1, -1] = False
    return x, valid


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_autograd_through_the_composition(gen, causal, masked):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x, valid = cases(gen, dtype)
        valid = valid if masked else None
        g = randn(gen, *x.shape).to(dtype)
        outs = []
        for fn in (composed, lambda x, lim, c, v: stages._ScaleByPeak.apply(x, lim, c, v)):
            xs = x.clone().requires_grad_()
            y = fn(xs, 0.8, causal, valid)
            (dx,) = torch.autograd.grad(y, xs, g)
            outs.append((y, dx))
        for a, b in zip(*outs):
            assert a.dtype == b.dtype == dtype
            assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (dtype, (a.double() - b.double()).abs().max())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(gen, causal, masked):
    x = randn(gen, 1, 2, 9, 4).requires_grad_()
    valid = (torch.rand(1, 9, generator=gen) > 0.3) if masked else None
    assert torch.autograd.gradcheck(lambda x: stages._ScaleByPeak.apply(x, 0.9, causal, valid), (x,))


def test_a_nonfinite_padded_key_reaches_no_gradient(gen):
    """normalize_qk removes padded keys by selection first: an inf there changes no gradient."""
    q = randn(gen, 2, 3, 11, 5)
    k, valid = cases(gen, torch.float64)
    bad = (~valid[0]).nonzero()[0, 0]
    k_bad = k.clone()
    k_bad[0, :, bad] = float("inf")
    gq, gk = randn(gen, *q.shape), randn(gen, *k.shape)
    results = []
    for keys in (k, k_bad):
        qs, ks = q.clone().requires_grad_(), keys.clone().requires_grad_()
        a, b = stages.normalize_qk(qs, ks, 1.0, True, valid)
        results.append((a, b, *torch.autograd.grad((a, b), (qs, ks), (gq, gk))))
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        assert torch.equal(clean, poisoned)


def test_empty_sequence():
    x = torch.zeros(1, 2, 0, 4, requires_grad=True)
    q, k = stages.normalize_qk(x, x, 1.0, True, None)
    assert q.shape == x.shape and k.shape == x.shape
