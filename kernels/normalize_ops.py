"""Launchers of normalize's scaling kernels (kernels/normalize.py), as one autograd Function.

``triton_scale_by_peak(x, lim, causal, valid)``: x (B, H, N, D) in fp16, bf16 or fp32, any
strides; ``valid`` (B, N) bool or None (rows that count towards the maximum). Returns
x * lim / max_{n' <= n} ||x_n'|| ((B, H, N, D) contiguous, x's dtype), differentiable in x:
the function of ``fastmax_hf.stages._ScaleByPeak`` in two launches and a running maximum over
blocks forward, two launches and a zero fill backward.
"""

from __future__ import annotations

import torch

from .common import cdiv, next_power_of_2
from .normalize import peak_grad_kernel, row_norms_kernel, scale_grad_kernel, scale_rows_kernel
from .settings import current_settings

BLOCK_N = 64  # rows per program: a (64, BLOCK_D) tile of x (and of the gradient) per pass


def _layout(x: torch.Tensor):
    B, H, N, D = x.shape
    block_d = max(16, next_power_of_2(D))
    big = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()) if size > 0) >= 2**31 - 1
    return B, H, N, D, block_d, big or B * H * N * D >= 2**31 - 1


class _TritonScaleByPeak(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lim, causal, valid):
        B, H, N, D, block_d, i64 = _layout(x)
        n_blocks = cdiv(N, BLOCK_N)
        norms, factor = torch.empty(2, B * H, N, dtype=torch.float32, device=x.device).unbind(0)
        block_max = torch.empty(B * H, n_blocks, dtype=torch.float32, device=x.device)
        block_at = torch.empty(B * H, n_blocks, dtype=torch.int32, device=x.device)
        at = torch.empty(B * H, N, dtype=torch.int32, device=x.device)
        out = torch.empty(B, H, N, D, dtype=x.dtype, device=x.device)
        if valid is not None:
            mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
            mask_args = (mask, mask.stride(0), mask.stride(1))
        else:
            mask_args = (x, 0, 0)
        grid = (n_blocks, B * H)
        row_norms_kernel[grid](
            x, mask_args[0], norms, block_max, block_at, *x.stride(), *mask_args[1:], H, N, D, n_blocks,
            HAS_VALID=valid is not None, CAUSAL=bool(causal), BLOCK_N=BLOCK_N, BLOCK_D=block_d, EVEN_D=D == block_d,
            I64=i64, num_warps=4,
        )
        if causal:  # the running maximum over blocks (ties: the later block, as within a block)
            run_max, run_block = torch.cummax(block_max, dim=-1)
        else:
            run_max, run_block = block_max.max(dim=-1, keepdim=True)
        scale_rows_kernel[grid](
            x, norms, run_max, run_block, block_at, factor, at, out, *x.stride(), *out.stride(),
            H, N, D, n_blocks, run_max.stride(0), float(lim),
            CAUSAL=bool(causal), BLOCK_N=BLOCK_N, BLOCK_D=block_d, EVEN_D=D == block_d, I64=i64, num_warps=4,
        )
        ctx.save_for_backward(x, norms, factor, at)
        ctx.settings = (float(lim), bool(causal))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, norms, factor, at = ctx.saved_tensors
        lim, causal = ctx.settings
        B, H, N, D, block_d, i64 = _layout(x)
        i64 = i64 or _layout(grad)[-1]
        grid = (cdiv(N, BLOCK_N), B * H)
        grad_norms = torch.zeros(B * H, N, dtype=torch.float32, device=x.device)
        flags = dict(BLOCK_N=BLOCK_N, BLOCK_D=block_d, EVEN_D=D == block_d, I64=i64, num_warps=4)
        peak_grad_kernel[grid](grad, x, factor, at, grad_norms, *grad.stride(), *x.stride(), H, N, D, -1.0 / lim,
                               CAUSAL=causal, **flags)
        dx = torch.empty(B, H, N, D, dtype=x.dtype, device=x.device)
        scale_grad_kernel[grid](grad, x, norms, factor, grad_norms, dx, *grad.stride(), *x.stride(), H, N, D,
                                **flags)
        return dx, None, None, None


def triton_scale_by_peak(x: torch.Tensor, lim: float, causal: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
    """x * lim / P (see the module docstring); x (B, H, N, D) with N >= 1."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the scaling kernels take float16, bfloat16 or float32 `x`, got {x.dtype}")
    if x.dim() != 4 or x.shape[2] == 0:
        raise ValueError(f"`x` must be (B, H, N, D) with N >= 1, got {tuple(x.shape)}")
    return _TritonScaleByPeak.apply(x, lim, causal, valid)


def normalize_scaler():
    """``triton_scale_by_peak`` where the setting ``fused_normalize`` asks for it (eager calls:
    under torch.compile the PyTorch form is traced and fused by the compiler), else None."""
    if current_settings().fused_normalize and not torch.compiler.is_compiling():
        return triton_scale_by_peak
    return None
