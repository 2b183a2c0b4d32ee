"""The hybrid window on the Triton kernels, as one autograd Function.

``triton_window_attention(q, k, v, options, key_padding_mask=..., window=W)`` returns
(out (B, Hq, Nq, Dv) in q's dtype, den (B, Hq, Nq) fp32): exact softmax over the last W
visible keys of every query and gamma f(s) over the earlier ones, under one normaliser
(``fastmax_hf.window`` defines it; kernels/window.py gives the stable form computed here).

Quadratic regime: both parts in the same tiles (kernels/window_quadratic.py), one forward
launch and two backward launches, as for plain Fastmax (where plain Fastmax adds dq inside its
key-block kernel, the row terms' kernel and that one kernel).

Linear regime: the rest, plain causal Fastmax of the queries over the keys [0, Nk - W) (with
bottom-right alignment query i then sees exactly the keys j <= t_i - W), on the linear kernels;
then one window kernel over each query block's band of keys, which also joins the rest's output
and denominator and writes the final output (kernels/window.py). Backward: the window's dq
kernel (it writes the row terms), its key-block kernel, and the rest's Fastmax backward with
the row terms scaled by rho = gamma e^{-M} (``linear_backward_terms``), whose kernels add their
gradients to the window's in place and read the window's copy of the finite keys.

In neither regime does anything per pair or a partial fp32 output go through memory.
"""

from __future__ import annotations

import functools

import torch

from .common import cdiv
from .ops import (
    _mask_args,
    _dq_accumulator,
    _dq_fused,
    _Problem,
    _chosen,
    _quad_defaults,
    _quad_settings_prefix,
    _quad_wide,
    _record,
    check_kernel_dtypes,
    choose_regime,
    dq_from_accumulator,
    finite_keys,
    linear_backward_terms,
    linear_forward_keeping,
    quadratic_forward,
    rows_block,
)
from .settings import current_settings
from .window import window_bwd_dkdv_kernel, window_bwd_dq_kernel, window_fwd_kernel
from .window_quadratic import (
    hybrid_quadratic_bwd_dkdv_kernel,
    hybrid_quadratic_bwd_dq_kernel,
    hybrid_quadratic_fwd_kernel,
    hybrid_rows_kernel,
)


def _window_config(pb: _Problem) -> dict:
    """Tiles of the window kernels: the settings where given, else 64 x 64 with 4 warps (32 x 32
    with fp32 operands): the fastest of five tile/warp candidates on an H100 at 64k and 128k
    tokens, D=64 (benchmarks/h100/window/window_sweep.jsonl)."""
    wide = pb.dtype != torch.bfloat16
    s = current_settings()
    return dict(block_m=s.window_block_m or (32 if wide else 64), block_n=s.window_block_n or (32 if wide else 64),
                warps=s.window_warps or 4, stages=1)


def _launch_flags(pb: _Problem, cfg: dict, mask, has_rest: bool) -> dict:
    return dict(HAS_MASK=mask is not None, HAS_REST=has_rest, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                **pb.flags(), num_warps=cfg["warps"], num_stages=cfg["stages"])


def _row_buffers(pb: _Problem, count: int, device) -> tuple[torch.Tensor, ...]:
    """``count`` fp32 (B, Hq, Nq) per-row buffers (den and M; the backward's 1/d, c, rho/d, rho c)
    from one allocation, each contiguous: at 4k tokens the calls are host-bound, and every
    allocation is a few microseconds of the host's time per launch (benchmarks/h100/window/tiles/
    cprofile.jsonl: the window's ten allocations per forward+backward against plain Fastmax's six)."""
    return tuple(torch.empty(count, pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=device).unbind(0))


def _rest_inputs(k, v, mask, window: int):
    """The keys, values and mask at least W positions back from the last: [0, Nk - W)."""
    n = k.shape[2] - window
    return k[:, :, :n], v[:, :, :n], None if mask is None else mask[:, :n]


