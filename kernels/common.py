"""Pieces shared by the quadratic and linear kernels: the kernel polynomial and its slope."""

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
