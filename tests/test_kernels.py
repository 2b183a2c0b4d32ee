"""The Triton kernels against the float64 reference (Triton's interpreter when there is no GPU).

bf16 cannot be checked in the interpreter (it returns garbage there); scripts/check_kernels.py
covers bf16, D = 128 and long sequences on a GPU.
"""

import pytest
import torch

from fastmax_hf import fastmax, fastmax_reference
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.recurrent import fastmax_step
from conftest import randn, rel_err

kernels = pytest.importorskip("fastmax_hf.kernels")  # triton is a Linux dependency of the package
from fastmax_hf.kernels import triton_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}

# (B, Hq, Hk, Nq, Nk, D, Dv): odd lengths, Nq < Nk, Nq > Nk, GQA, D padded to a power of 2,
# several pair tiles (D = 32 -> 3 tiles), Dv != D.
SHAPES = [
    (1, 2, 1, 37, 70, 16, 16),
    (2, 2, 2, 70, 45, 20, 12),
    (1, 4, 2, 65, 65, 32, 24),
    (2, 3, 3, 1, 77, 16, 16),
]


def inputs(gen, B, Hq, Hk, Nq, Nk, D, Dv, dtype):
    q = randn(gen, B, Hq, Nq, D).to(DEVICE)
    k = randn(gen, B, Hk, Nk, D).to(DEVICE)
    v = randn(gen, B, Hk, Nk, Dv).to(DEVICE)
    mask = torch.rand(B, Nk, generator=gen) > 0.25
    mask[0, : Nk // 3] = False  # left padding
    if B > 1:
        mask[-1] = False  # nothing to attend to: that row must come back 0
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    exact = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    return low, exact, mask.to(DEVICE)


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference(gen, regime, causal, shape):
    for dtype, p, coeffs in ((torch.float32, 2, (1.0, 1.0, 0.5)), (torch.float16, 2, (2.0, 0.7, 0.3)),
                             (torch.float32, 1, (8.0, 0.5, 0.0))):  # 8 + s/2 > 0 for these inputs
        (q, k, v), (qe, ke, ve), mask = inputs(gen, *shape, dtype)
        opts = dict(causal=causal, key_padding_mask=mask, scale=0.3, p=p,
                    a0=coeffs[0], a1=coeffs[1], a2=coeffs[2])
        expected = fastmax_reference(qe, ke, ve, **opts)
        options = FastmaxOptions(scale=0.3, p=p, a0=coeffs[0], a1=coeffs[1], a2=coeffs[2])
        out, den = triton_attention(q, k, v, options, causal=causal, key_padding_mask=mask, regime=regime)
        assert out.dtype == dtype and not torch.isnan(out).any()
        assert rel_err(out, expected) < TOL[dtype], (dtype, p)
        if shape[0] > 1:
            assert torch.all(out[-1] == 0)
        do = randn(gen, *expected.shape).to(DEVICE)
        got = torch.autograd.grad(out, (q, k, v), do.to(dtype))
        want = torch.autograd.grad(expected, (qe, ke, ve), do)
        for name, a, b in zip("qkv", got, want):
            assert a.dtype == dtype
            assert rel_err(a, b) < TOL[dtype], (dtype, p, "d" + name)


def test_public_function_reads_strided_inputs(gen):
    """Hugging Face's (B, N, H, D) memory, transposed to (B, H, N, D), is read without a copy."""
    B, N, Hq, Hk, D = 2, 41, 4, 2, 16
    q = randn(gen, B, N, Hq, D, dtype=torch.float32).to(DEVICE).transpose(1, 2)
    k = randn(gen, B, N, Hk, D, dtype=torch.float32).to(DEVICE).transpose(1, 2)
    v = randn(gen, B, N, Hk, D, dtype=torch.float32).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True)
    for regime in ("quadratic", "linear"):
        out, _ = triton_attention(q, k, v, FastmaxOptions(scale=D ** -0.5), causal=True, regime=regime)
        assert rel_err(out, expected) < 1e-4
    assert rel_err(fastmax(q, k, v, causal=True, backend="triton"), expected) < 1e-4


