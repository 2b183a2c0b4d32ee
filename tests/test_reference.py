"""The direct form against Fastmax's definition written as plain loops."""

import math

import pytest
import torch

from fastmax_hf import fastmax_reference, rpe_matrix_creator
from conftest import randn, rel_err


def loop_definition(q, k, v, causal, mask, scale, p, a0, a1, a2, normalize, lim, rpe):
    """One query, one key at a time, straight from the definition (README.md's formula,
    spelled out with masks, normalize and rpe in fastmax_hf/reference.py's docstring)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.zeros(B, Hq, Nq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            qs, ks = q[b, h].clone(), k[b, hk].clone()
            if normalize:
                for i in range(Nq):
                    # queries share the keys' padding when they are the same tokens
                    seen = [n for n in (range(i + 1) if causal else range(Nq))
                            if mask is None or Nq != Nk or mask[b, n]]
                    qs[i] = q[b, h, i] * lim / max(q[b, h, n].norm() for n in seen) if seen else 0.0
                for j in range(Nk):
                    seen = [n for n in (range(j + 1) if causal else range(Nk)) if mask is None or mask[b, n]]
                    if seen:
                        ks[j] = k[b, hk, j] * lim / max(k[b, hk, n].norm() for n in seen)
            for i in range(Nq):
                t = i + Nk - Nq
                num = torch.zeros(Dv, dtype=torch.float64)
                den = 0.0
                for j in range(Nk):
                    if causal and j > t:
                        continue
                    if mask is not None and not mask[b, j]:
                        continue
                    kj = ks[j]
                    if rpe is not None:
                        kj = kj + rpe[(rpe.shape[0] - 1) // 2 - (t - j)]
                    s = float(qs[i] @ kj) * scale
                    f = a0 + a1 * s + (a2 * s * s if p == 2 else 0.0)
                    num += f * v[b, hk, j]
                    den += f
                if den != 0.0:
                    out[b, h, i] = num / den
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("Nq", [5, 7])
def test_reference_matches_loops(gen, causal, p, Nq):
    B, Hq, Hk, Nk, D, Dv = 2, 4, 2, 7, 3, 2
    q, k, v = randn(gen, B, Hq, Nq, D), randn(gen, B, Hk, Nk, D), randn(gen, B, Hk, Nk, Dv)
    mask = torch.rand(B, Nk, generator=gen) > 0.3
    mask[1] = False  # a fully padded batch row: every query of it returns 0
    rpe = rpe_matrix_creator(Nk, D, "cpu", torch.float64, is_zero=False)
    for normalize, use_rpe in [(False, False), (True, False), (False, True)]:
        kw = dict(causal=causal, scale=0.7, p=p, a0=1.5, a1=0.8, a2=0.3)
        expected = loop_definition(q, k, v, causal, mask, 0.7, p, 1.5, 0.8, 0.3, normalize, 0.9,
                                   rpe if use_rpe else None)
        got = fastmax_reference(q, k, v, key_padding_mask=mask, normalize=normalize, lim=0.9,
                                rpe_matrix=rpe if use_rpe else None, **kw)
        assert rel_err(got, expected) < 1e-12, (normalize, use_rpe)
        assert torch.all(got[1] == 0)


def test_reference_default_scale_is_inverse_sqrt_dim(gen):
    q, k, v = randn(gen, 1, 1, 4, 9), randn(gen, 1, 1, 4, 9), randn(gen, 1, 1, 4, 9)
    assert rel_err(fastmax_reference(q, k, v), fastmax_reference(q, k, v, scale=1 / 3)) == 0


def test_rpe_matrix_creator_layout():
    n, d = 5, 6
    table = rpe_matrix_creator(n, d, "cpu", torch.float64, structured=True)
    assert table.shape == (2 * n - 1, d)
    # offset 0 sits at row n-1: sin(0) = 0, cos(0) = 1
    assert torch.allclose(table[n - 1, 0::2], torch.zeros(d // 2, dtype=torch.float64))
    assert torch.allclose(table[n - 1, 1::2], torch.ones(d // 2, dtype=torch.float64))
    # row (n-1) - t holds offset t
    assert math.isclose(table[n - 1 - 2, 0].item(), math.sin(2.0))
    assert torch.all(rpe_matrix_creator(n, d, "cpu", torch.float32) == 0)
    assert rpe_matrix_creator(n, d, "cpu", torch.float32, is_zero=False).std() > 0.1
