"""The hybrid window on the Triton kernels against the float64 reference (Triton's interpreter
on the CPU, the GPU when there is one).

In the quadratic regime both parts run in the same tiles (kernels/window_quadratic.py); in
the linear regime the rest runs on the linear kernels over the keys before the window and the
window kernel (kernels/window.py, the band of each query block) joins it. Tiles of 16 and chunks of 32 tokens (settings), so that a window spans several key
tiles, starts inside one, and (linear regime) the rest crosses chunk boundaries.
"""

import pytest
import torch

from fastmax_hf import fastmax, fastmax_reference
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.window import window_attention
from conftest import randn, rel_err

kernels = pytest.importorskip("fastmax_hf.kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(window_block_m=16, window_block_n=16, quad_fwd_block_m=16, quad_fwd_block_n=16,
             quad_dkdv_block_m=16, quad_dkdv_block_n=16, quad_dq_block_m=16, quad_dq_block_n=16,
             linear_chunk=32, linear_block_m=16, linear_block_n=16, linear_state_block_k=16)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}

# (B, Hq, Hk, Nq, Nk, D, Dv, W, pad, regime): odd lengths, Nq < Nk and Nq > Nk, GQA, padding
# with a fully padded row (B = 2), D padded to a power of 2, Dv != D, W = 1, W > N
CASES = [
    (1, 2, 1, 61, 61, 16, 16, 7, False, "quadratic"),
    (2, 4, 2, 45, 70, 16, 12, 20, True, "quadratic"),
    (1, 2, 2, 70, 45, 20, 16, 5, False, "quadratic"),
    (1, 2, 1, 30, 30, 16, 16, 64, False, "quadratic"),
    (2, 2, 1, 83, 83, 16, 16, 1, True, "linear"),
    (1, 4, 2, 50, 97, 16, 24, 33, False, "linear"),
    (1, 2, 2, 97, 64, 16, 16, 16, True, "linear"),
]


def _mask(gen, B, Nk):
    mask = torch.rand(B, Nk, generator=gen) > 0.25
    mask[0, : Nk // 3] = False  # left padding
    if B > 1:
        mask[-1] = False  # a row with no key: its output must be 0
    return mask.to(DEVICE)


def _triton_window(q, k, v, options, mask, regime):
    with kernels.settings(**SMALL):
        out, den = window_attention(q, k, v, options, key_padding_mask=mask, mode=regime, implementation="triton")
    return out, den


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}/{}-N{}x{}-D{}-Dv{}-W{}-pad{}-{}".format(*c))
def test_window_kernels_match_the_reference(gen, case, dtype):
    B, Hq, Hk, Nq, Nk, D, Dv, W, pad, regime = case
    q, k, v = (randn(gen, *s).to(DEVICE) for s in ((B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv)))
    mask = _mask(gen, B, Nk) if pad else None
    options = FastmaxOptions(scale=0.3, window=W)
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    exact = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    out, _ = _triton_window(*low, options, mask, regime)
    expected = fastmax_reference(*exact, causal=True, key_padding_mask=mask, scale=0.3, window=W)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, expected) < TOL[dtype]
    if pad and B > 1:
        assert torch.all(out[-1] == 0)
    do = randn(gen, *expected.shape).to(DEVICE)
    with kernels.settings(**SMALL):
        got = torch.autograd.grad(out, low, do.to(dtype))
    want = torch.autograd.grad(expected, exact, do)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], "d" + name


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "quadratic"],
                         ids=lambda c: "B{}-H{}/{}-N{}x{}-D{}-Dv{}-W{}-pad{}".format(*c[:-1]))