@pytest.mark.parametrize("p", [1, 2])
def test_prefill_and_decode_from_state(gen, p):
    B, Hq, Hk, N, D, Dv = 2, 4, 2, 75, 16, 16
    q, k, v = (randn(gen, B, h, N, d).to(DEVICE) for h, d in ((Hq, D), (Hk, D), (Hk, Dv)))
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[1, :9] = False
    opts = dict(scale=0.25, p=p, a0=1.0, a1=1.0, a2=0.5)
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, **opts)
    f32 = lambda t: t.float()  # noqa: E731
    split = 70
    out, state = fastmax_step(f32(q[:, :, :split]), f32(k[:, :, :split]), f32(v[:, :, :split]), None,
                              key_padding_mask=mask[:, :split], backend="triton", **opts)
    assert state.layout == "triton"
    outs, size = [out], state.nbytes()
    for t in range(split, N):
        step = slice(t, t + 1)
        out, state = fastmax_step(f32(q[:, :, step]), f32(k[:, :, step]), f32(v[:, :, step]), state,
                                  key_padding_mask=mask[:, step], **opts)
        outs.append(out)
        assert state.nbytes() == size
    assert rel_err(torch.cat(outs, 2), expected) < 1e-4


def test_custom_op_registration(gen):
    """Fake (meta) shapes, autograd, no graph break under torch.compile."""
    q = torch.empty(2, 4, 10, 16, device="meta")
    k = torch.empty(2, 2, 12, 16, device="meta")
    v = torch.empty(2, 2, 12, 8, device="meta")
    out, den = torch.ops.fastmax_hf.forward(q, k, v, None, True, 0.25, 2, 1.0, 1.0, 0.5, "linear")
    assert out.shape == (2, 4, 10, 8) and out.device.type == "meta" and den.shape == (2, 4, 10)

    (q, k, v), _, mask = inputs(gen, 1, 2, 1, 20, 20, 16, 16, torch.float32)
    args = (q, k, v, mask, True, 0.25, 2, 1.0, 1.0, 0.5, "quadratic")
    torch.library.opcheck(torch.ops.fastmax_hf.forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def layer(q, k, v):
        return fastmax(q, k, v, causal=True, key_padding_mask=mask, backend="triton").sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), layer(q, k, v))


@pytest.mark.parametrize("N, D, Hq, Hk, expected", [
    (262144, 64, 16, 16, 16),  # 3 GiB of scratch: one launch
    (524288, 64, 16, 16, 8),  # 6 GiB: two launches of 8 heads
    (1048576, 64, 16, 16, 4),  # 12 GiB, budget 20% of 16 GiB of tensors: four launches of 4 heads
    (1048576, 128, 16, 16, 4),
    (1048576, 64, 32, 8, 2),  # GQA: 4 query heads' dq scratch per key/value head
    (1048576, 64, 5, 5, 3),  # equal groups: 3 + 2, not 4 + 1 (the budget holds 4 heads)
])
def test_backward_head_group_size(N, D, Hq, Hk, expected):
    """Scratch stays within its budget and the groups are as large, and as even, as it allows."""
    from fastmax_hf.kernels import ops

    q = torch.empty(1, Hq, N, D, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(1, Hk, N, D, dtype=torch.bfloat16, device="meta")
    heads = ops.heads_per_launch(q, k, v)
    assert heads == expected
    scratch = 4 * heads * ((Hq // Hk) * N * D + 2 * N * D)
    tensors = 2 * 2 * (Hq * N * 2 * D + Hk * N * 2 * D)
    budget = kernels.current_settings()
    assert heads == Hk or scratch <= max(budget.scratch_min_bytes, budget.scratch_fraction * tensors)


def test_backward_in_head_groups(gen):
    """Large backward passes run over groups of key/value heads: same gradients."""
    from fastmax_hf.kernels import ops

    (q, k, v), (qe, ke, ve), mask = inputs(gen, 2, 6, 3, 40, 40, 16, 16, torch.float32)
    opts = dict(causal=True, key_padding_mask=mask, scale=0.3, p=2, a0=1.0, a1=1.0, a2=0.5)
    expected = fastmax_reference(qe, ke, ve, **opts)
    do = randn(gen, *expected.shape).to(DEVICE)
    want = torch.autograd.grad(expected, (qe, ke, ve), do)
    # one key/value head per launch, and (do . o) one head at a time
    with kernels.settings(scratch_min_bytes=1, scratch_fraction=0.0, row_terms_slice=1):
        assert ops.heads_per_launch(q, k, v) == 1
        out, _ = triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=True, key_padding_mask=mask,
                                  regime="linear")
        got = torch.autograd.grad(out, (q, k, v), do.float())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
