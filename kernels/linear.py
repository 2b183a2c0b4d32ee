"""Linear-regime Fastmax kernels: chunk-parallel states, a scan over chunks, and readouts.

The numerator of query i factorises over features of q and k:

    sum_j f(r_ij) v_j = phi_q(q_i)^T S,   S = sum_j phi_k(k_j) v_j^T,   z = sum_j phi_k(k_j)
    phi_k(k) = [1, k, k[m] k[n] (m <= n)]
    phi_q(q) = [a0, c1 q, c2 w_mn q[m] q[n]]     (w = 2 off the diagonal, 1 on it)

with c1 = a1 scale and c2 = a2 scale^2 (the denominator likewise with v_j -> 1). The
(m, n >= m) grid of pair features is cut into BT x BT tiles (tile (mb, nb), nb >= mb), each
holding all BT x BT products, so that w becomes one number per tile (``_tile``). The pair
part of z is a Gram matrix, z2[m, n] = sum_j k[m] k[n] (x^T x over a chunk), computed by the
state kernel's z program with one product and scattered into the tile layout (``_pair_rows``);
the readout's denominator reads it back as a D x D matrix, phi_q(q) . z = q^T z2 q.

Causal attention splits the key timeline into chunks of CHUNK tokens and runs three
kernels, each parallel over chunks as well as heads and feature tiles:

1. ``chunk_states_kernel``: every chunk's own state H_c = sum_{j in c} phi(k_j) v_j^T,
   one program per (feature tile, chunk, value block, head), one more for orders 0 and 1 and
   one for z; the pair features are formed in registers and fed to the tensor cores, never
   written to memory.
2. ``state_scan_kernel``: in place, H_c becomes the exclusive prefix sum_{c' < c} H_c'
   (in fp32 registers; stored in the operand dtype), continuing a given state and
   returning the final one when asked (prefill and decoding).
3. ``linear_fwd_kernel``: a block of queries in chunk c attends to its own chunk with the
   quadratic tile loop (keys from the chunk start to the diagonal) and reads the prefix
   state of chunk c, all feature tiles in one program: no atomics, one write per output.

Without a causal mask the scan sums every chunk and each query reads the total.

Backward (see fastmax_hf/chunked.py for the algebra), with g_i = do_i / d_i and
c_i = (do_i . o_i) / d_i:
- dq: the forward's prefix states where the launcher kept them (ops.keeps_key_states), else
  the same two kernels again, then ``linear_bwd_dq_kernel``: X_i = S g_i - c_i z (the
  gradient of phi_q(q_i)) pushed through the pair features, plus the chunk's own tile;
- dk, dv: query-side states R_c = sum_{i in c} phi_q(q_i) g_i^T, r_c = sum phi_q(q_i) c_i
  (``chunk_states_kernel`` on the queries), a reverse scan (the chunks after c), then
  ``linear_bwd_dkdv_kernel``: dv_j = R^T phi_k(k_j), Y_j = R v_j - r pushed through the
  pair features, plus the chunk's own tile.

State layout (prefill/decoding and the scratch above): rows of F_ROWS = 1 + BLOCK_D +
N_TILES * BT * BT: row 0 the zeroth order, rows 1..BLOCK_D the first order, then one
block of BT*BT rows per tile; S (.., F_ROWS, Dv) and z (.., F_ROWS), keys unweighted.
"""

import triton
import triton.language as tl

from .common import key_valid, load_tile, operand
from .quadratic import attend_keys, dkdv_from_query_heads, dq_from_keys, output_rows, scaled_grad_rows


@triton.jit
def _tile(TILE_M, TILE_N, t, BT: tl.constexpr):
    """Tile t of the pair grid: its block indices, the columns of x its pairs read, and the
    weight of its query-side features.

    Every tile holds all BT x BT products x[m] x[n] of its two column blocks. Off the diagonal
    (nb > mb) each unordered pair {m, n} appears once and weighs 2; in a diagonal tile it
    appears as (m, n) and as (n, m), with equal key-side entries, so weight 1 on the whole
    tile counts it twice and the squares once: w = 2 above, 1 on, 0 below the diagonal, folded
    into one number per tile (exact in bf16) instead of a weight per feature."""
    mb = tl.load(TILE_M + t)
    nb = tl.load(TILE_N + t)
    m_cols = mb * BT + tl.arange(0, BT)
    n_cols = nb * BT + tl.arange(0, BT)
    weight = tl.where(mb == nb, 1.0, 2.0)
    return mb, nb, m_cols, n_cols, weight