def test_the_key_block_kernel_that_also_adds_dq(gen, case):
    """quad_dq_fused (what bf16 at D=128 runs on a Hopper GPU): the row-terms kernel, then one
    key-block kernel that adds every band and rest tile's dq to an fp32 accumulator (pointer
    atomics here, a TMA reduction there), with a learned per-head gain and its gradient."""
    B, Hq, Hk, Nq, Nk, D, Dv, W, pad, _ = case
    q, k, v = (randn(gen, *s).to(DEVICE) for s in ((B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv)))
    mask = _mask(gen, B, Nk) if pad else None
    gain = (0.5 + torch.rand(Hq, generator=gen)).to(DEVICE).requires_grad_()
    gain64 = gain.detach().double().requires_grad_()
    low = [x.float().requires_grad_() for x in (q, k, v)]
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    options = FastmaxOptions(scale=0.3, window=W, window_gain=gain)
    expected = fastmax_reference(*exact, causal=True, key_padding_mask=mask, scale=0.3, window=W, window_gain=gain64)
    do = randn(gen, *expected.shape).to(DEVICE)
    with kernels.settings(**SMALL, quad_dq_fused=True):
        out, _ = window_attention(*low, options, key_padding_mask=mask, mode="quadratic", implementation="triton")
        got = torch.autograd.grad(out, (*low, gain), do.float())
    want = torch.autograd.grad(expected, (*exact, gain64), do)
    assert rel_err(out, expected) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dgain"), got, want):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_first_order_kernel_and_a_learned_gain(gen, regime):
    """p = 1 with other coefficients, and a per-head gain gamma that gets its gradient."""
    B, Hq, Hk, N, D, W = 1, 4, 2, 77, 16, 9
    q, k, v = (randn(gen, B, h, N, D).to(DEVICE) for h in (Hq, Hk, Hk))
    gain = torch.tensor([0.5, 1.0, 2.0, 1.5], device=DEVICE, requires_grad=True)
    gain64 = gain.detach().double().requires_grad_()
    kw = dict(scale=0.25, p=1, a0=6.0, a1=1.0, a2=0.0)
    options = FastmaxOptions(window=W, window_gain=gain, **kw)
    qs, ks, vs = (x.float().requires_grad_() for x in (q, k, v))
    out, _ = _triton_window(qs, ks, vs, options, None, regime)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    expected = fastmax_reference(*exact, causal=True, window=W, window_gain=gain64, **kw)
    assert rel_err(out, expected) < 1e-4
    do = randn(gen, *expected.shape).to(DEVICE)
    with kernels.settings(**SMALL):
        got = torch.autograd.grad(out, (qs, ks, vs, gain), do.float())
    want = torch.autograd.grad(expected, (*exact, gain64), do)
    for name, a, b in zip(("dq", "dk", "dv", "dgain"), got, want):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("regime", ["quadratic", "quadratic-fused-dq", "linear"])
@pytest.mark.parametrize("kind", ["nan_value", "inf_key"])
def test_a_later_nonfinite_token_leaves_earlier_rows_exact(gen, regime, kind):
    """A NaN value or inf key at position j (inside a window tile and, for the rest, inside a
    chunk) leaves the outputs of the queries before j, and the gradients of the positions
    before j under a loss that reads only those queries, exactly as with j made finite
    (quadratic-fused-dq: dq added by the key-block kernel, ``quad_dq_fused``)."""
    fused = regime == "quadratic-fused-dq"
    regime = "quadratic" if fused else regime
    B, H, N, D, W, j = 1, 2, 90, 16, 12, 50
    q, k, v = (randn(gen, B, H, N, D).float().to(DEVICE) for _ in range(3))
    options = FastmaxOptions(scale=0.4, window=W)
    k_bad, v_bad = k.clone(), v.clone()
    if kind == "nan_value":
        v_bad[0, 0, j, 1] = float("nan")
    else:
        k_bad[0, 0, j, 0] = float("inf")
    do = randn(gen, B, H, j, D).float().to(DEVICE)

    def run(k, v):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out, _ = _triton_window(qs, ks, vs, options, None, regime)
        with kernels.settings(**SMALL, quad_dq_fused=fused):
            grads = torch.autograd.grad((out[:, :, :j] * do).sum(), (qs, ks, vs))
        return (out.detach(), *grads)

    bad, clean = run(k_bad, v_bad), run(k, v)
    assert torch.isfinite(bad[0][:, :, :j]).all()
    assert torch.equal(bad[0][:, :, :j], clean[0][:, :, :j])
    assert torch.equal(bad[1][:, :, :j], clean[1][:, :, :j])  # dq of the earlier queries
    for a, b in zip(bad[2:], clean[2:]):  # dk, dv of the earlier keys
        assert torch.equal(a[:, :, :j], b[:, :, :j])
    assert not torch.isfinite(bad[0][0, 0, j:]).all()  # the token reaches the queries that see it


def test_the_public_function_takes_the_kernels_for_a_window(gen, monkeypatch):
    """fastmax(..., window=W, backend="triton") runs the window kernels (counted), and gives
    what the chunked form gives."""
    from fastmax_hf.kernels import window_ops

    calls = []
    for name in ("window_forward", "fused_quadratic_forward"):  # the linear and the quadratic regime's
        original = getattr(window_ops, name)
        monkeypatch.setattr(window_ops, name, lambda *a, _original=original, **kw: calls.append(1) or _original(*a, **kw))
    q, k, v = (randn(gen, 1, 2, 40, 16).float().to(DEVICE) for _ in range(3))
    with kernels.settings(**SMALL):
        out = fastmax(q, k, v, causal=True, window=6, backend="triton")
    assert calls
    chunked = fastmax(q, k, v, causal=True, window=6, backend="chunked")
    assert rel_err(out, chunked.double()) < 1e-5


