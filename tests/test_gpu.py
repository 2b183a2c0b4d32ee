"""The GPU suite: the Triton kernels on a CUDA device against float64 Fastmax.

    pytest -m gpu            (on a machine with a CUDA GPU; about 3 minutes on an H200)

Marked ``gpu`` and skipped without CUDA, so the CPU test-suite (and CI) is unchanged; on a GPU
machine a plain ``pytest`` runs it too. It holds the essential checks of tools/check_kernels.py
(which has the larger grid and writes JSON results): bf16, fp16 and fp32; head dims 64 and
128; both regimes (``triton_attention(..., regime="quadratic" | "linear")``); forward and
gradients; grouped-query heads; padding with a fully padded row; Hugging Face's (B, N, H, D)
memory read through its strides; the public function and the recurrent step on CUDA tensors;
the in-place decoding step and static generation replayed as CUDA graphs; empty inputs; the hybrid window on the kernels; and tensors of more than 2^31 elements
(offsets past int32).

Errors are ||x - ref|| / ||ref|| against the float64 reference, targets fp32 1e-4, fp16 5e-3,
bf16 2e-2 (the inputs are rounded to the dtype first, so the targets measure the kernels).
"""

import pytest
import torch

from fastmax_hf import FastmaxOptions, fastmax, fastmax_reference
from fastmax_hf.recurrent import fastmax_step
from conftest import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: run `pytest -m gpu` on a GPU machine"),
]

TARGET = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
REGIMES = ["quadratic", "linear"]


@pytest.fixture
def cuda_gen():
    return torch.Generator(device="cuda").manual_seed(1234)


