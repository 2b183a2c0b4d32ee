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

Every kernel takes two tensors (q and k: own head counts, lengths, strides and padding, one
D and dtype) and runs both in one grid, the second tensor's (batch, head) rows after the
first's: at the 4k-16k lengths where a call waits on the host, a launch is worth more than
the few programs a shorter tensor leaves idle. One tensor is the pair with an empty second.

Ties of the maximum go to the later row with a causal mask (``torch.cummax``) and to the first
without one (``torch.max``); a NaN norm is the maximum from its row on, as in PyTorch. Norms
that are equal but for rounding are not ties: which of them is the maximum follows the last
bits of each computation's sum of squares (this one's, PyTorch's, float64's), and with it the
row the peak's gradient goes to. Every choice is a subgradient of the maximum; on rows built
with equal norms the kernels, the PyTorch form and float64 can each choose a different row.
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
def _pick(first, a, b):
    """Pointer a for the first tensor's programs, b for the second's."""
    if first:
        out = a
    else:
        out = b
    return out


@triton.jit
def _pick_int(first, a, b, zero):
    """Integer a for the first tensor's programs, b for the second's (``zero`` a 0 tensor: an
    argument Triton specialised to a constant becomes a value like the other)."""
    return tl.where(first, a + zero, b + zero)


@triton.jit
def _rows_of(pid_bh, BH1, H1, H2, N1, N2, OFF2):
    """This program's tensor (True: the first), its (batch, head) b, h, its N and the offset of
    its (b, h) row 0 in the per-row buffers (the second tensor's rows follow the first's)."""
    zero = pid_bh * 0
    first = pid_bh < BH1
    bh = tl.where(first, pid_bh, pid_bh - BH1)
    H = _pick_int(first, H1, H2, zero)
    N = _pick_int(first, N1, N2, zero)
    row0 = _pick_int(first, 0, OFF2, zero).to(tl.int64) + bh.to(tl.int64) * N
    return first, zero, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), N, row0


@triton.jit
def _tile_of(first, zero, b, h, rows, ok, cols, D, P1, P2, sb1, sh1, sn1, sd1, sb2, sh2, sn2, sd2,
             EVEN_D: tl.constexpr, I64: tl.constexpr):
    """The (rows, BLOCK_D) tile of row ``rows`` of (b, h) of the program's tensor, P1 or P2
    (strides s*1 or s*2), 0 outside."""
    P = _pick(first, P1, P2) + b * _pick_int(first, sb1, sb2, zero) + h * _pick_int(first, sh1, sh2, zero)
    return load_tile(P, rows, ok, _pick_int(first, sn1, sn2, zero), cols, D, _pick_int(first, sd1, sd2, zero), True,
                     EVEN_D, I64)