def test_a_number_gain_is_made_once_and_survives_inference_mode(gen):
    """A number gamma becomes its (Hq,) tensor once per value, head count and device (host time
    of short calls), made outside inference mode: a first call under torch.inference_mode must
    not leave an inference tensor that a later call with gradients would save for backward."""
    from fastmax_hf.kernels import window_ops

    window_ops._constant_gain.cache_clear()
    q, k, v = (randn(gen, 1, 3, 37, 16).float().to(DEVICE) for _ in range(3))
    options = FastmaxOptions(scale=0.3, window=5, window_gain=0.75)
    with torch.inference_mode(), kernels.settings(**SMALL):
        first = kernels.triton_window_attention(q, k, v, options, window=5, regime="quadratic")[0]
    gain = window_ops._constant_gain(0.75, 3, str(q.device))
    assert not gain.is_inference() and gain.tolist() == [0.75] * 3
    assert window_ops._constant_gain.cache_info().hits >= 1  # the call above made it; this read it
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    with kernels.settings(**SMALL):
        out = kernels.triton_window_attention(*xs, options, window=5, regime="quadratic")[0]
        grads = torch.autograd.grad(out.sum(), xs)
    assert torch.equal(out.detach(), first)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    expected = fastmax_reference(*exact, causal=True, scale=0.3, window=5, window_gain=0.75)
    assert rel_err(out, expected) < 1e-4
    for a, b in zip(grads, torch.autograd.grad(expected.sum(), exact)):
        assert rel_err(a, b) < 1e-4
    assert gain.tolist() == [0.75] * 3  # never written


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_the_custom_operators_shapes_schema_and_autograd(gen, regime):
    """fastmax_hf::window_forward / window_backward: fake shapes equal the real ones (the rest's
    output and the key states included, where they are kept), and opcheck's schema, fake-tensor
    and autograd-registration checks pass."""
    from fastmax_hf.kernels import window_ops

    B, Hq, Hk, N, D, Dv, W = 1, 4, 2, 70, 16, 12, 9
    q, k = randn(gen, B, Hq, N, D).to(DEVICE), randn(gen, B, Hk, N, D).to(DEVICE)
    v = randn(gen, B, Hk, N, Dv).to(DEVICE)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    gain = torch.full((Hq,), 0.8, device=DEVICE).requires_grad_()
    mask = _mask(gen, B, N)
    with kernels.settings(**SMALL, linear_keep_states=True):
        keep_chunk = window_ops._keep_chunk_of(q, k, v, 2, W, regime, True)
        assert keep_chunk == (32 if regime == "linear" else 0)
        args = (q, k, v, mask, gain, 0.3, 2, 1.0, 1.0, 0.5, W, regime, keep_chunk, True)
        real = torch.ops.fastmax_hf.window_forward(*args)
        meta = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in args]
        fake = torch.ops.fastmax_hf.window_forward(*meta)
        assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]
        out, den_m, out_r, den_r, H, Z = real
        assert den_m.shape == (2, B, Hq, N)
        # the rest's output and its key states exist in the linear regime only
        assert [t.numel() > 0 for t in (out_r, den_r, H, Z)] == [regime == "linear"] * 4
        torch.library.opcheck(torch.ops.fastmax_hf.window_forward.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_under_torch_compile_the_kernels_run(gen, monkeypatch, regime):
    """A compiled call (fullgraph) runs the window's kernels through the custom operators, with
    the eager Function's output and gradients in q, k, v and a learned gain, both within the
    kernels' tolerance of float64; nothing falls back to the PyTorch parts."""
    from fastmax_hf.kernels import window_ops
    import fastmax_hf.window as window_module

    calls = []
    for name in ("window_forward", "fused_quadratic_forward"):  # the linear and the quadratic regime's
        original = getattr(window_ops, name)
        monkeypatch.setattr(window_ops, name, lambda *a, _original=original, **kw: calls.append(1) or _original(*a, **kw))
    monkeypatch.setattr(window_module, "_WindowPart", None)  # the PyTorch parts: never reached
    B, Hq, Hk, N, D, W = 2, 4, 2, 75, 16, 11
    q, k, v = (randn(gen, B, h, N, D).to(DEVICE).float().requires_grad_() for h in (Hq, Hk, Hk))
    mask = _mask(gen, B, N)
    gain = torch.linspace(0.5, 1.5, Hq, device=DEVICE).requires_grad_()
    do = randn(gen, B, Hq, N, D).to(DEVICE).float()

    def attend(q, k, v, gain):
        options = FastmaxOptions(scale=0.3, window=W, window_gain=gain)
        return window_attention(q, k, v, options, key_padding_mask=mask, mode=regime, implementation="triton")[0]

    with kernels.settings(**SMALL):
        eager = attend(q, k, v, gain)
        want = torch.autograd.grad(eager, (q, k, v, gain), do)
        calls.clear()
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, gain)
        assert calls, "the compiled call ran no window kernel"
        got = torch.autograd.grad(compiled, (q, k, v, gain), do)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv", "dgain"), got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    exact = [x.detach().double().requires_grad_() for x in (q, k, v, gain)]
    expected = fastmax_reference(*exact[:3], causal=True, key_padding_mask=mask, scale=0.3, window=W,
                                 window_gain=exact[3])
    assert rel_err(compiled, expected) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dgain"), got, torch.autograd.grad(expected, exact, do.double())):
        assert rel_err(a, b) < 1e-4, name


