"""The hybrid window's kernels (``fastmax_hf.window``): exp(s - M) over the last W keys, and the
one normaliser shared with the rest.

Query i sits at key position t_i = i + Nk - Nq (bottom-right alignment); its window holds the
keys t_i - W < j <= t_i that are not padding; every earlier visible key is "the rest", which
plain Fastmax over the keys [0, Nk - W) computes on the quadratic or linear kernels
(``window_ops``): its output o^r_i and denominator d^r_i, so that sum_rest f(s) v = d^r o^r.
With s_ij = scale q_i . k_j, m_i = max_win s_ij (0 where the window holds no key),
M_i = max(m_i, 0) and rho_i = gamma_h e^{-M_i}, the forward kernel writes per query row

    o_i = (sum_win e^{s_ij - M_i} v_j + rho_i d^r_i o^r_i) / d_i,
    d_i = sum_win e^{s_ij - M_i} + rho_i d^r_i,      and M_i,

the hybrid of ``fastmax_hf.window`` in its stable form (M and rho scale the numerator and the
denominator alike; e^{-M} <= 1 and e^{s - M} <= 1 never overflow). No partial sums go through
memory: the rest's (o^r, d^r) are read once, in the epilogue.

Backward, with g_i = do_i / d_i and c_i = (do_i . o_i) / d_i (the dq kernel computes them and
writes them for the others), and M held constant (it cancels in the quotient):

    window pairs  w_ij = e^{s_ij - M_i},   ds_ij = w_ij (g_i . v_j - c_i),
                  dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i w_ij g_i;
    the rest      the Fastmax backward over the keys [0, Nk - W) with the row terms
                  rho_i / d_i and rho_i c_i in place of 1/d_i and c_i (the dq kernel writes them),
                  since its weights are rho_i f(s_ij).

A block of BLOCK_M queries needs only the band of keys (t_first - W, t_last]: at most
BLOCK_M + W - 1 of them, so the cost is O(N (BLOCK_M + W) D), never N x N.

Pairs outside a window are removed by selection (``tl.where``), never by a zero weight; a
value that is not finite enters the products as 0 and marks the rows that do see it NaN
(``nonfinite_marks``), and the dq product reads the keys with inf and NaN set to 0 (KF), as
in the quadratic kernels. Padding keys load as zeros. Rows the loss does not read (do = 0)
get row terms of exactly 0, whatever o, d and M hold there.

Layouts: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), o^r, o, do (B, Hq, Nq, Dv)
through strides; d^r, d, M and the row terms (B * Hq, Nq) fp32 contiguous; gamma (Hq,) fp32;
dq (B, Hq, Nq, D), dk, dv (B, Hk, Nk, D | Dv) contiguous in the inputs' dtype.
"""

import triton
import triton.language as tl

from .common import key_valid, load_tile, nonfinite_marks, operand
from .quadratic import output_rows, row_terms


