"""The hybrid window's two parts on the Triton kernels, as autograd Functions.

``window_parts(q, k, v, options, key_padding_mask, window)`` returns, in the (B, Hq, Nq, ...)
layout, fp32:

    the window part  Nw (B, Hq, Nq, Dv), Dw, m (B, Hq, Nq)  (kernels/window.py), and
    the rest         Nr = sum_{j <= t_i - W} f(s_ij) v_j, Dr = sum f(s_ij),

the rest being plain causal Fastmax of the queries over the keys [0, Nk - W): with
bottom-right alignment query i then sees exactly the keys j <= t_i - W. Its forward is the
quadratic or linear kernels' (Nr = out * den), its backward theirs with the row terms of the
cotangents: g = dL/dNr and c = -dL/dDr (``linear_backward_terms``). The caller combines the
parts (``fastmax_hf.window``); nothing here knows of the gain gamma.
"""

from __future__ import annotations

import torch
import triton

from .ops import (
    _mask_args,
    _Problem,
    _record,
    check_kernel_dtypes,
    choose_regime,
    finite_keys,
    linear_backward_terms,
    linear_forward,
    quadratic_backward_terms,
    quadratic_forward,
)
from .settings import current_settings
from .window import window_bwd_dkdv_kernel, window_bwd_dq_kernel, window_fwd_kernel


def _window_config(pb: _Problem) -> dict:
    """Tiles of the window kernels: the settings where given, else 64 x 64 (32 x 32 with fp32
    operands). Not tuned on a GPU yet."""
    wide = pb.dtype != torch.bfloat16
    s = current_settings()
    return dict(block_m=s.window_block_m or (32 if wide else 64), block_n=s.window_block_n or (32 if wide else 64),
                warps=4, stages=1)


def _launch_flags(pb: _Problem, cfg: dict, mask) -> dict:
    return dict(HAS_MASK=mask is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], **pb.flags(),
                num_warps=cfg["warps"], num_stages=cfg["stages"])


