"""Linear-regime Fastmax kernels: chunked causal (or global) states kept on chip.

The numerator of query i factorises over features of q and k:

    sum_j f(s_ij) v_j = a0 S0 + a1 scale q_i^T S1 + a2 scale^2 sum_{m,n} q_i[m] q_i[n] S2[m,n]
    S0 = sum_j v_j,  S1 = sum_j k_j v_j^T,  S2[m,n] = sum_j k_j[m] k_j[n] v_j^T

(the denominator likewise with v_j -> 1). S2 is symmetric in (m, n), so only the
pairs n >= m are kept, the query side weighted 2 off the diagonal. The (m, n) grid is
cut into BT x BT tiles (tile (mb, nb) with nb >= mb); each program owns one tile's
state, BT*BT rows of S2 by a BLOCK_DV slice of its columns, in fp32 registers for the
whole sequence, and streams Q, K, V chunk by chunk: the products q[m] q[n] for its tile
are formed in registers (never written to memory) and fed to the tensor cores. One more
program per (head, dv-block) owns orders 0 and 1 and, under the causal mask, the
masked CHUNK x CHUNK tile inside each chunk (all orders). The programs' partial
numerators and denominators are summed with fp32 atomics into (B, Hq, Nq, Dv) buffers.

Causal: a chunk's queries read the state of the chunks before it, then the chunk is
folded in. Non-causal: the whole state first, then every query reads it.

Backward (no per-chunk states are stored; see fastmax_hf/chunked.py for the algebra):
a forward sweep rebuilds S and differentiates the query side (dq) and the intra-chunk
tiles (dq, dk, dv); a reverse sweep accumulates R = sum_i phi_q(q_i) g_i^T,
r = sum_i phi_q(q_i) c_i over later queries and differentiates the key side (dk, dv).

State layout (prefill/decoding): S (B, Hk, F_ROWS, Dv) and z (B, Hk, F_ROWS) fp32 with
row 0 the zeroth order, rows 1..BLOCK_D the first order and then one block of BT*BT
rows per tile, keys unweighted.
"""

import triton
import triton.language as tl

from .common import kernel_slope, kernel_value, key_valid, load_rows


@triton.jit
def _operand(x, OP_BF16: tl.constexpr):
    """Tensor-core operand: bf16 for bf16 inputs, fp32 (tf32 or ieee dot) otherwise.

    fp16 would overflow: the state grows with the number of tokens."""
    if OP_BF16:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _pairs(xm, xn, CHUNK: tl.constexpr, BT: tl.constexpr, OP_BF16: tl.constexpr):
    """(CHUNK, BT) x (CHUNK, BT) -> (CHUNK, BT*BT) products x[m] x[n], feature m*BT + n.

    Formed in the tensor-core operand type (bf16 products halve registers and shuffles)."""
    return tl.reshape(_operand(xm, OP_BF16)[:, :, None] * _operand(xn, OP_BF16)[:, None, :], (CHUNK, BT * BT))


@triton.jit
def _tile_weights(mb, nb, BT: tl.constexpr):
    """Symmetry weights of tile (mb, nb): 2 above the diagonal, 1 on it, 0 below (exact in bf16)."""
    m = mb * BT + tl.arange(0, BT)
    n = nb * BT + tl.arange(0, BT)
    w = tl.where(n[None, :] > m[:, None], 2.0, tl.where(n[None, :] == m[:, None], 1.0, 0.0))
    return tl.reshape(w, (BT * BT,))


@triton.jit
def _query_pairs(Q_h, rows, q_valid, sqn, m_cols, n_cols, D, sqd, coef, wsym,
                 CHUNK: tl.constexpr, BT: tl.constexpr, OP_BF16: tl.constexpr):
    """Weighted query features wsym[m,n] * coef * q[m] q[n] of one tile; coef = a2 scale^2
    goes onto q[m] before rounding, so the bf16 product carries no rounded coefficient."""
    qm = load_rows(Q_h, rows, q_valid, sqn, m_cols, D, sqd).to(tl.float32) * coef
    qn = load_rows(Q_h, rows, q_valid, sqn, n_cols, D, sqd)
    return _pairs(qm, qn, CHUNK, BT, OP_BF16) * _operand(wsym, OP_BF16)[None, :]


