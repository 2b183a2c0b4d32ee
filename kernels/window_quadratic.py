"""The hybrid window in the quadratic regime: both parts in one set of tiles.

The same function as kernels/window.py (whose docstring gives it: window pairs weighted
e^{s - M}, earlier visible pairs rho f(s), rho = gamma e^{-M}, one normaliser), for the lengths
where Fastmax runs its quadratic kernel anyway. Then the rest need not be a launch of its own:
a query block's key range splits into

    rest tiles  [0, lo)   every key at least W positions behind every query of the block, so
                          all pairs are rest pairs and visible: the plain Fastmax inner loops
                          (``attend_keys``, ``dq_from_keys``, ``dkdv_from_queries``) without
                          a causal mask, their sums scaled by rho (forward) or their row
                          terms replaced by rho / d and rho c (backward);
    band tiles  [lo, hi)  the band of kernels/window.py: each pair is a window pair, a rest
                          pair or invisible (``_pair_kinds``).

One forward launch and two backward launches, as for plain Fastmax; the rest's partial sums
never leave the registers. Where plain Fastmax fuses dq into its key-block kernel (bf16, D=128,
TMA reductions: ``ops._dq_fused``), so does the hybrid: a small kernel writes the row terms
(``hybrid_rows_kernel``), and the key-block kernel adds every tile's dq, band tiles and rest
tiles, to an fp32 accumulator (DQ_MODE, as in ``dkdv_from_queries``). Raw scores r = q . k; s = scale r; the polynomial's coefficients
have the scale folded in (c1 = a1 scale, c2 = a2 scale^2, kernels/common.py).

Forward, per query block: the window maximum over the band (pass 1), the rest tiles, then
the band tiles. Backward: the dq kernel writes the row terms 1/d, c and rho / d, rho c; the
key-block kernel reads them: the query rows whose windows or causal diagonal reach the key
block take the mixed band tiles, the later rows (every key of the block at least W behind
them) the plain loop with the rho-scaled terms.

Masks, non-finite values, padding, GQA and layouts as in kernels/window.py and
kernels/quadratic.py.
"""

import triton
import triton.language as tl

from .common import kernel_slope, kernel_value, key_valid, load_tile, nonfinite_marks, operand
from .quadratic import add_tile_dq, attend_keys, dkdv_from_queries, dq_from_keys, output_rows
from .window import _band, _pair_kinds, _window_max, hybrid_row_terms


LOG2E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e): the exponentials on ex2 directly


