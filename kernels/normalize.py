"""Kernels of normalize's scaling: x_n * lim / P_n, P_n = max_{n' <= n} ||x_n'|| (the whole
sequence without a causal mask), forward and backward, in a few launches instead of the dozen
PyTorch operations per tensor and direction of ``fastmax_hf.stages._ScaleByPeak`` (the
reference they are tested against; its docstring derives the backward).

Forward: ``row_norms_kernel`` (per row block: the norms, the block's maximum and where it is),
a running maximum over the blocks on the host (one ``torch.cummax`` over B*H x blocks), then
``scale_rows_kernel`` (the running maximum inside the block from the blocks before it, the
factor f = lim / P, x * f). Backward: ``peak_grad_kernel`` adds each row's
dL/dP = -(g . x) f^2 / lim to the norm of the row that holds its maximum (fp32 atomics, one per
block for the rows that share the block's first maximum row), then ``scale_grad_kernel`` writes
dx = g f + x / ||x|| dL/d||x||.

Ties of the maximum go to the later row with a causal mask (``torch.cummax``) and to the first
without one (``torch.max``); a NaN norm is the maximum from its row on, as in PyTorch. Norms
that are equal but for rounding are not ties: which of them is the maximum follows the last
bits of each computation's sum of squares (this one's, PyTorch's, float64's), and with it the
row the peak's gradient goes to. Every choice is a subgradient of the maximum; on rows built
with equal norms the kernels, the PyTorch form and float64 each differ from the others by
about 0.15 in the gradient's relative error (measured on the CPU, 1,000 rows in runs of 97).
"""

import triton
import triton.language as tl

from .common import load_tile


@triton.jit
def _later_max(v1, i1, v2, i2):
    """Combine of (value, row) pairs, (v1, i1) before (v2, i2): the larger value, the later row
    on a tie, and a NaN once seen."""
    take2 = (v2 >= v1) | ((v2 != v2) & (v1 == v1))
    return tl.where(take2, v2, v1), tl.where(take2, i2, i1)


@triton.jit
def row_norms_kernel(
    X, VALID, NORMS, BMAX, BARG,
    stride_xb, stride_xh, stride_xn, stride_xd, stride_vb, stride_vn,
    H, N, D, NB,
    HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B * H): ||x_n|| in fp32 (0 on rows that do not count: padding)
    into NORMS (B * H, N), and the block's maximum and its row into BMAX, BARG (B * H, NB)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    x = load_tile(X + b * stride_xb + h * stride_xh, rows, ok, stride_xn, cols, D, stride_xd, True, EVEN_D,
                  I64).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    if HAS_VALID:
        counted = tl.load(VALID + b * stride_vb + rows * stride_vn, mask=ok, other=0) != 0
        norm = tl.where(counted, norm, 0.0)
    tl.store(NORMS + pid_bh.to(tl.int64) * N + rows, norm, mask=ok)
    norm = tl.where(ok, norm, -1.0)  # rows past the end never hold the maximum
    is_nan = norm != norm
    any_nan = tl.sum(is_nan.to(tl.int32), 0) > 0
    peak = tl.max(tl.where(is_nan, -1.0, norm), 0)
    if CAUSAL:
        at = tl.max(tl.where(norm == peak, rows, -1), 0)
    else:
        at = tl.min(tl.where(norm == peak, rows, N), 0)
    # a NaN is the maximum from its row on (the first NaN's row), as in torch.cummax
    peak = tl.where(any_nan, tl.sum(tl.where(is_nan, norm, 0.0), 0), peak)
    at = tl.where(any_nan, tl.min(tl.where(is_nan, rows, N), 0), at)
    tl.store(BMAX + pid_bh * NB + pid_n, peak)
    tl.store(BARG + pid_bh * NB + pid_n, at)


