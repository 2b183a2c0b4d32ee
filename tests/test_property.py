"""Property tests: random shapes and options against the float64 reference (issue 15).

``hypothesis`` draws B, Hq/Hk (grouped-query), Nq and Nk (1 to a few hundred, odd ones
included), D, Dv, causal, padding (fully padded rows included), p, the a's, scale, normalize
with lim, and dropout with drop_noise; forward and gradients must match the direct float64
form (``fastmax_reference``, which shares no attention code with the fast paths). The runs are
derandomized (the same examples every time, so CI is reproducible) and bounded in number (CI
stays fast); a failure shrinks to a minimal case that hypothesis prints.

The kernel's coefficients are drawn where f(s) > 0 on every reachable score (a positive
definite quadratic for p = 2; for p = 1, normalize with a lim small enough), so that no
denominator is near 0 and a relative tolerance means something; vanishing denominators have
their own tests (tests/test_validation.py).
"""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmax_hf import FastmaxOptions, fastmax, fastmax_reference
from fastmax_hf.chunked import chunked_attention
from fastmax_hf.recurrent import fastmax_step
from conftest import rel_err

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL_FORWARD, TOL_GRAD = 1e-10, 1e-8


@st.composite
def problems(draw, max_len=300):
    B = draw(st.integers(1, 2))
    Hk = draw(st.integers(1, 2))
    Hq = Hk * draw(st.integers(1, 3))
    Nq = draw(st.integers(1, max_len))
    Nk = draw(st.one_of(st.just(Nq), st.integers(1, max_len)))
    D = draw(st.integers(1, 8))
    Dv = draw(st.integers(1, 6))
    causal = draw(st.booleans())
    p = draw(st.sampled_from([1, 2]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.5)))
    effective_scale = D ** -0.5 if scale is None else scale
    a0 = draw(st.floats(0.5, 2.0))
    a1 = draw(st.floats(-1.0, 1.0))
    if p == 2:
        a2 = a1 * a1 / (4 * a0) + draw(st.floats(0.05, 1.0))  # a1^2 < 4 a0 a2: f(s) > 0 for every s
        normalize = draw(st.booleans())
        lim = draw(st.floats(0.5, 2.0))
    else:
        a2 = 0.5  # unused
        normalize = True  # |s| <= lim^2 scale, and f(s) >= a0 / 2 for that lim
        lim = min(2.0, math.sqrt(0.5 * a0 / max(abs(a1) * effective_scale, 1e-9)))
    padding = draw(st.sampled_from(["none", "random", "with_empty_row"]))
    dropout = draw(st.sampled_from([0.0, 0.0, 0.1, 0.4]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, Hq=Hq, Hk=Hk, Nq=Nq, Nk=Nk, D=D, Dv=Dv, causal=causal, p=p, scale=scale, a0=a0, a1=a1,
                a2=a2, normalize=normalize, lim=lim, padding=padding, dropout=dropout, seed=seed)


def _tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["B"], c["Hq"], c["Nq"], c["D"], generator=g, dtype=torch.float64)
    k = torch.randn(c["B"], c["Hk"], c["Nk"], c["D"], generator=g, dtype=torch.float64)
    v = torch.randn(c["B"], c["Hk"], c["Nk"], c["Dv"], generator=g, dtype=torch.float64)
    mask = None
    if c["padding"] != "none":
        mask = torch.rand(c["B"], c["Nk"], generator=g) > 0.3
        if c["padding"] == "with_empty_row":
            mask[-1] = False  # every query of the last batch row sees no key: 0, never NaN
    noise = torch.randn(c["B"], c["Hq"], c["Nq"], c["Dv"], generator=g, dtype=torch.float64)
    do = torch.randn(c["B"], c["Hq"], c["Nq"], c["Dv"], generator=g, dtype=torch.float64)
    return q, k, v, mask, noise, do


def _output_and_grads(function, q, k, v, do):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = function(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _options(c):
    return dict(scale=c["scale"], p=c["p"], a0=c["a0"], a1=c["a1"], a2=c["a2"], normalize=c["normalize"],
                lim=c["lim"])


def _check(got, expected):
    out, *grads = got
    ref_out, *ref_grads = expected
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < TOL_FORWARD
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < TOL_GRAD, name


@SETTINGS
@given(problems())
def test_fastmax_matches_the_reference(c):
    """The public function (backend="chunked", both tilings by the shape) with every option."""
    q, k, v, mask, noise, do = _tensors(c)
    kw = dict(causal=c["causal"], key_padding_mask=mask, dropout=c["dropout"], drop_noise=noise, **_options(c))
    got = _output_and_grads(lambda q, k, v: fastmax(q, k, v, backend="chunked", **kw), q, k, v, do)
    expected = _output_and_grads(lambda q, k, v: fastmax_reference(q, k, v, **kw), q, k, v, do)
    _check(got, expected)
    if c["padding"] == "with_empty_row":
        assert torch.all(got[0][-1] == 0)


@SETTINGS
@given(problems(max_len=150), st.sampled_from(["linear", "quadratic"]), st.integers(1, 70))
def test_both_tilings_at_any_chunk_size_match_the_reference(c, mode, chunk):
    """The chunked core in the tiling and chunk size drawn (normalize and dropout are stages
    around it, drawn in the test above)."""
    q, k, v, mask, _, do = _tensors(c)
    opts = _options(c) | dict(normalize=False)
    if c["p"] == 1:
        opts["lim"] = 1.0
        q = q * (0.5 / q.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # |s| small: f(s) > 0 without normalize
        k = k * (0.5 / k.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    options = FastmaxOptions.resolve(c["D"], **opts)
    kw = dict(causal=c["causal"], key_padding_mask=mask)
    got = _output_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, options, mode=mode, chunk_size=chunk, **kw)[0], q, k, v, do)
    expected = _output_and_grads(lambda q, k, v: fastmax_reference(q, k, v, **kw, **opts), q, k, v, do)
    _check(got, expected)


@SETTINGS
@given(problems(max_len=120), st.data())
def test_recurrent_steps_match_one_causal_pass(c, data):
    """Prefill and steps of random sizes (one token included) equal the causal reference."""
    q, k, v, mask, _, _ = _tensors(c | dict(Nk=c["Nq"]))
    N = c["Nq"]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, N - 1)), max_size=4, unique=True)))
    opts = _options(c)
    expected = fastmax_reference(q, k, v, causal=True, key_padding_mask=mask, **opts)
    outs, state = [], None
    for a, b in zip([0, *cuts], [*cuts, N]):
        if a >= b:
            continue
        step_mask = None if mask is None else mask[:, a:b]
        out, state = fastmax_step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, key_padding_mask=step_mask,
                                  **opts)
        outs.append(out)
    assert rel_err(torch.cat(outs, dim=2), expected) < TOL_FORWARD
