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

Eager calls take the autograd Function ``_HybridWindow``; under torch.compile the custom
operators ``fastmax_hf::window_forward`` and ``fastmax_hf::window_backward`` run the same two
functions (``_hybrid_forward``, ``_hybrid_backward``), with what the backward reads (den and M,
the rest's output for a learned gain, the rest's key states) as outputs of the forward.
"""

from __future__ import annotations

import functools

import torch

from .common import cdiv
from .ops import (
    KeyStates,
    _key_states_shapes,
    _linear_forward_heads,
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
    key_states_chunk,
    linear_backward_terms,
    linear_forward,
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


# ---------------------------------------------------------------------------------------------
# forward and backward of the whole call: one eager autograd Function, and custom operators
# (the same two functions) for torch.compile
# ---------------------------------------------------------------------------------------------


def _hybrid_forward(q, k, v, mask, gain, coefficients, window: int, regime: str, keep_chunk: int, keep_rest: bool):
    """(out, den, M, out_r, den_r, key_states) of the whole call. Linear regime with a rest: the
    rest's (out_r, den_r) returned where ``keep_rest`` (a learned gain's gradient reads them),
    its ``KeyStates`` where ``keep_chunk`` > 0 (``key_states_chunk`` of q and the rest's keys:
    the backward skips one state pass); otherwise None."""
    if regime == "quadratic":
        out, den, M = fused_quadratic_forward(q, k, v, mask, gain, coefficients, window)
        return out, den, M, None, None, None
    out_r = den_r = key_states = None
    if k.shape[2] - window > 0:  # some query has keys before its window: the rest first
        kr, vr, mr = _rest_inputs(k, v, mask, window)
        if keep_chunk:
            out_r, den_r, key_states = _linear_forward_heads(q, kr, vr, mr, True, *coefficients, keep_chunk,
                                                             keep=True)
        else:
            out_r, den_r = linear_forward(q, kr, vr, mr, True, *coefficients)
    out, den, M = window_forward(q, k, v, mask, out_r, den_r, gain, coefficients[0], window)
    if not keep_rest:
        out_r = den_r = None
    return out, den, M, out_r, den_r, key_states


def _hybrid_backward(q, k, v, mask, out, den, M, gain, out_r, den_r, key_states, grad_out, coefficients,
                     window: int, regime: str, gain_grad: bool):
    """(dq, dk, dv, dgain): dgain (Hq,) fp32 where ``gain_grad``, else None."""
    has_rest = k.shape[2] - window > 0
    if regime == "quadratic":
        dq, dk, dv, inv_den, crow = fused_quadratic_backward(q, k, v, mask, out, den, M, gain, grad_out,
                                                             coefficients, window)
        dgain = None
        if gain_grad:
            dgain = _gain_gradient_quadratic(q, k, v, mask, grad_out, M, inv_den, crow, coefficients, window)
        return dq, dk, dv, dgain
    dq, dk, dv, inv_den, crow, inv_r, crow_r, k_finite = window_backward(
        q, k, v, mask, out, den, M, gain, grad_out, coefficients[0], window, has_rest)
    dgain = torch.zeros_like(gain) if gain_grad else None
    if has_rest:
        kr, vr, mr = _rest_inputs(k, v, mask, window)
        n = kr.shape[2]
        # the rest's kernels add their gradients to the window's in place: no pass of their own
        linear_backward_terms(q, kr, vr, mr, grad_out, inv_r, crow_r, True, *coefficients, key_states=key_states,
                              grads=(dq, dk[:, :, :n], dv[:, :, :n]), accumulate=True, k_finite=k_finite[:, :, :n])
        if gain_grad:
            dgain = _gain_gradient(grad_out, M, out_r, den_r, inv_den, crow)
    return dq, dk, dv, dgain


def _keep_chunk_of(q, k, v, p: int, window: int, regime: str, differentiated: bool) -> int:
    """The chunk of the rest's key states a differentiated linear-regime call keeps, else 0."""
    if regime != "linear" or not differentiated or k.shape[2] - window <= 0:
        return 0
    kr, vr, _ = _rest_inputs(k, v, None, window)
    return key_states_chunk(q, kr, vr, p, True)