def make(gen, B, Hq, Hk, Nq, Nk, D, Dv, dtype, *, pad, hf_layout):
    """q, k, v in ``dtype`` (HF's (B, N, H, D) memory viewed as (B, H, N, D) with ``hf_layout``),
    and a padding mask (left padding of row 0, the last row fully padded) with ``pad``."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    if hf_layout:
        q, k, v = rnd(B, Nq, Hq, D).transpose(1, 2), rnd(B, Nk, Hk, D).transpose(1, 2), rnd(B, Nk, Hk, Dv).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Nq, D), rnd(B, Hk, Nk, D), rnd(B, Hk, Nk, Dv)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen, device="cuda") > 0.2
        mask[0, : Nk // 4] = False
        if B > 1:
            mask[-1] = False
    return q, k, v, mask


def check_against_float64(gen, q, k, v, mask, *, causal, regime, p=2, coefficients=(1.0, 1.0, 0.5)):
    """Forward and gradients of the kernels against fastmax_reference in float64."""
    from fastmax_hf.kernels import triton_attention

    dtype, D = q.dtype, q.shape[-1]
    a0, a1, a2 = coefficients
    options = FastmaxOptions(scale=D ** -0.5, p=p, a0=a0, a1=a1, a2=a2)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    out, _ = triton_attention(qs, ks, vs, options, causal=causal, key_padding_mask=mask, regime=regime)
    assert out.dtype == dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    do = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    grads = torch.autograd.grad(out, (qs, ks, vs), do)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = fastmax_reference(q64, k64, v64, causal=causal, key_padding_mask=mask, scale=D ** -0.5, p=p,
                                 a0=a0, a1=a1, a2=a2)
    want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    assert torch.isfinite(out).all()
    errors = {"out": rel_err(out, expected)}
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert a.dtype == dtype and a.shape == b.shape
        errors[name] = rel_err(a, b)
    assert max(errors.values()) <= TARGET[dtype], errors
    if mask is not None and q.shape[0] > 1:
        assert torch.all(out[-1] == 0)  # the fully padded row sees no key: 0, never NaN
    return errors


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_causal_gqa_padding_hf_strides(cuda_gen, dtype, D, regime):
    """The common case of a model: causal, grouped-query heads, padding, HF strides, odd length."""
    q, k, v, mask = make(cuda_gen, 2, 8, 2, 1003, 1003, D, D, dtype, pad=True, hf_layout=True)
    assert not q.is_contiguous()
    check_against_float64(cuda_gen, q, k, v, mask, causal=True, regime=regime)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_lengths_without_padding_bf16(cuda_gen, causal, D, regime):
    """Nq < Nk (a query block ending a longer key sequence) and whole tiles without masks."""
    q, k, v, _ = make(cuda_gen, 1, 4, 4, 257, 1531, D, D, torch.bfloat16, pad=False, hf_layout=False)
    check_against_float64(cuda_gen, q, k, v, None, causal=causal, regime=regime)


@pytest.mark.parametrize("regime", REGIMES)
def test_first_order_kernel_and_dv_unlike_d(cuda_gen, regime):
    """p = 1 (f = 6 + s), Dv != D, Nq > Nk, GQA with 2 groups, padding."""
    q, k, v, mask = make(cuda_gen, 3, 6, 3, 777, 129, 64, 48, torch.float32, pad=True, hf_layout=False)
    check_against_float64(cuda_gen, q, k, v, mask, causal=True, regime=regime, p=1, coefficients=(6.0, 1.0, 0.0))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("D", [64, 128])
def test_hybrid_window_on_the_kernels_bf16(cuda_gen, D, regime):
    """The hybrid window (W = 64) on the kernels: causal, GQA, padding, HF strides, odd length."""
    from fastmax_hf.window import window_attention

    q, k, v, mask = make(cuda_gen, 2, 8, 2, 1003, 1003, D, D, torch.bfloat16, pad=True, hf_layout=True)
    options = FastmaxOptions(scale=D ** -0.5, window=64)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    out, _ = window_attention(qs, ks, vs, options, key_padding_mask=mask, mode=regime, implementation="triton")
    do = torch.randn(out.shape, generator=cuda_gen, device="cuda", dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, (qs, ks, vs), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = fastmax_reference(q64, k64, v64, causal=True, key_padding_mask=mask, scale=D ** -0.5, window=64)
    want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    assert torch.isfinite(out).all() and torch.all(out[-1] == 0)
    errors = {"out": rel_err(out, expected)}
    errors.update({name: rel_err(a, b) for name, a, b in zip(("dq", "dk", "dv"), grads, want)})
    assert max(errors.values()) <= TARGET[torch.bfloat16], errors


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_hybrid_window_compiled_bf16(cuda_gen, regime):
    """torch.compile (inductor, fullgraph) of the hybrid window with a learned gain: the custom
    operators run the kernels, with the eager call's output and gradients."""
    from fastmax_hf.window import window_attention

    q, k, v, mask = make(cuda_gen, 2, 8, 2, 1003, 1003, 64, 64, torch.bfloat16, pad=True, hf_layout=True)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    gain = torch.linspace(0.5, 1.5, 8, device="cuda").requires_grad_()

    def attend(q, k, v, gain):
        options = FastmaxOptions(scale=0.125, window=64, window_gain=gain)
        return window_attention(q, k, v, options, key_padding_mask=mask, mode=regime, implementation="triton")[0]

    eager = attend(qs, ks, vs, gain)
    do = torch.randn(eager.shape, generator=cuda_gen, device="cuda", dtype=torch.float32).to(eager.dtype)
    want = torch.autograd.grad(eager, (qs, ks, vs, gain), do)
    compiled = torch.compile(attend, fullgraph=True)(qs, ks, vs, gain)
    got = torch.autograd.grad(compiled, (qs, ks, vs, gain), do)
    assert torch.equal(compiled, eager)
    for name, a, b in zip(("dq", "dk", "dv", "dgain"), got, want):
        assert rel_err(a, b) <= 1e-3, name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_normalize_scaling_kernels_bf16(cuda_gen, causal):
    """normalize's scaling kernels (kernels/normalize.py) in bf16 on the GPU against float64,
    HF strides, padding, 16k rows (256 row blocks)."""
    from fastmax_hf import stages
    from fastmax_hf.kernels import triton_scale_by_peak

    x = torch.randn(2, 16384, 8, 64, generator=cuda_gen, device="cuda").to(torch.bfloat16).transpose(1, 2)
    valid = torch.rand(2, 16384, generator=cuda_gen, device="cuda") > 0.2
    xs = x.detach().requires_grad_()
    out = triton_scale_by_peak(xs, 1.0, causal, valid)
    g = torch.randn(out.shape, generator=cuda_gen, device="cuda").to(torch.bfloat16)
    (dx,) = torch.autograd.grad(out, xs, g)
    x64 = x.detach().double().requires_grad_()
    want = x64 * stages.norm_scale(x64, 1.0, causal, valid)[0]
    (dx64,) = torch.autograd.grad(want, x64, g.double())
    assert rel_err(out, want) <= TARGET[torch.bfloat16] and rel_err(dx, dx64) <= TARGET[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_public_function_and_decoding_on_cuda(cuda_gen, dtype):
    """backend="auto" takes the kernels on CUDA tensors (no warning), reads HF strides, and a
    prefill continued token by token from the recurrent state equals one causal pass."""
    import warnings

    from fastmax_hf.kernels import triton_attention

    q, k, v, _ = make(cuda_gen, 2, 8, 2, 2000, 2000, 64, 64, dtype, pad=False, hf_layout=True)
    mask = torch.ones(2, 2000, dtype=torch.bool, device="cuda")
    mask[1, :123] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernels run
        out = fastmax(q, k, v, causal=True, key_padding_mask=mask)
    direct, _ = triton_attention(q, k, v, FastmaxOptions(scale=64 ** -0.5), causal=True, key_padding_mask=mask)
    assert torch.equal(out, direct)
    expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    assert rel_err(out, expected) <= TARGET[dtype]

    split = 1900
    step, state = fastmax_step(q[:, :, :split], k[:, :, :split], v[:, :, :split], None,
                               key_padding_mask=mask[:, :split])
    assert state.layout == "triton"
    outs = [step]
    for t in range(split, 2000):
        s = slice(t, t + 1)
        step, state = fastmax_step(q[:, :, s], k[:, :, s], v[:, :, s], state, key_padding_mask=mask[:, s])
        outs.append(step)
    assert rel_err(torch.cat(outs, 2), expected) <= TARGET[dtype]


@pytest.mark.parametrize("shape", [(0, 4, 2, 64, 64), (2, 4, 2, 0, 0), (2, 4, 2, 0, 37)], ids=str)
def test_empty_inputs_on_cuda(shape):
    """N = 0 or B = 0: an empty output and empty gradients, as SDPA gives."""
    B, Hq, Hk, Nq, Nk = shape
    q = torch.randn(B, Hq, Nq, 64, device="cuda", requires_grad=True)
    k = torch.randn(B, Hk, Nk, 64, device="cuda", requires_grad=True)
    v = torch.randn(B, Hk, Nk, 64, device="cuda", requires_grad=True)
    out = fastmax(q, k, v, causal=True, backend="triton")
    assert out.shape == (B, Hq, Nq, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_tensors_past_two_to_the_31_elements(cuda_gen):
    """q, k, v of 2^31 + 2^25 elements each (bf16, about 4 GiB apiece): the last two heads lie
    wholly past element 2^31 - 1, so their offsets need 64 bits. The first head and the last are
    checked: forward rows against the float64 reference, gradients of the last head against
    the float64 chunked form (O(N) memory)."""
    from fastmax_hf.kernels import triton_attention

    B, H, N, D = 1, 130, 131072, 128
    assert (H - 2) * N * D == 2**31  # heads H-2 and H-1 start at or past 2^31
    dtype = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, generator=cuda_gen, device="cuda", dtype=dtype) for _ in range(3))
    options = FastmaxOptions(scale=D ** -0.5)
    qs, ks, vs = (x.requires_grad_() for x in (q, k, v))
    out, _ = triton_attention(qs, ks, vs, options, causal=True, regime="linear")
    do = torch.randn(out.shape, generator=cuda_gen, device="cuda", dtype=dtype)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), do)
    assert torch.isfinite(out).all()

    rows = 256
    for h in (0, H - 1):
        q64, k64, v64 = (x.detach()[:, h : h + 1].double() for x in (q, k, v))
        head = fastmax_reference(q64[:, :, :rows], k64[:, :, :rows], v64[:, :, :rows], causal=True)
        tail = fastmax_reference(q64[:, :, -rows:], k64, v64, causal=True)  # bottom-right aligned
        assert rel_err(out[:, h : h + 1, :rows], head) <= TARGET[dtype]
        assert rel_err(out[:, h : h + 1, -rows:], tail) <= TARGET[dtype]
    h = H - 1
    q64, k64, v64 = (x.detach()[:, h : h + 1].double().requires_grad_() for x in (q, k, v))
    expected = fastmax(q64, k64, v64, causal=True, backend="chunked")
    want = torch.autograd.grad(expected, (q64, k64, v64), do[:, h : h + 1].double())
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert rel_err(a[:, h : h + 1], b) <= TARGET[dtype], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_in_place_decoding_step_on_cuda(cuda_gen, dtype):
    """The in-place decoding kernel on the GPU: a prefill, then steps through decode_step_
    (batch 1: rows split over programs; batch 40: one program per head), against float64."""
    from fastmax_hf.kernels import decode_step_, empty_state, triton_step

    for batch in (1, 40):
        q, k, v, _ = make(cuda_gen, batch, 8, 2, 300, 300, 64, 64, dtype, pad=False, hf_layout=True)
        opts = FastmaxOptions(scale=64 ** -0.5)
        split = 290
        out, S, z = triton_step(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                *empty_state(batch, 2, 64, 64, 2, "cuda"), opts)
        outs, addr = [out], S.data_ptr()
        for t in range(split, 300):
            s = slice(t, t + 1)
            outs.append(decode_step_(q[:, :, s], k[:, :, s], v[:, :, s], S, z, opts))
        assert S.data_ptr() == addr
        expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True)
        assert rel_err(torch.cat(outs, 2), expected) <= TARGET[dtype]