@triton.jit
def _pair_rows(BLOCK_D: tl.constexpr, BT: tl.constexpr):
    """For every (a, b) of a BLOCK_D x BLOCK_D matrix: its row in the state's pair-tile layout
    (the tile (min, max) of the two column blocks, the entry with a's and b's roles swapped
    below the block diagonal), whether that row is the entry itself (a in a block at or before
    b's) and its tile's weight (1 on the block diagonal, 2 off it, as ``_tile``)."""
    a = tl.arange(0, BLOCK_D)[:, None]
    b = tl.arange(0, BLOCK_D)[None, :]
    ma = a // BT
    nb = b // BT
    lo = tl.minimum(ma, nb)
    hi = tl.maximum(ma, nb)
    NB: tl.constexpr = BLOCK_D // BT
    t = lo * NB - (lo * (lo - 1)) // 2 + (hi - lo)  # the order of ops._pair_tiles
    own = ma <= nb
    r_in = tl.where(own, a % BT, b % BT)
    c_in = tl.where(own, b % BT, a % BT)
    weight = tl.where(ma == nb, 1.0, 2.0)
    return 1 + BLOCK_D + t * (BT * BT) + r_in * BT + c_in, own, weight


@triton.jit
def _pairs(xm, xn, ROWS: tl.constexpr, BT: tl.constexpr, OP_BF16: tl.constexpr):
    """(ROWS, BT) x (ROWS, BT) -> (ROWS, BT*BT) products x[m] x[n], feature m*BT + n."""
    return tl.reshape(operand(xm, OP_BF16)[:, :, None] * operand(xn, OP_BF16)[:, None, :], (ROWS, BT * BT))


@triton.jit
def _pair_grads(grad3, Y, xm, xn, mb, nb, scale, ROWS: tl.constexpr, BT: tl.constexpr, NBLK: tl.constexpr):
    """grad3 (ROWS, NBLK, BT) += scale * d/dx of sum_f Y_f x[m_f] x[n_f] for one tile (mb, nb).

    Register tensors cannot be sliced by a run-time block index, so each half lands in its
    column block through a comparison with the block index."""
    Y3 = tl.reshape(Y, (ROWS, BT, BT))
    d_m = tl.sum(Y3 * xn.to(tl.float32)[:, None, :], 2) * scale  # (ROWS, BT): columns of block mb
    d_n = tl.sum(Y3 * xm.to(tl.float32)[:, :, None], 1) * scale  # (ROWS, BT): columns of block nb
    blocks = tl.arange(0, NBLK)[None, :, None]
    grad3 += tl.where(blocks == mb, d_m[:, None, :], 0.0)
    grad3 += tl.where(blocks == nb, d_n[:, None, :], 0.0)
    return grad3


# ----------------------------------------------------------------------------------------
# 1. per-chunk states
# ----------------------------------------------------------------------------------------

