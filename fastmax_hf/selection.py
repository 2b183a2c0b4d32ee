"""Masked products in which an invisible pair contributes nothing, whatever its values.

Masking by multiplication (``A * mask`` or ``where(mask, A, 0) @ V``) is not enough: IEEE
arithmetic gives 0 * inf = 0 * NaN = NaN, so a non-finite key or value at position j would
reach, through the matrix product, every query that merely shares a tile with it, and through
autograd's backward products the gradients of every earlier position. Under a causal mask that
is the future leaking into the past. Every product over the key (or query) axis of a masked
tile therefore goes through one of these two functions, which remove invisible pairs by
selection (``torch.where``) before any multiplication, in the forward pass and in the backward
pass that autograd derives from them:

    masked_scores(a, b, keep)[..., i, j] = a_i . b_j   where keep[..., i, j], else 0
    masked_matmul(w, x, keep)[..., i, :] = sum_j keep_ij w_ij x_j

Rows of ``a``, ``b`` or ``x`` that hold a non-finite entry are taken out of the fast matrix
product (replaced by zeros, by selection) and handled pair by pair, with the mask applied to
the operand itself, so the cost of this exactness is paid only for those rows: finite inputs
take a plain product (``finite=True`` skips even the check, for a caller that knows).
"""

from __future__ import annotations

import torch


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) bool: the rows of x (..., n, d) holding a NaN or an infinity."""
    return ~torch.isfinite(x).all(-1)


def _any_over_batch(bad: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim of ``bad`` (..., n) that are bad in some batch element."""
    return bad.reshape(-1, bad.shape[-1]).any(0).nonzero().squeeze(-1)


def masked_scores(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, *, finite: bool = False) -> torch.Tensor:
    """a (..., n, d) against b (..., m, d): the inner products a_i . b_j of the kept pairs.

    ``keep`` (bool) broadcasts to the output (..., n, m); the batch dims of a and b broadcast.
    Pairs not kept are exactly 0, and neither they nor their gradients see a's or b's values."""
    out_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-2])
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    if finite:
        return torch.where(keep, a @ b.transpose(-1, -2), zero)
    bad_a, bad_b = _bad_rows(a), _bad_rows(b)
    any_a, any_b = bool(bad_a.any()), bool(bad_b.any())
    if not (any_a or any_b):
        return torch.where(keep, a @ b.transpose(-1, -2), zero)
    keep = keep.expand(out_shape)
    a0 = torch.where(bad_a[..., None], zero, a)
    b0 = torch.where(bad_b[..., None], zero, b)
    scores = a0 @ b0.transpose(-1, -2)
    if any_b:  # columns of the non-finite keys, pair by pair with the mask on b's rows
        cols = _any_over_batch(bad_b)
        b_cols = b.index_select(-2, cols)[..., None, :, :]  # (..., 1, c, d)
        keep_cols = keep.index_select(-1, cols)[..., None]  # (..., n, c, 1)
        column = (a[..., :, None, :] * torch.where(keep_cols, b_cols, zero)).sum(-1)
        scores = scores.index_copy(-1, cols, column.expand(out_shape[:-1] + (cols.numel(),)))
    if any_a:  # rows of the non-finite queries, with the mask on a's rows
        rows = _any_over_batch(bad_a)
        a_rows = a.index_select(-2, rows)[..., :, None, :]  # (..., r, 1, d)
        keep_rows = keep.index_select(-2, rows)[..., None]  # (..., r, m, 1)
        row = (torch.where(keep_rows, a_rows, zero) * b[..., None, :, :]).sum(-1)
        scores = scores.index_copy(-2, rows, row.expand(out_shape[:-2] + (rows.numel(), out_shape[-1])))
    return torch.where(keep, scores, zero)


def masked_matmul(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, *, finite: bool = False) -> torch.Tensor:
    """sum_j keep_ij w_ij x_j: w (..., n, m), x (..., m, d) -> (..., n, d).

    ``keep`` (bool) broadcasts to w. A non-finite x_j reaches only the rows that keep it."""
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    w = torch.where(keep, w, zero)
    if finite:
        return w @ x
    bad = _bad_rows(x)
    if not bool(bad.any()):
        return w @ x
    out = w @ torch.where(bad[..., None], zero, x)
    cols = _any_over_batch(bad)
    x_cols = x.index_select(-2, cols)[..., None, :, :]  # (..., 1, c, d)
    keep_cols = keep.expand(w.shape).index_select(-1, cols)[..., None]  # (..., n, c, 1)
    w_cols = w.index_select(-1, cols)[..., None]  # (..., n, c, 1)
    bad_cols = bad.index_select(-1, cols)[..., None, :, None]  # (..., 1, c, 1): only the bad rows, once
    return out + (w_cols * torch.where(keep_cols & bad_cols, x_cols, zero)).sum(-2)
