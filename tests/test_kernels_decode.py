"""The in-place decoding step (kernels/decode.py and its PyTorch twin) against the float64 reference.

A prompt is folded into a state, then one new token per sequence attends through
``decode_step_``: its output must be the causal reference's last row over prompt + token, the
state must become the one a fresh fold of prompt + token gives, and a padded token must leave
the state exactly as it was. The Triton kernel runs in the interpreter on a CPU.
"""

import pytest
import torch

from fastmax_hf import fastmax_reference
from fastmax_hf.chunked import chunked_decode_step_
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.recurrent import decode_step_, fastmax_step
from conftest import randn, rel_err

pytest.importorskip("triton")
from fastmax_hf.kernels import empty_state, triton_step  # noqa: E402
from fastmax_hf.kernels.decode_ops import decode_plan, triton_decode_step_  # noqa: E402

# (B, Hq, Hk, prompt, D, Dv, p, splits): GQA groups 1, 3 and 4; D below, at and between powers of
# two; Dv wider than one value block (160); one split, forced splits and the chosen number
CASES = [
    (2, 4, 2, 9, 32, 16, 2, None),
    (1, 3, 1, 6, 20, 24, 2, 1),
    (2, 2, 2, 5, 16, 160, 1, None),
    (1, 8, 2, 4, 64, 48, 2, 3),
    (3, 3, 3, 7, 12, 8, 2, 1),
]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
# The step against a prefill over all tokens: the prefill's matrix products take operands in the
# input's dtype (fp16 key features, rounded), the step forms its features in fp32.
STATE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _case(gen, B, Hq, Hk, n, D, Dv, dtype):
    q, k, v = randn(gen, B, Hq, n + 1, D), randn(gen, B, Hk, n + 1, D), randn(gen, B, Hk, n + 1, Dv)
    return q.to(dtype), k.to(dtype), v.to(dtype), (q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_decoding_step_matches_the_reference(gen, case, dtype):
    B, Hq, Hk, n, D, Dv, p, splits = case
    q, k, v, exact = _case(gen, B, Hq, Hk, n, D, Dv, dtype)
    opts = FastmaxOptions.resolve(D, scale=0.3, p=p, a0=1.0, a1=0.7, a2=0.45)
    S, z = empty_state(B, Hk, D, Dv, p, "cpu")
    _, S, z = triton_step(q[:, :, :n], k[:, :, :n], v[:, :, :n], S, z, opts)
    _, S_all, z_all = triton_step(q, k, v, *empty_state(B, Hk, D, Dv, p, "cpu"), opts)
    S_addr, z_addr = S.data_ptr(), z.data_ptr()

    out = triton_decode_step_(q[:, :, n:], k[:, :, n:], v[:, :, n:], S, z, opts, splits=splits)

    expected = fastmax_reference(*exact, causal=True, scale=0.3, p=p, a0=1.0, a1=0.7, a2=0.45)[:, :, n:]
    assert out.shape == (B, Hq, 1, Dv) and out.dtype == dtype
    assert rel_err(out, expected) < TOL[dtype]
    assert (S.data_ptr(), z.data_ptr()) == (S_addr, z_addr)  # in place
    assert rel_err(S, S_all) < STATE_TOL[dtype] and rel_err(z, z_all) < STATE_TOL[dtype]


def test_the_plan_splits_rows_at_batch_one_and_not_at_a_large_batch():
    small = decode_plan(1, 8, 4, 64, 64, 2, "cpu", sm_count=132)  # an H200
    large = decode_plan(256, 8, 4, 64, 64, 2, "cpu", sm_count=132)
    assert small["splits"] > 1 and small["finish"]
    assert large["splits"] == 1 and not large["finish"]
    assert small["rows_per_split"] * small["splits"] >= small["f_rows"]


@pytest.mark.parametrize("valid_layout", ["contiguous", "mask column"])
def test_a_padded_token_attends_and_leaves_the_state_exactly(gen, valid_layout):
    B, Hq, Hk, n, D, Dv = 3, 4, 2, 5, 16, 8
    q, k, v, exact = _case(gen, B, Hq, Hk, n, D, Dv, torch.float32)
    opts = FastmaxOptions.resolve(D)
    S, z = empty_state(B, Hk, D, Dv, 2, "cpu")
    _, S, z = triton_step(q[:, :, :n], k[:, :, :n], v[:, :, :n], S, z, opts)
    S0, z0 = S.clone(), z.clone()
    valid = torch.tensor([True, False, True])
    if valid_layout == "mask column":
        # what the cache hands over: the last column of a (B, N) attention mask, stride N; the
        # other columns say the opposite, so reading them instead would show
        mask = (~valid)[:, None].repeat(1, 4)
        mask[:, -1] = valid
        valid = mask[:, -1]
        assert valid.stride(0) == 4

    out = triton_decode_step_(q[:, :, n:], k[:, :, n:], v[:, :, n:], S, z, opts, key_valid=valid, splits=2)

    assert torch.equal(S[1], S0[1]) and torch.equal(z[1], z0[1])  # bit for bit
    assert not torch.equal(S[0], S0[0])
    mask = torch.ones(B, n + 1, dtype=torch.bool)
    mask[1, n] = False
    expected = fastmax_reference(*exact, causal=True, key_padding_mask=mask)[:, :, n:]
    assert rel_err(out, expected) < 1e-5


def test_strided_inputs(gen):
    """q, k, v as the transposed (B, N, H, D) views that Hugging Face attention classes produce."""
    B, Hq, Hk, D, Dv = 2, 4, 2, 16, 16
    q = randn(gen, B, 1, Hq, D, dtype=torch.float32).transpose(1, 2)
    k = randn(gen, B, 1, Hk, D, dtype=torch.float32).transpose(1, 2)
    v = randn(gen, B, 1, Hk, Dv, dtype=torch.float32).transpose(1, 2)
    opts = FastmaxOptions.resolve(D)
    S, z = empty_state(B, Hk, D, Dv, 2, "cpu")
    out = triton_decode_step_(q, k, v, S, z, opts)
    expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out, expected) < 1e-5


