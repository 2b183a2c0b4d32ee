"""The Triton kernels against the float64 reference (Triton's interpreter when there is no GPU).

bf16 cannot be checked in the interpreter (it returns garbage there); tools/check_kernels.py
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
    out, den, H, Z = torch.ops.fastmax_hf.forward(q, k, v, None, True, 0.25, 2, 1.0, 1.0, 0.5, "linear")
    assert out.shape == (2, 4, 10, 8) and out.device.type == "meta" and den.shape == (2, 4, 10)
    assert H.numel() == 0 and Z.numel() == 0  # nothing kept unless the call says so
    from fastmax_hf.kernels import ops

    _, _, H, Z = torch.ops.fastmax_hf.forward(q, k, v, None, True, 0.25, 2, 1.0, 1.0, 0.5, "linear", 512)
    rows = ops.feature_rows(16, 2)
    assert H.shape == (4, 1, rows, 8) and Z.shape == (4, 1, rows) and H.dtype == torch.float32

    (q, k, v), _, mask = inputs(gen, 1, 2, 1, 20, 20, 16, 16, torch.float32)
    for args in ((q, k, v, mask, True, 0.25, 2, 1.0, 1.0, 0.5, "quadratic"),
                 (q, k, v, mask, True, 0.25, 2, 1.0, 1.0, 0.5, "linear", ops.key_states_chunk(q, k, v, 2, True))):
        torch.library.opcheck(torch.ops.fastmax_hf.forward.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def layer(q, k, v):
        return fastmax(q, k, v, causal=True, key_padding_mask=mask, backend="triton").sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), layer(q, k, v))


def test_the_decoding_step_compiles_without_a_graph_break(gen):
    """triton_step under torch.compile goes through fastmax_hf::step: fullgraph compiles, the
    fake implementation gives the shapes, and the compiled step equals the eager one."""
    from fastmax_hf.kernels import empty_state, triton_step

    B, Hq, Hk, D, Dv = 2, 4, 2, 16, 8
    options = FastmaxOptions(scale=0.25)
    S, z = empty_state(B, Hk, D, Dv, 2, torch.device(DEVICE))
    prompt = [randn(gen, B, h, 9, d).float().to(DEVICE) for h, d in ((Hq, D), (Hk, D), (Hk, Dv))]
    _, S, z = triton_step(*prompt, S, z, options)
    token = [randn(gen, B, h, 1, d).float().to(DEVICE) for h, d in ((Hq, D), (Hk, D), (Hk, Dv))]

    def step(q, k, v, S, z):
        return triton_step(q, k, v, S, z, options)

    want = step(*token, S, z)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*token, S, z)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    meta = [torch.empty(x.shape, device="meta") for x in (*token, S, z)]
    out, S_new, z_new = torch.ops.fastmax_hf.step(*meta, None, 0.25, 2, 1.0, 1.0, 0.5)
    assert out.shape == (B, Hq, 1, Dv) and S_new.shape == S.shape and z_new.shape == z.shape


# (B, Hq, Hk, Nq, Nk, D, Dv): several chunks of 32 keys, chunk boundaries that the causal
# offset Nk - Nq does not align with, both directions of Nq != Nk, GQA, a query row alone
CHUNKED_SHAPES = [
    (1, 2, 1, 150, 150, 16, 16),
    (2, 2, 2, 60, 130, 20, 12),
    (1, 4, 2, 110, 70, 16, 24),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CHUNKED_SHAPES)
def test_linear_kernels_across_chunks(gen, causal, shape):
    """The per-chunk states, the scans over chunks and the readouts, with chunks of 32 keys.

    Query blocks of 16 rows over key blocks of 32: a query block can start inside a key
    block, and only whole key blocks before it may skip the causal mask. State steps of 16 rows."""
    chunked = dict(linear_chunk=32, linear_block_m=16, linear_block_n=32, linear_state_block_k=16)
    for dtype, p, coeffs, padded in ((torch.float32, 2, (1.0, 1.0, 0.5), False), (torch.float16, 2, (2.0, 0.7, 0.3), True),
                                     (torch.float32, 1, (8.0, 0.5, 0.0), True)):
        (q, k, v), (qe, ke, ve), mask = inputs(gen, *shape, dtype)
        mask = mask if padded else None  # without padding the tiles before the diagonal run unmasked
        opts = dict(causal=causal, key_padding_mask=mask, scale=0.3, p=p, a0=coeffs[0], a1=coeffs[1], a2=coeffs[2])
        expected = fastmax_reference(qe, ke, ve, **opts)
        do = randn(gen, *expected.shape).to(DEVICE)
        with kernels.settings(**chunked):
            out, _ = triton_attention(q, k, v, FastmaxOptions(scale=0.3, p=p, a0=coeffs[0], a1=coeffs[1], a2=coeffs[2]),
                                      causal=causal, key_padding_mask=mask, regime="linear")
            got = torch.autograd.grad(out, (q, k, v), do.to(dtype))
        assert rel_err(out, expected) < TOL[dtype], (dtype, p)
        want = torch.autograd.grad(expected, (qe, ke, ve), do)
        for name, a, b in zip("qkv", got, want):
            assert rel_err(a, b) < TOL[dtype], (dtype, p, "d" + name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CHUNKED_SHAPES)
def test_kept_key_states_give_the_recomputed_gradients(gen, causal, shape, monkeypatch):
    """The forward's key states, kept for the backward, are the ones it would recompute: the
    same gradients to the bit, with one state pass fewer in the backward (the dq readout reads
    them; the dk/dv readout's query-side states are still computed)."""
    from fastmax_hf.kernels import ops

    passes = []
    real = ops._chunk_states
    monkeypatch.setattr(ops, "_chunk_states", lambda *a, **kw: passes.append(kw["is_query"]) or real(*a, **kw))
    chunked = dict(linear_chunk=32, linear_block_m=16, linear_block_n=32, linear_state_block_k=16)
    (q, k, v), (qe, ke, ve), mask = inputs(gen, *shape, torch.float32)
    expected = fastmax_reference(qe, ke, ve, causal=causal, key_padding_mask=mask, scale=0.3)
    do = randn(gen, *expected.shape).to(DEVICE).float()
    grads = {}
    for keep in (False, True):
        passes.clear()
        with kernels.settings(**chunked, linear_keep_states=keep):
            out, _ = triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=causal, key_padding_mask=mask,
                                      regime="linear")
            assert passes == [False]
            grads[keep] = torch.autograd.grad(out, (q, k, v), do)
        assert passes == ([False, True] if keep else [False, False, True])
        assert rel_err(out, expected) < 1e-4
    want = torch.autograd.grad(expected, (qe, ke, ve), do)
    for name, kept, recomputed, exact in zip("qkv", grads[True], grads[False], want):
        assert torch.equal(kept, recomputed), "d" + name
        assert rel_err(kept, exact) < 1e-4, "d" + name


