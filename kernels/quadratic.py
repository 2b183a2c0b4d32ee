"""Quadratic-regime Fastmax kernels: FlashAttention-style tiles with f in place of exp.

f(r) = a0 + c1 r + c2 r^2 is a polynomial (r = q . k, the scale folded into c1, c2), so no
running maximum and no rescaling are needed: a query block accumulates sum_j f(r_ij) v_j
and sum_j f(r_ij) over its visible key blocks and divides once at the end. Cost ~ 2 Nk
(D + Dv) FLOPs per query: cheaper than the linear form while Nk is below about
F = 1 + D + D(D+1)/2.

Masks cost work, so the key range of a query block is cut in two: blocks that every query
of the block sees in full (before the causal diagonal, inside the sequence, no padding
mask) run without any mask; the rest (the diagonal, the ragged end, or everything when a
padding mask is given) mask each score.

Backward, with g_i = do_i / d_i and c_i = (do_i . o_i) / d_i (computed by the dq kernel, or by
``backward_rows_kernel`` where no dq kernel runs first):
    dA_ij = g_i . v_j - c_i,    ds_ij = dA_ij f'(r_ij),    f'(r) = c1 + 2 c2 r,
    dv_j = sum_i f(r_ij) g_i,   dk_j = sum_i ds_ij q_i,    dq_i = sum_j ds_ij k_j;
one kernel over key blocks (dk, dv, summed over the query heads of a key/value head: no
atomics) and one over query blocks (dq), which recomputes r and dA: seven products per tile
pair. (Adding each tile's dq from the key-block kernel with fp32 atomics instead, five
products, measured slower on an H200 at every shape tried: BENCHMARKS.md.) Keys that are
padding or past the sequence are
loaded as zeros in the dq kernel, which makes their ds_ij k_j vanish without a mask; the
dk, dv kernel writes zeros for them.

The inner loops (``attend_keys``, ``dq_from_keys``, ``dkdv_from_queries``) take any key or
query range: the linear kernels use them for the causal tile inside each chunk.

Layouts: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), read through strides;
query head h reads key/value head h // GROUPS. Positions: query i sits at key position
i + Nk - Nq (bottom-right causal alignment).
"""

import triton
import triton.language as tl

from .common import kernel_slope, kernel_value, key_valid, load_tile, nonfinite_marks, operand


# ----------------------------------------------------------------------------------------
# inner loops
# ----------------------------------------------------------------------------------------


@triton.jit
def attend_keys(
    acc, den, q, q_pos, K_h, V_h, MASK_b,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    lo, hi, Nk, D, DV, a0, c1, c2,
    P: tl.constexpr, CHECK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """acc += sum_j f(r_ij) v_j and den += sum_j f(r_ij) over the keys j in [lo, hi).

    CHECK=False: every key of the range is real and visible to every query (no mask at all).
    CHECK=True: keys past Nk and padding load as zeros, and (CAUSAL) keys after a query's
    position are removed by selection, never by a zero weight (0 * inf is NaN): a value
    that is not finite enters the product as 0, and the weights of the queries that do see
    it become NaN, so that exactly those rows come out NaN."""
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        if CHECK:
            real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        else:
            real = keys < Nk
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, CHECK, EVEN_D, I64)  # (BLOCK_N, BLOCK_D)
        v = load_tile(V_h, keys, real, stride_vn, cols_v, DV, stride_vd, CHECK, EVEN_DV, I64)  # (BLOCK_N, BLOCK_DV)
        r = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        w = kernel_value(r, a0, c1, c2, P)
        if CHECK:
            vis = real[None, :]
            if CAUSAL:
                vis = vis & (keys[None, :] <= q_pos[:, None])
                v_nan = nonfinite_marks(v)  # (BLOCK_N,): 0, or NaN where the key's value is not finite
                v = tl.where(v_nan[:, None] == 0.0, v, 0.0)
                w = w + v_nan[None, :]
            w = tl.where(vis, w, 0.0)
        acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PRECISION)
        den += tl.sum(w, 1)
    return acc, den