class _HybridWindow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, gain, coefficients, window, regime):
        differentiated = any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[4]
        keep_chunk = _keep_chunk_of(q, k, v, coefficients[1], window, regime, differentiated)
        out, den, M, out_r, den_r, key_states = _hybrid_forward(q, k, v, mask, gain, coefficients, window, regime,
                                                                keep_chunk, keep_rest=ctx.needs_input_grad[4])
        ctx.save_for_backward(q, k, v, mask, out, den, M, gain, out_r, den_r)
        ctx.settings = (coefficients, window, regime, key_states)
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_den):
        q, k, v, mask, out, den, M, gain, out_r, den_r = ctx.saved_tensors
        coefficients, window, regime, key_states = ctx.settings
        dq, dk, dv, dgain = _hybrid_backward(q, k, v, mask, out, den, M, gain, out_r, den_r, key_states, grad_out,
                                             coefficients, window, regime, gain_grad=ctx.needs_input_grad[4])
        return dq, dk, dv, None, dgain, None, None, None


def _nothing(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """The empty tensor a custom operator returns for an output it does not have."""
    return like.new_empty(0, dtype=dtype)


@torch.library.custom_op("fastmax_hf::window_forward", mutates_args=(), device_types=("cuda", "cpu"))
def window_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, gain: torch.Tensor,
    scale: float, p: int, a0: float, a1: float, a2: float, window: int, regime: str,
    keep_chunk: int = 0, keep_rest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, den_m, out_r, den_r, H, Z): ``_hybrid_forward``'s, den and M as the one fp32
    (2, B, Hq, Nq) tensor they are views of (a custom operator's outputs may not alias), and
    empty tensors for what it does not keep (``keep_chunk`` and ``keep_rest`` are decided when
    the call is traced)."""
    out, den, M, out_r, den_r, states = _hybrid_forward(q, k, v, mask, gain, (scale, p, a0, a1, a2), window, regime,
                                                        keep_chunk, keep_rest)
    den_m = den._base if den._base is not None and den._base is M._base else torch.stack((den, M))
    rest = (out_r, den_r) if out_r is not None else (_nothing(q), _nothing(q, torch.float32))
    kept = (states.H, states.Z) if states is not None else (_nothing(q), _nothing(q, torch.float32))
    return out, den_m, *rest, *kept


@window_forward_op.register_fake
def _(q, k, v, mask, gain, scale, p, a0, a1, a2, window, regime, keep_chunk=0, keep_rest=False):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty(B, Hq, Nq, v.shape[-1])
    den_m = q.new_empty(2, B, Hq, Nq, dtype=torch.float32)
    has_rest = regime == "linear" and k.shape[2] - window > 0
    if has_rest and keep_rest:
        rest = (q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32))
    else:
        rest = (_nothing(q), _nothing(q, torch.float32))
    if has_rest and keep_chunk:
        kr, vr, _ = _rest_inputs(k, v, None, window)
        pb = _Problem.of(q, kr, vr)
        h_shape, z_shape = _key_states_shapes(pb, p, True, keep_chunk)
        kept = (q.new_empty(h_shape, dtype=pb.state_dtype), q.new_empty(z_shape, dtype=torch.float32))
    else:
        kept = (_nothing(q), _nothing(q, torch.float32))
    return out, den_m, *rest, *kept


@torch.library.custom_op("fastmax_hf::window_backward", mutates_args=(), device_types=("cuda", "cpu"))
def window_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
    den_m: torch.Tensor, gain: torch.Tensor, out_r: torch.Tensor, den_r: torch.Tensor,
    H: torch.Tensor, Z: torch.Tensor, grad_out: torch.Tensor,
    scale: float, p: int, a0: float, a1: float, a2: float, window: int, regime: str,
    keep_chunk: int = 0, keep_rest: bool = False, gain_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgain): ``_hybrid_backward``'s, dgain empty unless ``gain_grad``."""
    has_rest = regime == "linear" and k.shape[2] - window > 0
    states = KeyStates(H, Z, keep_chunk) if has_rest and keep_chunk else None
    rest = (out_r, den_r) if has_rest and keep_rest else (None, None)
    dq, dk, dv, dgain = _hybrid_backward(q, k, v, mask, out, den_m[0], den_m[1], gain, *rest, states, grad_out,
                                         (scale, p, a0, a1, a2), window, regime, gain_grad)
    return dq, dk, dv, dgain if dgain is not None else _nothing(gain)


@window_backward_op.register_fake
def _(q, k, v, mask, out, den_m, gain, out_r, den_r, H, Z, grad_out, scale, p, a0, a1, a2, window, regime,
      keep_chunk=0, keep_rest=False, gain_grad=False):
    dgain = torch.empty_like(gain) if gain_grad else _nothing(gain)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgain


def _window_setup_context(ctx, inputs, output):
    q, k, v, mask, gain, scale, p, a0, a1, a2, window, regime, keep_chunk, keep_rest = inputs
    out, den_m, out_r, den_r, H, Z = output
    ctx.save_for_backward(q, k, v, mask, out, den_m, gain, out_r, den_r, H, Z)
    ctx.settings = (scale, p, a0, a1, a2, window, regime, keep_chunk, keep_rest)


def _window_op_backward(ctx, grad_out, *_grads_of_the_rest):
    scale, p, a0, a1, a2, window, regime, keep_chunk, keep_rest = ctx.settings
    gain_grad = ctx.needs_input_grad[4]
    dq, dk, dv, dgain = window_backward_op(*ctx.saved_tensors, grad_out, scale, p, a0, a1, a2, window, regime,
                                           keep_chunk, keep_rest, gain_grad)
    return (dq, dk, dv, None, dgain if gain_grad else None) + (None,) * 9


torch.library.register_autograd("fastmax_hf::window_forward", _window_op_backward,
                                setup_context=_window_setup_context)


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
    ("auto": by Nk as for ``triton_attention``, "quadratic", "linear").

    In eager mode one autograd Function runs the kernels; under torch.compile the custom
    operators ``fastmax_hf::window_forward`` / ``window_backward`` (opaque to the compiler,
    the same kernels), which return what the backward keeps as outputs of their own."""
    check_kernel_dtypes(q, k, v)
    Hq, Nk, D = q.shape[1], k.shape[2], q.shape[-1]
    if regime == "auto":
        regime = choose_regime(Nk, D, options.p)
    if regime not in ("quadratic", "linear"):
        raise ValueError(f"`regime` must be 'auto', 'quadratic' or 'linear', got {regime!r}")
    compiling = torch.compiler.is_compiling()
    gain = getattr(options, "window_gain", 1.0)
    if isinstance(gain, torch.Tensor):
        gain = gain.to(device=q.device, dtype=torch.float32).expand(Hq).contiguous()  # (Hq,); the gradient flows back
    elif compiling or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        # traced, or kept out of a CUDA graph's memory pool: made per call, not cached
        gain = torch.full((Hq,), float(gain), dtype=torch.float32, device=q.device)
    else:
        gain = _constant_gain(float(gain), Hq, str(q.device))
    coefficients = (float(options.scale), int(options.p), float(options.a0), float(options.a1), float(options.a2))
    if compiling:
        gain_grad = torch.is_grad_enabled() and gain.requires_grad
        differentiated = torch.is_grad_enabled() and (gain_grad or any(x.requires_grad for x in (q, k, v)))
        keep_chunk = _keep_chunk_of(q, k, v, coefficients[1], int(window), regime, differentiated)
        out, den_m = window_forward_op(q, k, v, key_padding_mask, gain, *coefficients, int(window), regime,
                                       keep_chunk, gain_grad)[:2]
        return out, den_m[0]
    return _HybridWindow.apply(q, k, v, key_padding_mask, gain, coefficients, int(window), regime)