def test_the_compiled_call_keeps_the_key_states_too(gen, monkeypatch):
    """Under torch.compile the custom operator returns the kept states beside its output and its
    backward reads them: the eager gradients to the bit, one state pass fewer than recomputing."""
    from fastmax_hf.kernels import ops

    passes = []
    real = ops._chunk_states
    monkeypatch.setattr(ops, "_chunk_states", lambda *a, **kw: passes.append(kw["is_query"]) or real(*a, **kw))
    (q, k, v), _, mask = inputs(gen, 1, 2, 1, 70, 70, 16, 16, torch.float32)
    do = randn(gen, 1, 2, 70, 16).to(DEVICE).float()

    def attend(q, k, v):
        return triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=True, key_padding_mask=mask,
                                regime="linear")[0]

    with kernels.settings(linear_chunk=32, linear_block_m=16, linear_block_n=32, linear_state_block_k=16,
                          linear_keep_states=True):
        assert ops.key_states_chunk(q, k, v, 2, True) == 32
        want = torch.autograd.grad(attend(q, k, v), (q, k, v), do)
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v)
        passes.clear()
        got = torch.autograd.grad(out, (q, k, v), do)
        assert passes == [True]  # the backward built only the query-side states
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_key_states_are_kept_only_where_they_are_small():
    """The default: without a causal mask (one total state per head) always; with it while the
    per-chunk states take no more memory than q, k, v, o and their gradients; never without a
    gradient."""
    from fastmax_hf.kernels import ops

    def problem(N, D, Hq=16, Hk=16):
        q = torch.empty(1, Hq, N, D, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, Hk, N, D, dtype=torch.bfloat16, device="meta")
        return ops._Problem.of(q, k, k)

    assert ops.keeps_key_states(problem(65536, 128), 2, False, 1024)
    assert ops.keeps_key_states(problem(65536, 64), 2, True, 1024)  # 355 MB of states, 1.07 GB of q, k, v, o, grads
    assert ops.keeps_key_states(problem(16384, 64), 2, True, 512)  # 177 MB against 268 MB
    assert not ops.keeps_key_states(problem(65536, 128), 2, True, 1024)  # 2.5 GB against 2.1 GB
    assert ops.keeps_key_states(problem(65536, 128, 32, 8), 2, True, 4096)  # GQA: states per key/value head
    with kernels.settings(linear_keep_states=True):
        assert ops.keeps_key_states(problem(65536, 128), 2, True, 1024)
    with kernels.settings(linear_keep_states=False):
        assert not ops.keeps_key_states(problem(65536, 64), 2, False, 1024)
    # no gradient asked for: nothing is kept
    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    out, den, states = ops.linear_forward_keeping(q, k, v, None, False, 0.3, 2, 1.0, 1.0, 0.5, keep=False)
    assert states is None
    out2, den2, states = ops.linear_forward_keeping(q, k, v, None, False, 0.3, 2, 1.0, 1.0, 0.5, keep=True)
    assert torch.equal(out, out2) and states.H.shape[1] == 1 and states.nbytes > 0


