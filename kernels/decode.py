"""One decoding step on the state, in place: the kernel behind static (CUDA-graph) generation.

A new token (q (B, Hq, 1, D), k, v (B, Hk, 1, D / Dv)) attends to everything folded into the
state (S, z) and to itself, then joins it:

    S' = S + phi_k(k) v^T,   z' = z + phi_k(k),   o_h = phi_q(q_h)^T S' / phi_q(q_h)^T z'

for the GROUP query heads h that share one key/value head. S and z are updated where they
lie, so the state keeps its addresses from step to step (what a captured CUDA graph needs),
and each state row is read once and written once for all GROUP query heads: at a large
batch a step costs what streaming the state costs.

The state layout is the linear kernels' (kernels/linear.py): F_ROWS = 1 + BLOCK_D +
N_TILES * BT * BT rows, row 0 the zeroth order, rows 1..BLOCK_D the first order, then one
block of BT * BT rows per pair tile (mb, nb), nb >= mb, row i * BT + j of a tile holding
x[mb * BT + i] * x[nb * BT + j]. ``_row_features`` maps any block of rows to its key-side and
query-side features, so one loop covers the three orders.

At batch 1 there are only Hk key/value heads to spread over 132 SMs, so the rows are also
split over SPLITS programs; each writes its partial numerator and denominator, and
``decode_finish_kernel`` sums them (as it does for a Dv wider than one value block: the
denominator comes from the block that updates z). With one split and one value block the step
kernel writes the output itself.
"""

import torch
import triton
import triton.language as tl

from .quadratic import output_rows



@triton.jit
def _row_features(rows, TILE_M, TILE_N, D, a0, c1, c2,
                  BLOCK_D: tl.constexpr, BT: tl.constexpr, N_TILES: tl.constexpr, ROWS: tl.constexpr,
                  K_PTR, stride_kd, Q_PTR, stride_qh, stride_qd, heads_ok, BLOCK_G: tl.constexpr):
    """Key-side (ROWS,) and query-side (BLOCK_G, ROWS) features of state rows ``rows``.

    Row 0: 1 and a0. Rows 1..BLOCK_D: k[d] and c1 q[d]. Pair rows: k[m] k[n] and
    c2 w q[m] q[n], w = 1 in a diagonal tile, 2 off it (see linear._tile). The columns a row
    reads are gathered from k and q in memory (a few hundred bytes, cached)."""
    first = (rows >= 1) & (rows <= BLOCK_D)
    d1 = tl.where(first, rows - 1, 0)
    pair = rows > BLOCK_D
    within = tl.where(pair, rows - 1 - BLOCK_D, 0)
    t = within // (BT * BT)
    in_tile = pair & (t < N_TILES)
    t = tl.where(in_tile, t, 0)
    mb = tl.load(TILE_M + t, mask=in_tile, other=0)
    nb = tl.load(TILE_N + t, mask=in_tile, other=0)
    m = mb * BT + (within % (BT * BT)) // BT
    n = nb * BT + within % BT
    weight = tl.where(mb == nb, 1.0, 2.0)
    m = tl.where(in_tile, m, d1)
    n = tl.where(in_tile, n, 0)

    k_m = tl.load(K_PTR + m * stride_kd, mask=(first | in_tile) & (m < D), other=0.0).to(tl.float32)
    k_n = tl.load(K_PTR + n * stride_kd, mask=in_tile & (n < D), other=0.0).to(tl.float32)
    g = tl.arange(0, BLOCK_G)[:, None]
    q_ok = heads_ok[:, None]
    q_m = tl.load(Q_PTR + g * stride_qh + m[None, :] * stride_qd,
                  mask=q_ok & ((first | in_tile) & (m < D))[None, :], other=0.0).to(tl.float32)
    q_n = tl.load(Q_PTR + g * stride_qh + n[None, :] * stride_qd,
                  mask=q_ok & (in_tile & (n < D))[None, :], other=0.0).to(tl.float32)

    key_f = tl.where(rows == 0, 1.0, tl.where(first, k_m, tl.where(in_tile, k_m * k_n, 0.0)))
    query_f = tl.where((rows == 0)[None, :], a0,
                       tl.where(first[None, :], c1 * q_m,
                                tl.where(in_tile[None, :], (c2 * weight)[None, :] * q_m * q_n, 0.0)))
    return key_f, tl.where(q_ok, query_f, 0.0)