def window_forward(q, k, v, mask, out_r, den_r, gain, scale: float, window: int):
    """(out (B, Hq, Nq, Dv) in q's dtype, den (B, Hq, Nq) fp32, M (B, Hq, Nq) fp32): the window over
    each query block's band joined with the rest's (out_r, den_r) (None: no rest)."""
    pb = _Problem.of(q, k, v)
    out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    den, M = _row_buffers(pb, 2, q.device)
    if out.numel() == 0 or den.numel() == 0:
        return out.zero_(), den.zero_(), M.zero_()
    has_rest = out_r is not None
    if not has_rest:
        out_r, den_r = out, den  # not read
    mk, smb, smn = _mask_args(mask, q)
    cfg = _window_config(pb)
    compiled = window_fwd_kernel[(cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
        q, k, v, mk, out_r, den_r.contiguous(), gain, out, den, M,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *out_r.stride(), *out.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **_launch_flags(pb, cfg, mask, has_rest),
    )
    _record("window_fwd", compiled)
    return out, den, M


def window_backward(q, k, v, mask, out, den, M, gain, grad_out, scale: float, window: int, has_rest: bool):
    """The window's dq, dk, dv (the inputs' dtypes, m held constant), the row terms
    (1/d, c, rho/d, rho c), fp32 (B, Hq, Nq), the last two None without a rest, and
    ``finite_keys(k)``, which the rest's backward reads too."""
    pb = _Problem.of(q, k, v, grad_out)
    dq = torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device)
    dk = torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device)
    dv = torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device)
    # every row's terms are written by the dq kernel: no fill
    inv_den, crow, inv_r, crow_r = _row_buffers(pb, 4, q.device) if has_rest else (_row_buffers(pb, 2, q.device) * 2)
    if pb.B * pb.Hq * pb.Nq == 0 or pb.Nk == 0:
        for terms in (inv_den, crow, inv_r, crow_r):
            terms.zero_()
        return dq.zero_(), dk.zero_(), dv.zero_(), inv_den, crow, inv_r, crow_r, k
    mk, smb, smn = _mask_args(mask, q)
    cfg = _window_config(pb)
    flags = dict(_launch_flags(pb, cfg, mask, has_rest), OP_BF16=pb.op_bf16)
    k_finite = finite_keys(k)
    compiled = window_bwd_dq_kernel[(cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
        q, k, k_finite, v, mk, grad_out, out, den, M, gain, dq, inv_den, crow, inv_r, crow_r,
        *q.stride(), *k.stride(), *k_finite.stride(), *v.stride(), smb, smn, *grad_out.stride(), *out.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **flags,
    )
    _record("window_bwd_dq", compiled)
    flags.pop("HAS_REST")
    compiled = window_bwd_dkdv_kernel[(cdiv(pb.Nk, cfg["block_n"]), pb.B * pb.Hk)](
        q, k, v, mk, grad_out, inv_den, crow, M, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride(),
        pb.Hq, pb.Hk, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, **flags,
    )
    _record("window_bwd_dkdv", compiled)
    return dq, dk, dv, inv_den, crow, (inv_r if has_rest else None), (crow_r if has_rest else None), k_finite


# ---------------------------------------------------------------------------------------------
# quadratic regime: both parts in one set of tiles (kernels/window_quadratic.py)
# ---------------------------------------------------------------------------------------------


def _hybrid_quad_config(pb: _Problem, kernel: str) -> dict:
    """The hybrid's quadratic tiles: plain Fastmax's defaults but where the band measured
    otherwise, then the same quad_* settings. At D <= 64 with 16-bit products (H100, 4k causal,
    B=1, H=16, GPU kernel sums of benchmarks/h100/window/tiles/tiles.jsonl): a 64-query forward
    block (0.113 ms against 0.125 with 128: a block's band is BLOCK_M + W keys, visited twice,
    for the window maximum and for the weights, so each query scores 128 band keys instead of
    192 at W = 64) and 3 pipeline stages in dq (0.129 ms against 0.170 with 2, where plain
    Fastmax's dq keeps 2)."""
    defaults = _quad_defaults(pb, kernel)
    if not _quad_wide(pb, kernel) and pb.block_d <= 64:
        if kernel == "fwd":
            defaults = dict(defaults, block_m=64)
        elif kernel == "dq":
            defaults = dict(defaults, stages=3)
    return _chosen(defaults, _quad_settings_prefix(kernel))


def _fused_flags(pb: _Problem, cfg: dict, mask, p: int) -> dict:
    return dict(P=p, HAS_MASK=mask is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], **pb.flags(),
                num_warps=cfg["warps"], num_stages=cfg["stages"])


