"""Non-finite keys and values stay causal in the Triton kernels (issue 15, item 1), both regimes.

The same property as tests/test_nonfinite.py checks on the PyTorch paths: a later token that
holds inf or NaN leaves every earlier output, and the gradients of the earlier positions
under a loss that reads only the earlier rows, exactly as they are with that token made
finite; a padded key reaches no row at all. Tiles of 16 to 32 rows and chunks of 32 tokens
(settings), so that the poisoned key sits inside a causal diagonal tile, after whole
unmasked tiles, and (linear regime) in the middle of a chunk whose prefix state is read.
Triton's interpreter on the CPU (float32), the GPU when there is one.
"""

import pytest
import torch

from fastmax_hf.options import FastmaxOptions
from conftest import randn

kernels = pytest.importorskip("fastmax_hf.kernels")
from fastmax_hf.kernels import triton_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(quad_fwd_block_m=32, quad_fwd_block_n=16, quad_dkdv_block_m=16, quad_dkdv_block_n=32,
             quad_dq_block_m=16, quad_dq_block_n=32, linear_chunk=32, linear_block_m=16, linear_block_n=16,
             linear_state_block_k=16)
OPTIONS = FastmaxOptions(scale=0.4)
KINDS = ["nan_value", "inf_key", "both"]
# (B, Hq, Hk, Nq, Nk, D, Dv, j, pad): j = the poisoned key position (inside the diagonal tile of
# the queries at j and after, and in the middle of the chunk 32-63 or 64-95)
CASES = [
    (1, 2, 1, 90, 90, 16, 16, 45, False),
    (2, 4, 2, 77, 77, 16, 12, 70, True),  # GQA, padding, Dv != D
    (1, 2, 2, 50, 85, 16, 16, 60, False),  # Nq < Nk: query i at key position i + 35
]


def _poison(k, v, j, kind):
    k, v = k.detach().clone(), v.detach().clone()
    if kind in ("nan_value", "both"):
        v[0, 0, j, 1] = float("nan")
    if kind in ("inf_key", "both"):
        k[0, 0, j, 0] = float("inf")
    return k, v


def _run(q, k, v, mask, rows, do, regime, causal=True, fused=False):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with kernels.settings(**SMALL, quad_dq_fused=fused):
        out, _ = triton_attention(q, k, v, OPTIONS, causal=causal, key_padding_mask=mask, regime=regime)
        grads = torch.autograd.grad((out[:, :, rows] * do).sum(), (q, k, v))
    return (out.detach(), *grads)


def _same_dq(a, b, fused):
    """dq equal; where the key-block kernel adds it with atomics (fused) the order of the fp32
    additions varies on a GPU, so there it is equal to rounding, and finite."""
    if fused:
        return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return torch.equal(a, b)


# the quadratic regime's backward in both forms: the separate dq kernel, and dq added by the
# key-block kernel (``quad_dq_fused``)
REGIMES = [("quadratic", False), ("quadratic", True), ("linear", False)]
REGIME_IDS = ["quadratic", "quadratic-fused-dq", "linear"]


@pytest.mark.parametrize("regime,fused", REGIMES, ids=REGIME_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}/{}-N{}x{}-D{}-Dv{}-j{}-pad{}".format(*c))
def test_a_later_nonfinite_token_leaves_earlier_rows_exact(gen, regime, fused, kind, case):
    *shape, j, pad = case
    B, Hq, Hk, Nq, Nk, D, Dv = shape
    q, k, v = (randn(gen, *s).float().to(DEVICE) for s in ((B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv)))
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen) > 0.2
        mask[-1, : Nk // 3] = False
        mask[0, j] = True  # the poisoned key is a real token
        mask = mask.to(DEVICE)
    rows = slice(0, j - (Nk - Nq))  # the queries that cannot see key j
    do = randn(gen, B, Hq, rows.stop, Dv).float().to(DEVICE)
    k_bad, v_bad = _poison(k, v, j, kind)
    out, dq, dk, dv = _run(q, k_bad, v_bad, mask, rows, do, regime, fused=fused)
    clean, cq, ck, cv = _run(q, k, v, mask, rows, do, regime, fused=fused)
    assert torch.isfinite(out[:, :, rows]).all()
    assert torch.equal(out[:, :, rows], clean[:, :, rows])
    assert _same_dq(dq[:, :, rows], cq[:, :, rows], fused)
    assert torch.equal(dk[:, :, :j], ck[:, :, :j]) and torch.equal(dv[:, :, :j], cv[:, :, :j])
    # the token does reach the queries that see it: nothing was dropped
    assert not torch.isfinite(out[0, 0, rows.stop:]).all()


@pytest.mark.parametrize("regime,fused", REGIMES, ids=REGIME_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_padded_nonfinite_key_reaches_no_row(gen, regime, fused, causal):
    B, Hq, Hk, N, D, Dv, j = 2, 2, 1, 70, 16, 16, 40
    q, k, v = (randn(gen, *s).float().to(DEVICE) for s in ((B, Hq, N, D), (B, Hk, N, D), (B, Hk, N, Dv)))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, j] = False
    mask = mask.to(DEVICE)
    do = randn(gen, B, Hq, N, Dv).float().to(DEVICE)
    k_bad, v_bad = _poison(k, v, j, "both")
    out, dq, dk, dv = _run(q, k_bad, v_bad, mask, slice(0, N), do, regime, causal, fused)
    clean, cq, ck, cv = _run(q, k, v, mask, slice(0, N), do, regime, causal, fused)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.equal(out, clean) and _same_dq(dq, cq, fused) and torch.equal(dk, ck) and torch.equal(dv, cv)
    assert torch.all(dk[0, :, j] == 0) and torch.all(dv[0, :, j] == 0)
