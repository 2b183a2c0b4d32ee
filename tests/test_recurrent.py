"""Prefill and token-by-token decoding from the recurrent state equal one causal pass."""

import pytest
import torch

from fastmax_hf import fastmax_reference
from fastmax_hf.recurrent import FastmaxState, fastmax_step
from conftest import randn, rel_err


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_prefill_then_decode_equals_full_pass(gen, normalize, p):
    B, Hq, Hk, N, D, Dv = 2, 4, 2, 23, 6, 5
    q, k, v = randn(gen, B, Hq, N, D), randn(gen, B, Hk, N, D), randn(gen, B, Hk, N, Dv)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :6] = False  # left padding of the second row
    opts = dict(scale=0.35, p=p, a0=1.0, a1=0.6, a2=0.4, normalize=normalize, lim=0.8)
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, **opts)

    split = 15
    out, state = fastmax_step(q[:, :, :split], k[:, :, :split], v[:, :, :split], None,
                              key_padding_mask=mask[:, :split], **opts)
    outs = [out]
    size = state.nbytes()
    for t in range(split, N):
        out, state = fastmax_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state,
                                  key_padding_mask=mask[:, t : t + 1], **opts)
        outs.append(out)
        assert state.nbytes() == size  # constant memory per token
    assert rel_err(torch.cat(outs, dim=2), expected) < 1e-12


def test_state_reorder_for_beams(gen):
    B, H, D = 3, 2, 4
    q, k, v = randn(gen, B, H, 5, D), randn(gen, B, H, 5, D), randn(gen, B, H, 5, D)
    _, state = fastmax_step(q, k, v, None)
    picked = state.index_select(torch.tensor([2, 2, 0]))
    assert torch.equal(picked.S[0], state.S[2]) and torch.equal(picked.S[2], state.S[0])


def test_empty_state_row_returns_zero(gen):
    q, k, v = randn(gen, 1, 1, 3, 4), randn(gen, 1, 1, 3, 4), randn(gen, 1, 1, 3, 4)
    out, state = fastmax_step(q, k, v, None, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.all(out == 0) and torch.all(state.S == 0)
    assert isinstance(state, FastmaxState)