@triton.jit
def _band(pid_m, offset, Nk, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of the windows of query block pid_m, lo a multiple of BLOCK_N."""
    lo = tl.maximum(pid_m * BLOCK_M + offset - W + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + offset, Nk)
    return lo, hi


@triton.jit
def _in_window(keys, t, real, W):
    """(len(t), len(keys)) bool: key j in the window of the query at position t, not padding."""
    return (keys[None, :] <= t[:, None]) & (keys[None, :] > t[:, None] - W) & real[None, :]


@triton.jit
def _pair_kinds(j, t, real, W, HAS_MASK: tl.constexpr):
    """Of a tile of pairs, from the key positions ``j`` and the query positions ``t`` broadcast
    to it (one a row, the other a column, in either layout) and the key mask ``real`` broadcast
    alike: the visible pairs (j <= t, and not padding), the rest pairs (j <= t - W: visible and
    at least W behind) and the window pairs (the visible ones that are not rest). A key past Nk
    is after every query row that exists (t <= Nk - 1), so only a padding mask needs ``real``.
    Two comparisons and one xor a pair (t - W is a row's): in the band the element-wise work,
    not the products, is what a tile costs."""
    vis = j <= t
    rest = j <= t - W
    if HAS_MASK:
        vis = vis & real
        rest = rest & real
    return vis, vis ^ rest, rest


@triton.jit
def _window_max(q, t, K_h, MASK_b, stride_kn, stride_kd, stride_mn, lo, hi, Nk, D, W, scale,
                HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr):
    """M = max(0, max_win s_ij) per query row, over the band keys [lo, hi)."""
    cols_d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        _, win, _ = _pair_kinds(keys[None, :], t[:, None], real[None, :], W, HAS_MASK)
        m = tl.maximum(m, tl.max(tl.where(win, s, float("-inf")), 1))
    return tl.maximum(tl.where(m == float("-inf"), 0.0, m), 0.0)


@triton.jit
def hybrid_row_terms(O_h, DO_h, DEN_r, M_r, gain, INV_DEN_r, CROW_r, INV_R_r, CROW_R_r, rows, q_ok, cols_v, DV,
                     stride_on, stride_od, stride_don, stride_dod, STORE_REST: tl.constexpr,
                     EVEN_DV: tl.constexpr, I64: tl.constexpr):
    """The backward's row terms of a query block (``rows``), from the forward's output, its
    denominator and shift M: stores 1/d and c (exactly 0 on rows the loss does not read) and,
    with STORE_REST, the rest's rho/d and rho c (rho = gain e^{-M}). Pointers ``*_r`` are at
    row 0 of the (batch, head). Returns do (fp32), 1/d, c, M, rho, rho/d, rho c."""
    do = load_tile(DO_h, rows, q_ok, stride_don, cols_v, DV, stride_dod, True, EVEN_DV, I64).to(tl.float32)
    o = load_tile(O_h, rows, q_ok, stride_on, cols_v, DV, stride_od, True, EVEN_DV, I64).to(tl.float32)
    den = tl.load(DEN_r + rows, mask=q_ok, other=0.0)
    shift = tl.load(M_r + rows, mask=q_ok, other=0.0)
    inv_den, crow = row_terms(o, do, den)
    tl.store(INV_DEN_r + rows, inv_den, mask=q_ok)
    tl.store(CROW_r + rows, crow, mask=q_ok)
    rho = gain * tl.exp(-shift)
    inv_r = tl.where(inv_den != 0.0, rho * inv_den, 0.0)
    crow_r = tl.where(crow != 0.0, rho * crow, 0.0)
    if STORE_REST:
        tl.store(INV_R_r + rows, inv_r, mask=q_ok)
        tl.store(CROW_R_r + rows, crow_r, mask=q_ok)
    return do, inv_den, crow, shift, rho, inv_r, crow_r


@triton.jit
def window_fwd_kernel(
    Q, K, V, MASK, OUT_R, DEN_R, GAIN, O, DEN, M,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_rb, stride_rh, stride_rn, stride_rd,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, W, scale,
    HAS_MASK: tl.constexpr, HAS_REST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): o, d and M of one query block (two passes over the band:
    the maximum, then the weights; then the rest's o^r, d^r join with the weight rho)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    offset = Nk - Nq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    q_ok = rows < Nq
    t = rows + offset
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    K_h = K + b * stride_kb + hk * stride_kh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb
    lo, hi = _band(pid_m, offset, Nk, W, BLOCK_M, BLOCK_N)

    shift = _window_max(q, t, K_h, MASK_b, stride_kn, stride_kd, stride_mn, lo, hi, Nk, D, W, scale, HAS_MASK,
                        BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, I64)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
        v = load_tile(V_h, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = _in_window(keys, t, real, W)
        v_nan = nonfinite_marks(v)  # 0, or NaN where the key's value is not finite
        v = tl.where(v_nan[:, None] == 0.0, v, 0.0)
        w = tl.where(keep, tl.exp(s - shift[:, None]) + v_nan[None, :], 0.0)
        acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PRECISION)
        den += tl.sum(w, 1)

    row0 = pid_bh.to(tl.int64) * Nq
    if HAS_REST:
        out_r = load_tile(OUT_R + b * stride_rb + h * stride_rh, rows, q_ok, stride_rn, cols_v, DV, stride_rd,
                          True, EVEN_DV, I64).to(tl.float32)
        den_r = tl.load(DEN_R + row0 + rows, mask=q_ok, other=0.0)
        weight = tl.load(GAIN + h) * tl.exp(-shift) * den_r  # rho d^r: 0 on rows whose rest is empty
        acc += tl.where(weight[:, None] != 0.0, weight[:, None] * out_r, 0.0)
        den += weight
    out = output_rows(acc, den)
    o_offs = b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + cols_v[None, :] * stride_od
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & (cols_v[None, :] < DV))
    tl.store(DEN + row0 + rows, den, mask=q_ok)
    tl.store(M + row0 + rows, shift, mask=q_ok)


@triton.jit
def window_bwd_dq_kernel(
    Q, K, KF, V, MASK, DO, O, DEN, M, GAIN, DQ, INV_DEN, CROW, INV_R, CROW_R,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, W, scale,
    HAS_MASK: tl.constexpr, HAS_REST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): the window's dq of one query block, and the block's row
    terms: 1/d and c for the key-block kernel, rho/d and rho c for the rest's backward. KF: the
    keys with non-finite entries set to 0, which the product ds k reads (ds is 0 outside a
    row's window, and 0 * inf would be NaN)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    offset = Nk - Nq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    q_ok = rows < Nq
    t = rows + offset
    row0 = pid_bh.to(tl.int64) * Nq
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    do, inv_den, crow, m, _rho, _inv_r, _crow_r = hybrid_row_terms(
        O + b * stride_ob + h * stride_oh, DO + b * stride_dob + h * stride_doh, DEN + row0, M + row0,
        tl.load(GAIN + h), INV_DEN + row0, CROW + row0, INV_R + row0, CROW_R + row0, rows, q_ok, cols_v, DV,
        stride_on, stride_od, stride_don, stride_dod, HAS_REST, EVEN_DV, I64)
    active = (inv_den != 0.0) | (crow != 0.0)  # rows the loss reads
    g_op = operand(do * inv_den[:, None], OP_BF16)
    K_h = K + b * stride_kb + hk * stride_kh
    KF_h = KF + b * stride_kfb + hk * stride_kfh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb
    lo, hi = _band(pid_m, offset, Nk, W, BLOCK_M, BLOCK_N)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
        v = load_tile(V_h, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = _in_window(keys, t, real, W) & active[:, None]
        dP = tl.dot(g_op, tl.trans(operand(v, OP_BF16)), input_precision=PRECISION)
        ds = tl.where(keep, tl.exp(s - m[:, None]) * (dP - crow[:, None]), 0.0)
        kf = load_tile(KF_h, keys, real, stride_kfn, cols_d, D, stride_kfd, True, EVEN_D, I64)
        dq = tl.dot(operand(ds, OP_BF16), operand(kf, OP_BF16), dq, input_precision=PRECISION)
    tl.store(DQ + (row0 + rows[:, None]) * D + cols_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_ok[:, None] & (cols_d[None, :] < D))


@triton.jit
def window_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, INV_DEN, CROW, M, DK, DV_OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    Hq, Hk, GROUPS, Nq, Nk, D, DV, W, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nk, BLOCK_N), B * Hk): the window's dk, dv of one key block, summed over the
    GROUPS query heads that read it, from the queries whose windows hold one of its keys: rows
    with n0 <= t_i < n0 + BLOCK_N + W - 1, and the row terms 1/d and c the dq kernel wrote.
    Tiles are computed transposed, (key, query)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    offset = Nk - Nq
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    k_in = keys < Nk
    real = key_valid(MASK + b * stride_mb, stride_mn, keys, Nk, HAS_MASK)
    k = load_tile(K + b * stride_kb + hk * stride_kh, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
    v = load_tile(V + b * stride_vb + hk * stride_vh, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
    k_op = operand(k, OP_BF16)
    v_op = operand(v, OP_BF16)
    lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(n0 + BLOCK_N - 1 + W - offset, Nq)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        Q_h = Q + b * stride_qb + h * stride_qh
        DO_h = DO + b * stride_dob + h * stride_doh
        row0 = (b * Hq + h) * Nq
        for i0 in range(lo, hi, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            ok = rows < Nq
            q = operand(load_tile(Q_h, rows, ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64), OP_BF16)
            do = load_tile(DO_h, rows, ok, stride_don, cols_v, DV, stride_dod, True, EVEN_DV, I64).to(tl.float32)
            inv_den = tl.load(INV_DEN + row0 + rows, mask=ok, other=0.0)
            crow = tl.load(CROW + row0 + rows, mask=ok, other=0.0)
            m = tl.load(M + row0 + rows, mask=ok, other=0.0)
            active = (inv_den != 0.0) | (crow != 0.0)
            g_op = operand(do * inv_den[:, None], OP_BF16)
            sT = tl.dot(k_op, tl.trans(q), input_precision=PRECISION) * scale  # (BLOCK_N, BLOCK_M)
            t = rows + offset
            keepT = (keys[:, None] <= t[None, :]) & (keys[:, None] > t[None, :] - W) & real[:, None] & active[None, :]
            wT = tl.where(keepT, tl.exp(sT - m[None, :]), 0.0)
            dPT = tl.dot(v_op, tl.trans(g_op), input_precision=PRECISION)
            dsT = tl.where(keepT, wT * (dPT - crow[None, :]), 0.0)
            dv = tl.dot(operand(wT, OP_BF16), g_op, dv, input_precision=PRECISION)
            dk = tl.dot(operand(dsT, OP_BF16), q, dk, input_precision=PRECISION)

    key_rows = (pid_bh.to(tl.int64) * Nk + keys)[:, None]
    tl.store(DK + key_rows * D + cols_d[None, :], tl.where(real[:, None], dk * scale, 0.0).to(DK.dtype.element_ty),
             mask=k_in[:, None] & (cols_d[None, :] < D))
    tl.store(DV_OUT + key_rows * DV + cols_v[None, :], tl.where(real[:, None], dv, 0.0).to(DV_OUT.dtype.element_ty),
             mask=k_in[:, None] & (cols_v[None, :] < DV))