@triton.jit
def decode_step_kernel(
    Q, K, V, S, Z, VALID, OUT, PART_NUM, PART_DEN, TILE_M, TILE_N,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_sb, stride_sh, stride_sf, stride_sv,
    stride_zb, stride_zh, stride_zf,
    stride_ob, stride_oh, stride_ov, stride_validb,
    Hk, D, Dv, F_ROWS, ROWS_PER_SPLIT, SPLITS, a0, c1, c2,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BT: tl.constexpr, N_TILES: tl.constexpr, ROWS: tl.constexpr, FINISH: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    """One program: key/value head (b, hk), value columns pid_v, rows of split pid_s."""
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hk
    hk = pid_bh % Hk

    dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < Dv
    g = tl.arange(0, BLOCK_G)
    heads_ok = g < GROUP
    K_b = K + b * stride_kb + hk * stride_kh
    Q_b = Q + b * stride_qb + (hk * GROUP) * stride_qh
    v = tl.load(V + b * stride_vb + hk * stride_vh + dv * stride_vd, mask=dv_ok, other=0.0).to(tl.float32)
    if HAS_VALID:
        # a padded token joins nothing: its features are zero (exactly: where, not a product)
        valid = tl.load(VALID + b * stride_validb) != 0
    else:
        valid = True
    S_bh = S + b * stride_sb + hk * stride_sh
    Z_bh = Z + b * stride_zb + hk * stride_zh
    owns_z = pid_v == 0  # one value block updates z and answers the denominator

    num = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_G,), dtype=tl.float32)
    row_lo = pid_s * ROWS_PER_SPLIT
    row_hi = tl.minimum(row_lo + ROWS_PER_SPLIT, F_ROWS)
    for r0 in range(row_lo, row_hi, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rows_ok = rows < row_hi
        key_f, query_f = _row_features(rows, TILE_M, TILE_N, D, a0, c1, c2, BLOCK_D, BT, N_TILES, ROWS,
                                       K_b, stride_kd, Q_b, stride_qh, stride_qd, heads_ok, BLOCK_G)
        key_f = tl.where(valid & rows_ok, key_f, 0.0)
        s_ptrs = S_bh + rows[:, None] * stride_sf + dv[None, :] * stride_sv
        s_ok = rows_ok[:, None] & dv_ok[None, :]
        s_new = tl.load(s_ptrs, mask=s_ok, other=0.0) + key_f[:, None] * v[None, :]  # (ROWS, BLOCK_DV)
        tl.store(s_ptrs, s_new, mask=s_ok)
        num += tl.sum(query_f[:, :, None] * s_new[None, :, :], 1)
        if owns_z:
            z_ptrs = Z_bh + rows * stride_zf
            z_new = tl.load(z_ptrs, mask=rows_ok, other=0.0) + key_f
            tl.store(z_ptrs, z_new, mask=rows_ok)
            den += tl.sum(query_f * z_new[None, :], 1)

    if not FINISH:
        # one split and one value block: this program holds the whole numerator and denominator
        out = output_rows(num, den)
        o_ptrs = OUT + b * stride_ob + (hk * GROUP + g)[:, None] * stride_oh + dv[None, :] * stride_ov
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=heads_ok[:, None] & dv_ok[None, :])
    else:
        # partials (B * Hk, SPLITS, BLOCK_G, Dv) and (B * Hk, SPLITS, BLOCK_G), contiguous
        part = pid_bh * SPLITS + pid_s
        n_ptrs = PART_NUM + (part * BLOCK_G + g)[:, None] * Dv + dv[None, :]
        tl.store(n_ptrs, num, mask=dv_ok[None, :])
        if owns_z:
            tl.store(PART_DEN + part * BLOCK_G + g, den)


@triton.jit
def decode_finish_kernel(
    PART_NUM, PART_DEN, OUT,
    stride_ob, stride_oh, stride_ov,
    Hk, Dv, SPLITS,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Sum the SPLITS partials of one key/value head and divide: o = num / den (0 where den = 0)."""
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < Dv
    g = tl.arange(0, BLOCK_G)
    num = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for s in range(SPLITS):
        part = pid_bh * SPLITS + s
        num += tl.load(PART_NUM + (part * BLOCK_G + g)[:, None] * Dv + dv[None, :], mask=dv_ok[None, :], other=0.0)
        den += tl.load(PART_DEN + part * BLOCK_G + g)
    out = output_rows(num, den)
    o_ptrs = OUT + b * stride_ob + (hk * GROUP + g)[:, None] * stride_oh + dv[None, :] * stride_ov
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(g < GROUP)[:, None] & dv_ok[None, :])
