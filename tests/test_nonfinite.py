"""Non-finite inputs stay where they belong (issue 15, item 1).

Under a causal mask a later token must never change an earlier output, whatever it holds: an
inf key or a NaN value at position j (fp16 overflow makes them real) leaves every query that
cannot see j exactly as it was, in the forward pass and in the gradients of earlier positions,
on every PyTorch path (the reference, the chunked form in both tilings, the recurrent step). A
padded key is invisible to everyone, so nothing it holds reaches any row. A NaN or inf in q
stays in its own row.

"Exactly as it was": equal to the same call with the token's entries made finite (the same
backend, bit for bit) and to the float64 reference of that finite input.
"""

import pytest
import torch

from fastmax_hf import fastmax, fastmax_reference
from fastmax_hf.chunked import chunked_attention, chunked_state
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.recurrent import fastmax_step
from conftest import rel_err

BACKENDS = ["reference", "chunked"]

# (B, Hq, Hk, Nq, Nk, D, Dv, j, pad): j = the key position holding the non-finite entries.
# N = 1024 with j = 900 is the case (chunked: the linear tiling, j inside the chunk
# 896-1023); odd N, Nq < Nk and Nq > Nk, grouped-query heads, padding; Nk <= F takes the
# quadratic tiling under backend="auto".
CASES = [
    (1, 2, 2, 1024, 1024, 8, 8, 900, False),
    (2, 4, 2, 301, 301, 4, 5, 200, True),  # odd N, GQA, padding, linear tiling (F = 15)
    (2, 4, 2, 37, 37, 8, 6, 20, True),  # quadratic tiling (F = 45)
    (1, 2, 1, 150, 333, 4, 4, 250, False),  # Nq < Nk: query i sits at key position i + 183
    (2, 2, 2, 333, 150, 4, 3, 101, True),  # Nq > Nk: the first 183 queries see no key
]
KINDS = ["nan_value", "inf_key", "both", "-inf_key_nan_key"]