@triton.jit
def dq_from_keys(
    dq, q, g, crow, q_pos, K_h, KF_h, V_h, MASK_b,
    stride_kn, stride_kd, stride_kfn, stride_kfd, stride_vn, stride_vd, stride_mn,
    lo, hi, Nk, D, DV, c1, c2,
    P: tl.constexpr, CHECK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    I64: tl.constexpr,
):
    """dq += sum_j (g_i . v_j - c_i) f'(r_ij) k_j over the keys j in [lo, hi).

    g (BLOCK_M, BLOCK_DV) is an operand already; keys that are padding or past Nk load as
    zeros (CHECK), so only the causal diagonal needs a mask, by selection. There a key that
    is not finite would turn the zero ds of the queries before it into NaN (0 * inf), so the
    product reads the keys from KF_h, a copy of the keys with non-finite entries set to 0
    (the queries that see such a key have a non-finite ds already)."""
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        ok = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, ok, stride_kn, cols_d, D, stride_kd, CHECK, EVEN_D, I64)
        v = load_tile(V_h, keys, ok, stride_vn, cols_v, DV, stride_vd, CHECK, EVEN_DV, I64)
        r = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dA = tl.dot(g, tl.trans(operand(v, OP_BF16)), input_precision=PRECISION) - crow[:, None]
        ds = dA * kernel_slope(r, c1, c2, P)
        if CAUSAL:
            ds = tl.where(keys[None, :] <= q_pos[:, None], ds, 0.0)
            k = load_tile(KF_h, keys, ok, stride_kfn, cols_d, D, stride_kfd, CHECK, EVEN_D, I64)
        dq = tl.dot(operand(ds, OP_BF16), operand(k, OP_BF16), dq, input_precision=PRECISION)
    return dq


@triton.jit
def scaled_grad_rows(DO_h, INV_h, CROW_h, rows, ok, stride_don, stride_dod, cols_v, DV,
                     EVEN_DV: tl.constexpr, OP_BF16: tl.constexpr, I64: tl.constexpr):
    """g = do / d as an operand (len(rows), BLOCK_DV), and c = (do . o) / d; zero outside ``ok``."""
    do = load_tile(DO_h, rows, ok, stride_don, cols_v, DV, stride_dod, True, EVEN_DV, I64)
    inv_den = tl.load(INV_h + rows, mask=ok, other=0.0)
    crow = tl.load(CROW_h + rows, mask=ok, other=0.0)
    return operand(do.to(tl.float32) * inv_den[:, None], OP_BF16), crow


