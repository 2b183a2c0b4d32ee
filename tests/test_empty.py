"""Empty inputs (issue 15, item 2): N = 0 or B = 0 give an empty output and empty gradients, as
SDPA does, on every CPU backend and in the recurrent step; Nk = 0 with queries gives zero rows
(a query with no visible key returns 0)."""

import pytest
import torch
import torch.nn.functional as F

from fastmax_hf import fastmax, fastmax_function, fastmax_reference
from fastmax_hf.chunked import chunked_attention
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.recurrent import fastmax_step

# (B, Hq, Hk, Nq, Nk, D, Dv)
EMPTY = [
    (0, 2, 1, 5, 5, 4, 3),  # B = 0
    (2, 2, 1, 0, 0, 4, 3),  # N = 0
    (2, 4, 2, 0, 7, 4, 3),  # no queries
    (0, 2, 2, 0, 0, 4, 4),  # both
]


def _inputs(B, Hq, Hk, Nq, Nk, D, Dv, dtype=torch.float64):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Hk, Nk, D, dtype=dtype, requires_grad=True),
            torch.randn(B, Hk, Nk, Dv, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("shape", EMPTY, ids=str)
@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_empty_input_gives_empty_output_and_gradients(shape, backend, causal, normalize):
    B, Hq, Hk, Nq, Nk, D, Dv = shape
    q, k, v = _inputs(*shape)
    out = fastmax(q, k, v, causal=causal, normalize=normalize, backend=backend)
    assert out.shape == (B, Hq, Nq, Dv) and out.dtype == q.dtype
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.shape == x.shape and torch.all(x.grad == 0)
    # SDPA (with K/V repeated for the groups) gives the same shapes
    if Hq == Hk:
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        assert sdpa.shape == out.shape


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("shape", EMPTY, ids=str)
def test_empty_input_both_chunked_tilings(shape, mode):
    q, k, v = _inputs(*shape)
    out, den = chunked_attention(q, k, v, FastmaxOptions(scale=0.5), causal=True, key_padding_mask=None, mode=mode)
    assert out.shape == shape[:2] + (shape[3], shape[6]) and den.shape == shape[:2] + (shape[3],)
    torch.autograd.grad(out.sum(), (q, k, v))


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_no_keys_gives_zero_rows(backend):
    """Nk = 0 with queries: every row sees no key and returns 0; the gradient of q is 0."""
    q, k, v = _inputs(2, 2, 1, 5, 0, 4, 3)
    out = fastmax(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, 2, 5, 3) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0) and k.grad.shape == k.shape


def test_empty_padding_mask_and_three_d_and_seed_api():
    q, k, v = _inputs(0, 1, 1, 4, 4, 4, 4)
    mask = torch.ones(0, 4, dtype=torch.bool)
    assert fastmax(q, k, v, causal=True, key_padding_mask=mask).shape == (0, 1, 4, 4)
    q3 = torch.randn(3, 0, 4, dtype=torch.float64)
    assert fastmax(q3, q3, q3, causal=True).shape == (3, 0, 4)
    assert fastmax_function(q3, q3, q3, mask=True).shape == (3, 0, 4)
    assert fastmax_reference(q3[:, None], q3[:, None], q3[:, None], causal=True).shape == (3, 1, 0, 4)


@pytest.mark.parametrize("shape", [(0, 2, 1, 3, 3, 4, 3), (2, 2, 1, 0, 0, 4, 3)], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_empty_recurrent_step(shape, normalize):
    B, Hq, Hk, N, _, D, Dv = shape
    q, k, v = (x.detach() for x in _inputs(*shape))
    mask = torch.ones(B, N, dtype=torch.bool)
    out, state = fastmax_step(q, k, v, None, key_padding_mask=mask, normalize=normalize)
    assert out.shape == (B, Hq, N, Dv)
    assert state.S.shape[:2] == (B, Hk)
    # an empty step continues a state and leaves it as it was
    if B > 0:
        q1, k1, v1 = (x.detach() for x in _inputs(B, Hq, Hk, 2, 2, D, Dv))
        _, state = fastmax_step(q1, k1, v1, None, normalize=normalize)
        out, after = fastmax_step(q, k, v, state, normalize=normalize)
        assert out.shape == (B, Hq, 0, Dv)
        assert torch.equal(after.S, state.S) and torch.equal(after.z, state.z)