def _case_inputs(seed, B, Hq, Hk, Nq, Nk, D, Dv, pad):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=torch.float64)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=g) > 0.2
        mask[-1, : Nk // 3] = False  # left padding of the last row
    return q, k, v, mask


def _poison(k, v, b, h, j, kind):
    """Copies of k, v with non-finite entries at key position j of batch b, head h."""
    k, v = k.clone(), v.clone()
    if kind in ("nan_value", "both"):
        v[b, h, j, 1] = float("nan")
    if kind in ("inf_key", "both"):
        k[b, h, j, 0] = float("inf")
    if kind == "-inf_key_nan_key":
        k[b, h, j, 0] = float("-inf")
        k[b, h, j, -1] = float("nan")
    return k, v


def _earlier_rows(Nq, Nk, j):
    """The query rows that cannot see key j: t_i = i + Nk - Nq < j."""
    return slice(0, max(0, min(Nq, j - (Nk - Nq))))


def _forward_and_grads(q, k, v, rows, do, **kw):
    """The output, and the gradients of sum(do * out[rows]) (a loss that reads earlier rows only)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fastmax(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad((out[:, :, rows] * do).sum(), (q, k, v))
    return out.detach(), dq, dk, dv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}/{}-N{}x{}-D{}-Dv{}-j{}-pad{}".format(*c))
def test_nonfinite_key_or_value_does_not_leak_backwards(backend, kind, case):
    *shape, j, pad = case
    B, Hq, Hk, Nq, Nk, D, Dv = shape
    q, k, v, mask = _case_inputs(1000 + j, *shape, pad)
    if mask is not None:
        mask[0, j] = True  # the poisoned key is a real token (padded keys: the test below)
    k_bad, v_bad = _poison(k, v, 0, 0, j, kind)
    rows = _earlier_rows(Nq, Nk, j)
    assert rows.stop > 0
    do = torch.randn(B, Hq, rows.stop, Dv, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
    kw = dict(causal=True, key_padding_mask=mask, backend=backend, scale=0.4)

    out, dq, dk, dv = _forward_and_grads(q, k_bad, v_bad, rows, do, **kw)
    clean, cq, ck, cv = _forward_and_grads(q, k, v, rows, do, **kw)
    # the earlier rows and the gradients of the earlier positions, bit for bit
    assert torch.isfinite(out[:, :, rows]).all()
    assert torch.equal(out[:, :, rows], clean[:, :, rows])
    assert torch.equal(dq[:, :, rows], cq[:, :, rows])
    assert torch.equal(dk[:, :, :j], ck[:, :, :j])
    assert torch.equal(dv[:, :, :j], cv[:, :, :j])
    # and the float64 reference of the finite input
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, scale=0.4)
    assert rel_err(out[:, :, rows], expected[:, :, rows]) < 1e-12
    # the poisoned token does reach the rows that see it (nothing was silently dropped)
    seen = rows.stop  # the first row whose position is j
    assert not torch.isfinite(out[0, 0, seen:]).all()


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_tilings_do_not_leak_backwards(mode, kind):
    """Both tilings of the chunked form, with the poisoned key in the middle of a chunk."""
    B, Hq, Hk, N, D, Dv, j = 2, 4, 2, 45, 3, 4, 19
    q, k, v, mask = _case_inputs(7, B, Hq, Hk, N, N, D, Dv, pad=True)
    mask[0, j] = True
    k_bad, v_bad = _poison(k, v, 0, 1, j, kind)
    options = FastmaxOptions(scale=0.6, p=2, a0=1.0, a1=0.8, a2=0.4)
    do = torch.randn(B, Hq, j, Dv, dtype=torch.float64)
    results = []
    for kk, vv in ((k_bad, v_bad), (k, v)):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, kk, vv))
        out, _ = chunked_attention(qq, kk, vv, options, causal=True, key_padding_mask=mask, mode=mode, chunk_size=8)
        grads = torch.autograd.grad((out[:, :, :j] * do).sum(), (qq, kk, vv))
        results.append((out.detach(), grads))
    (out, (dq, dk, dv)), (clean, (cq, ck, cv)) = results
    assert torch.equal(out[:, :, :j], clean[:, :, :j])
    assert torch.equal(dq[:, :, :j], cq[:, :, :j])
    assert torch.equal(dk[:, :, :j], ck[:, :, :j]) and torch.equal(dv[:, :, :j], cv[:, :, :j])
    assert not torch.isfinite(out[0, 2:4, j:]).all()  # heads 2, 3 read key/value head 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_a_padded_key_reaches_no_row(backend, causal, normalize):
    """A padded key holding inf and NaN changes nothing at all, output or gradient (its own
    gradient is 0), with and without normalize (whose maxima skip padded keys)."""
    B, Hq, Hk, N, D, Dv, j = 2, 2, 1, 140, 4, 4, 60
    q, k, v, _ = _case_inputs(11, B, Hq, Hk, N, N, D, Dv, pad=False)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, j] = False
    k_bad, v_bad = _poison(k, v, 0, 0, j, "both")
    do = torch.randn(B, Hq, N, Dv, dtype=torch.float64)
    kw = dict(causal=causal, key_padding_mask=mask, backend=backend, normalize=normalize)
    out, dq, dk, dv = _forward_and_grads(q, k_bad, v_bad, slice(0, N), do, **kw)
    clean, cq, ck, cv = _forward_and_grads(q, k, v, slice(0, N), do, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.equal(out, clean) and torch.equal(dq, cq)
    assert torch.equal(dk, ck) and torch.equal(dv, cv)
    assert torch.all(dk[0, :, j] == 0) and torch.all(dv[0, :, j] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_query_stays_in_its_row(backend, causal, value):
    B, Hq, Hk, N, D, Dv, i = 1, 2, 2, 300, 4, 4, 150
    q, k, v, mask = _case_inputs(5, B, Hq, Hk, N, N, D, Dv, pad=True)
    q_bad = q.clone()
    q_bad[0, 1, i, 2] = value
    out = fastmax(q_bad, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    clean = fastmax(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    others = torch.ones(N, dtype=torch.bool)
    others[i] = False
    assert torch.equal(out[:, :, others], clean[:, :, others])
    # the same row of the other head is finite and right (recomputed pair by pair: rounding only)
    assert torch.isfinite(out[:, 0]).all() and rel_err(out[:, 0], clean[:, 0]) < 1e-14
    if mask[0].any():
        assert not torch.isfinite(out[0, 1, i]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["inf_key", "-inf_key_nan_key"])
def test_normalize_with_an_inf_key_keeps_the_earlier_rows(backend, kind):
    """normalize=True under a causal mask: the running maximum before the inf key is untouched,
    so every earlier row equals the call without the inf (the rows from j on see it)."""
    B, Hq, Hk, N, D, Dv, j = 1, 2, 2, 1024, 8, 8, 900
    q, k, v, _ = _case_inputs(3, B, Hq, Hk, N, N, D, Dv, pad=False)
    k_bad, v_bad = _poison(k, v, 0, 0, j, kind)
    kw = dict(causal=True, normalize=True, lim=1.2, backend=backend)
    out, clean = fastmax(q, k_bad, v_bad, **kw), fastmax(q, k, v, **kw)
    assert torch.isfinite(out[:, :, :j]).all()
    assert torch.equal(out[:, :, :j], clean[:, :, :j])
    expected = fastmax_reference(q, k, v, causal=True, normalize=True, lim=1.2)
    assert rel_err(out[:, :, :j], expected[:, :, :j]) < 1e-12
    assert not torch.isfinite(out[0, 0, j:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_step_does_not_leak_backwards(kind):
    """A prefill continued by a block of new tokens with a poisoned one at j: the new tokens
    before j equal the finite run, and the state then carries the poison (it is seen later)."""
    B, Hq, Hk, D, Dv, prefix, n, j = 2, 4, 2, 4, 3, 70, 300, 210
    q, k, v, mask = _case_inputs(9, B, Hq, Hk, prefix + n, prefix + n, D, Dv, pad=True)
    mask[0, prefix + j] = True
    k_bad, v_bad = _poison(k, v, 0, 0, prefix + j, kind)
    runs = []
    for kk, vv in ((k_bad, v_bad), (k, v)):
        _, state = fastmax_step(q[:, :, :prefix], kk[:, :, :prefix], vv[:, :, :prefix], None,
                                key_padding_mask=mask[:, :prefix], scale=0.5)
        out, state = fastmax_step(q[:, :, prefix:], kk[:, :, prefix:], vv[:, :, prefix:], state,
                                  key_padding_mask=mask[:, prefix:], scale=0.5)
        runs.append((out, state))
    (out, state), (clean, _) = runs
    assert torch.isfinite(out[:, :, :j]).all()
    assert torch.equal(out[:, :, :j], clean[:, :, :j])
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, scale=0.5)[:, :, prefix:]
    assert rel_err(out[:, :, :j], expected[:, :, :j]) < 1e-12
    assert not torch.isfinite(out[0, :2, j:]).all()  # query heads 0, 1 read key/value head 0
    # a padded poisoned token never enters the state
    pad = torch.ones(B, 5, dtype=torch.bool)
    pad[0, 2] = False
    k5, v5 = _poison(k[:, :, :5], v[:, :, :5], 0, 0, 2, "both")
    _, padded = fastmax_step(q[:, :, :5], k5, v5, None, key_padding_mask=pad)
    assert torch.isfinite(padded.S).all() and torch.isfinite(padded.z).all()
    S, z = chunked_state(k5, v5, key_padding_mask=pad, p=2)
    assert torch.equal(S, padded.S) and torch.equal(z, padded.z)
