"""The public function and its PyTorch linear-time form against the direct form in float64, and
both public paths against the loop-by-loop definition of tests/test_reference.py."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fastmax_hf import FastmaxOptions, fastmax, fastmax_reference
from fastmax_hf.chunked import chunked_attention, chunked_state, feature_count, state_readout
from conftest import randn, rel_err
from test_reference import loop_definition

# (B, Hq, Hk, Nq, Nk, D, Dv): odd lengths, Nq < Nk, Nq > Nk, Nq = 1, GQA, Dv != D
SHAPES = [
    (2, 4, 2, 37, 37, 8, 5),
    (1, 2, 1, 13, 50, 6, 7),
    (2, 2, 2, 50, 13, 4, 4),
    (1, 3, 3, 1, 29, 8, 8),
    (3, 6, 1, 19, 19, 5, 3),
]


def make_inputs(gen, B, Hq, Hk, Nq, Nk, D, Dv, pad=True):
    q = randn(gen, B, Hq, Nq, D, requires_grad=True)
    k = randn(gen, B, Hk, Nk, D, requires_grad=True)
    v = randn(gen, B, Hk, Nk, Dv, requires_grad=True)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen) > 0.3
        mask[0, : Nk // 2] = False  # left padding
        if B > 1:
            mask[-1] = False  # a fully padded row
    return q, k, v, mask


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("p", [1, 2])
def test_chunked_matches_reference(gen, shape, causal, mode, p):
    q, k, v, mask = make_inputs(gen, *shape)
    coefficients = dict(scale=0.4, p=p, a0=2.0, a1=0.7, a2=0.3)
    expected = fastmax_reference(q, k, v, causal=causal, key_padding_mask=mask, **coefficients)
    got, den = chunked_attention(q, k, v, FastmaxOptions(**coefficients), causal=causal, key_padding_mask=mask,
                                 mode=mode, chunk_size=8)
    assert got.dtype == torch.float64
    assert rel_err(got, expected) < 1e-12
    do = randn(gen, *expected.shape)
    for a, b in zip(grads(got, (q, k, v), do), grads(expected, (q, k, v), do)):
        assert rel_err(a, b) < 1e-11
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_chunked_gradcheck(gen, causal, mode):
    q, k, v, mask = make_inputs(gen, 2, 2, 1, 6, 9, 3, 2)

    def f(q, k, v):
        return chunked_attention(q, k, v, FastmaxOptions(scale=0.5), causal=causal, key_padding_mask=mask,
                                 mode=mode, chunk_size=4)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_public_function_options(gen, backend):
    """normalize, temperature-like scale, non-default a's, dropout: against the loop-by-loop
    definition (which shares no code with either backend)."""
    q, k, v, mask = make_inputs(gen, 2, 4, 2, 11, 23, 6, 5)
    noise = randn(gen, 2, 4, 11, 5)
    coefficients = dict(scale=1 / 1.7, p=2, a0=1.0, a1=0.5, a2=0.25)
    for causal in (False, True):
        got = fastmax(q, k, v, causal=causal, key_padding_mask=mask, normalize=True, lim=1.3, dropout=0.2,
                      drop_noise=noise, backend=backend, **coefficients)
        attention = loop_definition(q.detach(), k.detach(), v.detach(), causal, mask, normalize=True, lim=1.3,
                                    rpe=None, **coefficients)
        assert rel_err(got, attention * (1 + 0.2 * noise)) < 1e-12  # the seed's output dropout


def test_chunked_and_reference_gradients_agree_with_every_option(gen):
    """The two PyTorch paths share no attention code; their gradients agree with every option on."""
    q, k, v, mask = make_inputs(gen, 2, 4, 2, 11, 23, 6, 5)
    noise = randn(gen, 2, 4, 11, 5)
    for causal in (False, True):
        kw = dict(causal=causal, key_padding_mask=mask, scale=1 / 1.7, p=2, a0=1.0, a1=0.5, a2=0.25,
                  normalize=True, lim=1.3, dropout=0.2, drop_noise=noise)
        chunked = fastmax(q, k, v, backend="chunked", **kw)
        reference = fastmax(q, k, v, backend="reference", **kw)
        do = randn(gen, *chunked.shape)
        for a, b in zip(grads(chunked, (q, k, v), do), grads(reference, (q, k, v), do)):
            assert rel_err(a, b) < 1e-10


def test_causal_normalize_reads_no_future(gen):
    """With causal normalisation, changing the last token leaves every earlier output alone."""
    q, k, v, _ = make_inputs(gen, 1, 2, 2, 16, 16, 4, 4, pad=False)
    out = fastmax(q, k, v, causal=True, normalize=True, lim=1.0, backend="chunked")
    q2, k2 = q.detach().clone(), k.detach().clone()
    q2[:, :, -1] *= 50
    k2[:, :, -1] *= 50
    out2 = fastmax(q2, k2, v, causal=True, normalize=True, lim=1.0, backend="chunked")
    assert rel_err(out2[:, :, :-1], out[:, :, :-1]) < 1e-14
    assert rel_err(out2[:, :, -1], out[:, :, -1]) > 1e-3


def test_three_d_inputs(gen):
    q, k, v = randn(gen, 6, 10, 4), randn(gen, 6, 12, 4), randn(gen, 6, 12, 3)
    got = fastmax(q, k, v, causal=True)
    assert got.shape == (6, 10, 3)
    expected = fastmax_reference(q[None].transpose(0, 1), k[:, None], v[:, None], causal=True)[:, 0]
    assert rel_err(got, expected) < 1e-12


def test_rows_without_keys_are_zero(gen):
    q, k, v = randn(gen, 1, 1, 9, 4), randn(gen, 1, 1, 5, 4), randn(gen, 1, 1, 5, 4)
    # Nk < Nq under a causal mask: the first Nq - Nk queries see no key
    for backend in ("chunked", "reference"):
        out = fastmax(q, k, v, causal=True, backend=backend)
        assert torch.all(out[:, :, :4] == 0) and not torch.isnan(out).any()
        assert (out[:, :, 4:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_low_precision_inputs(gen, backend):
    q, k, v, mask = make_inputs(gen, 2, 2, 1, 33, 33, 8, 8)
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        got = fastmax(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, key_padding_mask=mask, backend=backend)
        assert got.dtype == dtype
        assert rel_err(got, expected) < tol


def test_state_matches_prefill(gen):
    """The final state of a sequence answers a next query like the full causal computation."""
    B, Hq, Hk, N, D, Dv = 2, 4, 2, 21, 6, 5
    q, k, v = randn(gen, B, Hq, N, D), randn(gen, B, Hk, N, D), randn(gen, B, Hk, N, Dv)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :7] = False
    S, z = chunked_state(k, v, key_padding_mask=mask, p=2, chunk_size=8)
    assert S.shape == (B, Hk, feature_count(D, 2), Dv) and S.dtype == torch.float64
    num, den = state_readout(q[:, :, -1:], S, z, FastmaxOptions(scale=0.3))
    full = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, scale=0.3)
    assert rel_err(num / den[..., None], full[:, :, -1:]) < 1e-12


def test_long_sequence_linear_memory():
    """A causal forward and backward at N = 131072 on the CPU, in a fresh process:
    an N x N float32 matrix alone would take 64 GiB; the whole run must stay far below 1 GiB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from fastmax_hf import fastmax
        N = 131072
        q = torch.randn(1, 2, N, 16, requires_grad=True)
        k = torch.randn(1, 1, N, 16, requires_grad=True)
        v = torch.randn(1, 1, N, 16, requires_grad=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fastmax(q, k, v, causal=True)
        out.square().mean().backward()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
        print(grown // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    grown_mib = int(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 1024, f"peak resident memory grew by {grown_mib} MiB"


def test_autocast_takes_mixed_inputs(gen):
    """Mixed precision hands fastmax fp32 q, k (after RoPE) next to a bf16 v, as it does SDPA."""
    q, k = randn(gen, 1, 2, 9, 8, dtype=torch.float32), randn(gen, 1, 2, 9, 8, dtype=torch.float32)
    v = randn(gen, 1, 2, 9, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastmax(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    expected = fastmax_reference(q.bfloat16().double(), k.bfloat16().double(), v.double(), causal=True)
    assert rel_err(out, expected) < 3e-2
    with pytest.raises(TypeError, match="share one dtype"):
        fastmax(q, k, v)  # outside autocast, mixed dtypes are an error


@pytest.mark.parametrize("window", [None, 5])
def test_training_after_inference_mode_generation(window):
    """Generation runs under torch.inference_mode; constants the chunked path caches there (the
    pair indices of a head dim first seen then) must still serve a later backward."""
    D = 11  # a head dim no other test uses, so that inference mode makes the cache entry
    q, k, v = (torch.randn(1, 2, 300, D, dtype=torch.float32) for _ in range(3))  # N > F = 78: the linear tiling
    with torch.inference_mode():
        fastmax(q, k, v, causal=True, window=window, backend="chunked")
    q.requires_grad_()
    out = fastmax(q, k, v, causal=True, window=window, backend="chunked")
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all()

