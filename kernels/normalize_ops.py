"""Launchers of normalize's scaling kernels (kernels/normalize.py), as one autograd Function.

``triton_scale_by_peak(x, lim, causal, valid)`` scales one tensor and
``triton_scale_qk_by_peak(q, k, lim, causal, q_valid, k_valid)`` two (q and k, any head
counts and lengths, one D and dtype) in the same launches: x (B, H, N, D) in fp16, bf16 or
fp32, any strides; ``valid`` (B, N) bool or None (rows that count towards the maximum). Each
result is x * lim / max_{n' <= n} ||x_n'|| ((B, H, N, D) contiguous, x's dtype),
differentiable in x: the function of ``fastmax_hf.stages._ScaleByPeak`` in two launches and a
running maximum over blocks forward, two launches and a zero fill backward, for both tensors.
"""

from __future__ import annotations

import functools

import torch

from .common import cdiv, next_power_of_2
from .ops import _max_offset
from .normalize import peak_grad_kernel, row_norms_kernel, scale_grad_kernel, scale_rows_kernel
from .settings import current_settings

BLOCK_N = 64  # rows per program: a (64, BLOCK_D) tile of x (and of the gradient) per pass


@functools.lru_cache(maxsize=16)
def _all_rows_count(device_str: str) -> torch.Tensor:
    """The padding mask of a tensor without padding: one 1 read with strides 0. Never written."""
    with torch.inference_mode(False):
        return torch.ones(1, dtype=torch.uint8, device=device_str)


def _mask_args(valid, x):
    if valid is None:
        return _all_rows_count(str(x.device)), 0, 0
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    return mask, mask.stride(0), mask.stride(1)


def _big(*tensors) -> bool:
    """Whether an offset into one of ``tensors`` (or their contiguous copies) can pass 2^31."""
    return any(max(_max_offset(t), t.numel()) >= 2**31 - 1 for t in tensors)


class _TritonScaleByPeak(torch.autograd.Function):
    """Forward (q, k, lim, causal, q_valid, k_valid) -> (q scaled, k scaled); k may be None
    (one tensor: the second problem is empty)."""

    @staticmethod
    def forward(ctx, q, k, lim, causal, q_valid, k_valid):
        second = k if k is not None else q
        B, H1, N1, D = q.shape
        H2, N2 = (k.shape[1], k.shape[2]) if k is not None else (0, 0)
        BH1, BH2 = B * H1, B * H2
        off2 = BH1 * N1  # the second tensor's rows follow the first's in the per-row buffers
        rows = off2 + BH2 * N2
        n_blocks = cdiv(max(N1, N2), BLOCK_N)
        block_d = max(16, next_power_of_2(D))
        i64 = _big(q, second)
        norms, factor = torch.empty(2, rows, dtype=torch.float32, device=q.device).unbind(0)
        at = torch.empty(rows, dtype=torch.int32, device=q.device)
        block_max = torch.empty(BH1 + BH2, n_blocks, dtype=torch.float32, device=q.device)
        block_at = torch.empty(BH1 + BH2, n_blocks, dtype=torch.int32, device=q.device)
        out_q = torch.empty(B, H1, N1, D, dtype=q.dtype, device=q.device)
        out_k = torch.empty(B, H2, N2, D, dtype=q.dtype, device=q.device) if k is not None else out_q
        mq, mk = _mask_args(q_valid, q), _mask_args(k_valid, q)
        grid = (n_blocks, BH1 + BH2)
        sizes = (BH1, H1, max(H2, 1), N1, N2, off2, D)
        flags = dict(CAUSAL=bool(causal), BLOCK_N=BLOCK_N, BLOCK_D=block_d, EVEN_D=D == block_d, I64=i64,
                     num_warps=4)
        row_norms_kernel[grid](
            q, second, mq[0], mk[0], norms, block_max, block_at, *q.stride(), *second.stride(), *mq[1:], *mk[1:],
            *sizes, n_blocks, **flags,
        )
        if causal:  # the running maximum over blocks (ties: the later block, as within a block)
            run_max, run_block = torch.cummax(block_max, dim=-1)
        else:
            run_max, run_block = block_max.max(dim=-1, keepdim=True)
        scale_rows_kernel[grid](
            q, second, norms, run_max, run_block, block_at, factor, at, out_q, out_k, *q.stride(), *second.stride(),
            *sizes, n_blocks, run_max.stride(0), float(lim), **flags,
        )
        ctx.save_for_backward(q, k, norms, factor, at)
        ctx.settings = (float(lim), bool(causal), sizes, i64)
        return out_q, (out_k if k is not None else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k):
        q, k, norms, factor, at = ctx.saved_tensors
        lim, causal, sizes, i64 = ctx.settings
        second = k if k is not None else q
        if grad_q is None:
            grad_q = torch.zeros_like(q)
        if k is not None and grad_k is None:
            grad_k = torch.zeros_like(k)
        grad_second = grad_k if k is not None else grad_q
        BH1, H1, H2, N1, N2, off2, D = sizes
        BH2 = (second.shape[0] * second.shape[1]) if k is not None else 0
        block_d = max(16, next_power_of_2(D))
        i64 = i64 or _big(grad_q, grad_second)
        grid = (cdiv(max(N1, N2), BLOCK_N), BH1 + BH2)
        flags = dict(BLOCK_N=BLOCK_N, BLOCK_D=block_d, EVEN_D=D == block_d, I64=i64, num_warps=4)
        grad_norms = torch.zeros(norms.shape[0], dtype=torch.float32, device=q.device)
        strides = (*grad_q.stride(), *grad_second.stride(), *q.stride(), *second.stride())
        peak_grad_kernel[grid](grad_q, grad_second, q, second, factor, at, grad_norms, *strides, *sizes, -1.0 / lim,
                               CAUSAL=causal, **flags)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else dq
        scale_grad_kernel[grid](grad_q, grad_second, q, second, norms, factor, grad_norms, dq, dk, *strides, *sizes,
                                **flags)
        return dq, (dk if k is not None else None), None, None, None, None


def _check(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the scaling kernels take float16, bfloat16 or float32 `{name}`, got {x.dtype}")
    if x.dim() != 4 or x.shape[2] == 0:
        raise ValueError(f"`{name}` must be (B, H, N, D) with N >= 1, got {tuple(x.shape)}")


def triton_scale_by_peak(x: torch.Tensor, lim: float, causal: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
    """x * lim / P (see the module docstring); x (B, H, N, D) with N >= 1."""
    _check("x", x)
    return _TritonScaleByPeak.apply(x, None, lim, causal, valid, None)[0]


def triton_scale_qk_by_peak(q: torch.Tensor, k: torch.Tensor, lim: float, causal: bool,
                            q_valid: torch.Tensor | None = None, k_valid: torch.Tensor | None = None):
    """(q, k) each scaled by lim / P of its own rows, in the same launches: q (B, Hq, Nq, D) and
    k (B, Hk, Nk, D) of one dtype, N >= 1 each."""
    _check("q", q)
    _check("k", k)
    if k.dtype != q.dtype or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"`q` and `k` must share dtype, batch and D, got {q.dtype} {tuple(q.shape)} and "
                         f"{k.dtype} {tuple(k.shape)}")
    return _TritonScaleByPeak.apply(q, k, lim, causal, q_valid, k_valid)


def normalize_scaler():
    """``triton_scale_qk_by_peak`` where the setting ``fused_normalize`` asks for it (eager
    calls: under torch.compile the PyTorch form is traced and fused by the compiler), else None."""
    if current_settings().fused_normalize and not torch.compiler.is_compiling():
        return triton_scale_qk_by_peak
    return None
