"""normalize's scaling on the kernels (kernels/normalize.py): x * lim / max ||x_n|| and its
gradient against float64 autograd through ``stages.norm_scale`` and against the PyTorch form
``stages._ScaleByPeak`` (Triton's interpreter on the CPU, the GPU when there is one): odd
lengths over several row blocks, D padded to a power of 2, Hugging Face strides, padding, ties
of the maximum, zero and non-finite rows."""

import pytest
import torch

from fastmax_hf import fastmax, stages
from conftest import rel_err

kernels = pytest.importorskip("fastmax_hf.kernels")
from fastmax_hf.kernels import normalize_scaler, triton_scale_by_peak, triton_scale_qk_by_peak  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _inputs(gen, B, H, N, D, dtype, masked):
    x = torch.randn(B, N, H, D, generator=gen) * torch.rand(B, N, H, 1, generator=gen) * 3
    x = x.to(DEVICE, dtype).transpose(1, 2)  # (B, H, N, D) with (B, N, H, D) strides
    valid = (torch.rand(B, N, generator=gen) > 0.3).to(DEVICE) if masked else None
    return x, valid


def _exact(x, lim, causal, valid):
    """float64 autograd through the composed form."""
    x64 = x.detach().double().requires_grad_()
    return x64, x64 * stages.norm_scale(x64, lim, causal, valid)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("shape", [(2, 3, 150, 20), (1, 2, 1, 16), (1, 1, 64, 64)], ids=lambda s: "x".join(map(str, s)))
def test_scaling_matches_float64_and_the_pytorch_form(gen, dtype, causal, masked, shape):
    x, valid = _inputs(gen, *shape, dtype, masked)
    got_x = x.detach().clone().requires_grad_()
    got = triton_scale_by_peak(got_x, 0.9, causal, valid)
    x64, want = _exact(x, 0.9, causal, valid)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, want) < TOL[dtype]
    g = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(got, got_x, g)
    (dx64,) = torch.autograd.grad(want, x64, g.double())
    assert dx.dtype == dtype and rel_err(dx, dx64) < TOL[dtype]
    ref_x = x.detach().clone().requires_grad_()
    ref = stages._ScaleByPeak.apply(ref_x, 0.9, causal, valid)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, g)
    assert rel_err(got, ref) < TOL[dtype] and rel_err(dx, ref_dx) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", [(150, 150), (70, 201), (201, 9)], ids=lambda n: "Nq{}-Nk{}".format(*n))
def test_q_and_k_in_the_same_launches(gen, dtype, causal, lengths):
    """q and k scaled together (GQA: 4 query heads, 2 key heads; Nq != Nk both ways; each its
    own padding mask): each equals its own scaling by ``_ScaleByPeak``, and so do both gradients,
    also when the loss reads only one of them."""
    Nq, Nk = lengths
    q, q_valid = _inputs(gen, 2, 4, Nq, 20, dtype, True)
    k, k_valid = _inputs(gen, 2, 2, Nk, 20, dtype, True)
    qs, ks = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    got_q, got_k = triton_scale_qk_by_peak(qs, ks, 0.8, causal, q_valid, k_valid)
    gq, gk = (torch.randn(x.shape, generator=gen).to(DEVICE, dtype) for x in (q, k))
    dq, dk = torch.autograd.grad((got_q, got_k), (qs, ks), (gq, gk))
    for x, valid, got, g, dx in ((q, q_valid, got_q, gq, dq), (k, k_valid, got_k, gk, dk)):
        ref_x = x.detach().clone().requires_grad_()
        ref = stages._ScaleByPeak.apply(ref_x, 0.8, causal, valid)
        (ref_dx,) = torch.autograd.grad(ref, ref_x, g)
        assert got.shape == x.shape and rel_err(got, ref) < TOL[dtype] and rel_err(dx, ref_dx) < TOL[dtype]
    qs2, ks2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    only_k = triton_scale_qk_by_peak(qs2, ks2, 0.8, causal, q_valid, k_valid)[1]
    dq2, dk2 = torch.autograd.grad(only_k, (qs2, ks2), gk)
    assert torch.all(dq2 == 0) and rel_err(dk2, dk) < 1e-6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ties_of_the_maximum_send_the_gradient_where_pytorch_does(gen, causal):
    """Rows of equal norm: with a causal mask the later row holds the running maximum (as
    torch.cummax), without one the first (as torch.max); the gradient goes to that row only.
    The tied rows sit in different row blocks and inside one."""
    x, _ = _inputs(gen, 1, 2, 200, 16, torch.float32, False)
    x = x.contiguous() * 0.1
    peak_row = torch.randn(16, generator=gen).to(DEVICE) * 5
    for n in (10, 30, 100, 190):
        x[:, :, n] = peak_row
    got_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    (dx,) = torch.autograd.grad(triton_scale_by_peak(got_x, 1.0, causal, None), got_x, g)
    (ref_dx,) = torch.autograd.grad(stages._ScaleByPeak.apply(ref_x, 1.0, causal, None), ref_x, g)
    assert rel_err(dx, ref_dx) < 1e-5