@triton.jit
def dkdv_from_queries(
    dk, dv, k, v, kf, keys, Q_h, DO_h, INV_h, CROW_h, DQ_ACC, dq_head,
    stride_qn, stride_qd, stride_don, stride_dod,
    lo, hi, offset, row_limit, D, DV, a0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr, DQ_MODE: tl.constexpr,
):
    """dv_j += sum_i f(r_ij) g_i and dk_j += sum_i ds_ij q_i over the query rows i in [lo, hi).

    The tiles are computed transposed, (key, query): r^T = k q^T and dA^T = v do^T / d - c,
    so that f(r)^T and ds^T come out of the products in the layout the next products take
    as their first operand, and q and do are read as they are loaded (1/d scales the tile,
    not the operand). Rows at or past ``row_limit`` (Nq, or the end of a chunk), and rows
    that see no key (d = 0), load 1/d = c = 0 and add nothing; only the causal diagonal
    (CAUSAL) needs a mask.

    DQ_MODE > 0 also adds each tile's dq_i = sum_j ds_ij kf_j (kf: the key block with
    non-finite entries set to 0, an operand) to the fp32 (B * Hq, Nq, BLOCK_D) accumulator
    DQ_ACC at head ``dq_head`` (row_limit is Nq then): 1 through pointer atomics (DQ_ACC a pointer), 2 through a
    TMA reduction of the whole tile (DQ_ACC a tensor descriptor with block (1, BLOCK_M, BLOCK_D),
    which drops the rows past Nq)."""
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    k_op = operand(k, OP_BF16)
    v_op = operand(v, OP_BF16)
    for i0 in range(lo, hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        ok = rows < row_limit
        q = operand(load_tile(Q_h, rows, ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64), OP_BF16)
        do = operand(load_tile(DO_h, rows, ok, stride_don, cols_v, DV, stride_dod, True, EVEN_DV, I64), OP_BF16)
        inv_den = tl.load(INV_h + rows, mask=ok, other=0.0)
        crow = tl.load(CROW_h + rows, mask=ok, other=0.0)
        rT = tl.dot(k_op, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        wT = kernel_value(rT, a0, c1, c2, P) * inv_den[None, :]
        dAT = tl.dot(v_op, tl.trans(do), input_precision=PRECISION) * inv_den[None, :] - crow[None, :]
        dsT = dAT * kernel_slope(rT, c1, c2, P)
        if CAUSAL:
            vis = keys[:, None] <= (rows + offset)[None, :]
            wT = tl.where(vis, wT, 0.0)
            dsT = tl.where(vis, dsT, 0.0)
        ds_op = operand(dsT, OP_BF16)
        dv = tl.dot(operand(wT, OP_BF16), do, dv, input_precision=PRECISION)
        dk = tl.dot(ds_op, q, dk, input_precision=PRECISION)
        add_tile_dq(ds_op, kf, DQ_ACC, dq_head, i0, rows, ok, row_limit, BLOCK_M, BLOCK_D, PRECISION, DQ_MODE)
    return dk, dv


@triton.jit
def add_tile_dq(ds_op, kf, DQ_ACC, dq_head, i0, rows, ok, row_limit, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, DQ_MODE: tl.constexpr):
    """One tile's dq_i = sum_j ds_ij kf_j (ds_op: the transposed (key, query) tile) added to the
    fp32 (B * Hq, row_limit, BLOCK_D) accumulator at head ``dq_head``: DQ_MODE 1 through pointer
    atomics (rows ``ok`` only), 2 through a TMA reduction of the whole tile (DQ_ACC a tensor
    descriptor with block (1, BLOCK_M, BLOCK_D), which drops the rows past its end); 0 nothing."""
    if DQ_MODE == 1:
        cols_d = tl.arange(0, BLOCK_D)
        dq = tl.dot(tl.trans(ds_op), kf, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        dq_offs = (dq_head.to(tl.int64) * row_limit + rows)[:, None] * BLOCK_D + cols_d[None, :]
        tl.atomic_add(DQ_ACC + dq_offs, dq, mask=ok[:, None], sem="relaxed")
    elif DQ_MODE == 2:
        dq = tl.dot(tl.trans(ds_op), kf, input_precision=PRECISION)
        DQ_ACC.atomic_add([dq_head, i0, 0], dq.reshape(1, BLOCK_M, BLOCK_D))


@triton.jit
def dkdv_from_query_heads(
    dk, dv, k, v, kf, keys, Q, DO, INV_DEN, CROW, DQ_ACC, b, hk, Hq, GROUPS,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
    lo, diag_hi, hi, offset, row_limit, Nq, D, DV, a0, c1, c2,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    I64: tl.constexpr, DQ_MODE: tl.constexpr,
):
    """``dkdv_from_queries`` summed over the GROUPS query heads that read key/value head hk:
    rows [lo, diag_hi) on the causal diagonal (masked), then rows [diag_hi, hi) that see the
    whole key block. The (B * Hq, Nq) row terms INV_DEN and CROW are contiguous."""
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        Q_h = Q + b * stride_qb + h * stride_qh
        DO_h = DO + b * stride_dob + h * stride_doh
        row0 = (b * Hq + h) * Nq
        dq_head = (b * Hq + h).to(tl.int32)
        dk, dv = dkdv_from_queries(dk, dv, k, v, kf, keys, Q_h, DO_h, INV_DEN + row0, CROW + row0, DQ_ACC, dq_head,
                                   stride_qn, stride_qd, stride_don, stride_dod, lo, diag_hi, offset, row_limit,
                                   D, DV, a0, c1, c2, P, True, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
                                   OP_BF16, PRECISION, I64, DQ_MODE)
        dk, dv = dkdv_from_queries(dk, dv, k, v, kf, keys, Q_h, DO_h, INV_DEN + row0, CROW + row0, DQ_ACC, dq_head,
                                   stride_qn, stride_qd, stride_don, stride_dod, diag_hi, hi, offset, row_limit,
                                   D, DV, a0, c1, c2, P, False, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
                                   OP_BF16, PRECISION, I64, DQ_MODE)
    return dk, dv


@triton.jit
def output_rows(acc, den):
    """o = acc / d per row, 0 where no key is visible (d = 0)."""
    safe = tl.where(den == 0.0, 1.0, den)
    return tl.where(den[:, None] == 0.0, 0.0, acc / safe[:, None])


@triton.jit
def row_terms(o, do, den):
    """1/d and c = (do . o)/d of rows (len, BLOCK_DV) fp32: 0 where d = 0 and on rows whose
    cotangent is all zero, whatever o and d hold there (a row after a non-finite key has
    o = NaN; its zero cotangent must not turn the gradients of earlier positions into NaN)."""
    live = tl.max(tl.where(do != 0.0, 1, 0), 1) > 0
    inv_den = tl.where(live & (den != 0.0), 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)
    crow = tl.where(live, tl.sum(tl.where(do != 0.0, o * do, 0.0), 1) * inv_den, 0.0)
    return inv_den, crow


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def quadratic_fwd_kernel(
    Q, K, V, MASK, O, DEN,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, a0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): out (B, Hq, Nq, Dv) and the fp32 denominator (B * Hq, Nq)."""
    # the last query blocks see the most keys under a causal mask: launch them first
    pid_m = tl.cdiv(Nq, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    offset = Nk - Nq
    Q_h = Q + b * stride_qb + h * stride_qh
    K_h = K + b * stride_kb + hk * stride_kh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    q_ok = rows < Nq
    q = load_tile(Q_h, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    q_pos = rows + offset

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if CAUSAL:
        k_end = tl.minimum(Nk, pid_m * BLOCK_M + BLOCK_M + offset)
        first_partial = tl.maximum(pid_m * BLOCK_M + offset, 0)  # the first key some query of the block cannot see
    else:
        k_end = Nk
        first_partial = Nk
    if HAS_MASK:
        n_full = 0
    else:
        n_full = tl.minimum(first_partial, Nk) // BLOCK_N * BLOCK_N
    acc, den = attend_keys(acc, den, q, q_pos, K_h, V_h, MASK_b, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_mn, 0, n_full, Nk, D, DV, a0, c1, c2, P, False, CAUSAL, HAS_MASK,
                           BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, PRECISION, I64)
    acc, den = attend_keys(acc, den, q, q_pos, K_h, V_h, MASK_b, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_mn, n_full, k_end, Nk, D, DV, a0, c1, c2, P, True, CAUSAL, HAS_MASK,
                           BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, PRECISION, I64)

    out = output_rows(acc, den)
    o_offs = b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + cols_v[None, :] * stride_od
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & (cols_v[None, :] < DV))
    tl.store(DEN + pid_bh.to(tl.int64) * Nq + rows, den, mask=q_ok)


@triton.jit
def backward_rows_kernel(
    O, DO, DEN, INV_DEN, CROW,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    Hq, Nq, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): 1/d and c = (do . o)/d per query row, fp32 (B * Hq, Nq) (``row_terms``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_v = tl.arange(0, BLOCK_DV)
    ok = rows < Nq
    o = load_tile(O + b * stride_ob + h * stride_oh, rows, ok, stride_on, cols_v, DV, stride_od, True, EVEN_DV, I64)
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, ok, stride_don, cols_v, DV, stride_dod,
                   True, EVEN_DV, I64)
    row0 = pid_bh.to(tl.int64) * Nq
    den = tl.load(DEN + row0 + rows, mask=ok, other=0.0)
    inv_den, crow = row_terms(o.to(tl.float32), do.to(tl.float32), den)
    tl.store(INV_DEN + row0 + rows, inv_den, mask=ok)
    tl.store(CROW + row0 + rows, crow, mask=ok)


@triton.jit
def quadratic_bwd_dkdv_kernel(
    Q, K, KF, V, MASK, DO, INV_DEN, CROW, DK, DV_OUT, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    Hq, Hk, GROUPS, Nq, Nk, D, DV, a0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    I64: tl.constexpr, DQ_MODE: tl.constexpr,
):
    """Grid (cdiv(Nk, BLOCK_N), B * Hk): dK, dV ((B, Hk, Nk, D | Dv) contiguous, the inputs' dtype)
    of one key block, summed over the GROUPS query heads that read it; with DQ_MODE > 0 also
    every tile's dq, added to DQ_ACC (``dkdv_from_queries``). KF: the keys with non-finite
    entries set to 0 (read only with DQ_MODE > 0)."""
    pid_n = tl.program_id(0)  # the first key blocks are seen by the most queries: launched first
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    offset = Nk - Nq
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    k_in = keys < Nk
    # padding keys load as zeros (their dk, dv are written as zeros): no dq term from them
    real = key_valid(MASK + b * stride_mb, stride_mn, keys, Nk, HAS_MASK)
    k = load_tile(K + b * stride_kb + hk * stride_kh, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
    v = load_tile(V + b * stride_vb + hk * stride_vh, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
    if DQ_MODE > 0:
        kf = operand(load_tile(KF + b * stride_kfb + hk * stride_kfh, keys, real, stride_kfn, cols_d, D, stride_kfd,
                               True, EVEN_D, I64), OP_BF16)
    else:
        kf = k

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    n_rows = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # rows that see part of the block, then rows that see all of it
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - offset, 0), BLOCK_M) * BLOCK_M, n_rows)
    else:
        lo = 0
        diag_hi = 0
    dk, dv = dkdv_from_query_heads(dk, dv, k, v, kf, keys, Q, DO, INV_DEN, CROW, DQ_ACC, b, hk, Hq, GROUPS,
                                   stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don,
                                   stride_dod, lo, diag_hi, n_rows, offset, Nq, Nq, D, DV, a0, c1, c2, P,
                                   BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16, PRECISION, I64, DQ_MODE)

    key_rows = (pid_bh.to(tl.int64) * Nk + keys)[:, None]
    tl.store(DK + key_rows * D + cols_d[None, :], tl.where(real[:, None], dk, 0.0).to(DK.dtype.element_ty),
             mask=k_in[:, None] & (cols_d[None, :] < D))
    tl.store(DV_OUT + key_rows * DV + cols_v[None, :], tl.where(real[:, None], dv, 0.0).to(DV_OUT.dtype.element_ty),
             mask=k_in[:, None] & (cols_v[None, :] < DV))


@triton.jit
def quadratic_bwd_dq_kernel(
    Q, K, KF, V, MASK, DO, O, DEN, INV_DEN, CROW, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    I64: tl.constexpr, ROWS_GIVEN: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): dQ ((B, Hq, Nq, D) contiguous, the inputs' dtype) of one
    query block, and the block's row terms 1/d and c = (do . o)/d (fp32 (B * Hq, Nq), 0 where
    d = 0), which the key-block kernel launched after it reads; with ROWS_GIVEN the row terms
    are read from INV_DEN and CROW instead (O and DEN unused). KF: the keys with non-finite
    entries set to 0 (``dq_from_keys``)."""
    pid_m = tl.cdiv(Nq, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    offset = Nk - Nq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    q_ok = rows < Nq
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    row0 = pid_bh.to(tl.int64) * Nq
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, q_ok, stride_don, cols_v, DV, stride_dod,
                   True, EVEN_DV, I64).to(tl.float32)
    if ROWS_GIVEN:
        inv_den = tl.load(INV_DEN + row0 + rows, mask=q_ok, other=0.0)
        crow = tl.load(CROW + row0 + rows, mask=q_ok, other=0.0)
    else:
        o = load_tile(O + b * stride_ob + h * stride_oh, rows, q_ok, stride_on, cols_v, DV, stride_od, True,
                      EVEN_DV, I64)
        den = tl.load(DEN + row0 + rows, mask=q_ok, other=0.0)
        inv_den, crow = row_terms(o.to(tl.float32), do, den)
        tl.store(INV_DEN + row0 + rows, inv_den, mask=q_ok)
        tl.store(CROW + row0 + rows, crow, mask=q_ok)
    g = operand(do * inv_den[:, None], OP_BF16)
    q_pos = rows + offset
    K_h = K + b * stride_kb + hk * stride_kh
    KF_h = KF + b * stride_kfb + hk * stride_kfh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        k_end = tl.minimum(Nk, pid_m * BLOCK_M + BLOCK_M + offset)
        n_full = tl.minimum(tl.maximum(pid_m * BLOCK_M + offset, 0), Nk) // BLOCK_N * BLOCK_N
    else:
        k_end = Nk
        n_full = Nk // BLOCK_N * BLOCK_N
    if HAS_MASK:
        n_full = 0
    dq = dq_from_keys(dq, q, g, crow, q_pos, K_h, KF_h, V_h, MASK_b, stride_kn, stride_kd, stride_kfn, stride_kfd,
                      stride_vn, stride_vd, stride_mn, 0, n_full, Nk, D, DV, c1, c2, P, False, False, HAS_MASK,
                      BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16, PRECISION, I64)
    dq = dq_from_keys(dq, q, g, crow, q_pos, K_h, KF_h, V_h, MASK_b, stride_kn, stride_kd, stride_kfn, stride_kfd,
                      stride_vn, stride_vd, stride_mn, n_full, k_end, Nk, D, DV, c1, c2, P, True, CAUSAL, HAS_MASK,
                      BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16, PRECISION, I64)
    tl.store(DQ + (row0 + rows[:, None]) * D + cols_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok[:, None] & (cols_d[None, :] < D))
