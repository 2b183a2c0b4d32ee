"""The public Fastmax function: its checks, then the stages of ``stages.py`` around the core
that ``backends.choose_backend`` picks."""

from __future__ import annotations

import torch

from .backends import choose_backend
from .chunked import chunked_attention
from .options import FastmaxOptions
from .reference import reference_attention
from .stages import apply_dropout, check_denominators, normalize_qk
from .window import window_attention
from .validation import (
    Shapes,
    check_window_causal,
    check_window_gain_tensor,
    check_drop_noise,
    check_dropout,
    check_key_padding_mask,
    check_qkv,
    check_flag,
    check_rpe_matrix,
)


def _autocast_inputs(q, k, v):
    """Under autocast, take q, k, v in the autocast dtype, as SDPA does.

    Mixed precision produces mixed inputs: Llama's RoPE multiplies bf16 projections by fp32
    cos/sin tables, so q and k arrive in fp32 next to a bf16 v."""
    tensors = (q, k, v)
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return tensors
    device_type = q.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in tensors)


def _as_4d(q, k, v, drop_noise):
    """Inputs in the autocast dtype, 3-D (B*H, N, D) ones as 4-D (B*H, 1, N, D), checked.

    Returns (q, k, v, drop_noise, shapes, three_d); ``three_d`` says to squeeze the output."""
    q, k, v = _autocast_inputs(q, k, v)
    three_d = isinstance(q, torch.Tensor) and q.dim() == 3
    if three_d:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"`q` is 3-D (B*H, N, D), so `{name}` must be 3-D too, got {shape}")
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if isinstance(drop_noise, torch.Tensor) and drop_noise.dim() == 3:
            drop_noise = drop_noise.unsqueeze(1)
    return q, k, v, drop_noise, check_qkv(q, k, v), three_d


def fastmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    p: int = 2,
    a0: float = 1.0,
    a1: float = 1.0,
    a2: float = 0.5,
    normalize: bool = False,
    lim: float = 1.0,
    dropout: float = 0.0,
    drop_noise: torch.Tensor | None = None,
    rpe_matrix: torch.Tensor | None = None,
    backend: str = "auto",
    window: int | None = None,
    window_gain: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Fastmax attention: o_i = sum_j f(s_ij) v_j / sum_j f(s_ij), f(s) = a0 + a1 s + a2 s^2.

    Args:
        q: (B, Hq, Nq, D) or (B*H, Nq, D).
        k: (B, Hk, Nk, D) or (B*H, Nk, D); Hq must be a multiple of Hk (grouped-query
            attention: query head h reads key/value head h // (Hq / Hk); K/V are never repeated).
        v: (B, Hk, Nk, Dv) or (B*H, Nk, Dv).
        causal: key j is visible to query i iff j <= i + (Nk - Nq) (bottom-right aligned).
            Flags (``causal``, ``normalize``) are Python bools: anything else, a NumPy bool or
            a bool tensor included, is a TypeError naming the argument (``validation.check_flag``).
        key_padding_mask: bool (B, Nk), True = attend (Hugging Face's convention). A query
            with no visible key returns 0.
        scale: s_ij = (q_i . k_j) * scale; 1/sqrt(D) when None (as in SDPA).
        p: 2 for a0 + a1 s + a2 s^2, 1 for a0 + a1 s.
        normalize, lim: scale q and k by lim / max_n ||x_n|| so that |s| <= lim^2 * scale.
            Without a causal mask the maximum runs over the whole sequence (as in the seed);
            with one, over n <= i, so that no position reads the future.
        dropout, drop_noise: multiply the output by (1 + dropout * xi), xi ~ N(0, 1)
            (``drop_noise`` supplies xi). Applied whenever dropout > 0, like SDPA's dropout_p.
        rpe_matrix: (2M-1, D) relative position vectors added to the keys (see
            ``rpe_matrix_creator``); only the exact O(N^2) path supports it.
        backend: "auto", "reference" (direct O(N^2) form, any dtype, every option),
            "chunked" (PyTorch, linear time, O(N) memory in forward and backward) or
            "triton" (fused GPU kernels). "auto" takes Triton for float16/bfloat16/float32
            CUDA tensors, the reference when an rpe_matrix is given (nothing else supports
            it), and the chunked PyTorch form otherwise (CPU, float64); CUDA tensors that
            cannot take the kernels get the chunked form and a warning saying why
            (``fastmax_hf.backends`` decides).
        window: None (default: plain fastmax, unchanged) or a positive int W: the hybrid window
            (causal only, else a ValueError). Query i weights the visible keys of its last W
            positions, t_i - W < j <= t_i, by exp(s_ij) and the earlier visible keys by
            window_gain * f(s_ij), with one normaliser for both (``fastmax_hf.window`` derives
            it). W >= Nk is exact softmax over the visible keys. Every backend runs it:
            "triton" and "chunked" in linear time and O(N) memory (a band of W keys per query
            block beside plain fastmax over the keys before the window), "reference" in O(N^2).
        window_gain: gamma, the weight of the fastmax part: a positive number (default 1.0, which
            makes f(s), the Taylor expansion of e^s, commensurate with the window's e^s) or a
            floating tensor of shape () or (Hq,) (one per query head), differentiable.

    Returns:
        (B, Hq, Nq, Dv) (or (B*H, Nq, Dv)) in q's dtype.

    Raises:
        ValueError/TypeError naming the argument on bad input, and ValueError when the
        kernel's coefficients let a denominator reach 0 and it does.
    """
    q, k, v, drop_noise, shapes, three_d = _as_4d(q, k, v, drop_noise)
    options = FastmaxOptions.resolve(shapes.dim, scale=scale, p=p, a0=a0, a1=a1, a2=a2, normalize=normalize, lim=lim,
                                     window=window, window_gain=window_gain)
    out = _attend(q, k, v, shapes, options, causal=causal, key_padding_mask=key_padding_mask, dropout=dropout,
                  drop_noise=drop_noise, rpe_matrix=rpe_matrix, backend=backend)
    return out.squeeze(1) if three_d else out


def fastmax_with_options(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: FastmaxOptions,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    drop_noise: torch.Tensor | None = None,
    rpe_matrix: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``fastmax`` for a caller that holds its ``FastmaxOptions`` already (the Hugging Face
    attention function, ``FastmaxConfig.options_for``). Same arguments otherwise."""
    q, k, v, drop_noise, shapes, three_d = _as_4d(q, k, v, drop_noise)
    out = _attend(q, k, v, shapes, options, causal=causal, key_padding_mask=key_padding_mask, dropout=dropout,
                  drop_noise=drop_noise, rpe_matrix=rpe_matrix, backend=backend)
    return out.squeeze(1) if three_d else out


def _attend(q, k, v, shapes: Shapes, options: FastmaxOptions, *, causal, key_padding_mask, dropout, drop_noise,
            rpe_matrix, backend) -> torch.Tensor:
    """Checked 4-D q, k, v -> (B, Hq, Nq, Dv): the remaining checks, then the stages of ``stages.py``."""
    check_flag("causal", causal)
    check_dropout(dropout)
    key_padding_mask = check_key_padding_mask(key_padding_mask, shapes, q.device)
    check_drop_noise(drop_noise, (shapes.batch, shapes.heads_q, shapes.len_q, shapes.dim_v), q.device)
    check_rpe_matrix(rpe_matrix, shapes, q.device)
    check_window_causal(options.window, causal)
    check_window_gain_tensor(options.window_gain, shapes.heads_q, q.device)
    has_rpe = rpe_matrix is not None
    implementation = choose_backend(backend, q.device, q.dtype, rpe_matrix=has_rpe, window=options.window is not None)

    if implementation == "reference":
        out, den = reference_attention(q, k, v, options, causal=causal, key_padding_mask=key_padding_mask,
                                       rpe_matrix=rpe_matrix)
    else:
        if options.normalize:
            scaler = None
            if implementation == "triton":
                from .kernels import normalize_scaler

                scaler = normalize_scaler()  # the kernels' scaling where the settings ask for it
            q, k = normalize_qk(q, k, options.lim, causal, key_padding_mask, scaler=scaler)
        if options.window is not None:
            out, den = window_attention(q, k, v, options, key_padding_mask=key_padding_mask,
                                        implementation=implementation)
        elif implementation == "triton":
            from .kernels import triton_attention

            out, den = triton_attention(q, k, v, options, causal=causal, key_padding_mask=key_padding_mask)
        else:
            out, den = chunked_attention(q, k, v, options, causal=causal, key_padding_mask=key_padding_mask)

    check_denominators(den, options, shapes, causal, key_padding_mask, rpe=has_rpe)
    return apply_dropout(out, dropout, drop_noise)