def window_forward(q, k, v, mask, scale: float, window: int):
    """(Nw (B, Hq, Nq, Dv), Dw (B, Hq, Nq), m (B, Hq, Nq)), fp32 contiguous."""
    pb = _Problem.of(q, k, v)
    Nw = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=torch.float32, device=q.device)
    Dw = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=q.device)
    m = torch.empty_like(Dw)
    if Nw.numel() == 0:
        return Nw.zero_(), Dw.zero_(), m.zero_()
    mk, smb, smn = _mask_args(mask, q)
    cfg = _window_config(pb)
    flags = _launch_flags(pb, cfg, mask)
    compiled = window_fwd_kernel[(triton.cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
        q, k, v, mk, Nw, Dw, m, *q.stride(), *k.stride(), *v.stride(), smb, smn,
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **flags,
    )
    _record("window_fwd", compiled)
    return Nw, Dw, m


def window_backward(q, k, v, mask, m, gN, gD, scale: float, window: int):
    """dq, dk, dv (the inputs' dtypes) of sum_i gN_i . Nw_i + gD_i Dw_i, m held constant."""
    pb = _Problem.of(q, k, v, gN)
    gN, gD, m = gN.float().contiguous(), gD.float().contiguous(), m.contiguous()
    dq = torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device)
    dk = torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device)
    dv = torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device)
    if pb.B * pb.Hq * pb.Nq == 0 or pb.Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mk, smb, smn = _mask_args(mask, q)
    cfg = _window_config(pb)
    flags = dict(_launch_flags(pb, cfg, mask), OP_BF16=pb.op_bf16)
    k_finite = finite_keys(k)
    compiled = window_bwd_dq_kernel[(triton.cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
        q, k, k_finite, v, mk, gN, gD, m, dq, *q.stride(), *k.stride(), *k_finite.stride(), *v.stride(), smb, smn,
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **flags,
    )
    _record("window_bwd_dq", compiled)
    del k_finite
    compiled = window_bwd_dkdv_kernel[(triton.cdiv(pb.Nk, cfg["block_n"]), pb.B * pb.Hk)](
        q, k, v, mk, gN, gD, m, dk, dv, *q.stride(), *k.stride(), *v.stride(), smb, smn,
        pb.Hq, pb.Hk, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **flags,
    )
    _record("window_bwd_dkdv", compiled)
    return dq, dk, dv


def _rest_inputs(k, v, mask, window: int):
    """The keys, values and mask at least W positions back from the last: [0, Nk - W)."""
    n = k.shape[2] - window
    return k[:, :, :n], v[:, :, :n], None if mask is None else mask[:, :n]


def rest_forward(q, k, v, mask, coefficients, window: int, regime: str):
    """(Nr (B, Hq, Nq, Dv), Dr (B, Hq, Nq)) fp32; ``coefficients`` = (scale, p, a0, a1, a2)."""
    kr, vr, mr = _rest_inputs(k, v, mask, window)
    impl = quadratic_forward if regime == "quadratic" else linear_forward
    out, den = impl(q, kr, vr, mr, True, *coefficients)
    den = den.float()
    return out.float() * den[..., None], den


def rest_backward(q, k, v, mask, gN, gD, coefficients, window: int, regime: str):
    """dq, dk, dv of sum_i gN_i . Nr_i + gD_i Dr_i: the kernels' backward with g = gN (1/d = 1)
    and c = -gD on the rows the loss reads (both 0 on the others, by selection)."""
    kr, vr, mr = _rest_inputs(k, v, mask, window)
    gN, gD = gN.float().contiguous(), gD.float().contiguous()
    active = (gN != 0).any(-1) | (gD != 0)
    inv_den = active.float().contiguous()
    crow = torch.where(active, -gD, torch.zeros((), dtype=gD.dtype, device=gD.device)).contiguous()
    impl = quadratic_backward_terms if regime == "quadratic" else linear_backward_terms
    dq, dkr, dvr = impl(q, kr, vr, mr, gN, inv_den, crow, True, *coefficients)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk[:, :, : kr.shape[2]] = dkr
    dv[:, :, : vr.shape[2]] = dvr
    return dq, dk, dv


class _WindowPart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, window):
        Nw, Dw, m = window_forward(q, k, v, mask, scale, window)
        ctx.save_for_backward(q, k, v, mask, m)
        ctx.settings = (scale, window)
        ctx.mark_non_differentiable(m)
        return Nw, Dw, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gN, gD, _gm):
        q, k, v, mask, m = ctx.saved_tensors
        dq, dk, dv = window_backward(q, k, v, mask, m, gN, gD, *ctx.settings)
        return dq, dk, dv, None, None, None


class _RestPart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, coefficients, window, regime):
        Nr, Dr = rest_forward(q, k, v, mask, coefficients, window, regime)
        ctx.save_for_backward(q, k, v, mask)
        ctx.settings = (coefficients, window, regime)
        return Nr, Dr

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gN, gD):
        q, k, v, mask = ctx.saved_tensors
        coefficients, window, regime = ctx.settings
        dq, dk, dv = rest_backward(q, k, v, mask, gN, gD, coefficients, window, regime)
        return dq, dk, dv, None, None, None, None


def window_parts(q, k, v, options, *, key_padding_mask=None, window: int, regime: str = "auto"):
    """(Nw, Dw, m, Nr, Dr) of the hybrid window, fp32, in the (B, Hq, Nq, ...) layout (module
    docstring), differentiable in q, k, v (m is not). ``options``: any object with ``scale``,
    ``p``, ``a0``, ``a1``, ``a2``; ``regime`` that of the rest part ("auto": by Nk as for
    ``triton_attention``, "quadratic", "linear")."""
    check_kernel_dtypes(q, k, v)
    Nk, D = k.shape[2], q.shape[-1]
    if regime == "auto":
        regime = choose_regime(Nk, D, options.p)
    if regime not in ("quadratic", "linear"):
        raise ValueError(f"`regime` must be 'auto', 'quadratic' or 'linear', got {regime!r}")
    mask = key_padding_mask
    Nw, Dw, m = _WindowPart.apply(q, k, v, mask, float(options.scale), int(window))
    if Nk - window > 0:  # some query has keys before its window
        coefficients = (float(options.scale), int(options.p), float(options.a0), float(options.a1), float(options.a2))
        Nr, Dr = _RestPart.apply(q, k, v, mask, coefficients, int(window), regime)
    else:
        Nr, Dr = torch.zeros_like(Nw), torch.zeros_like(Dw)
    return Nw, Dw, m, Nr, Dr