@triton.jit
def hybrid_quadratic_fwd_kernel(
    Q, K, V, MASK, GAIN, O, DEN, M,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, W, scale, a0, c1, c2,
    P: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): o (B, Hq, Nq, Dv), d and M (B * Hq, Nq) of one query block."""
    # the last query blocks see the most keys: launch them first
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
    t = rows + offset
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    K_h = K + b * stride_kb + hk * stride_kh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb
    lo, hi = _band(pid_m, offset, Nk, W, BLOCK_M, BLOCK_N)

    shift = _window_max(q, t, K_h, MASK_b, stride_kn, stride_kd, stride_mn, lo, hi, Nk, D, W, scale, HAS_MASK,
                        BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, I64)
    rho = tl.load(GAIN + h) * tl.exp(-shift)

    # rest tiles: every pair visible and a rest pair; summed unscaled, then scaled by rho
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, den = attend_keys(acc, den, q, t, K_h, V_h, MASK_b, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_mn, 0, lo, Nk, D, DV, a0, c1, c2, P, HAS_MASK, False, HAS_MASK,
                           BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, PRECISION, I64)
    acc = acc * rho[:, None]
    den = den * rho

    # band tiles: window, rest or invisible, pair by pair
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
        v = load_tile(V_h, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
        r = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        vis, win, _ = _pair_kinds(keys[None, :], t[:, None], real[None, :], W, HAS_MASK)
        w = tl.where(win, tl.exp2((r * scale - shift[:, None]) * LOG2E), rho[:, None] * kernel_value(r, a0, c1, c2, P))
        v_nan = nonfinite_marks(v)  # 0, or NaN where the key's value is not finite
        v = tl.where(v_nan[:, None] == 0.0, v, 0.0)
        w = tl.where(vis, w + v_nan[None, :], 0.0)
        acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PRECISION)
        den += tl.sum(w, 1)

    out = output_rows(acc, den)
    row0 = pid_bh.to(tl.int64) * Nq
    o_offs = b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + cols_v[None, :] * stride_od
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & (cols_v[None, :] < DV))
    tl.store(DEN + row0 + rows, den, mask=q_ok)
    tl.store(M + row0 + rows, shift, mask=q_ok)


@triton.jit
def hybrid_quadratic_bwd_dq_kernel(
    Q, K, KF, V, MASK, DO, O, DEN, M, GAIN, DQ, INV_DEN, CROW, INV_R, CROW_R,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, W, scale, c1, c2,
    P: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): dq ((B, Hq, Nq, D), the inputs' dtype) of one query block,
    and its row terms 1/d, c, rho / d, rho c (fp32 (B * Hq, Nq), exactly 0 on rows the loss does
    not read). KF: the keys with non-finite entries set to 0, which the band's ds k reads."""
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
    t = rows + offset
    row0 = pid_bh.to(tl.int64) * Nq
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    do, inv_den, crow, shift, rho, inv_r, crow_r = hybrid_row_terms(
        O + b * stride_ob + h * stride_oh, DO + b * stride_dob + h * stride_doh, DEN + row0, M + row0,
        tl.load(GAIN + h), INV_DEN + row0, CROW + row0, INV_R + row0, CROW_R + row0, rows, q_ok, cols_v, DV,
        stride_on, stride_od, stride_don, stride_dod, True, EVEN_DV, I64)
    active = (inv_den != 0.0) | (crow != 0.0)  # rows the loss reads
    # one operand g = do / d for both loops, and do dead from here: the rest's row terms are
    # rho / d and rho c, so its dq is rho times the plain loop's with 1/d and c (rho per row).
    # Holding do (fp32) or a second operand across the rest loop cost ~45 registers at D=64,
    # a third of the SM's resident blocks (tools/kernel_registers.py --hybrid).
    g_op = operand(do * inv_den[:, None], OP_BF16)
    K_h = K + b * stride_kb + hk * stride_kh
    KF_h = KF + b * stride_kfb + hk * stride_kfh
    V_h = V + b * stride_vb + hk * stride_vh
    MASK_b = MASK + b * stride_mb
    lo, hi = _band(pid_m, offset, Nk, W, BLOCK_M, BLOCK_N)

    # rest tiles: the Fastmax dq, then scaled by rho
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = dq_from_keys(dq, q, g_op, crow, t, K_h, KF_h, V_h, MASK_b,
                      stride_kn, stride_kd, stride_kfn, stride_kfd, stride_vn, stride_vd, stride_mn, 0, lo, Nk, D, DV,
                      c1, c2, P, HAS_MASK, False, HAS_MASK, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16,
                      PRECISION, I64)
    dq = dq * rho[:, None]

    # band tiles: ds = dA dw/dr, dw/dr = scale w on window pairs, rho f'(r) on rest pairs (the
    # exponentials from r scale log2 e - M log2 e: one FMA); rows the loss does not read take nothing
    scale2 = scale * LOG2E
    shift2 = shift * LOG2E
    for j0 in range(lo, hi, BLOCK_N):
        keys = j0 + tl.arange(0, BLOCK_N)
        real = key_valid(MASK_b, stride_mn, keys, Nk, HAS_MASK)
        k = load_tile(K_h, keys, real, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)
        v = load_tile(V_h, keys, real, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
        r = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        vis, win, _ = _pair_kinds(keys[None, :], t[:, None], real[None, :], W, HAS_MASK)
        vis = vis & active[:, None]
        dA = tl.dot(g_op, tl.trans(operand(v, OP_BF16)), input_precision=PRECISION) - crow[:, None]
        slope = tl.where(win, scale * tl.exp2(r * scale2 - shift2[:, None]), rho[:, None] * kernel_slope(r, c1, c2, P))
        ds = tl.where(vis, slope * dA, 0.0)
        kf = load_tile(KF_h, keys, real, stride_kfn, cols_d, D, stride_kfd, True, EVEN_D, I64)
        dq = tl.dot(operand(ds, OP_BF16), operand(kf, OP_BF16), dq, input_precision=PRECISION)
    tl.store(DQ + (row0 + rows[:, None]) * D + cols_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok[:, None] & (cols_d[None, :] < D))


@triton.jit
def hybrid_rows_kernel(
    O, DO, DEN, M, GAIN, INV_DEN, CROW, INV_R, CROW_R,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    Hq, Nq, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr, I64: tl.constexpr,
):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq): the row terms 1/d, c, rho / d, rho c (fp32 (B * Hq, Nq))
    of ``hybrid_row_terms``, for the key-block kernel that also computes dq (DQ_MODE > 0)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_v = tl.arange(0, BLOCK_DV)
    ok = rows < Nq
    row0 = pid_bh.to(tl.int64) * Nq
    hybrid_row_terms(O + b * stride_ob + h * stride_oh, DO + b * stride_dob + h * stride_doh, DEN + row0, M + row0,
                     tl.load(GAIN + h), INV_DEN + row0, CROW + row0, INV_R + row0, CROW_R + row0, rows, ok, cols_v,
                     DV, stride_on, stride_od, stride_don, stride_dod, True, EVEN_DV, I64)