@triton.jit
def _chunk_rows(INV_DEN, CROW, MASK_b, row0, p0, pos_hi, ROW_SHIFT, N_ROWS, stride_mn,
                IS_QUERY: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of BLOCK_K positions of a chunk: the rows, which of them count, the weight of
    each row's features in S (1/d for queries: g = do / d with do as loaded) and in z (c for
    queries, 1 for keys)."""
    pos = p0 + tl.arange(0, BLOCK_K)
    rows = pos - ROW_SHIFT
    ok = pos < pos_hi
    if IS_QUERY:
        row_w = tl.load(INV_DEN + row0 + rows, mask=ok, other=0.0)
        zw = tl.load(CROW + row0 + rows, mask=ok, other=0.0)
    else:
        ok = ok & key_valid(MASK_b, stride_mn, rows, N_ROWS, HAS_MASK)
        row_w = ok.to(tl.float32)
        zw = row_w
    return rows, ok, row_w, zw


@triton.jit
def chunk_states_kernel(
    X, VAL, MASK, INV_DEN, CROW, H, Z, TILE_M, TILE_N,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    Hx, GROUPS, N_ROWS, ROW_SHIFT, N_CHUNKS, N_DV_BLOCKS, D, DV, F_ROWS, N_TILES,
    a0, c1, c2,
    IS_QUERY: tl.constexpr, HAS_MASK: tl.constexpr, PAIRS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (N_TILES + 2, N_CHUNKS * N_DV_BLOCKS, B * Hk): H[bh, c] (F_ROWS, Dv), Z[bh, c] (F_ROWS).

    Keys (IS_QUERY=False): X = k, VAL = v, rows = positions, unweighted features; padded keys
    and keys past N_ROWS add nothing. Queries (IS_QUERY=True): X = q of the GROUPS heads of
    each key/value head (summed), VAL = do, each row's features scaled by 1/d (so that S sums
    phi_q(q_i) g_i^T, g = do / d), the orders weighted by (a0, c1, c2 w) on the finished sums,
    and Z gets sum phi_q(q_i) c_i. Rows are positions - ROW_SHIFT (the causal offset Nk - Nq for
    queries). Programs: one per pair tile of S, then orders 0 and 1 of S, then z (in the first
    value block's programs only), so that no program holds two accumulators."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1) // N_DV_BLOCKS
    pid_v = tl.program_id(1) % N_DV_BLOCKS
    pid_bh = tl.program_id(2)
    Hk = Hx // GROUPS
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    TF: tl.constexpr = BT * BT
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    cols_d = tl.arange(0, BLOCK_D)
    # positions of this chunk that hold rows
    pos_lo = tl.maximum(pid_c * CHUNK, ROW_SHIFT)
    pos_hi = tl.minimum(pid_c * CHUNK + CHUNK, N_ROWS + ROW_SHIFT)
    chunk_base = (pid_bh.to(tl.int64) * N_CHUNKS + pid_c) * F_ROWS
    MASK_b = MASK + b * stride_mb

    if pid_t < N_TILES:  # one pair tile of S: sum_j (x[m] x[n])_j val_j^T
        mb, nb, m_cols, n_cols, weight = _tile(TILE_M, TILE_N, pid_t, BT)
        acc = tl.zeros((TF, BLOCK_DV), dtype=tl.float32)
        for g in range(0, GROUPS):
            head = hk * GROUPS + g
            X_h = X + b * stride_xb + head * stride_xh
            V_h = VAL + b * stride_vb + head * stride_vh
            row0 = (b * Hx + head) * N_ROWS
            for p0 in range(pos_lo, pos_hi, BLOCK_K):
                rows, ok, row_w, zw = _chunk_rows(INV_DEN, CROW, MASK_b, row0, p0, pos_hi, ROW_SHIFT, N_ROWS, stride_mn,
                                                  IS_QUERY, HAS_MASK, BLOCK_K)
                val = load_tile(V_h, rows, ok, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
                xm = load_tile(X_h, rows, ok, stride_xn, m_cols, D, stride_xd, True, EVEN_D, I64)
                xn = load_tile(X_h, rows, ok, stride_xn, n_cols, D, stride_xd, True, EVEN_D, I64)
                if IS_QUERY:
                    # 1/d goes onto x[m] before rounding: the bf16 product is the only rounding
                    f = _pairs(xm.to(tl.float32) * row_w[:, None], xn, BLOCK_K, BT, OP_BF16)
                else:
                    f = _pairs(xm, xn, BLOCK_K, BT, OP_BF16)  # (BLOCK_K, TF), zero on rows not ok
                acc = tl.dot(tl.trans(f), operand(val, OP_BF16), acc, input_precision=PRECISION)
        if IS_QUERY:
            acc = acc * (c2 * weight)
        frows = 1 + BLOCK_D + pid_t * TF + tl.arange(0, TF)
        tl.store(H + (chunk_base + frows[:, None]) * DV + cols_v[None, :], acc.to(H.dtype.element_ty),
                 mask=v_ok[None, :])
    elif pid_t == N_TILES:  # orders 0 and 1 of S
        S1 = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
        S0 = tl.zeros((BLOCK_DV,), dtype=tl.float32)
        for g in range(0, GROUPS):
            head = hk * GROUPS + g
            X_h = X + b * stride_xb + head * stride_xh
            V_h = VAL + b * stride_vb + head * stride_vh
            row0 = (b * Hx + head) * N_ROWS
            for p0 in range(pos_lo, pos_hi, BLOCK_K):
                rows, ok, row_w, zw = _chunk_rows(INV_DEN, CROW, MASK_b, row0, p0, pos_hi, ROW_SHIFT, N_ROWS, stride_mn,
                                                  IS_QUERY, HAS_MASK, BLOCK_K)
                val = load_tile(V_h, rows, ok, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)
                x = load_tile(X_h, rows, ok, stride_xn, cols_d, D, stride_xd, True, EVEN_D, I64)  # (BLOCK_K, BLOCK_D)
                if IS_QUERY:
                    x = x.to(tl.float32) * row_w[:, None]
                S1 = tl.dot(tl.trans(operand(x, OP_BF16)), operand(val, OP_BF16), S1, input_precision=PRECISION)
                S0 += tl.sum(val.to(tl.float32) * row_w[:, None], 0)
        if IS_QUERY:
            S1 = S1 * c1
            S0 = S0 * a0
        tl.store(H + (chunk_base + 1 + cols_d[:, None]) * DV + cols_v[None, :], S1.to(H.dtype.element_ty),
                 mask=v_ok[None, :])
        tl.store(H + chunk_base * DV + cols_v, S0.to(H.dtype.element_ty), mask=v_ok)
    elif pid_v == 0:  # z, once per chunk: orders 0 and 1, and the pair part as a Gram matrix
        z1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        z0 = tl.sum(z1, 0)
        z2 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # sum zw x[m] x[n]: the pair tiles' z
        for g in range(0, GROUPS):
            head = hk * GROUPS + g
            X_h = X + b * stride_xb + head * stride_xh
            row0 = (b * Hx + head) * N_ROWS
            for p0 in range(pos_lo, pos_hi, BLOCK_K):
                rows, ok, row_w, zw = _chunk_rows(INV_DEN, CROW, MASK_b, row0, p0, pos_hi, ROW_SHIFT, N_ROWS, stride_mn,
                                                  IS_QUERY, HAS_MASK, BLOCK_K)
                x = load_tile(X_h, rows, ok, stride_xn, cols_d, D, stride_xd, True, EVEN_D, I64)  # (BLOCK_K, BLOCK_D)
                if IS_QUERY:
                    xw = operand(x.to(tl.float32) * zw[:, None], OP_BF16)
                else:
                    xw = operand(x, OP_BF16)  # zw is 1 on the rows loaded, 0 (and x 0) elsewhere
                if PAIRS:
                    z2 = tl.dot(tl.trans(xw), operand(x, OP_BF16), z2, input_precision=PRECISION)
                z1 += tl.sum(xw.to(tl.float32), 0)
                z0 += tl.sum(zw, 0)
        if IS_QUERY:
            z1 = z1 * c1
            z0 = z0 * a0
        tl.store(Z + chunk_base + 1 + cols_d, z1)
        tl.store(Z + chunk_base, z0)
        if PAIRS:
            pair_rows, own, weight = _pair_rows(BLOCK_D, BT)
            if IS_QUERY:
                z2 = z2 * (c2 * weight)
            tl.store(Z + chunk_base + pair_rows, z2, mask=own)


# ----------------------------------------------------------------------------------------
# 2. scan over chunks
# ----------------------------------------------------------------------------------------


@triton.jit
def _scan_block(BUF, IN, OUT, bh, offs, width, N_CHUNKS,
                MODE: tl.constexpr, LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """One block of elements of a (N_CHUNKS, width) buffer: exclusive prefix (MODE 0), exclusive
    suffix (MODE 1) or the total into chunk 0 (MODE 2); accumulated in fp32.

    BLOCK_C chunks are loaded at once and summed with a cumulative sum across them, so that the
    loads of a step are independent of each other: the scan runs at memory speed rather than at
    one load latency per chunk."""
    ok = offs < width
    if LOAD_STATE:
        running = tl.load(IN + bh * width + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        running = tl.zeros((BLOCK_E,), dtype=tl.float32)
    base = bh * N_CHUNKS * width
    steps = tl.arange(0, BLOCK_C)
    for step0 in range(0, N_CHUNKS, BLOCK_C):
        inside = (step0 + steps) < N_CHUNKS
        if MODE == 1:
            chunks = N_CHUNKS - 1 - (step0 + steps)
        else:
            chunks = step0 + steps
        ptrs = BUF + base + chunks[:, None].to(tl.int64) * width + offs[None, :]
        tile_ok = inside[:, None] & ok[None, :]
        tile = tl.load(ptrs, mask=tile_ok, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_E)
        if MODE != 2:
            # exclusive: the running sum of the chunks before each one in the step, loaded
            # again one chunk back (inclusive - tile would let a non-finite chunk reach its own
            # prefix through inf - inf); read before this step's stores
            prev_ptrs = ptrs + (width if MODE == 1 else -width)
            prev_ok = (steps >= 1)[:, None] & tile_ok
            prev = tl.load(prev_ptrs, mask=prev_ok, other=0.0).to(tl.float32)
            before = tl.cumsum(prev, 0)
            tl.store(ptrs, (before + running[None, :]).to(BUF.dtype.element_ty), mask=tile_ok)
        running += tl.sum(tile, 0)
    if MODE == 2:
        tl.store(BUF + base + offs, running.to(BUF.dtype.element_ty), mask=ok)
    if STORE_STATE:
        tl.store(OUT + bh * width + offs, running, mask=ok)


@triton.jit
def state_scan_kernel(
    H, Z, S_IN, Z_IN, S_OUT, Z_OUT, N_CHUNKS, F_ROWS, DV, N_S_BLOCKS,
    MODE: tl.constexpr, LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (N_S_BLOCKS + cdiv(F_ROWS, BLOCK_E), B * Hk): the S part (F_ROWS * Dv elements)
    in the first N_S_BLOCKS programs, the z part (F_ROWS) in the rest."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if pid < N_S_BLOCKS:
        offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        _scan_block(H, S_IN, S_OUT, bh, offs, F_ROWS * DV, N_CHUNKS, MODE, LOAD_STATE, STORE_STATE, BLOCK_E,
                    BLOCK_C)
    else:
        offs = (pid - N_S_BLOCKS) * BLOCK_E + tl.arange(0, BLOCK_E)
        _scan_block(Z, Z_IN, Z_OUT, bh, offs, F_ROWS, N_CHUNKS, MODE, LOAD_STATE, STORE_STATE, BLOCK_E, BLOCK_C)


# ----------------------------------------------------------------------------------------
# 3. readouts
# ----------------------------------------------------------------------------------------


@triton.jit
def _query_block(pid_p, POS0, Nq, Nk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Rows, validity, positions, first position and chunk-visibility of query block pid_p.

    Under a causal mask blocks tile the key timeline from POS0 (a multiple of BLOCK_M, the
    block of query 0), so that a block never straddles a chunk boundary; without one they
    tile the rows."""
    offset = Nk - Nq
    if CAUSAL:
        pos0 = POS0 + pid_p * BLOCK_M
        rows = pos0 - offset + tl.arange(0, BLOCK_M)
        has_keys = pos0 >= 0  # blocks before position 0 see no key
    else:
        pos0 = pid_p * BLOCK_M
        rows = pos0 + tl.arange(0, BLOCK_M)
        has_keys = Nk > 0
    q_ok = (rows >= 0) & (rows < Nq)
    return rows, q_ok, rows + offset, pos0, has_keys