def _tiny_causal_lm(family: str, dtype):
    import copy

    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.05)
    configs = {
        "llama": lambda: LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=1, **common),
        "gpt2": lambda: GPT2Config(n_embd=256, n_layer=3, n_head=4, **common),
    }
    name, _, window = family.partition("_window")  # "llama_window16": the hybrid window W = 16
    config = copy.deepcopy(configs[name]())
    if window:
        from fastmax_hf import set_fastmax_config

        set_fastmax_config(config, window=int(window))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastmax")
    return model.to(device="cuda", dtype=dtype).eval()


def _recomputed_logits(model, mask, sequences):
    """Teacher-forced stateless logits of generated ``sequences`` (B, P + T) from a left-padded
    prompt mask (B, P): logits[:, t] is the forward's prediction of token P + t, (B, T, V)."""
    prompt = mask.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, prompt:])], 1)[:, :-1]
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    return model(sequences[:, :-1], attention_mask=full_mask, position_ids=positions,
                 use_cache=False).logits[:, prompt - 1:].float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "llama_window16", "qwen2_window64"])
def test_generation_equals_recomputation_bf16(family):
    """Greedy search, seeded sampling and beam search of a left-padded batch in bf16, with the
    default FastmaxCache and with cache_implementation="static" (every step after the first a
    replayed CUDA graph): each step's logits are those of a stateless forward over the tokens
    generated so far (bf16 tolerance); beams' scores are the recomputed sums of log-probabilities
    (beam search steps eagerly: transformers' beam search does not take the compiled call);
    the graphs leave the random generator where the default cache leaves it. With a hybrid
    window (W = 16, shorter than the prompt; W = 64, longer than prompt and generation) the static
    steps move the tail in place and are replayed too."""
    model = _tiny_causal_lm(family, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 512, (3, 50), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    runner = model.get_compiled_call(None)
    new = 12
    gen = torch.cuda.default_generators[0]
    searches = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=20),
                "beams": dict(num_beams=3, do_sample=False, length_penalty=0.0, output_scores=True)}
    for search, kwargs in searches.items():
        offsets = []
        for implementation in ("static", None):
            before = runner.replays
            torch.manual_seed(5)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     pad_token_id=0, cache_implementation=implementation,
                                     return_dict_in_generate=True, output_logits=True, **kwargs)
                recomputed = _recomputed_logits(model, mask, out.sequences)
            offsets.append(gen.get_offset())
            where = f"{search}, cache_implementation={implementation}"
            # transformers' beam search calls the model itself, never the compiled call: its static
            # steps run eagerly (still in place)
            graphs = implementation is not None and search != "beams"
            assert runner.replays - before == (new - 1 if graphs else 0), where
            if search == "beams":
                # length_penalty=0: a beam's score is the plain sum of its tokens' log-probabilities
                chosen = out.sequences[:, 50:, None]
                scores = recomputed.log_softmax(-1).gather(-1, chosen).sum((1, 2))
                assert rel_err(out.sequences_scores.float(), scores) <= 2e-2, where
            else:
                assert rel_err(torch.stack(out.logits, 1).float(), recomputed) <= 2e-2, where
        assert offsets[0] == offsets[1], search
    assert runner.captures >= 1