@pytest.mark.parametrize("fused", [False, True], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("causal", [False, True])
def test_quadratic_kernels_whole_and_diagonal_blocks(gen, causal, fused):
    """Tiles of 16 x 16: key blocks that every query of a block sees run unmasked, the diagonal
    and the ragged end masked; Nq < Nk and Nq > Nk shift the diagonal off the block grid; GQA
    sums several query heads into one key block's program. Both backward forms: the separate
    dq kernel, and dq added by the key-block kernel (pointer atomics here, TMA on a GPU)."""
    small = dict(quad_fwd_block_m=32, quad_fwd_block_n=16, quad_dkdv_block_m=16, quad_dkdv_block_n=32,
                 quad_dq_block_m=16, quad_dq_block_n=32, quad_dq_fused=fused)
    for shape in ((1, 2, 1, 75, 101, 16, 16), (1, 2, 2, 101, 67, 32, 16), (2, 4, 2, 40, 40, 24, 16)):
        for mask_on in (False, True):
            (q, k, v), (qe, ke, ve), mask = inputs(gen, *shape, torch.float32)
            mask = mask if mask_on else None
            opts = dict(causal=causal, key_padding_mask=mask, scale=0.3)
            expected = fastmax_reference(qe, ke, ve, **opts)
            do = randn(gen, *expected.shape).to(DEVICE)
            with kernels.settings(**small):
                out, _ = triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=causal, key_padding_mask=mask,
                                          regime="quadratic")
                got = torch.autograd.grad(out, (q, k, v), do.float())
            assert rel_err(out, expected) < 1e-4
            want = torch.autograd.grad(expected, (qe, ke, ve), do)
            for name, a, b in zip("qkv", got, want):
                assert rel_err(a, b) < 1e-4, (shape, mask_on, "d" + name)


