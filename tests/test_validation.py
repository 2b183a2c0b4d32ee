"""Bad input gets a clear error naming the argument; vanishing denominators are refused."""

import pytest
import torch

from fastmax_hf import FASTMultiHeadAttention, fastmax, fastmax_function, rpe_matrix_creator


def qkv(B=2, Hq=4, Hk=2, Nq=5, Nk=7, D=4, Dv=3, dtype=torch.float32):
    return torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hk, Nk, D, dtype=dtype), torch.randn(B, Hk, Nk, Dv, dtype=dtype)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "`k` must be 3-D"),
        (lambda q, k, v: (q[None], k, v), ValueError, "`q` must have 3 dims"),
        (lambda q, k, v: (q, k[:1], v), ValueError, "batch sizes"),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, "heads"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple"),
        (lambda q, k, v: (q, k, v[:, :, :2]), ValueError, "`k` has 7 tokens but `v` has 2"),
        (lambda q, k, v: (q[..., :3], k, v), ValueError, "head dim"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "`q` has dtype torch.int64"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "`q` must be a torch.Tensor"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "different devices"),
    ],
)
def test_bad_tensors(change, error, words):
    q, k, v = change(*qkv())
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastmax(q, k, v)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(p=3), ValueError, "`p` must be 1 or 2"),
        (dict(p=True), ValueError, "`p` must be 1 or 2"),
        (dict(dropout=1.0), ValueError, "`dropout`"),
        (dict(dropout=-0.1), ValueError, "`dropout`"),
        (dict(a1=float("nan")), TypeError, "`a1`"),
        (dict(a0="1"), TypeError, "`a0`"),
        (dict(lim=0.0), ValueError, "`lim`"),
        (dict(scale=float("inf")), TypeError, "`scale`"),
        (dict(backend="cuda"), ValueError, "`backend`"),
        (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "`key_padding_mask` must have dtype torch.bool"),
        (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "`key_padding_mask` must have shape"),
        (dict(key_padding_mask=[[True] * 7] * 2), TypeError, "`key_padding_mask`"),
        (dict(drop_noise=torch.randn(3, 3), dropout=0.1), ValueError, "`drop_noise`"),
        (dict(rpe_matrix=torch.randn(12, 4)), ValueError, "`rpe_matrix` must have shape"),
        (dict(rpe_matrix=torch.randn(13, 4), backend="chunked"), ValueError, "backend='reference'"),
    ],
)
def test_bad_options(kwargs, error, words):
    q, k, v = qkv()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastmax(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_vanishing_denominator_is_an_error(backend):
    q, k, v = qkv(B=1, Hq=1, Hk=1, Nq=3, Nk=4, dtype=torch.float64)
    k = -q[:, :, :1].expand(-1, -1, 4, -1).clone()  # every score of query 0 is -|q_0|^2 < 0
    with pytest.raises(ValueError, match="denominator"):
        # p=1 without normalize: f(s) = 1 + s is negative once s < -1
        fastmax(q * 10, k * 10, v, p=1, backend=backend, scale=1.0)


def test_positive_kernels_need_no_check():
    q, k, v = qkv()
    out = fastmax(q * 100, k * 100, v)  # the default quadratic is >= 0.5 everywhere
    assert torch.isfinite(out).all()
    # p=1 with normalize and lim small enough: |s| <= lim^2 scale < 1 keeps 1 + s > 0
    out = fastmax(q * 100, k * 100, v, p=1, normalize=True, lim=0.9, scale=1.0)
    assert torch.isfinite(out).all()


def test_seed_api_matches_fastmax():
    q, k, v = (torch.randn(12, 9, 4, dtype=torch.float64) for _ in range(3))
    for use_custom_gradient in (True, False):
        attn = FASTMultiHeadAttention(use_custom_gradient=use_custom_gradient)
        for mask in (False, True):
            got = attn(q, k, v, mask=mask, temperature=2.5, a0=1.0, a1=0.9, a2=0.4, normalize=True, lim=1.1)
            expected = fastmax(q, k, v, causal=mask, scale=1 / 2.5, a1=0.9, a2=0.4, normalize=True, lim=1.1,
                               backend="reference")
            assert got.shape == q.shape
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    q4 = q.reshape(3, 4, 9, 4)
    assert FASTMultiHeadAttention()(q4, q4, q4).shape == q4.shape


def test_seed_api_dropout_only_in_training():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    noise = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    attn = FASTMultiHeadAttention()
    trained = attn(q, k, v, drop_noise=noise, dropout=0.3)
    plain = fastmax_function(q, k, v)
    assert torch.allclose(trained, plain * (1 + 0.3 * noise))
    attn.eval()
    assert torch.allclose(attn(q, k, v, drop_noise=noise, dropout=0.3), plain)


def test_seed_api_rpe(gen=None):
    q, k, v = (torch.randn(4, 6, 3, dtype=torch.float64) for _ in range(3))
    rpe = rpe_matrix_creator(6, 3, "cpu", torch.float64, structured=True)
    got = FASTMultiHeadAttention()(q, k, v, rpe_matrix=rpe)
    without = FASTMultiHeadAttention()(q, k, v)
    assert got.shape == q.shape and not torch.allclose(got, without)
    with pytest.raises(ValueError, match="`temperature`"):
        fastmax_function(q, k, v, temperature=0)


def test_triton_backend_refuses_float64():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*float64"):
        fastmax(q, k, v, backend="triton")


# ---------------------------------------------------------------------------------------------
# Flags are bools (issue 15): anything else is a TypeError naming the argument, never truthiness
# ---------------------------------------------------------------------------------------------

NOT_BOOLS = ["no", "", 0, 1, 1.0, None, [True], torch.tensor(True), torch.tensor(1)]
try:  # NumPy is not a dependency; where it is installed its bools are refused like the others
    import numpy

    NOT_BOOLS.append(numpy.bool_(True))
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("flag", ["causal", "normalize"])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_fastmax_flags_take_only_bools(flag, value, backend):
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match=f"`{flag}` must be a bool"):
        fastmax(q, k, v, backend=backend, **{flag: value})


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("flag", ["causal", "normalize", "return_denominator"])
def test_reference_flags_take_only_bools(flag, value):
    from fastmax_hf import fastmax_reference

    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match=f"`{flag}` must be a bool"):
        fastmax_reference(q, k, v, **{flag: value})


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_step_and_options_flags_take_only_bools(value):
    from fastmax_hf import FastmaxOptions
    from fastmax_hf.recurrent import fastmax_step

    q, k, v = qkv(Hk=4, Nk=5, dtype=torch.float64)
    with pytest.raises(TypeError, match="`normalize` must be a bool"):
        fastmax_step(q, k, v, None, normalize=value)
    with pytest.raises(TypeError, match="`normalize` must be a bool"):
        FastmaxOptions(scale=0.5, normalize=value)


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("flag", ["mask", "normalize", "use_custom_gradient"])
def test_seed_api_flags_take_only_bools(flag, value):
    q = torch.randn(6, 5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"`{flag}` must be a bool"):
        fastmax_function(q, q, q, **{flag: value})
    if flag == "use_custom_gradient":
        with pytest.raises(TypeError, match="`use_custom_gradient` must be a bool"):
            FASTMultiHeadAttention(use_custom_gradient=value)
    else:
        with pytest.raises(TypeError, match=f"`{flag}` must be a bool"):
            FASTMultiHeadAttention()(q, q, q, **{flag: value})


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("flag", ["structured", "is_zero"])
def test_rpe_matrix_creator_flags_take_only_bools(flag, value):
    with pytest.raises(TypeError, match=f"`{flag}` must be a bool"):
        rpe_matrix_creator(4, 3, "cpu", torch.float32, **{flag: value})


def test_causal_no_is_not_causal_but_an_error():
    """The issue's case: causal="no" used to be read as truthy, i.e. causal."""
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="`causal` must be a bool.*'no'"):
        fastmax(q, k, v, causal="no")
    # real bools still work, and mean what they say
    assert torch.equal(fastmax(q, k, v, causal=False), fastmax(q, k, v))