@triton.jit
def scale_rows_kernel(
    X, NORMS, RUN_MAX, RUN_BLOCK, BARG, FACTOR, AT, OUT,
    stride_xb, stride_xh, stride_xn, stride_xd, stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, NB, stride_r, lim,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    I64: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B * H): P_n, and f_n = lim / P_n (0 where P_n = 0) into FACTOR
    (B * H, N) fp32, the row of P_n into AT (int32), x_n * f_n into OUT in x's dtype.
    RUN_MAX, RUN_BLOCK (B * H, NB) with row stride ``stride_r``: with a causal mask the running
    maximum over blocks and the block it lies in; without one, (B * H, 1): the whole sequence's."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    row0 = pid_bh.to(tl.int64) * N
    if CAUSAL:
        norm = tl.load(NORMS + row0 + rows, mask=ok, other=-1.0)
        peak, at = tl.associative_scan((norm, rows), 0, _later_max)
        if pid_n > 0:  # the blocks before this one: their maximum, and the row that holds it
            carry = tl.load(RUN_MAX + pid_bh * stride_r + pid_n - 1)
            carry_at = tl.load(BARG + pid_bh * NB + tl.load(RUN_BLOCK + pid_bh * stride_r + pid_n - 1))
            peak, at = _later_max(carry + 0.0 * peak, carry_at + 0 * at, peak, at)
    else:
        peak = tl.load(RUN_MAX + pid_bh * stride_r) + 0.0 * rows
        at = tl.load(BARG + pid_bh * NB + tl.load(RUN_BLOCK + pid_bh * stride_r)) + 0 * rows
    factor = tl.where(peak > 0, lim / tl.where(peak > 0, peak, 1.0), 0.0)
    tl.store(FACTOR + row0 + rows, factor, mask=ok)
    tl.store(AT + row0 + rows, at.to(tl.int32), mask=ok)
    cols = tl.arange(0, BLOCK_D)
    x = load_tile(X + b * stride_xb + h * stride_xh, rows, ok, stride_xn, cols, D, stride_xd, True, EVEN_D, I64)
    # the factor in x's dtype first, as the reference multiplies
    out = x.to(tl.float32) * factor.to(X.dtype.element_ty).to(tl.float32)[:, None]
    offs = rows[:, None].to(tl.int64) * stride_on + cols[None, :] * stride_od
    tl.store(OUT + b * stride_ob + h * stride_oh + offs, out.to(OUT.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < D))


@triton.jit
def peak_grad_kernel(
    G, X, FACTOR, AT, GRAD_NORMS,
    stride_gb, stride_gh, stride_gn, stride_gd, stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, D, neg_inv_lim,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    I64: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B * H): dL/dP_n = -(g_n . x_n) f_n^2 / lim (0 where f_n = 0) added
    into GRAD_NORMS (B * H, N) fp32 at the row AT_n that holds P_n."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    row0 = pid_bh.to(tl.int64) * N
    g = load_tile(G + b * stride_gb + h * stride_gh, rows, ok, stride_gn, cols, D, stride_gd, True, EVEN_D, I64)
    x = load_tile(X + b * stride_xb + h * stride_xh, rows, ok, stride_xn, cols, D, stride_xd, True, EVEN_D, I64)
    factor = tl.load(FACTOR + row0 + rows, mask=ok, other=0.0)
    g_factor = tl.sum(g.to(tl.float32) * x.to(tl.float32), 1)
    g_peak = tl.where(ok & (factor > 0), g_factor * factor * factor * neg_inv_lim, 0.0)
    at = tl.load(AT + row0 + rows, mask=ok, other=0)
    if CAUSAL:
        # AT never decreases along the rows: most of a block shares its first row's, one atomic for them
        first = tl.min(tl.where(ok, at, N), 0)
        same = at == first
        tl.atomic_add(GRAD_NORMS + row0 + first, tl.sum(tl.where(same, g_peak, 0.0), 0))
        tl.atomic_add(GRAD_NORMS + row0 + at, g_peak, mask=ok & (at != first))
    else:
        tl.atomic_add(GRAD_NORMS + row0 + tl.min(tl.where(ok, at, N), 0), tl.sum(g_peak, 0))


@triton.jit
def scale_grad_kernel(
    G, X, NORMS, FACTOR, GRAD_NORMS, DX,
    stride_gb, stride_gh, stride_gn, stride_gd, stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B * H): dx_n = g_n f_n + x_n dL/d||x_n|| / ||x_n|| into DX
    ((B, H, N, D) contiguous, x's dtype); the second term only where ||x_n|| > 0 (counted rows),
    by selection, so that a non-finite x where no gradient passes gives 0."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    row0 = pid_bh.to(tl.int64) * N
    g = load_tile(G + b * stride_gb + h * stride_gh, rows, ok, stride_gn, cols, D, stride_gd, True, EVEN_D, I64)
    x = load_tile(X + b * stride_xb + h * stride_xh, rows, ok, stride_xn, cols, D, stride_xd, True, EVEN_D, I64)
    norm = tl.load(NORMS + row0 + rows, mask=ok, other=0.0)
    factor = tl.load(FACTOR + row0 + rows, mask=ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    through = norm > 0
    coef = tl.where(through, tl.load(GRAD_NORMS + row0 + rows, mask=ok, other=0.0) / tl.where(through, norm, 1.0),
                    0.0)
    coef = coef.to(X.dtype.element_ty).to(tl.float32)
    x_term = tl.where(through[:, None], x.to(tl.float32) * coef[:, None], 0.0)
    dx = g.to(tl.float32) * factor[:, None] + x_term
    offs = (row0 + rows)[:, None] * D + cols[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < D))