@triton.jit
def linear_fwd_kernel(
    Q, K, V, MASK, H, Z, O, DEN, TILE_M, TILE_N,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, GROUPS, Nq, Nk, D, DV, N_CHUNKS, F_ROWS, N_TILES, POS0, a0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """Grid (query blocks, cdiv(Dv, BLOCK_DV), B * Hq): out (B, Hq, Nq, Dv) and the fp32 denominator
    (B * Hq, Nq), from the chunk's own tile and the scanned states H, Z (B * Hk, N_CHUNKS, F_ROWS, ..)."""
    pid_p = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    TF: tl.constexpr = BT * BT
    rows, q_ok, q_pos, pos0, has_keys = _query_block(pid_p, POS0, Nq, Nk, BLOCK_M, CAUSAL)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    Q_h = Q + b * stride_qb + h * stride_qh
    q = load_tile(Q_h, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if has_keys:
        if CAUSAL:
            chunk = pos0 // CHUNK
            chunk_lo = chunk * CHUNK
            if HAS_MASK:
                n_full = chunk_lo
            else:
                n_full = pos0 // BLOCK_N * BLOCK_N  # whole key blocks before the diagonal (CHUNK is a multiple of BLOCK_N)
            K_h = K + b * stride_kb + hk * stride_kh
            V_h = V + b * stride_vb + hk * stride_vh + pid_v * BLOCK_DV * stride_vd
            MASK_b = MASK + b * stride_mb
            DV_BLOCK = DV - pid_v * BLOCK_DV
            acc, den = attend_keys(acc, den, q, q_pos, K_h, V_h, MASK_b, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_mn, chunk_lo, n_full, Nk, D, DV_BLOCK, a0, c1, c2, P, False, True, HAS_MASK,
                                   BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, PRECISION, I64)
            acc, den = attend_keys(acc, den, q, q_pos, K_h, V_h, MASK_b, stride_kn, stride_kd, stride_vn, stride_vd,
                                   stride_mn, n_full, tl.minimum(pos0 + BLOCK_M, Nk), Nk, D, DV_BLOCK, a0, c1, c2, P,
                                   True, True, HAS_MASK, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, PRECISION, I64)
        else:
            chunk = 0
        base = ((b * (Hq // GROUPS) + hk) * N_CHUNKS + chunk) * F_ROWS  # the state this block reads
        # orders 0 and 1
        S0 = tl.load(H + base * DV + cols_v, mask=v_ok, other=0.0).to(tl.float32)
        S1 = tl.load(H + (base + 1 + cols_d[:, None]) * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
        z0 = tl.load(Z + base)
        z1 = tl.load(Z + base + 1 + cols_d)
        acc += a0 * S0[None, :]
        acc = tl.dot(operand(q.to(tl.float32) * c1, OP_BF16), operand(S1, OP_BF16), acc, input_precision=PRECISION)
        den += a0 * z0 + c1 * tl.sum(q.to(tl.float32) * z1[None, :], 1)
        if N_TILES > 0:  # order 2 of the denominator: q^T z2 q
            pair_rows, own, weight = _pair_rows(BLOCK_D, BT)
            z2 = tl.load(Z + base + pair_rows)  # (BLOCK_D, BLOCK_D), symmetric
            qz2 = tl.dot(q.to(tl.float32), z2, input_precision=PRECISION)
            den += c2 * tl.sum(q.to(tl.float32) * qz2, 1)
        # order 2 of the numerator, one feature tile at a time
        for t in range(0, N_TILES):
            mb, nb, m_cols, n_cols, weight = _tile(TILE_M, TILE_N, t, BT)
            qm = load_tile(Q_h, rows, q_ok, stride_qn, m_cols, D, stride_qd, True, EVEN_D, I64)
            qn = load_tile(Q_h, rows, q_ok, stride_qn, n_cols, D, stride_qd, True, EVEN_D, I64)
            qf = _pairs(qm.to(tl.float32) * (c2 * weight), qn, BLOCK_M, BT, OP_BF16)
            frows = base + 1 + BLOCK_D + t * TF + tl.arange(0, TF)
            S_t = tl.load(H + frows[:, None] * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)  # (TF, BLOCK_DV)
            acc = tl.dot(qf, operand(S_t, OP_BF16), acc, input_precision=PRECISION)

    out = output_rows(acc, den)
    o_offs = b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + cols_v[None, :] * stride_od
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & v_ok[None, :])
    if pid_v == 0:
        tl.store(DEN + pid_bh.to(tl.int64) * Nq + rows, den, mask=q_ok)


@triton.jit
def linear_bwd_dq_kernel(
    Q, K, KF, V, MASK, DO, INV_DEN, CROW, H, Z, DQ, TILE_M, TILE_N,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kfb, stride_kfh, stride_kfn, stride_kfd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    Hq, GROUPS, Nq, Nk, D, DV, N_CHUNKS, F_ROWS, N_TILES, POS0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Grid (query blocks, B * Hq): dQ ((B, Hq, Nq, D) at strides stride_dq*, the inputs' dtype)
    from the chunk's own tile and the prefix states H, Z; ACCUMULATE adds it to what DQ holds
    (the hybrid window's own dq), so that no separate pass sums the two. BLOCK_DV covers all of
    Dv. KF: the keys with non-finite entries set to 0, for the diagonal tile (``dq_from_keys``)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUPS
    TF: tl.constexpr = BT * BT
    NBLK: tl.constexpr = BLOCK_D // BT
    rows, q_ok, q_pos, pos0, has_keys = _query_block(pid_p, POS0, Nq, Nk, BLOCK_M, CAUSAL)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    Q_h = Q + b * stride_qb + h * stride_qh
    q = load_tile(Q_h, rows, q_ok, stride_qn, cols_d, D, stride_qd, True, EVEN_D, I64)
    row0 = pid_bh.to(tl.int64) * Nq
    g, crow = scaled_grad_rows(DO + b * stride_dob + h * stride_doh, INV_DEN + row0, CROW + row0, rows, q_ok,
                               stride_don, stride_dod, cols_v, DV, EVEN_DV, OP_BF16, I64)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if has_keys:
        if CAUSAL:
            chunk = pos0 // CHUNK
            chunk_lo = chunk * CHUNK
            if HAS_MASK:
                n_full = chunk_lo
            else:
                n_full = pos0 // BLOCK_N * BLOCK_N  # whole key blocks before the diagonal (CHUNK is a multiple of BLOCK_N)
            K_h = K + b * stride_kb + hk * stride_kh
            V_h = V + b * stride_vb + hk * stride_vh
            MASK_b = MASK + b * stride_mb
            KF_h = KF + b * stride_kfb + hk * stride_kfh
            dq = dq_from_keys(dq, q, g, crow, q_pos, K_h, KF_h, V_h, MASK_b, stride_kn, stride_kd, stride_kfn,
                              stride_kfd, stride_vn, stride_vd, stride_mn, chunk_lo, n_full, Nk, D, DV, c1, c2, P,
                              False, False, HAS_MASK, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16, PRECISION,
                              I64)
            dq = dq_from_keys(dq, q, g, crow, q_pos, K_h, KF_h, V_h, MASK_b, stride_kn, stride_kd, stride_kfn,
                              stride_kfd, stride_vn, stride_vd, stride_mn, n_full, tl.minimum(pos0 + BLOCK_M, Nk), Nk,
                              D, DV, c1, c2, P, True, True, HAS_MASK, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV,
                              OP_BF16, PRECISION, I64)
        else:
            chunk = 0
        base = ((b * (Hq // GROUPS) + hk) * N_CHUNKS + chunk) * F_ROWS
        v_ok = cols_v < DV
        # order 1: X1 = S1 g - c z1
        S1 = tl.load(H + (base + 1 + cols_d[:, None]) * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
        z1 = tl.load(Z + base + 1 + cols_d)
        X1 = tl.dot(g, tl.trans(operand(S1, OP_BF16)), input_precision=PRECISION) - crow[:, None] * z1[None, :]
        dq += c1 * X1
        if N_TILES > 0:
            dq3 = tl.zeros((BLOCK_M, NBLK, BT), dtype=tl.float32)
            for t in range(0, N_TILES):
                mb, nb, m_cols, n_cols, weight = _tile(TILE_M, TILE_N, t, BT)
                frows = base + 1 + BLOCK_D + t * TF + tl.arange(0, TF)
                S_t = tl.load(H + frows[:, None] * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
                z_t = tl.load(Z + frows)
                X = tl.dot(g, tl.trans(operand(S_t, OP_BF16)), input_precision=PRECISION)  # (BLOCK_M, TF)
                X = X - crow[:, None] * z_t[None, :]
                qm = load_tile(Q_h, rows, q_ok, stride_qn, m_cols, D, stride_qd, True, EVEN_D, I64)
                qn = load_tile(Q_h, rows, q_ok, stride_qn, n_cols, D, stride_qd, True, EVEN_D, I64)
                dq3 = _pair_grads(dq3, X, qm, qn, mb, nb, c2 * weight, BLOCK_M, BT, NBLK)
            dq += tl.reshape(dq3, (BLOCK_M, BLOCK_D))
    dq_offs = b * stride_dqb + h * stride_dqh + rows[:, None].to(tl.int64) * stride_dqn + cols_d[None, :] * stride_dqd
    dq_ok = q_ok[:, None] & (cols_d[None, :] < D)
    if ACCUMULATE:
        dq += tl.load(DQ + dq_offs, mask=dq_ok, other=0.0).to(tl.float32)
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=dq_ok)


@triton.jit
def linear_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, INV_DEN, CROW, H, Z, DK, DV_OUT, TILE_M, TILE_N,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hk, GROUPS, Nq, Nk, D, DV, N_CHUNKS, F_ROWS, N_TILES, a0, c1, c2,
    P: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    OP_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Grid (cdiv(Nk, BLOCK_N), B * Hk): dK, dV ((B, Hk, Nk, D | Dv) at strides stride_dk*, stride_dv*,
    the inputs' dtype) from the chunk's own tile (every query head of the group) and the
    query-side states H, Z (suffix over later chunks, or the total without a causal mask);
    ACCUMULATE adds them to what DK, DV_OUT hold. BLOCK_DV covers all of Dv."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)
    hk = (pid_bh % Hk).to(tl.int64)
    TF: tl.constexpr = BT * BT
    NBLK: tl.constexpr = BLOCK_D // BT
    offset = Nk - Nq
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)
    v_ok = cols_v < DV
    k_in = keys < Nk
    K_h = K + b * stride_kb + hk * stride_kh
    k = load_tile(K_h, keys, k_in, stride_kn, cols_d, D, stride_kd, True, EVEN_D, I64)  # (BLOCK_N, BLOCK_D)
    v = load_tile(V + b * stride_vb + hk * stride_vh, keys, k_in, stride_vn, cols_v, DV, stride_vd, True, EVEN_DV, I64)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    if CAUSAL:
        chunk = n0 // CHUNK
        # queries of this chunk at or after the block: rows [lo, row_end), the first ones on the diagonal
        row_end = tl.minimum(tl.minimum(chunk * CHUNK + CHUNK, Nk) - offset, Nq)
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
        # (block-aligned, so that no row is in both loops; rows at or past row_end are masked)
        diag_hi = tl.cdiv(tl.maximum(n0 + BLOCK_N - offset, 0), BLOCK_M) * BLOCK_M
        dk, dv = dkdv_from_query_heads(dk, dv, k, v, k, keys, Q, DO, INV_DEN, CROW, INV_DEN, b, hk, Hq, GROUPS,
                                       stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don,
                                       stride_dod, lo, diag_hi, row_end, offset, row_end, Nq, D, DV, a0, c1, c2, P,
                                       BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, OP_BF16, PRECISION, I64, 0)
    else:
        chunk = 0
    base = (pid_bh.to(tl.int64) * N_CHUNKS + chunk) * F_ROWS
    v_op = operand(v, OP_BF16)
    # orders 0 and 1: dv += R0 + R1^T k, dk += R1 v - r1
    R0 = tl.load(H + base * DV + cols_v, mask=v_ok, other=0.0).to(tl.float32)
    R1 = tl.load(H + (base + 1 + cols_d[:, None]) * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0)
    r1 = tl.load(Z + base + 1 + cols_d)
    dv += R0[None, :]
    dv = tl.dot(operand(k, OP_BF16), operand(R1, OP_BF16), dv, input_precision=PRECISION)
    dk += tl.dot(v_op, tl.trans(operand(R1, OP_BF16)), input_precision=PRECISION) - r1[None, :]
    if N_TILES > 0:
        dk3 = tl.zeros((BLOCK_N, NBLK, BT), dtype=tl.float32)
        for t in range(0, N_TILES):
            mb, nb, m_cols, n_cols, weight = _tile(TILE_M, TILE_N, t, BT)
            km = load_tile(K_h, keys, k_in, stride_kn, m_cols, D, stride_kd, True, EVEN_D, I64)
            kn = load_tile(K_h, keys, k_in, stride_kn, n_cols, D, stride_kd, True, EVEN_D, I64)
            kf = _pairs(km, kn, BLOCK_N, BT, OP_BF16)  # (BLOCK_N, TF)
            frows = base + 1 + BLOCK_D + t * TF + tl.arange(0, TF)
            R_t = operand(tl.load(H + frows[:, None] * DV + cols_v[None, :], mask=v_ok[None, :], other=0.0), OP_BF16)
            r_t = tl.load(Z + frows)
            dv = tl.dot(kf, R_t, dv, input_precision=PRECISION)
            Y = tl.dot(v_op, tl.trans(R_t), input_precision=PRECISION) - r_t[None, :]  # (BLOCK_N, TF)
            dk3 = _pair_grads(dk3, Y, km, kn, mb, nb, 1.0, BLOCK_N, BT, NBLK)
        dk += tl.reshape(dk3, (BLOCK_N, BLOCK_D))

    real = key_valid(MASK + b * stride_mb, stride_mn, keys, Nk, HAS_MASK)  # padding gets no gradient
    dk = tl.where(real[:, None], dk, 0.0)
    dv = tl.where(real[:, None], dv, 0.0)
    key_rows = keys[:, None].to(tl.int64)
    dk_offs = b * stride_dkb + hk * stride_dkh + key_rows * stride_dkn + cols_d[None, :] * stride_dkd
    dv_offs = b * stride_dvb + hk * stride_dvh + key_rows * stride_dvn + cols_v[None, :] * stride_dvd
    dk_ok = k_in[:, None] & (cols_d[None, :] < D)
    dv_ok = k_in[:, None] & v_ok[None, :]
    if ACCUMULATE:
        dk += tl.load(DK + dk_offs, mask=dk_ok, other=0.0).to(tl.float32)
        dv += tl.load(DV_OUT + dv_offs, mask=dv_ok, other=0.0).to(tl.float32)
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=dk_ok)
    tl.store(DV_OUT + dv_offs, dv.to(DV_OUT.dtype.element_ty), mask=dv_ok)