def test_the_public_function_compiles_with_a_window(gen):
    """``fastmax(..., window=W)`` with a number gain compiles without a graph break."""
    q, k, v = (randn(gen, 1, 2, 40, 16).to(DEVICE).float() for _ in range(3))

    def layer(q, k, v):
        return fastmax(q, k, v, causal=True, backend="triton", window=5, window_gain=0.7, scale=0.3)

    with kernels.settings(**SMALL):
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
        want = layer(q, k, v)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_tensor_gain_compiles_and_is_still_checked(gen):
    """A tensor gain is value-checked by a traced assertion under torch.compile (no host read,
    so fullgraph compiles) and a non-positive one is still an error naming the argument."""
    q, k, v = (randn(gen, 1, 2, 40, 16).to(DEVICE).float() for _ in range(3))

    def layer(q, k, v, gain):
        return fastmax(q, k, v, causal=True, backend="triton", window=5, window_gain=gain, scale=0.3)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with kernels.settings(**SMALL):
        good = torch.tensor([0.7, 1.3], device=DEVICE)
        assert torch.allclose(compiled(q, k, v, good), layer(q, k, v, good), rtol=1e-6, atol=1e-6)
        if DEVICE == "cpu":  # on a GPU a failed device-side assertion ends the process's CUDA context
            with pytest.raises(RuntimeError, match="window_gain"):
                compiled(q, k, v, torch.tensor([0.7, -1.0], device=DEVICE))


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_tiles_of_unequal_sides_per_kernel(gen, regime):
    """Query and key tiles of different sides in each kernel (the band's alignment to key tiles,
    the key-block kernel's split into band rows and later rows), with padding, GQA and Nk > Nq,
    and a window wider than a tile but not a multiple of one."""
    B, Hq, Hk, Nq, Nk, D, W = 2, 4, 2, 75, 101, 16, 21
    q, k, v = (randn(gen, *s).to(DEVICE) for s in ((B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, D)))
    mask = _mask(gen, B, Nk)
    options = FastmaxOptions(scale=0.3, window=W)
    low = [x.float().requires_grad_() for x in (q, k, v)]
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    expected = fastmax_reference(*exact, causal=True, key_padding_mask=mask, scale=0.3, window=W)
    do = randn(gen, *expected.shape).to(DEVICE)
    tiles = dict(SMALL, window_block_m=32, window_block_n=16, quad_fwd_block_m=32, quad_fwd_block_n=16,
                 quad_dq_block_m=16, quad_dq_block_n=32, quad_dkdv_block_m=32, quad_dkdv_block_n=16,
                 linear_block_m=32)
    with kernels.settings(**tiles):
        out, _ = window_attention(*low, options, key_padding_mask=mask, mode=regime, implementation="triton")
        got = torch.autograd.grad(out, low, do.float())
    want = torch.autograd.grad(expected, exact, do)
    assert rel_err(out, expected) < 1e-4
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-4, "d" + name


def test_linear_rest_in_head_groups_adds_into_the_window_gradients(gen):
    """The rest's backward over groups of key/value heads (the scratch budget) with B = 2, so
    that each group's gradients are strided views, written by adding to the window's own
    gradients in place (dk and dv over the rest's keys only)."""
    from fastmax_hf.kernels import ops

    B, Hq, Hk, N, D, W = 2, 6, 3, 70, 16, 11
    q, k, v = (randn(gen, B, h, N, D).to(DEVICE) for h in (Hq, Hk, Hk))
    mask = _mask(gen, B, N)
    options = FastmaxOptions(scale=0.3, window=W)
    low = [x.float().requires_grad_() for x in (q, k, v)]
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    expected = fastmax_reference(*exact, causal=True, key_padding_mask=mask, scale=0.3, window=W)
    do = randn(gen, *expected.shape).to(DEVICE)
    with kernels.settings(**SMALL, scratch_min_bytes=1, scratch_fraction=0.0):  # one key/value head per launch
        assert ops.heads_per_launch(q, k, v) == 1
        out, _ = window_attention(*low, options, key_padding_mask=mask, mode="linear", implementation="triton")
        got = torch.autograd.grad(out, low, do.float())
    want = torch.autograd.grad(expected, exact, do)
    assert rel_err(out, expected) < 1e-4
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-4, "d" + name
