"""Pieces shared by the quadratic and linear kernels: the kernel polynomial, operands, tile loads.

Scores are kept as raw dot products r = q . k; the score scale is folded into the
coefficients once on the host (c1 = a1 scale, c2 = a2 scale^2), so that

    f(s) = a0 + a1 s + a2 s^2 = a0 + c1 r + c2 r^2,     df/dr = c1 + 2 c2 r.
"""

import triton
import triton.language as tl


# Host-side integer helpers. Recent Triton releases make triton.cdiv and triton.next_power_of_2
# constexpr functions that cost ~6 us a call on the host; a short forward+backward takes a dozen
# of them, a fifth of its host time (tools/kernel_lab.py --sections hoststub). Launchers use these.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1); 0 for n = 0, as triton.next_power_of_2."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@triton.jit
def kernel_value(r, a0, c1, c2, P: tl.constexpr):
    """f at raw score r: a0 + c1 r + c2 r^2 (P = 2) or a0 + c1 r (P = 1)."""
    if P == 2:
        return a0 + r * (c1 + c2 * r)
    else:
        return a0 + c1 * r


@triton.jit
def kernel_slope(r, c1, c2, P: tl.constexpr):
    """df/dr, shaped like r."""
    if P == 2:
        return c1 + (2.0 * c2) * r
    else:
        return c1 + 0.0 * r


@triton.jit
def operand(x, OP_BF16: tl.constexpr):
    """Tensor-core operand of a product whose result accumulates: bf16 for bf16 inputs, fp32
    (a tf32 or ieee dot) otherwise. fp16 would underflow or overflow: states grow with the
    number of tokens, and gradients shrink with it."""
    if OP_BF16:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def row_offsets(rows, stride, I64: tl.constexpr):
    """rows * stride, in 64-bit when a tensor holds 2^31 elements or more."""
    if I64:
        return rows.to(tl.int64) * stride
    else:
        return rows * stride


@triton.jit
def load_tile(ptr, rows, row_ok, stride_n, cols, ncols, stride_d,
              CHECK_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr, I64: tl.constexpr):
    """(len(rows), len(cols)) tile of a (N, C) matrix; zero where a row or column is outside.

    CHECK_ROWS=False and EVEN_COLS=True (every row inside, C == len(cols)) load without a
    mask, which keeps the loads wide and pipelined."""
    offs = row_offsets(rows, stride_n, I64)[:, None] + cols[None, :] * stride_d
    if CHECK_ROWS:
        if EVEN_COLS:
            return tl.load(ptr + offs, mask=row_ok[:, None], other=0.0)
        else:
            return tl.load(ptr + offs, mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0)
    else:
        if EVEN_COLS:
            return tl.load(ptr + offs)
        else:
            return tl.load(ptr + offs, mask=cols[None, :] < ncols, other=0.0)


@triton.jit
def key_valid(MASK_b, smn, keys, Nk, HAS_MASK: tl.constexpr):
    """Which keys are real: inside the sequence and, with a padding mask, not padding.

    MASK_b points at this batch row of the (B, Nk) mask."""
    valid = keys < Nk
    if HAS_MASK:
        valid = valid & (tl.load(MASK_b + keys * smn, mask=keys < Nk, other=0) != 0)
    return valid


@triton.jit
def nonfinite_marks(x):
    """Per row of a tile: 0.0 where every entry is finite, NaN where one is inf or NaN
    (x * 0 is NaN exactly there); cheap enough for the masked tiles that need it."""
    return tl.sum(x.to(tl.float32) * 0.0, 1)