@triton.jit
def hybrid_quadratic_bwd_dkdv_kernel(
    Q, K, KF, V, MASK, DO, INV_DEN, CROW, INV_R, CROW_R, M, GAIN, DK, DV_OUT, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    Hq, Hk, GROUPS, Nq, Nk, D, DV, W, scale, a0, c1, c2,
    P: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr, DQ_MODE: tl.constexpr,
):
    """Grid (cdiv(Nk, BLOCK_N), B * Hk): dk, dv of one key block, summed over the GROUPS query heads
    that read it: the band rows (n0 <= t_i < n0 + BLOCK_N - 1 + W) pair by pair, the later rows
    through the plain loop with the rho-scaled row terms. Tiles transposed, (key, query).
    DQ_MODE > 0: every tile's dq also goes into the fp32 (B * Hq, Nq, BLOCK_D) DQ_ACC (1 pointer
    atomics, 2 a TMA reduction; ``dkdv_from_queries``), from KF, the keys with non-finite
    entries set to 0."""
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
    if DQ_MODE > 0:
        kf = operand(load_tile(KF + b * stride_kfb + hk * stride_kfh, keys, real, stride_kfn, cols_d, D, stride_kfd,
                               True, EVEN_D, I64), OP_BF16)
    else:
        kf = k_op
    n_rows = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
    lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
    band_hi = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + W - offset, 0), BLOCK_M) * BLOCK_M, n_rows)

    scale2 = scale * LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        Q_h = Q + b * stride_qb + h * stride_qh
        DO_h = DO + b * stride_dob + h * stride_doh
        row0 = (b * Hq + h) * Nq
        dq_head = (b * Hq + h).to(tl.int32)
        gain = tl.load(GAIN + h)
        for i0 in range(lo, band_hi, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            ok = rows < Nq
            q = operand(load_tile(Q_h, rows, ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64), OP_BF16)
            do = operand(load_tile(DO_h, rows, ok, stride_don, cols_v, DV, stride_dod, True, EVEN_DV, I64), OP_BF16)
            inv_den = tl.load(INV_DEN + row0 + rows, mask=ok, other=0.0)
            crow = tl.load(CROW + row0 + rows, mask=ok, other=0.0)
            shift = tl.load(M + row0 + rows, mask=ok, other=0.0)
            rho = gain * tl.exp(-shift)
            active = (inv_den != 0.0) | (crow != 0.0)
            rT = tl.dot(k_op, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            visT, winT, _ = _pair_kinds(keys[:, None], (rows + offset)[None, :], real[:, None], W, HAS_MASK)
            visT = visT & active[None, :]  # rows the loss does not read take nothing (fewer registers than moving t)
            eT = tl.exp2(rT * scale2 - (shift * LOG2E)[None, :])
            wT = tl.where(visT, tl.where(winT, eT, rho[None, :] * kernel_value(rT, a0, c1, c2, P)), 0.0)
            dv = tl.dot(operand(wT * inv_den[None, :], OP_BF16), do, dv, input_precision=PRECISION)  # wT dead here
            dAT = tl.dot(v_op, tl.trans(do), input_precision=PRECISION) * inv_den[None, :] - crow[None, :]
            slopeT = tl.where(winT, scale * eT, rho[None, :] * kernel_slope(rT, c1, c2, P))
            ds_op = operand(tl.where(visT, slopeT * dAT, 0.0), OP_BF16)
            dk = tl.dot(ds_op, q, dk, input_precision=PRECISION)
            add_tile_dq(ds_op, kf, DQ_ACC, dq_head, i0, rows, ok, Nq, BLOCK_M, BLOCK_D, PRECISION, DQ_MODE)
        # the later rows: every key of the block a rest pair, seen in full
        dk, dv = dkdv_from_queries(dk, dv, k, v, kf, keys, Q_h, DO_h, INV_R + row0, CROW_R + row0, DQ_ACC, dq_head,
                                   stride_qn, stride_qd, stride_don, stride_dod, band_hi, n_rows, offset, Nq,
                                   D, DV, a0, c1, c2, P, False, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
                                   OP_BF16, PRECISION, I64, DQ_MODE)

    key_rows = (pid_bh.to(tl.int64) * Nk + keys)[:, None]
    tl.store(DK + key_rows * D + cols_d[None, :], tl.where(real[:, None], dk, 0.0).to(DK.dtype.element_ty),
             mask=k_in[:, None] & (cols_d[None, :] < D))
    tl.store(DV_OUT + key_rows * DV + cols_v[None, :], tl.where(real[:, None], dv, 0.0).to(DV_OUT.dtype.element_ty),
             mask=k_in[:, None] & (cols_v[None, :] < DV))
