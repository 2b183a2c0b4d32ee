"""Pieces shared by the quadratic and linear kernels: the kernel polynomial, its slope, tile loads."""

import triton
import triton.language as tl


@triton.jit
def kernel_value(s, a0, a1, a2, P: tl.constexpr):
    """f(s) = a0 + a1 s + a2 s^2 (P = 2) or a0 + a1 s (P = 1)."""
    if P == 2:
        return a0 + s * (a1 + a2 * s)
    else:
        return a0 + a1 * s


@triton.jit
def kernel_slope(s, a1, a2, P: tl.constexpr):
    """f'(s), shaped like s."""
    if P == 2:
        return a1 + 2.0 * a2 * s
    else:
        return a1 + 0.0 * s


@triton.jit
def load_rows(ptr, rows, valid, stride_n, cols, ncols, stride_d):
    """(len(rows), len(cols)) tile of a (N, C) matrix, zero outside."""
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d,
                   mask=valid[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def key_valid(MASK, b, smb, smn, keys, Nk, HAS_MASK: tl.constexpr):
    """Which keys are real: inside the sequence and, with a padding mask, not padding."""
    valid = keys < Nk
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * smb + keys * smn, mask=keys < Nk, other=0) != 0)
    return valid
