"""The hybrid window (issue 17): exact softmax over the last W positions, fastmax over the rest.

Every path is compared with the float64 reference on fresh random inputs (``gen``); the reference
itself is checked against the definition written out key by key, and against softmax for W >= Nk.
"""

import inspect
import json
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList

import fastmax_hf
from fastmax_hf import fastmax, fastmax_reference
from fastmax_hf.backends import choose_backend
from fastmax_hf.chunked import chunked_attention
from fastmax_hf.notices import WARNED
from fastmax_hf.options import FastmaxOptions
from fastmax_hf.recurrent import fastmax_step
from fastmax_hf.window import window_attention

from conftest import randn

F64 = torch.float64


def inputs(gen, B, Hq, Hk, Nq, Nk, D, Dv, dtype=F64):
    q = randn(gen, B, Hq, Nq, D, dtype=dtype, requires_grad=True)
    k = randn(gen, B, Hk, Nk, D, dtype=dtype, requires_grad=True)
    v = randn(gen, B, Hk, Nk, Dv, dtype=dtype, requires_grad=True)
    return q, k, v


def gain_of(kind, Hq, gen):
    """gamma: a float, a 0-dim tensor or one positive factor per query head (tensors need grad)."""
    if kind == "float":
        return 0.8
    if kind == "scalar":
        return torch.tensor(1.7, dtype=F64, requires_grad=True)
    return (0.25 + 2 * torch.rand(Hq, generator=gen, dtype=F64)).requires_grad_()