def test_bad_arguments_are_named(gen):
    B, H, D = 1, 2, 16
    q, k, v = (randn(gen, B, H, 2, D, dtype=torch.float32) for _ in range(3))
    S, z = empty_state(B, H, D, D, 2, "cpu")
    opts = FastmaxOptions.resolve(D)
    with pytest.raises(ValueError, match="one new token"):
        triton_decode_step_(q, k, v, S, z, opts)
    with pytest.raises(ValueError, match="`S` must be"):
        triton_decode_step_(q[:, :, :1], k[:, :, :1], v[:, :, :1], S.double(), z, opts)
    with pytest.raises(ValueError, match="`key_valid`"):
        triton_decode_step_(q[:, :, :1], k[:, :, :1], v[:, :, :1], S, z, opts, key_valid=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_pytorch_in_place_steps_equal_the_full_pass(gen, p, normalize):
    """recurrent.decode_step_ on a PyTorch-layout state (CPU, float64): token after token, padding
    in the middle of the decoded tokens, the state's tensors never replaced."""
    B, Hq, Hk, N, D, Dv = 2, 4, 2, 17, 6, 5
    q, k, v = randn(gen, B, Hq, N, D), randn(gen, B, Hk, N, D), randn(gen, B, Hk, N, Dv)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :4] = False
    mask[0, 12] = False
    kw = dict(scale=0.35, p=p, a0=1.0, a1=0.6, a2=0.4, normalize=normalize, lim=0.8)
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, **kw)
    opts = FastmaxOptions.resolve(D, **kw)

    split = 9
    out, state = fastmax_step(q[:, :, :split], k[:, :, :split], v[:, :, :split], None,
                              key_padding_mask=mask[:, :split], **kw)
    addresses = [t.data_ptr() for t in state.tensors()]
    outs = [out]
    for t in range(split, N):
        outs.append(decode_step_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, opts,
                                 key_valid=mask[:, t]))
    assert [t.data_ptr() for t in state.tensors()] == addresses
    assert rel_err(torch.cat(outs, dim=2), expected) < 1e-12


def test_pytorch_and_triton_steps_agree(gen):
    B, Hq, Hk, D, Dv = 2, 6, 2, 8, 8
    q, k, v, _ = _case(gen, B, Hq, Hk, 0, D, Dv, torch.float32)
    opts = FastmaxOptions.resolve(D)
    S_t, z_t = empty_state(B, Hk, D, Dv, 2, "cpu")
    S_c = torch.zeros(B, Hk, 1 + D + D * (D + 1) // 2, Dv)
    z_c = torch.zeros(B, Hk, S_c.shape[2])
    a = triton_decode_step_(q, k, v, S_t, z_t, opts)
    b = chunked_decode_step_(q, k, v, S_c, z_c, opts)
    assert rel_err(a, b) < 1e-5