@triton.jit
def _chunk_has_queries(j0, CHUNK: tl.constexpr, offset, Nq):
    """Whether any query sits at a key position inside [j0, j0 + CHUNK)."""
    return (j0 + CHUNK - offset > 0) & (j0 - offset < Nq)


@triton.jit
def _tile_columns(TILE_M, TILE_N, pid_t, BT: tl.constexpr):
    """Program pid_t's feature tile: the columns of x that its pairs x[m] x[n] read, and their weights."""
    mb = tl.load(TILE_M + pid_t)
    nb = tl.load(TILE_N + pid_t)
    return mb * BT + tl.arange(0, BT), nb * BT + tl.arange(0, BT), _tile_weights(mb, nb, BT)


@triton.jit
def _fold_key_pairs(S, z, K_h, V_h, keys, k_valid, skn, skd, svn, svd, m_cols, n_cols, cols_v, D, DV,
                    CHUNK: tl.constexpr, BT: tl.constexpr, OP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk of keys folded into a tile's state: S += phi(k)^T v, z += sum phi(k)."""
    kf = _pairs(load_rows(K_h, keys, k_valid, skn, m_cols, D, skd),
                load_rows(K_h, keys, k_valid, skn, n_cols, D, skd), CHUNK, BT, OP_BF16)
    v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
    S += tl.dot(tl.trans(kf), _operand(v, OP_BF16), input_precision=PRECISION)
    z += tl.sum(kf.to(tl.float32), 0)
    return S, z


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _second_order_fwd(
    Q, K, V, MASK, O_ACC, DEN_ACC, S_IN, Z_IN, S_OUT, Z_OUT, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, F_ROWS, scale, a2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    TF: tl.constexpr = BT * BT
    m_cols, n_cols, wsym = _tile_columns(TILE_M, TILE_N, pid_t, BT)
    coef = a2 * scale * scale
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh

    frows = 1 + BLOCK_D + pid_t * TF + tl.arange(0, TF)
    sbase = (b * Hk + hk) * F_ROWS
    if LOAD_STATE:
        S = tl.load(S_IN + (sbase + frows[:, None]) * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
        z = tl.load(Z_IN + sbase + frows)
    else:
        S = tl.zeros((TF, BLOCK_DV), dtype=tl.float32)
        z = tl.zeros((TF,), dtype=tl.float32)

    for j0 in range(0, Nk, CHUNK):
        keys = j0 + tl.arange(0, CHUNK)
        k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
        if CAUSAL:
            if _chunk_has_queries(j0, CHUNK, offset, Nq):
                rows = keys - offset
                q_valid = (rows >= 0) & (rows < Nq)
                S_op = _operand(S, OP_BF16)
                for g in range(0, GROUPS):
                    h = hk * GROUPS + g
                    Q_h = Q + b * sqb + h * sqh
                    qf = _query_pairs(Q_h, rows, q_valid, sqn, m_cols, n_cols, D, sqd, coef, wsym, CHUNK, BT, OP_BF16)
                    part = tl.dot(qf, S_op, input_precision=PRECISION)
                    out_rows = (b * Hq + h) * Nq + rows
                    tl.atomic_add(O_ACC + out_rows[:, None] * DV + cols_v[None, :], part,
                                  mask=q_valid[:, None] & v_ok[None, :], sem="relaxed")
                    if pid_v == 0:
                        tl.atomic_add(DEN_ACC + out_rows, tl.sum(qf.to(tl.float32) * z[None, :], 1), mask=q_valid, sem="relaxed")
        S, z = _fold_key_pairs(S, z, K_h, V_h, keys, k_valid, skn, skd, svn, svd, m_cols, n_cols, cols_v, D, DV,
                               CHUNK, BT, OP_BF16, PRECISION)

    if not CAUSAL:
        S_op = _operand(S, OP_BF16)
        for i0 in range(0, Nq, CHUNK):
            rows = i0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                Q_h = Q + b * sqb + h * sqh
                qf = _query_pairs(Q_h, rows, q_valid, sqn, m_cols, n_cols, D, sqd, coef, wsym, CHUNK, BT, OP_BF16)
                part = tl.dot(qf, S_op, input_precision=PRECISION)
                out_rows = (b * Hq + h) * Nq + rows
                tl.atomic_add(O_ACC + out_rows[:, None] * DV + cols_v[None, :], part,
                              mask=q_valid[:, None] & v_ok[None, :], sem="relaxed")
                if pid_v == 0:
                    tl.atomic_add(DEN_ACC + out_rows, tl.sum(qf.to(tl.float32) * z[None, :], 1), mask=q_valid, sem="relaxed")

    if STORE_STATE:
        tl.store(S_OUT + (sbase + frows[:, None]) * DV + cols_v[None, :], S, mask=v_ok[None, :])
        if pid_v == 0:
            tl.store(Z_OUT + sbase + frows, z)


@triton.jit
def _low_order_fwd(
    Q, K, V, MASK, O_ACC, DEN_ACC, S_IN, Z_IN, S_OUT, Z_OUT,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, F_ROWS, scale, a0, a1, a2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh

    sbase = (b * Hk + hk) * F_ROWS
    if LOAD_STATE:
        S1 = tl.load(S_IN + (sbase + 1 + cols_d[:, None]) * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
        S0 = tl.load(S_IN + sbase * DV + cols_v, mask=v_ok, other=0.0)
        z1 = tl.load(Z_IN + sbase + 1 + cols_d)
        z0 = tl.load(Z_IN + sbase)
    else:
        S1 = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
        S0 = tl.zeros((BLOCK_DV,), dtype=tl.float32)
        z1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        z0 = tl.sum(z1, 0)

    for j0 in range(0, Nk, CHUNK):
        keys = j0 + tl.arange(0, CHUNK)
        k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
        k = load_rows(K_h, keys, k_valid, skn, cols_d, D, skd)
        v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
        if CAUSAL:
            if _chunk_has_queries(j0, CHUNK, offset, Nq):
                rows = keys - offset
                q_valid = (rows >= 0) & (rows < Nq)
                S1_op = _operand(S1, OP_BF16)
                for g in range(0, GROUPS):
                    h = hk * GROUPS + g
                    q = load_rows(Q + b * sqb + h * sqh, rows, q_valid, sqn, cols_d, D, sqd)
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (CHUNK, CHUNK)
                    vis = q_valid[:, None] & k_valid[None, :] & (keys[None, :] <= keys[:, None])
                    w = tl.where(vis, kernel_value(s, a0, a1, a2, P), 0.0)
                    part = tl.dot(_operand(w, OP_BF16), _operand(v, OP_BF16), input_precision=PRECISION)
                    part += (a1 * scale) * tl.dot(_operand(q, OP_BF16), S1_op, input_precision=PRECISION)
                    part += a0 * S0[None, :]
                    out_rows = (b * Hq + h) * Nq + rows
                    tl.atomic_add(O_ACC + out_rows[:, None] * DV + cols_v[None, :], part,
                                  mask=q_valid[:, None] & v_ok[None, :], sem="relaxed")
                    if pid_v == 0:
                        den = tl.sum(w, 1) + (a1 * scale) * tl.sum(q.to(tl.float32) * z1[None, :], 1) + a0 * z0
                        tl.atomic_add(DEN_ACC + out_rows, den, mask=q_valid, sem="relaxed")
        S1 += tl.dot(tl.trans(_operand(k, OP_BF16)), _operand(v, OP_BF16), input_precision=PRECISION)
        S0 += tl.sum(v.to(tl.float32), 0)
        z1 += tl.sum(k.to(tl.float32), 0)
        z0 += tl.sum(k_valid.to(tl.float32), 0)

    if not CAUSAL:
        S1_op = _operand(S1, OP_BF16)
        for i0 in range(0, Nq, CHUNK):
            rows = i0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                q = load_rows(Q + b * sqb + h * sqh, rows, q_valid, sqn, cols_d, D, sqd)
                part = (a1 * scale) * tl.dot(_operand(q, OP_BF16), S1_op, input_precision=PRECISION)
                part += a0 * S0[None, :]
                out_rows = (b * Hq + h) * Nq + rows
                tl.atomic_add(O_ACC + out_rows[:, None] * DV + cols_v[None, :], part,
                              mask=q_valid[:, None] & v_ok[None, :], sem="relaxed")
                if pid_v == 0:
                    den = (a1 * scale) * tl.sum(q.to(tl.float32) * z1[None, :], 1) + a0 * z0
                    tl.atomic_add(DEN_ACC + out_rows, den, mask=q_valid, sem="relaxed")

    if STORE_STATE:
        tl.store(S_OUT + (sbase + 1 + cols_d[:, None]) * DV + cols_v[None, :], S1, mask=v_ok[None, :])
        tl.store(S_OUT + sbase * DV + cols_v, S0, mask=v_ok)
        if pid_v == 0:
            tl.store(Z_OUT + sbase + 1 + cols_d, z1)
            tl.store(Z_OUT + sbase, z0)


@triton.jit
def linear_fwd_kernel(
    Q, K, V, MASK, O_ACC, DEN_ACC, S_IN, Z_IN, S_OUT, Z_OUT, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    Hk, GROUPS, Nq, Nk, D, DV, N_TILES, F_ROWS,
    scale, a0, a1, a2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (N_TILES + 1, cdiv(Dv, BLOCK_DV), B * Hk): program N_TILES owns orders 0-1 and the intra-chunk tile."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    if pid_t < N_TILES:
        _second_order_fwd(
            Q, K, V, MASK, O_ACC, DEN_ACC, S_IN, Z_IN, S_OUT, Z_OUT, TILE_M, TILE_N,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, F_ROWS, scale, a2,
            CAUSAL, HAS_MASK, LOAD_STATE, STORE_STATE, CHUNK, BLOCK_D, BLOCK_DV, BT, OP_BF16, PRECISION,
        )
    else:
        _low_order_fwd(
            Q, K, V, MASK, O_ACC, DEN_ACC, S_IN, Z_IN, S_OUT, Z_OUT,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, F_ROWS, scale, a0, a1, a2,
            P, CAUSAL, HAS_MASK, LOAD_STATE, STORE_STATE, CHUNK, BLOCK_D, BLOCK_DV, OP_BF16, PRECISION,
        )


# ----------------------------------------------------------------------------------------
# backward, forward sweep: dq (all orders) and the intra-chunk dk, dv
# ----------------------------------------------------------------------------------------


@triton.jit
def _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid, sdob, sdoh, sdon, sdod, cols_v, DV, pid_v):
    """g = do / d (CHUNK, BLOCK_DV) fp32 and c = (do . o) / d, the latter only for dv-block 0."""
    do = load_rows(DO + b * sdob + h * sdoh, rows, q_valid, sdon, cols_v, DV, sdod)
    inv_den = tl.load(INV_DEN + (b * Hq + h) * Nq + rows, mask=q_valid, other=0.0)
    crow = tl.load(CROW + (b * Hq + h) * Nq + rows, mask=q_valid, other=0.0)
    crow = tl.where(pid_v == 0, crow, 0.0)
    return do.to(tl.float32) * inv_den[:, None], crow


@triton.jit
def _add_pair_grads(DST_ROWS, Y, xm, xn, m_cols, n_cols, valid, D, CHUNK: tl.constexpr, BT: tl.constexpr):
    """d/dx of sum_f Y_f x[m_f] x[n_f], added into rows DST_ROWS (pointer per row, D columns)."""
    Y3 = tl.reshape(Y, (CHUNK, BT, BT))
    d_m = tl.sum(Y3 * xn.to(tl.float32)[:, None, :], 2)
    d_n = tl.sum(Y3 * xm.to(tl.float32)[:, :, None], 1)
    tl.atomic_add(DST_ROWS[:, None] + m_cols[None, :], d_m, mask=valid[:, None] & (m_cols[None, :] < D), sem="relaxed")
    tl.atomic_add(DST_ROWS[:, None] + n_cols[None, :], d_n, mask=valid[:, None] & (n_cols[None, :] < D), sem="relaxed")


@triton.jit
def _second_order_bwd_dq(
    Q, K, V, MASK, DO, INV_DEN, CROW, DQ, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    TF: tl.constexpr = BT * BT
    m_cols, n_cols, wsym = _tile_columns(TILE_M, TILE_N, pid_t, BT)
    coef = a2 * scale * scale
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh
    S = tl.zeros((TF, BLOCK_DV), dtype=tl.float32)
    z = tl.zeros((TF,), dtype=tl.float32)

    if not CAUSAL:
        for j0 in range(0, Nk, CHUNK):
            keys = j0 + tl.arange(0, CHUNK)
            k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
            S, z = _fold_key_pairs(S, z, K_h, V_h, keys, k_valid, skn, skd, svn, svd, m_cols, n_cols, cols_v, D, DV,
                                   CHUNK, BT, OP_BF16, PRECISION)

    n_steps = tl.cdiv(Nk, CHUNK) if CAUSAL else tl.cdiv(Nq, CHUNK)
    for step in range(0, n_steps):
        j0 = step * CHUNK
        if CAUSAL:
            keys = j0 + tl.arange(0, CHUNK)
            rows = keys - offset
            q_valid = (rows >= 0) & (rows < Nq)
            has_queries = _chunk_has_queries(j0, CHUNK, offset, Nq)
        else:
            rows = j0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            has_queries = j0 < Nq
        if has_queries:
            S_op = _operand(S, OP_BF16)
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                Q_h = Q + b * sqb + h * sqh
                gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                        sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                X = tl.dot(_operand(gr, OP_BF16), tl.trans(S_op), input_precision=PRECISION)  # (CHUNK, TF)
                X -= crow[:, None] * z[None, :]
                qm = load_rows(Q_h, rows, q_valid, sqn, m_cols, D, sqd)
                qn = load_rows(Q_h, rows, q_valid, sqn, n_cols, D, sqd)
                _add_pair_grads(DQ + ((b * Hq + h) * Nq + rows) * D, X * (coef * wsym)[None, :], qm, qn,
                                m_cols, n_cols, q_valid, D, CHUNK, BT)
        if CAUSAL:
            k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
            S, z = _fold_key_pairs(S, z, K_h, V_h, keys, k_valid, skn, skd, svn, svd, m_cols, n_cols, cols_v, D, DV,
                                   CHUNK, BT, OP_BF16, PRECISION)


@triton.jit
def _low_order_bwd_dq(
    Q, K, V, MASK, DO, INV_DEN, CROW, DQ, DK, DV_ACC,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a0, a1, a2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh
    S1 = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    z1 = tl.zeros((BLOCK_D,), dtype=tl.float32)

    if not CAUSAL:
        for j0 in range(0, Nk, CHUNK):
            keys = j0 + tl.arange(0, CHUNK)
            k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
            k = load_rows(K_h, keys, k_valid, skn, cols_d, D, skd)
            v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
            S1 += tl.dot(tl.trans(_operand(k, OP_BF16)), _operand(v, OP_BF16), input_precision=PRECISION)
            z1 += tl.sum(k.to(tl.float32), 0)

    n_steps = tl.cdiv(Nk, CHUNK) if CAUSAL else tl.cdiv(Nq, CHUNK)
    for step in range(0, n_steps):
        j0 = step * CHUNK
        if CAUSAL:
            keys = j0 + tl.arange(0, CHUNK)
            rows = keys - offset
            q_valid = (rows >= 0) & (rows < Nq)
            has_queries = _chunk_has_queries(j0, CHUNK, offset, Nq)
            k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
            k = load_rows(K_h, keys, k_valid, skn, cols_d, D, skd)
            v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
        else:
            rows = j0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            has_queries = j0 < Nq
        if has_queries:
            S1_op = _operand(S1, OP_BF16)
            if CAUSAL:
                dk = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
                dv = tl.zeros((CHUNK, BLOCK_DV), dtype=tl.float32)
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                q = load_rows(Q + b * sqb + h * sqh, rows, q_valid, sqn, cols_d, D, sqd)
                gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                        sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                dq = (a1 * scale) * (tl.dot(_operand(gr, OP_BF16), tl.trans(S1_op), input_precision=PRECISION)
                                     - crow[:, None] * z1[None, :])
                if CAUSAL:
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                    vis = q_valid[:, None] & k_valid[None, :] & (keys[None, :] <= keys[:, None])
                    w = tl.where(vis, kernel_value(s, a0, a1, a2, P), 0.0)
                    dA = tl.dot(_operand(gr, OP_BF16), tl.trans(_operand(v, OP_BF16)), input_precision=PRECISION)
                    dA -= crow[:, None]
                    ds = tl.where(vis, dA * kernel_slope(s, a1, a2, P), 0.0) * scale
                    dq += tl.dot(_operand(ds, OP_BF16), _operand(k, OP_BF16), input_precision=PRECISION)
                    dk += tl.dot(tl.trans(_operand(ds, OP_BF16)), _operand(q, OP_BF16), input_precision=PRECISION)
                    dv += tl.dot(tl.trans(_operand(w, OP_BF16)), _operand(gr, OP_BF16), input_precision=PRECISION)
                tl.atomic_add(DQ + ((b * Hq + h) * Nq + rows[:, None]) * D + cols_d[None, :], dq,
                              mask=q_valid[:, None] & (cols_d[None, :] < D), sem="relaxed")
            if CAUSAL:
                key_rows = (b * Hk + hk) * Nk + keys
                tl.atomic_add(DK + key_rows[:, None] * D + cols_d[None, :], dk,
                              mask=(keys[:, None] < Nk) & (cols_d[None, :] < D), sem="relaxed")
                tl.atomic_add(DV_ACC + key_rows[:, None] * DV + cols_v[None, :], dv,
                              mask=(keys[:, None] < Nk) & v_ok[None, :], sem="relaxed")
        if CAUSAL:
            S1 += tl.dot(tl.trans(_operand(k, OP_BF16)), _operand(v, OP_BF16), input_precision=PRECISION)
            z1 += tl.sum(k.to(tl.float32), 0)


@triton.jit
def linear_bwd_dq_kernel(
    Q, K, V, MASK, DO, INV_DEN, CROW, DQ, DK, DV_ACC, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    Hk, GROUPS, Nq, Nk, D, DV, N_TILES,
    scale, a0, a1, a2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    if pid_t < N_TILES:
        _second_order_bwd_dq(
            Q, K, V, MASK, DO, INV_DEN, CROW, DQ, TILE_M, TILE_N,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
            pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a2,
            CAUSAL, HAS_MASK, CHUNK, BLOCK_DV, BT, OP_BF16, PRECISION,
        )
    else:
        _low_order_bwd_dq(
            Q, K, V, MASK, DO, INV_DEN, CROW, DQ, DK, DV_ACC,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
            pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a0, a1, a2,
            P, CAUSAL, HAS_MASK, CHUNK, BLOCK_D, BLOCK_DV, OP_BF16, PRECISION,
        )


# ----------------------------------------------------------------------------------------
# backward, reverse sweep: dk, dv from the queries after each chunk
# ----------------------------------------------------------------------------------------


@triton.jit
def _second_order_bwd_dkdv(
    Q, K, V, MASK, DO, INV_DEN, CROW, DK, DV_ACC, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    TF: tl.constexpr = BT * BT
    m_cols, n_cols, wsym = _tile_columns(TILE_M, TILE_N, pid_t, BT)
    coef = a2 * scale * scale
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh
    R = tl.zeros((TF, BLOCK_DV), dtype=tl.float32)
    r = tl.zeros((TF,), dtype=tl.float32)

    if not CAUSAL:
        for i0 in range(0, Nq, CHUNK):
            rows = i0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                Q_h = Q + b * sqb + h * sqh
                qf = _query_pairs(Q_h, rows, q_valid, sqn, m_cols, n_cols, D, sqd, coef, wsym, CHUNK, BT, OP_BF16)
                gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                        sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                R += tl.dot(tl.trans(qf), _operand(gr, OP_BF16), input_precision=PRECISION)
                r += tl.sum(qf.to(tl.float32) * crow[:, None], 0)

    n_chunks = tl.cdiv(Nk, CHUNK)
    for step in range(0, n_chunks):
        j0 = (n_chunks - 1 - step) * CHUNK
        keys = j0 + tl.arange(0, CHUNK)
        k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
        km = load_rows(K_h, keys, k_valid, skn, m_cols, D, skd)
        kn = load_rows(K_h, keys, k_valid, skn, n_cols, D, skd)
        kf = _pairs(km, kn, CHUNK, BT, OP_BF16)
        v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
        R_op = _operand(R, OP_BF16)
        key_rows = (b * Hk + hk) * Nk + keys
        dv = tl.dot(kf, R_op, input_precision=PRECISION)  # (CHUNK, BLOCK_DV)
        tl.atomic_add(DV_ACC + key_rows[:, None] * DV + cols_v[None, :], dv,
                      mask=k_valid[:, None] & v_ok[None, :], sem="relaxed")
        Xk = tl.dot(_operand(v, OP_BF16), tl.trans(R_op), input_precision=PRECISION)  # (CHUNK, TF)
        if pid_v == 0:
            Xk -= r[None, :]
        _add_pair_grads(DK + key_rows * D, Xk, km, kn, m_cols, n_cols, k_valid, D, CHUNK, BT)
        if CAUSAL:
            if _chunk_has_queries(j0, CHUNK, offset, Nq):
                rows = keys - offset
                q_valid = (rows >= 0) & (rows < Nq)
                for g in range(0, GROUPS):
                    h = hk * GROUPS + g
                    Q_h = Q + b * sqb + h * sqh
                    qf = _query_pairs(Q_h, rows, q_valid, sqn, m_cols, n_cols, D, sqd, coef, wsym, CHUNK, BT, OP_BF16)
                    gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                            sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                    R += tl.dot(tl.trans(qf), _operand(gr, OP_BF16), input_precision=PRECISION)
                    r += tl.sum(qf.to(tl.float32) * crow[:, None], 0)


@triton.jit
def _low_order_bwd_dkdv(
    Q, K, V, MASK, DO, INV_DEN, CROW, DK, DV_ACC,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a0, a1,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Hq = Hk * GROUPS
    offset = Nk - Nq
    K_h = K + b * skb + hk * skh
    V_h = V + b * svb + hk * svh
    R1 = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    R0 = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_D,), dtype=tl.float32)

    if not CAUSAL:
        for i0 in range(0, Nq, CHUNK):
            rows = i0 + tl.arange(0, CHUNK)
            q_valid = rows < Nq
            for g in range(0, GROUPS):
                h = hk * GROUPS + g
                q = load_rows(Q + b * sqb + h * sqh, rows, q_valid, sqn, cols_d, D, sqd)
                gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                        sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                R1 += (a1 * scale) * tl.dot(tl.trans(_operand(q, OP_BF16)), _operand(gr, OP_BF16),
                                            input_precision=PRECISION)
                R0 += a0 * tl.sum(gr, 0)
                r1 += (a1 * scale) * tl.sum(q.to(tl.float32) * crow[:, None], 0)

    n_chunks = tl.cdiv(Nk, CHUNK)
    for step in range(0, n_chunks):
        j0 = (n_chunks - 1 - step) * CHUNK
        keys = j0 + tl.arange(0, CHUNK)
        k_valid = key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK)
        k = load_rows(K_h, keys, k_valid, skn, cols_d, D, skd)
        v = load_rows(V_h, keys, k_valid, svn, cols_v, DV, svd)
        key_rows = (b * Hk + hk) * Nk + keys
        R1_op = _operand(R1, OP_BF16)
        dv = R0[None, :] + tl.dot(_operand(k, OP_BF16), R1_op, input_precision=PRECISION)
        tl.atomic_add(DV_ACC + key_rows[:, None] * DV + cols_v[None, :], dv,
                      mask=k_valid[:, None] & v_ok[None, :], sem="relaxed")
        dk = tl.dot(_operand(v, OP_BF16), tl.trans(R1_op), input_precision=PRECISION)
        if pid_v == 0:
            dk -= r1[None, :]
        tl.atomic_add(DK + key_rows[:, None] * D + cols_d[None, :], dk,
                      mask=k_valid[:, None] & (cols_d[None, :] < D), sem="relaxed")
        if CAUSAL:
            if _chunk_has_queries(j0, CHUNK, offset, Nq):
                rows = keys - offset
                q_valid = (rows >= 0) & (rows < Nq)
                for g in range(0, GROUPS):
                    h = hk * GROUPS + g
                    q = load_rows(Q + b * sqb + h * sqh, rows, q_valid, sqn, cols_d, D, sqd)
                    gr, crow = _scaled_grad(DO, INV_DEN, CROW, b, h, Hq, Nq, rows, q_valid,
                                            sdob, sdoh, sdon, sdod, cols_v, DV, pid_v)
                    R1 += (a1 * scale) * tl.dot(tl.trans(_operand(q, OP_BF16)), _operand(gr, OP_BF16),
                                                input_precision=PRECISION)
                    R0 += a0 * tl.sum(gr, 0)
                    r1 += (a1 * scale) * tl.sum(q.to(tl.float32) * crow[:, None], 0)


@triton.jit
def linear_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, INV_DEN, CROW, DK, DV_ACC, TILE_M, TILE_N,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
    Hk, GROUPS, Nq, Nk, D, DV, N_TILES,
    scale, a0, a1, a2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BT: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    if pid_t < N_TILES:
        _second_order_bwd_dkdv(
            Q, K, V, MASK, DO, INV_DEN, CROW, DK, DV_ACC, TILE_M, TILE_N,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
            pid_t, pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a2,
            CAUSAL, HAS_MASK, CHUNK, BLOCK_DV, BT, OP_BF16, PRECISION,
        )
    else:
        _low_order_bwd_dkdv(
            Q, K, V, MASK, DO, INV_DEN, CROW, DK, DV_ACC,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sdob, sdoh, sdon, sdod,
            pid_v, b, hk, Hk, GROUPS, Nq, Nk, D, DV, scale, a0, a1,
            CAUSAL, HAS_MASK, CHUNK, BLOCK_D, BLOCK_DV, OP_BF16, PRECISION,
        )