@triton.jit
def row_norms_kernel(
    X1, X2, V1, V2, NORMS, BMAX, BARG,
    s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d, sv1b, sv1n, sv2b, sv2n,
    BH1, H1, H2, N1, N2, OFF2, D, NB,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    I64: tl.constexpr,
):
    """Grid (blocks of the longer tensor, B * H1 + B * H2): ||x_n|| in fp32 (0 on rows that do
    not count: padding, V1 / V2 (B, N) uint8, 0 = padding; a tensor without padding is given a
    one-element 1 with strides 0) into NORMS, and the block's maximum and its row into BMAX, BARG
    (B * H1 + B * H2, NB); a block past the tensor's end records -1, which nothing beats."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    first, zero, bh, b, h, N, row0 = _rows_of(pid_bh, BH1, H1, H2, N1, N2, OFF2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    x = _tile_of(first, zero, b, h, rows, ok, cols, D, X1, X2, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d, EVEN_D,
                 I64).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    V = _pick(first, V1, V2) + b * _pick_int(first, sv1b, sv2b, zero)
    counted = tl.load(V + rows * _pick_int(first, sv1n, sv2n, zero), mask=ok, other=1) != 0
    norm = tl.where(counted, norm, 0.0)
    tl.store(NORMS + row0 + rows, norm, mask=ok)
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
    X1, X2, NORMS, RUN_MAX, RUN_BLOCK, BARG, FACTOR, AT, OUT1, OUT2,
    s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
    BH1, H1, H2, N1, N2, OFF2, D, NB, stride_r, lim,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    I64: tl.constexpr,
):
    """Grid as ``row_norms_kernel``'s: P_n, and f_n = lim / P_n (0 where P_n = 0) into FACTOR
    (fp32), the row of P_n into AT (int32, a row of the same sequence), x_n * f_n into OUT1 or
    OUT2 ((B, H, N, D) contiguous, x's dtype). RUN_MAX, RUN_BLOCK (B * H1 + B * H2, NB) with row
    stride ``stride_r``: with a causal mask the running maximum over blocks and the block it
    lies in; without one, (B * H1 + B * H2, 1): the whole sequence's."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    first, zero, bh, b, h, N, row0 = _rows_of(pid_bh, BH1, H1, H2, N1, N2, OFF2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
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
    x = _tile_of(first, zero, b, h, rows, ok, cols, D, X1, X2, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d, EVEN_D, I64)
    # the factor in x's dtype first, as the reference multiplies
    out = x.to(tl.float32) * factor.to(X1.dtype.element_ty).to(tl.float32)[:, None]
    local = bh.to(tl.int64) * N + rows  # the row in its own (B, H, N, D) output
    OUT = _pick(first, OUT1, OUT2)
    tl.store(OUT + local[:, None] * D + cols[None, :], out.to(OUT1.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < D))


@triton.jit
def _gradient_tiles(G1, G2, X1, X2, g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
                    BH1, H1, H2, N1, N2, OFF2, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    EVEN_D: tl.constexpr, I64: tl.constexpr):
    """What both backward kernels start from: the program's tensor, (b, h) row and rows, and its
    tiles of the gradient g and of x."""
    pid_bh = tl.program_id(1)
    first, zero, bh, b, h, N, row0 = _rows_of(pid_bh, BH1, H1, H2, N1, N2, OFF2)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    g = _tile_of(first, zero, b, h, rows, ok, cols, D, G1, G2, g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, EVEN_D, I64)
    x = _tile_of(first, zero, b, h, rows, ok, cols, D, X1, X2, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d, EVEN_D, I64)
    return first, bh, N, row0, rows, ok, cols, g, x


@triton.jit
def peak_grad_kernel(
    G1, G2, X1, X2, FACTOR, AT, GRAD_NORMS,
    g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
    BH1, H1, H2, N1, N2, OFF2, D, neg_inv_lim,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    I64: tl.constexpr,
):
    """Grid as the forward's: dL/dP_n = -(g_n . x_n) f_n^2 / lim (0 where f_n = 0) added into
    GRAD_NORMS (fp32, the per-row layout of NORMS) at the row AT_n that holds P_n."""
    first, bh, N, row0, rows, ok, cols, g, x = _gradient_tiles(
        G1, G2, X1, X2, g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
        BH1, H1, H2, N1, N2, OFF2, D, BLOCK_N, BLOCK_D, EVEN_D, I64)
    factor = tl.load(FACTOR + row0 + rows, mask=ok, other=0.0)
    g_factor = tl.sum(g.to(tl.float32) * x.to(tl.float32), 1)
    g_peak = tl.where(ok & (factor > 0), g_factor * factor * factor * neg_inv_lim, 0.0)
    at = tl.load(AT + row0 + rows, mask=ok, other=0)
    # AT never decreases along the rows: most of a block shares its first row's, one atomic for
    # them (without a causal mask, every row's is the same)
    first_at = tl.min(tl.where(ok, at, N), 0)
    if first_at < N:  # a block with rows of this tensor
        same = at == first_at
        tl.atomic_add(GRAD_NORMS + row0 + first_at, tl.sum(tl.where(same, g_peak, 0.0), 0))
        if CAUSAL:
            tl.atomic_add(GRAD_NORMS + row0 + at, g_peak, mask=ok & (at != first_at))


@triton.jit
def scale_grad_kernel(
    G1, G2, X1, X2, NORMS, FACTOR, GRAD_NORMS, DX1, DX2,
    g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
    BH1, H1, H2, N1, N2, OFF2, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, I64: tl.constexpr,
):
    """Grid as the forward's: dx_n = g_n f_n + x_n dL/d||x_n|| / ||x_n|| into DX1 or DX2
    ((B, H, N, D) contiguous, x's dtype); the second term only where ||x_n|| > 0 (counted rows),
    by selection, so that a non-finite x where no gradient passes gives 0."""
    first, bh, N, row0, rows, ok, cols, g, x = _gradient_tiles(
        G1, G2, X1, X2, g1b, g1h, g1n, g1d, g2b, g2h, g2n, g2d, s1b, s1h, s1n, s1d, s2b, s2h, s2n, s2d,
        BH1, H1, H2, N1, N2, OFF2, D, BLOCK_N, BLOCK_D, EVEN_D, I64)
    norm = tl.load(NORMS + row0 + rows, mask=ok, other=0.0)
    factor = tl.load(FACTOR + row0 + rows, mask=ok, other=0.0).to(X1.dtype.element_ty).to(tl.float32)
    through = norm > 0
    coef = tl.where(through, tl.load(GRAD_NORMS + row0 + rows, mask=ok, other=0.0) / tl.where(through, norm, 1.0),
                    0.0)
    coef = coef.to(X1.dtype.element_ty).to(tl.float32)
    x_term = tl.where(through[:, None], x.to(tl.float32) * coef[:, None], 0.0)
    dx = g.to(tl.float32) * factor[:, None] + x_term
    local = bh.to(tl.int64) * N + rows
    DX = _pick(first, DX1, DX2)
    tl.store(DX + local[:, None] * D + cols[None, :], dx.to(DX1.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < D))