def test_eager_function_and_custom_operator_agree(gen):
    """Eager calls take an autograd Function, torch.compile the custom operator: same numbers,
    with the operator keeping the key states for its backward and without."""
    from fastmax_hf.kernels import ops

    assert ops.key_states_chunk(*inputs(gen, 1, 2, 1, 30, 30, 16, 16, torch.float32)[0], 2, True) > 0
    (q, k, v), _, mask = inputs(gen, 1, 2, 1, 30, 30, 16, 16, torch.float32)
    do = randn(gen, 1, 2, 30, 16).to(DEVICE).float()
    for regime in ("quadratic", "linear"):
        out, den = triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=True, key_padding_mask=mask,
                                    regime=regime)
        for keep_chunk in ((0, ops.key_states_chunk(q, k, v, 2, True)) if regime == "linear" else (0,)):
            op_out, op_den, _, _ = torch.ops.fastmax_hf.forward(q, k, v, mask, True, 0.3, 2, 1.0, 1.0, 0.5, regime,
                                                                keep_chunk)
            assert torch.equal(out, op_out) and torch.equal(den, op_den)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                            torch.autograd.grad(op_out, (q, k, v), do)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("N, D, Hq, Hk", [
    (262144, 64, 16, 16), (1048576, 64, 16, 16), (1048576, 128, 16, 16), (1048576, 64, 32, 8), (1048576, 64, 5, 5),
    (4096, 128, 8, 8),
])
def test_linear_plan_keeps_states_within_the_budget(N, D, Hq, Hk):
    """Per-chunk states of a launch fit the scratch budget; groups are as large and as even as it allows."""
    from fastmax_hf.kernels import ops

    q = torch.empty(1, Hq, N, D, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(1, Hk, N, D, dtype=torch.bfloat16, device="meta")
    pb = ops._Problem.of(q, k, v)
    chunk, heads = ops.linear_plan(pb, 2, True)
    per_head = ops._state_bytes_per_head(pb, N, 2, chunk)
    budget = ops._scratch_budget(pb)
    assert heads == Hk or heads * per_head <= budget
    assert heads == Hk or (heads + 1) * per_head > budget or -(-Hk // heads) == -(-Hk // (heads + 1))
    launches = -(-Hk // heads)
    assert heads == -(-Hk // launches)  # equal groups: 3 + 2, not 4 + 1
    default_chunk = ops._linear_config(pb, 2)["chunk"]
    assert chunk in (default_chunk, 2 * default_chunk, 4 * default_chunk, 4096)
    if N <= 262144 and D <= 64:
        assert heads == Hk and chunk == default_chunk  # no splitting below ~256k tokens at D = 64
    if per_head > budget:  # one head's states too large for the budget: longer chunks first
        assert chunk == 4096


def test_backward_in_head_groups(gen):
    """Large passes run over groups of key/value heads (the scratch budget): same results."""
    from fastmax_hf.kernels import ops

    (q, k, v), (qe, ke, ve), mask = inputs(gen, 2, 6, 3, 40, 40, 16, 16, torch.float32)
    opts = dict(causal=True, key_padding_mask=mask, scale=0.3, p=2, a0=1.0, a1=1.0, a2=0.5)
    expected = fastmax_reference(qe, ke, ve, **opts)
    do = randn(gen, *expected.shape).to(DEVICE)
    want = torch.autograd.grad(expected, (qe, ke, ve), do)
    with kernels.settings(scratch_min_bytes=1, scratch_fraction=0.0):  # one key/value head per launch
        assert ops.heads_per_launch(q, k, v) == 1
        out, _ = triton_attention(q, k, v, FastmaxOptions(scale=0.3), causal=True, key_padding_mask=mask,
                                  regime="linear")
        got = torch.autograd.grad(out, (q, k, v), do.float())
    assert rel_err(out, expected) < 1e-4
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_inputs_of_another_dtype_are_refused_by_name():
    """float64 (or mixed dtypes) would be silently wrong in the kernels: a TypeError instead."""
    q, k, v = (torch.randn(1, 1, 8, 16, dtype=torch.float64) for _ in range(3))
    options = FastmaxOptions(scale=0.3)
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32 `q`, got torch.float64"):
        triton_attention(q, k, v, options)
    with pytest.raises(TypeError, match="share one dtype"):
        triton_attention(q.float(), k.float(), v.half(), options)
    with pytest.raises(TypeError, match="`k`"):
        kernels.triton_window_attention(q.float(), k, v.float(), FastmaxOptions(scale=0.3, window=2), window=2)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="linear_chunk"):
        with kernels.settings(linear_chunk=100):
            pass
    with pytest.raises(ValueError, match="quad_dq_fused"):
        with kernels.settings(quad_dq_fused=1):
            pass
    with pytest.raises(ValueError, match="linear_keep_states"):
        with kernels.settings(linear_keep_states="yes"):
            pass
    with pytest.raises(ValueError, match="unknown kernel setting"):
        with kernels.settings(chunk=64):
            pass
    with pytest.raises(ValueError, match="multiple of linear_block_m"):
        with kernels.settings(linear_chunk=32, linear_block_m=64):
            (q, k, v), _, _ = inputs(torch.Generator().manual_seed(0), 1, 1, 1, 8, 8, 16, 16, torch.float32)
            triton_attention(q, k, v, FastmaxOptions(scale=0.3), regime="linear")
    assert kernels.current_settings().linear_chunk is None  # restored after the error


def test_a_top_level_kernels_import_loads_nothing():
    """From the repository root `kernels/` also answers to the top-level name `kernels`, which
    transformers imports when it probes for the Hugging Face package of that name: that copy
    must register nothing (the custom operators exist once): when that package is installed
    (transformers 5.25 requires it) it takes the name, otherwise nothing passes for it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib, sys; import fastmax_hf; from fastmax_hf import kernels\n"
        "from importlib.metadata import PackageNotFoundError, version\n"
        "try: hub = version('kernels')\n"
        "except PackageNotFoundError: hub = None\n"
        "top = importlib.import_module('kernels')\n"
        "assert top is not kernels and not hasattr(top, 'triton_attention'), top\n"
        "assert kernels.__name__ == 'fastmax_hf.kernels' and hasattr(kernels, 'current_settings')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "if hub is None: assert top.__all__ == [] and not is_kernels_available()\n"
        "else: assert not top.__file__.startswith(sys.argv[1]), top.__file__  # the Hugging Face package\n"
        "import transformers.integrations.hub_kernels\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(root / "kernels")], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_the_tma_reduction_probe_runs_without_a_gpu(monkeypatch):
    """The probe that picks the fused-dq backward on Hopper (``ops._tma_reduce_on``) only runs
    on a GPU; here it runs with the device's capability faked, so that a name it lacks (as once
    happened: ``tl`` not imported) fails on the CPU too, not first on the GPU."""
    from fastmax_hf.kernels import ops

    probe = ops._tma_reduce_on.__wrapped__
    for major, expected in ((9, True), (8, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, major=major: (major, 0))
        import triton.language as tl

        has_atomics = hasattr(getattr(tl, "tensor_descriptor", None), "atomic_add")
        assert probe(0) is (expected and has_atomics)