def fused_quadratic_forward(q, k, v, mask, gain, coefficients, window: int):
    """(out, den, M) as ``window_forward``'s, in one launch: the rest inside the same tiles."""
    scale, p, a0, a1, a2 = coefficients
    pb = _Problem.of(q, k, v)
    out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    den, M = _row_buffers(pb, 2, q.device)
    if out.numel() == 0 or den.numel() == 0:
        return out.zero_(), den.zero_(), M.zero_()
    mk, smb, smn = _mask_args(mask, q)
    cfg = _hybrid_quad_config(pb, "fwd")
    compiled = hybrid_quadratic_fwd_kernel[(cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
        q, k, v, mk, gain, out, den, M, *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, a0, a1 * scale, a2 * scale * scale,
        **_fused_flags(pb, cfg, mask, p),
    )
    _record("hybrid_quadratic_fwd", compiled)
    return out, den, M


def fused_quadratic_backward(q, k, v, mask, out, den, M, gain, grad_out, coefficients, window: int):
    """dq, dk, dv (the inputs' dtypes) and the row terms (1/d, c) in two launches."""
    scale, p, a0, a1, a2 = coefficients
    c1, c2 = a1 * scale, a2 * scale * scale
    pb = _Problem.of(q, k, v, grad_out)
    dq = torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device)
    dk = torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device)
    dv = torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device)
    inv_den, crow, inv_r, crow_r = _row_buffers(pb, 4, q.device)  # every row written by a kernel
    if pb.B * pb.Hq * pb.Nq == 0 or pb.Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), inv_den.zero_(), crow.zero_()
    mk, smb, smn = _mask_args(mask, q)
    k_finite = finite_keys(k)
    if _dq_fused(pb, q.device):  # as plain Fastmax's backward decides: the row terms, then one key-block kernel
        cfg = _hybrid_quad_config(pb, "fused")
        rows_m = rows_block(pb)
        compiled = hybrid_rows_kernel[(cdiv(pb.Nq, rows_m), pb.B * pb.Hq)](
            out, grad_out, den, M, gain, inv_den, crow, inv_r, crow_r, *out.stride(), *grad_out.stride(),
            pb.Hq, pb.Nq, pb.Dv, BLOCK_M=rows_m, BLOCK_DV=pb.block_dv, EVEN_DV=pb.Dv == pb.block_dv, I64=pb.i64,
            num_warps=4,
        )
        _record("hybrid_rows", compiled)
        dq_acc, dq_arg, dq_mode = _dq_accumulator(pb, cfg["block_m"], q.device)
    else:
        cfg = _hybrid_quad_config(pb, "dq")
        compiled = hybrid_quadratic_bwd_dq_kernel[(cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
            q, k, k_finite, v, mk, grad_out, out, den, M, gain, dq, inv_den, crow, inv_r, crow_r,
            *q.stride(), *k.stride(), *k_finite.stride(), *v.stride(), smb, smn, *grad_out.stride(), *out.stride(),
            pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, c1, c2,
            OP_BF16=pb.op_bf16, **_fused_flags(pb, cfg, mask, p),
        )
        _record("hybrid_quadratic_bwd_dq", compiled)
        cfg = _hybrid_quad_config(pb, "dkdv")
        dq_acc, dq_arg, dq_mode = None, inv_den, 0
    compiled = hybrid_quadratic_bwd_dkdv_kernel[(cdiv(pb.Nk, cfg["block_n"]), pb.B * pb.Hk)](
        q, k, k_finite, v, mk, grad_out, inv_den, crow, inv_r, crow_r, M, gain, dk, dv, dq_arg,
        *q.stride(), *k.stride(), *k_finite.stride(), *v.stride(), smb, smn, *grad_out.stride(),
        pb.Hq, pb.Hk, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, window, scale, a0, c1, c2,
        OP_BF16=pb.op_bf16, DQ_MODE=dq_mode, **_fused_flags(pb, cfg, mask, p),
    )
    _record("hybrid_quadratic_bwd_dkdv" if dq_mode == 0 else "hybrid_quadratic_bwd_fused", compiled)
    if dq_acc is not None:
        dq = dq_from_accumulator(dq_acc, pb, q.dtype)
    return dq, dk, dv, inv_den, crow


def _gain_gradient(grad_out, M, out_r, den_r, inv_den, crow):
    """dL/dgamma_h: sum over batch rows and queries of e^{-M} d^r (g . o^r - c), g = do / d, on
    the rows the loss reads (the weight of the rest is gamma e^{-M} d^r o^r and gamma e^{-M} d^r)."""
    zero = torch.zeros((), dtype=torch.float32, device=grad_out.device)
    active = (inv_den != 0) | (crow != 0)  # (B, Hq, Nq)
    read = (grad_out.float() * out_r.float()).sum(-1) * inv_den - crow
    term = torch.where(active & (den_r != 0), torch.exp(-M) * den_r * read, zero)
    return term.sum(dim=(0, 2))


def _gain_gradient_quadratic(q, k, v, mask, grad_out, M, inv_den, crow, coefficients, window: int):
    """``_gain_gradient`` for the fused quadratic kernels, which never form the rest's (o^r, d^r)
    apart: they are computed here, once, only when gamma wants its gradient (a learned gain)."""
    if k.shape[2] - window <= 0:
        return torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    kr, vr, mr = _rest_inputs(k, v, mask, window)
    out_r, den_r = quadratic_forward(q, kr, vr, mr, True, *coefficients)
    return _gain_gradient(grad_out, M, out_r, den_r, inv_den, crow)


class _HybridWindow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, gain, coefficients, window, regime):
        has_rest = k.shape[2] - window > 0  # some query has keys before its window
        out_r = den_r = key_states = None
        if regime == "quadratic":
            out, den, M = fused_quadratic_forward(q, k, v, mask, gain, coefficients, window)
            ctx.save_for_backward(q, k, v, mask, out, den, M, gain, None, None)
            ctx.settings = (coefficients, window, regime, has_rest, None)
            ctx.mark_non_differentiable(den)
            return out, den
        if has_rest:  # the linear regime: the rest on the linear kernels, then the band kernel
            kr, vr, mr = _rest_inputs(k, v, mask, window)
            out_r, den_r, key_states = linear_forward_keeping(q, kr, vr, mr, True, *coefficients)
        out, den, M = window_forward(q, k, v, mask, out_r, den_r, gain, coefficients[0], window)
        keep_rest = has_rest and ctx.needs_input_grad[4]
        ctx.save_for_backward(q, k, v, mask, out, den, M, gain,
                              out_r if keep_rest else None, den_r if keep_rest else None)
        ctx.settings = (coefficients, window, regime, has_rest, key_states)
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_den):
        q, k, v, mask, out, den, M, gain, out_r, den_r = ctx.saved_tensors
        coefficients, window, regime, has_rest, key_states = ctx.settings
        if regime == "quadratic":
            dq, dk, dv, inv_den, crow = fused_quadratic_backward(q, k, v, mask, out, den, M, gain, grad_out,
                                                                 coefficients, window)
            dgain = None
            if ctx.needs_input_grad[4]:
                dgain = _gain_gradient_quadratic(q, k, v, mask, grad_out, M, inv_den, crow, coefficients, window)
            return dq, dk, dv, None, dgain, None, None, None
        dq, dk, dv, inv_den, crow, inv_r, crow_r, k_finite = window_backward(
            q, k, v, mask, out, den, M, gain, grad_out, coefficients[0], window, has_rest)
        dgain = None
        if has_rest:
            kr, vr, mr = _rest_inputs(k, v, mask, window)
            n = kr.shape[2]
            # the rest's kernels add their gradients to the window's in place: no pass of their own
            linear_backward_terms(q, kr, vr, mr, grad_out, inv_r, crow_r, True, *coefficients, key_states=key_states,
                                  grads=(dq, dk[:, :, :n], dv[:, :, :n]), accumulate=True, k_finite=k_finite[:, :, :n])
            if ctx.needs_input_grad[4]:
                dgain = _gain_gradient(grad_out, M, out_r, den_r, inv_den, crow)
        elif ctx.needs_input_grad[4]:
            dgain = torch.zeros_like(gain)
        return dq, dk, dv, None, dgain, None, None, None