def left_padding(B, Nk, lengths):
    """(B, Nk) bool, True = a real token; row b has its last lengths[b] tokens real (0: fully padded)."""
    mask = torch.zeros(B, Nk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n:
            mask[b, Nk - n:] = True
    return mask


def by_definition(q, k, v, W, gain, p, mask):
    """o_i written out key by key (float64): e^{s} in the window, gamma f(s) before it."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G = Hq // Hk
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(Hq):
            g = float(gain[h]) if isinstance(gain, torch.Tensor) and gain.dim() == 1 else float(gain)
            for i in range(Nq):
                t = i + Nk - Nq
                num, den = torch.zeros(v.shape[-1], dtype=F64), 0.0
                for j in range(0, t + 1):
                    if mask is not None and not mask[b, j]:
                        continue
                    s = float(q[b, h, i] @ k[b, h // G, j]) * D ** -0.5
                    weight = math.exp(s) if j > t - W else g * (1 + s + (0.5 * s * s if p == 2 else 0))
                    num += weight * v[b, h // G, j]
                    den += weight
                out[b, h, i] = num / den if den != 0 else 0
    return out


def test_the_reference_is_the_definition(gen):
    q, k, v = inputs(gen, 2, 4, 2, 9, 12, 4, 3)
    mask = left_padding(2, 12, [12, 7])
    gain = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    for W, p in ((1, 2), (4, 1), (20, 2)):
        expected = by_definition(q.detach(), k.detach(), v.detach(), W, gain, p, mask)
        got = fastmax_reference(q, k, v, causal=True, window=W, window_gain=gain, p=p, key_padding_mask=mask)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_window_over_every_key_is_softmax(gen):
    q, k, v = inputs(gen, 2, 2, 2, 11, 11, 8, 5)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    for backend in ("reference", "chunked"):
        got = fastmax(q, k, v, causal=True, window=11, window_gain=5.0, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# (B, Hq, Hk, Nq, Nk, W, chunk, p, gain, padding lengths or None)
GRID = [
    (2, 4, 2, 37, 37, 7, 5, 2, "heads", None),  # odd N, GQA, chunk not dividing W
    (1, 2, 1, 23, 41, 7, 6, 2, "float", None),  # Nq < Nk
    (1, 2, 1, 41, 23, 7, 6, 1, "scalar", None),  # Nq > Nk, p = 1
    (2, 2, 2, 19, 19, 1, 4, 2, "heads", None),  # W = 1
    (1, 3, 1, 17, 17, 64, 5, 2, "heads", None),  # W larger than N
    (3, 4, 2, 29, 29, 7, 8, 2, "heads", [29, 11, 0]),  # left padding and a fully padded row
    (2, 2, 1, 13, 31, 5, 4, 1, "scalar", [31, 9]),  # padding with Nq < Nk
]


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
@pytest.mark.parametrize("B, Hq, Hk, Nq, Nk, W, chunk, p, gain_kind, lengths", GRID)
def test_chunked_matches_the_reference(gen, mode, B, Hq, Hk, Nq, Nk, W, chunk, p, gain_kind, lengths):
    q, k, v = inputs(gen, B, Hq, Hk, Nq, Nk, 8, 5)
    gain = gain_of(gain_kind, Hq, gen)
    mask = None if lengths is None else left_padding(B, Nk, lengths)
    expected = fastmax_reference(q, k, v, causal=True, p=p, window=W, window_gain=gain, key_padding_mask=mask)
    options = FastmaxOptions.resolve(8, p=p, window=W, window_gain=gain)
    got, _ = window_attention(q, k, v, options, key_padding_mask=mask, mode=mode, chunk_size=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    leaves = [q, k, v] + ([gain] if isinstance(gain, torch.Tensor) else [])
    cotangent = randn(gen, *expected.shape)
    if lengths is not None and 0 in lengths:  # the loss reads the fully padded row too: it has no gradient
        assert expected[lengths.index(0)].abs().max() == 0
    want = torch.autograd.grad((expected * cotangent).sum(), leaves)
    have = torch.autograd.grad((got * cotangent).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "window_gain"), have, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_the_public_function_matches_the_reference_with_every_option(gen):
    q, k, v = inputs(gen, 2, 4, 2, 33, 33, 8, 8)
    mask = left_padding(2, 33, [33, 20])
    gain = gain_of("heads", 4, gen)
    kwargs = dict(causal=True, window=6, window_gain=gain, key_padding_mask=mask, normalize=True, lim=1.5,
                  a0=1.0, a1=0.9, a2=0.4)
    expected = fastmax(q, k, v, backend="reference", **kwargs)
    for backend in ("chunked", "auto"):
        got = fastmax(q, k, v, backend=backend, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # 3-D input (B*H, N, D)
    q3, k3, v3 = (x.detach()[:1, :1, :, :].reshape(1, 33, 8) for x in (q, k, v))
    torch.testing.assert_close(fastmax(q3, k3, v3, causal=True, window=6),
                               fastmax(q3, k3, v3, causal=True, window=6, backend="reference"))


def test_float32_and_bfloat16_follow_the_float64_reference(gen):
    q, k, v = inputs(gen, 1, 2, 2, 300, 300, 16, 16)
    expected = fastmax_reference(q, k, v, causal=True, window=32)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = fastmax(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, window=32)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_window_none_is_plain_fastmax_bit_for_bit(gen):
    q, k, v = inputs(gen, 2, 4, 2, 40, 40, 8, 8)
    mask = left_padding(2, 40, [40, 25])
    for causal in (True, False):
        for backend in ("reference", "chunked"):
            plain = fastmax(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
            same = fastmax(q, k, v, causal=causal, key_padding_mask=mask, backend=backend, window=None,
                           window_gain=3.0)
            assert torch.equal(plain, same)
        core, _ = chunked_attention(q, k, v, FastmaxOptions.resolve(8), causal=causal, key_padding_mask=mask)
        assert torch.equal(fastmax(q, k, v, causal=causal, key_padding_mask=mask, backend="chunked", window=None), core)


def test_non_finite_keys_reach_only_the_queries_that_see_them(gen):
    q, k, v = inputs(gen, 1, 2, 1, 30, 30, 8, 4)
    mask = left_padding(1, 30, [26])
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[0, 0, 2] = float("nan")  # padded: reaches nobody
    v2[0, 0, 20] = float("inf")  # reaches the queries from position 20 on
    clean = fastmax_reference(q, k, v, causal=True, window=5, key_padding_mask=mask)
    q1, k1, v1 = (x.detach().requires_grad_() for x in (q, k2, v2))
    out = fastmax(q1, k1, v1, causal=True, window=5, key_padding_mask=mask, backend="chunked")
    torch.testing.assert_close(out[:, :, :20], clean[:, :, :20], rtol=1e-10, atol=1e-10)
    assert not torch.isfinite(out[:, :, 20:]).all(-1).any()
    # the loss reads the rows before 20 only: the gradients of every position they see are those
    # of the clean inputs (a row after 20 sees the inf itself: as for plain fastmax, its own
    # query gradient is not finite)
    out[:, :, :20].sum().backward()
    want = torch.autograd.grad(clean[:, :, :20].sum(), (q, k, v))
    for have, expected in zip((q1.grad, k1.grad, v1.grad), want):
        torch.testing.assert_close(have[:, :, :20], expected[:, :, :20], rtol=1e-10, atol=1e-10)
    assert (k1.grad[0, 0, 2] == 0).all() and (v1.grad[0, 0, 2] == 0).all()
    assert (k1.grad[0, 0, 21:] == 0).all()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
                                        ("8", TypeError)])
def test_a_bad_window_is_refused_by_name(gen, bad, error):
    q, k, v = inputs(gen, 1, 1, 1, 4, 4, 4, 4)
    with pytest.raises(error, match="`window`"):
        fastmax(q, k, v, causal=True, window=bad)
    with pytest.raises(error, match="`window`"):
        FastmaxOptions(scale=0.5, window=bad)


@pytest.mark.parametrize("bad, error", [
    (0.0, ValueError), (-1.0, ValueError), (float("inf"), TypeError), ("1", TypeError), (None, TypeError),
    (torch.tensor([1.0, 2.0, 3.0]), ValueError),  # neither () nor (Hq,)
    (torch.tensor([1.0, -2.0]), ValueError), (torch.tensor([1, 2]), TypeError), (torch.ones(2, 1), ValueError),
])
def test_a_bad_window_gain_is_refused_by_name(gen, bad, error):
    q, k, v = inputs(gen, 1, 2, 1, 4, 4, 4, 4)
    with pytest.raises(error, match="`window_gain`"):
        fastmax(q, k, v, causal=True, window=2, window_gain=bad.to(F64) if isinstance(bad, torch.Tensor) and
                bad.is_floating_point() else bad)


def test_a_window_needs_causal(gen):
    q, k, v = inputs(gen, 1, 1, 1, 4, 4, 4, 4)
    for call in (fastmax, fastmax_reference):
        with pytest.raises(ValueError, match=r"`window`.*needs causal=True"):
            call(q, k, v, window=2)


def test_backends_a_window_call_takes_the_kernels_and_its_step_runs_chunked():
    """A whole call with a window chooses its backend as any call does (the kernels on CUDA);
    the recurrent step with a window has only the PyTorch form: "triton" is refused there and
    "auto" on CUDA tensors warns once."""
    from fastmax_hf.backends import triton_available

    if triton_available(torch.device("cuda"), torch.bfloat16):
        assert choose_backend("auto", torch.device("cuda"), torch.bfloat16, window=True) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU: no warning
        assert choose_backend("auto", torch.device("cpu"), torch.float32, window=True) == "chunked"
        assert choose_backend("chunked", torch.device("cuda"), torch.float16, window=True) == "chunked"
    with pytest.raises(ValueError, match=r"do not implement the recurrent step of `window`.*backend='chunked'"):
        choose_backend("triton", torch.device("cuda"), torch.float16, window=True, stateful=True)
    WARNED.discard("backend-fallback:window")
    with pytest.warns(UserWarning, match=r"recurrent step with `window` runs on the PyTorch path"):
        assert choose_backend("auto", torch.device("cuda"), torch.bfloat16, window=True, stateful=True) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert choose_backend("auto", torch.device("cuda"), torch.bfloat16, window=True, stateful=True) == "chunked"
    assert choose_backend("reference", torch.device("cpu"), torch.float32, window=True) == "reference"


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.ops += 1
        return out


def test_a_4096_token_call_never_forms_an_n_by_n_tensor(gen):
    N, D, W = 4096, 16, 64
    q, k, v = inputs(gen, 1, 1, 1, N, N, D, D, dtype=torch.float32)
    gain = torch.tensor([1.0], requires_grad=True)
    forward, backward = _LargestTensor(), _LargestTensor()
    with forward:
        out = fastmax(q, k, v, causal=True, window=W, window_gain=gain, backend="chunked")
    loss = out.square().sum()
    with backward:
        loss.backward()
    assert forward.ops > 0 and backward.ops > 0  # the mode saw both passes
    # the largest tensors are the inputs' size (N x D) and one band tile (128 x (128 + W - 1)); N x N is 16.7M
    limit = 4 * N * D
    assert forward.largest <= limit and backward.largest <= limit, (forward.largest, backward.largest)
    assert torch.isfinite(q.grad).all() and gain.grad is not None


@pytest.mark.parametrize("W", [1, 7, 100])
def test_prefill_then_decoding_equals_the_full_call(gen, W):
    B, Hq, Hk, N, D = 2, 4, 2, 45, 8
    q, k, v = (x.detach() for x in inputs(gen, B, Hq, Hk, N, N, D, 6))
    mask = left_padding(B, N, [N, 30])
    gain = gain_of("heads", Hq, gen).detach()
    for normalize in (False, True):
        kwargs = dict(window=W, window_gain=gain, normalize=normalize)
        full = fastmax(q, k, v, causal=True, key_padding_mask=mask, backend="reference", **kwargs)
        out, state = fastmax_step(q[:, :, :13], k[:, :, :13], v[:, :, :13], None, key_padding_mask=mask[:, :13],
                                  **kwargs)
        outs, sizes = [out], []
        for t in range(13, N, 3):  # chunks of 3, then a last one
            out, state = fastmax_step(q[:, :, t:t + 3], k[:, :, t:t + 3], v[:, :, t:t + 3], state,
                                      key_padding_mask=mask[:, t:t + 3], **kwargs)
            outs.append(out)
            sizes.append(state.nbytes())
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)
        assert state.tail_k.shape[2] == min(W, N)
        assert len(set(sizes)) == 1 or W > 13  # constant once the window is full


@pytest.mark.parametrize("W, prompt, p", [(1, 9, 2), (7, 9, 2), (20, 9, 2), (7, 4, 1)])
def test_in_place_decoding_equals_the_full_call_and_keeps_its_addresses(gen, W, prompt, p):
    """decode_step_ on a hybrid-window state (its tail padded to W at the front), token by token
    with padded tokens in the middle of a row, equals the full call; no tensor of the state moves."""
    from fastmax_hf.recurrent import decode_step_

    B, Hq, Hk, N, D = 2, 4, 2, 31, 8
    q, k, v = (x.detach() for x in inputs(gen, B, Hq, Hk, N, N, D, 6))
    mask = left_padding(B, N, [N, 24])
    mask[0, 15:17] = False  # padding inside a row: a position that attends and joins nothing
    gain = gain_of("heads", Hq, gen).detach()
    for normalize in (False, True):
        kwargs = dict(window=W, window_gain=gain, normalize=normalize, p=p)
        options = FastmaxOptions.resolve(D, a1=1.0, a2=0.5, **kwargs)
        full = fastmax(q, k, v, causal=True, key_padding_mask=mask, backend="reference", **kwargs)
        out, state = fastmax_step(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None,
                                  key_padding_mask=mask[:, :prompt], **kwargs)
        state = state.with_full_tail()
        assert state.tail_k.shape[2] == W
        addresses = [t.data_ptr() for t in state.tensors()]
        outs = [out]
        for t in range(prompt, N):
            outs.append(decode_step_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, options,
                                     key_valid=mask[:, t]))
        torch.testing.assert_close(torch.cat(outs, 2)[mask[:, None, :, None].expand(full.shape)],
                                   full[mask[:, None, :, None].expand(full.shape)], rtol=1e-10, atol=1e-10)
        assert [t.data_ptr() for t in state.tensors()] == addresses


def test_in_place_decoding_needs_a_full_tail(gen):
    from fastmax_hf.recurrent import decode_step_

    q, k, v = (x.detach() for x in inputs(gen, 1, 1, 1, 2, 2, 4, 4))
    _, state = fastmax_step(q, k, v, None, window=5)
    options = FastmaxOptions.resolve(4, window=5)
    with pytest.raises(ValueError, match="with_full_tail"):
        decode_step_(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, options)
    with pytest.raises(ValueError, match="`window`=None"):
        decode_step_(q[:, :, :1], k[:, :, :1], v[:, :, :1], state.with_full_tail(), FastmaxOptions.resolve(4))


def test_a_state_continues_with_its_own_window(gen):
    q, k, v = (x.detach() for x in inputs(gen, 1, 1, 1, 4, 4, 4, 4))
    _, state = fastmax_step(q, k, v, None, window=3)
    with pytest.raises(ValueError, match="`window`"):
        fastmax_step(q, k, v, state, window=5)
    with pytest.raises(ValueError, match="`window`"):
        fastmax_step(q, k, v, state)
    with pytest.raises(ValueError, match="do not implement the recurrent step of `window`"):
        fastmax_step(q, k, v, None, window=3, backend="triton")


def test_the_package_exports_the_option():
    assert "window" in fastmax_hf.fastmax.__doc__ and "window_gain" in fastmax_hf.fastmax.__doc__


# ---------------------------------------------------------------------------------------------
# Hugging Face: the option in the config, the cache's tail, generation
# ---------------------------------------------------------------------------------------------


def tiny_llama(window, window_gain=1.0):
    """A float32 2-layer GQA Llama (random weights) with the hybrid window in its fastmax options."""
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fastmax_hf.set_fastmax_config(config, window=window, window_gain=window_gain)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="fastmax").eval()


def greedy(model, ids, new_tokens, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


def test_the_window_is_saved_in_config_json_and_reloaded(tmp_path):
    model = tiny_llama(window=5, window_gain=0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["fastmax"]
    assert saved["window"] == 5 and saved["window_gain"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    options = fastmax_hf.get_fastmax_config(reloaded.config)
    assert (options.window, options.window_gain) == (5, 0.5)
    assert options.options_for(None, 8).window == 5
    ids = torch.randint(3, 97, (1, 12))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`window`"):
        fastmax_hf.FastmaxConfig(window=0)
    with pytest.raises(TypeError, match="`window_gain`"):
        fastmax_hf.FastmaxConfig(window=3, window_gain=torch.tensor(1.0))


def test_the_window_changes_what_the_model_computes():
    ids = torch.randint(3, 97, (1, 20))
    plain, windowed = tiny_llama(window=None)(ids).logits, tiny_llama(window=4)(ids).logits
    assert not torch.allclose(plain, windowed)
    # the first 4 positions see only their window: exact softmax over every previous token
    softmax = tiny_llama(window=None)
    softmax.set_attn_implementation("sdpa")
    torch.testing.assert_close(windowed[:, :4], softmax(ids).logits[:, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 6])
def test_cached_greedy_generation_equals_recomputation(window):
    model = tiny_llama(window=window, window_gain=0.7)
    ids, mask = torch.randint(3, 97, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # a left-padded row
    out = greedy(model, ids, 20, attention_mask=mask, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert isinstance(cache, fastmax_hf.FastmaxCache)
    assert cache.layers[0].state.tail_k.shape[2] == window
    assert torch.equal(out.sequences, greedy(model, ids, 20, attention_mask=mask, use_cache=False))


def test_beam_search_reorders_the_tail_with_the_state():
    model = tiny_llama(window=3)
    ids = torch.randint(3, 97, (1, 5))
    kwargs = dict(num_beams=3, num_return_sequences=3, early_stopping=False, length_penalty=0.0)
    assert torch.equal(greedy(model, ids, 10, **kwargs), greedy(model, ids, 10, use_cache=False, **kwargs))


class _CacheBytes(LogitsProcessor):
    """Records the cache's bytes after every forward of generate()."""

    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def __call__(self, input_ids, scores):
        self.sizes.append(self.cache.nbytes())
        return scores


def test_the_cache_stays_constant_in_the_generated_length():
    model = tiny_llama(window=4)
    cache = fastmax_hf.FastmaxCache(config=model.config)
    recorder = _CacheBytes(cache)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    greedy(model, torch.randint(3, 97, (1, 6)), 25, logits_processor=LogitsProcessorList([recorder]), **{key: cache})
    assert len(set(recorder.sizes)) == 1, recorder.sizes  # the prompt (6 >= W) filled the tail already
    state = cache.layers[1].state
    assert state.tail_k.shape == (1, 2, 4, 8) and state.tail_v.shape == (1, 2, 4, 8)


def test_finetune_window_flag_reaches_the_model_config():
    from pathlib import Path

    from conftest import load_script

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "finetune.py", "finetune_window_test")
    def built(argv):  # the model main() builds for these flags (the built-in tiny Llama, random weights)
        args = script.parse_args(["--model", "llama-tiny", *argv])
        script.check_args(args)
        return script.build_model(args, script.data.builtin_model_config("llama-tiny", 512))

    options = fastmax_hf.get_fastmax_config(built(["--window", "16", "--window_gain", "0.5"]).config)
    assert (options.window, options.window_gain) == (16, 0.5)
    assert fastmax_hf.get_fastmax_config(built([]).config).window is None
    with pytest.raises(SystemExit, match="--window"):
        script.check_args(script.parse_args(["--window", "0"]))