def test_zero_and_nonfinite_rows_as_the_pytorch_form(gen):
    """Leading zero rows (the maximum is 0: factor 0, no gradient through it), and an inf and a
    NaN row: the same finite entries and the same non-finite pattern as ``_ScaleByPeak``."""
    x, _ = _inputs(gen, 1, 2, 140, 16, torch.float32, False)
    x = x.contiguous()
    x[:, :, :5] = 0.0
    x[:, 0, 80, 3] = float("inf")
    x[:, 1, 90, 0] = float("nan")
    got = triton_scale_by_peak(x, 1.0, True, None)
    ref = stages._ScaleByPeak.apply(x, 1.0, True, None)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-7)
    assert torch.all(got[:, :, :5] == 0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_the_public_function_takes_the_kernels_when_the_setting_asks(gen, causal, monkeypatch):
    """``fastmax(..., normalize=True)`` on the kernels: the PyTorch scaling by default, the
    kernels' with ``fused_normalize=True``, the same output and gradients (p = 1, padding)."""
    from fastmax_hf.kernels import normalize_ops

    calls = []
    real = normalize_ops._TritonScaleByPeak.apply
    monkeypatch.setattr(normalize_ops._TritonScaleByPeak, "apply", lambda *a: calls.append(1) or real(*a))
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    mask = torch.rand(2, 70, generator=gen).to(DEVICE) > 0.2
    do = torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE)

    def run():
        out = fastmax(q, k, v, causal=causal, key_padding_mask=mask, p=1, normalize=True, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    want = run()
    assert not calls and normalize_scaler() is None
    with kernels.settings(fused_normalize=True):
        assert normalize_scaler() is triton_scale_qk_by_peak
        got = run()
    assert len(calls) == 1  # q and k in the same launches
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 1e-5, name


def test_under_torch_compile_the_pytorch_form_is_traced():
    """The scaling kernels are no custom operator: a compiled call traces the PyTorch form."""
    seen = []

    def probe(x):
        seen.append(normalize_scaler())
        return x

    with kernels.settings(fused_normalize=True):
        torch.compile(probe, backend="eager")(torch.ones(2))
    assert seen == [None]


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="`x`"):
        triton_scale_by_peak(torch.ones(1, 1, 4, 8, dtype=torch.float64), 1.0, True)
    with pytest.raises(ValueError, match="`x`"):
        triton_scale_by_peak(torch.ones(1, 4, 8), 1.0, True)
    with pytest.raises(ValueError, match="`q` and `k`"):
        triton_scale_qk_by_peak(torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 16), 1.0, True)
    with pytest.raises(ValueError, match="fused_normalize"):
        kernels.KernelSettings(fused_normalize=1)
