"""The public Fastmax function and its dispatch between implementations."""

from __future__ import annotations

import os

import torch

from .chunked import chunked_attention
from .reference import fastmax_reference
from .validation import (
    check_drop_noise,
    check_key_padding_mask,
    check_options,
    check_qkv,
    check_rpe_matrix,
    kernel_can_vanish,
)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``.

    CUDA devices need Triton installed; CPU tensors only under TRITON_INTERPRET=1
    (Triton's interpreter, used by the CPU test-suite).
    """
    try:
        from .kernels import HAS_TRITON
    except ImportError:  # pragma: no cover - kernels are part of the package
        return False
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_refusal(q, rpe_matrix) -> str | None:
    """Why the Triton kernels cannot take this call, or None when they can."""
    if rpe_matrix is not None:
        return "rpe_matrix is only supported by the exact O(N^2) path: use backend='reference'"
    if not triton_available(q.device):
        return f"the Triton kernels need a CUDA device (got {q.device}) and an installed triton"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32 inputs, got {q.dtype}"
    return None


def norm_scale(x, lim, causal, valid=None, prev_peak=None):
    """lim / max ||x_n|| for every position: (B, H, N, 1) in x's dtype, and the last peak (B, H).

    Without a causal mask the maximum runs over the whole sequence (as in the seed); with
    one, over n <= i, continuing ``prev_peak`` (the maximum over earlier tokens, for
    decoding), so that no position reads the future. ``valid`` (B, N) leaves padded
    positions out of the maximum."""
    work = x.to(prev_peak.dtype) if prev_peak is not None else (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    norms = torch.linalg.vector_norm(work, dim=-1)  # (B, H, N)
    if valid is not None:
        norms = norms.masked_fill(~valid[:, None, :], 0.0)
    peak = torch.cummax(norms, dim=-1).values if causal else norms.amax(-1, keepdim=True)
    if prev_peak is not None:
        peak = torch.maximum(peak, prev_peak[..., None])
    # a zero peak means every vector so far is 0 (or padded): any factor works, take 0
    factor = torch.where(peak > 0, lim / peak.clamp_min(torch.finfo(peak.dtype).tiny), torch.zeros_like(peak))
    return factor.to(x.dtype).unsqueeze(-1), peak[..., -1]


def _normalize_qk(q, k, lim, causal, key_padding_mask):
    """Scale q and k by lim / max ||x_n|| (see ``norm_scale``).

    Padded keys do not count towards the maximum, nor do padded queries when q and k are
    the same tokens (Nq == Nk)."""
    query_mask = key_padding_mask if q.shape[2] == k.shape[2] else None
    return q * norm_scale(q, lim, causal, query_mask)[0], k * norm_scale(k, lim, causal, key_padding_mask)[0]


def _visible_rows(shapes, causal, key_padding_mask, device):
    """(B, 1, Nq) bool: which query rows see at least one key."""
    last = torch.arange(shapes.len_q, device=device) + (shapes.len_k - shapes.len_q)  # t_i
    if key_padding_mask is None:
        if not causal:
            return torch.ones(1, 1, shapes.len_q, dtype=torch.bool, device=device)
        return (last >= 0)[None, None, :]
    if not causal:
        return key_padding_mask.any(-1)[:, None, None].expand(-1, 1, shapes.len_q)
    seen = torch.cumsum(key_padding_mask.to(torch.int32), dim=-1)  # (B, Nk)
    idx = last.clamp_min(0)[None, :].expand(shapes.batch, -1)
    counts = torch.gather(seen, 1, idx) * (last >= 0)
    return (counts > 0)[:, None, :]


def _check_denominator(den, shapes, causal, key_padding_mask, p, a0, a1, a2):
    visible = _visible_rows(shapes, causal, key_padding_mask, den.device)  # (B, 1, Nq)
    if bool(((den <= 0) & visible).any()):
        kernel = f"{a0} + {a1}*s" + (f" + {a2}*s^2" if p == 2 else "")
        raise ValueError(
            f"the Fastmax denominator sum_j f(s_ij) reached 0 or below: f(s) = {kernel} is not positive "
            "for every score. With p=1 use normalize=True with a small enough `lim`, or choose a0, a1, a2 "
            "so that f(s) > 0 (e.g. the default a0=1, a1=1, a2=0.5 with p=2)."
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
) -> torch.Tensor:
    """Fastmax attention: o_i = sum_j f(s_ij) v_j / sum_j f(s_ij), f(s) = a0 + a1 s + a2 s^2.

    Args:
        q: (B, Hq, Nq, D) or (B*H, Nq, D).
        k: (B, Hk, Nk, D) or (B*H, Nk, D); Hq must be a multiple of Hk (grouped-query
            attention: query head h reads key/value head h // (Hq / Hk); K/V are never repeated).
        v: (B, Hk, Nk, Dv) or (B*H, Nk, Dv).
        causal: key j is visible to query i iff j <= i + (Nk - Nq) (bottom-right aligned).
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
            it), and the chunked PyTorch form otherwise (CPU, float64).

    Returns:
        (B, Hq, Nq, Dv) (or (B*H, Nq, Dv)) in q's dtype.

    Raises:
        ValueError/TypeError naming the argument on bad input, and ValueError when the
        kernel's coefficients let a denominator reach 0 and it does.
    """
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
    shapes = check_qkv(q, k, v)
    check_options(p=p, a0=a0, a1=a1, a2=a2, dropout=dropout, lim=lim, scale=scale, backend=backend)
    key_padding_mask = check_key_padding_mask(key_padding_mask, shapes, q.device)
    out_shape = (shapes.batch, shapes.heads_q, shapes.len_q, shapes.dim_v)
    check_drop_noise(drop_noise, out_shape, q.device)
    check_rpe_matrix(rpe_matrix, shapes, q.device)
    causal = bool(causal)
    if scale is None:
        scale = shapes.dim ** -0.5
    scale = float(scale)

    if backend == "auto":
        if rpe_matrix is not None:
            backend = "reference"
        elif q.device.type == "cuda" and _triton_refusal(q, None) is None:
            backend = "triton"
        else:
            backend = "chunked"

    if backend == "reference":
        out, den = fastmax_reference(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, p=p,
            a0=a0, a1=a1, a2=a2, normalize=normalize, lim=lim, rpe_matrix=rpe_matrix,
            return_denominator=True,
        )
    else:
        if rpe_matrix is not None:
            raise ValueError(
                f"`rpe_matrix` is only supported by the exact O(N^2) path: use backend='reference' "
                f"(or 'auto'), not backend={backend!r}"
            )
        if normalize:
            q, k = _normalize_qk(q, k, lim, causal, key_padding_mask)
        if backend == "triton":
            refusal = _triton_refusal(q, None)
            if refusal is not None:
                raise ValueError(f"backend='triton' cannot run this call: {refusal}")
            from .kernels import triton_attention
            from .options import FastmaxOptions

            out, den = triton_attention(
                q, k, v, FastmaxOptions(scale=scale, p=p, a0=a0, a1=a1, a2=a2),
                causal=causal, key_padding_mask=key_padding_mask,
            )
        else:
            out, den = chunked_attention(
                q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                p=p, a0=a0, a1=a1, a2=a2,
            )

    bound = lim * lim * abs(scale) if normalize and rpe_matrix is None else None
    if kernel_can_vanish(p, a0, a1, a2, bound):
        _check_denominator(den.detach(), shapes, causal, key_padding_mask, p, a0, a1, a2)

    if dropout > 0.0:
        noise = drop_noise if drop_noise is not None else torch.randn_like(out)
        out = out * (1.0 + dropout * noise.to(out.dtype))
    if three_d:
        out = out.squeeze(1)
    return out