@functools.lru_cache(maxsize=64)
def _constant_gain(value: float, heads: int, device_str: str) -> torch.Tensor:
    """A number gamma as the (heads,) fp32 tensor the kernels read, made once: torch.full on the
    GPU took 0.06 ms of host time per call under cProfile, 6% of a 4k forward+backward's
    (benchmarks/h100/window/shipped/window_ab_rounds.jsonl). Never written to."""
    with torch.inference_mode(False):  # cached: never an inference tensor
        return torch.full((heads,), value, dtype=torch.float32, device=device_str)


def triton_window_attention(q, k, v, options, *, key_padding_mask=None, window: int, regime: str = "auto"):
    """(out (B, Hq, Nq, Dv) in q's dtype, den (B, Hq, Nq) fp32) of the causal hybrid window,
    differentiable in q, k, v and a tensor ``options.window_gain`` (den is not).

    ``options``: any object with ``scale``, ``p``, ``a0``, ``a1``, ``a2`` and ``window_gain``
    (gamma: a positive number, or a tensor of shape () or (Hq,)); ``regime`` that of the rest
    ("auto": by Nk as for ``triton_attention``, "quadratic", "linear")."""
    check_kernel_dtypes(q, k, v)
    Hq, Nk, D = q.shape[1], k.shape[2], q.shape[-1]
    if regime == "auto":
        regime = choose_regime(Nk, D, options.p)
    if regime not in ("quadratic", "linear"):
        raise ValueError(f"`regime` must be 'auto', 'quadratic' or 'linear', got {regime!r}")
    gain = getattr(options, "window_gain", 1.0)
    if isinstance(gain, torch.Tensor):
        gain = gain.to(device=q.device, dtype=torch.float32).expand(Hq).contiguous()  # (Hq,); the gradient flows back
    elif q.is_cuda and torch.cuda.is_current_stream_capturing():
        gain = torch.full((Hq,), float(gain), dtype=torch.float32, device=q.device)  # not cached from a graph's pool
    else:
        gain = _constant_gain(float(gain), Hq, str(q.device))
    coefficients = (float(options.scale), int(options.p), float(options.a0), float(options.a1), float(options.a2))
    return _HybridWindow.apply(q, k, v, key_padding_mask, gain, coefficients, int(window), regime)
