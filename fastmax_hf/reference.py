"""The direct O(N^2) form of Fastmax: the definition every other path is tested against.

For query i and key j,

    s_ij = (q_i . (k_j + r_{t_i - j})) * scale        (r only with an rpe_matrix)
    f(s) = a0 + a1 s + a2 s^2                          (p = 2; p = 1 drops a2)
    o_i  = sum_j f(s_ij) v_j / sum_j f(s_ij)           over the keys visible to i

where t_i = i + (Nk - Nq) is the position of query i on the key timeline
(bottom-right alignment). Under ``causal`` key j is visible iff j <= t_i, and a
``key_padding_mask`` (True = attend) removes keys. A row with no visible key is
0.

With a ``window`` W (causal only; see ``fastmax_hf.window`` for the derivation), the visible
keys with t_i - W < j <= t_i (the window) are weighted by exp(s_ij - m_i), m_i the largest
window score of row i (0 when the window holds no visible key), and the earlier visible keys
by gamma_h e^{-m_i} f(s_ij):

    o_i = (sum_win e^{s-m} v + gamma e^{-m} sum_rest f(s) v) / (sum_win e^{s-m} + gamma e^{-m} sum_rest f(s)) Everything is computed in the inputs' dtype, so float64 inputs give a float64
ground truth; memory is O(B H Nq Nk).

This module deliberately shares no attention code with the fast paths: it reads the
coefficients from a ``FastmaxOptions`` and normalises and forms f(s) itself. Only the output
dropout (``stages.apply_dropout``) is the one every path uses.
"""

from __future__ import annotations

import torch

from .options import FastmaxOptions
from .selection import masked_matmul, masked_scores
from .stages import apply_dropout
from .validation import check_flag, check_window_causal


def _norm_scale(x: torch.Tensor, lim: float, causal: bool, valid: torch.Tensor | None) -> torch.Tensor:
    """lim / max ||x_n||: over the whole sequence, or the running maximum n <= i when causal."""
    if valid is not None:  # padded positions by selection, before the norm and its gradient
        x = torch.where(valid[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    norms = x.norm(dim=-1)  # (B, H, N)
    if norms.shape[-1] == 0:  # no token (N = 0): no maximum to take
        return norms
    if valid is not None:
        norms = torch.where(valid[:, None, :], norms, torch.zeros((), dtype=norms.dtype, device=norms.device))
    if causal:
        biggest = torch.cummax(norms, dim=-1).values
    else:
        biggest = norms.amax(dim=-1, keepdim=True)
    return torch.where(biggest > 0, lim / biggest.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(biggest))


def fastmax_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    p: int = 2,
    a0: float = 1.0,
    a1: float = 1.0,
    a2: float = 0.5,
    normalize: bool = False,
    lim: float = 1.0,
    dropout: float = 0.0,
    drop_noise: torch.Tensor | None = None,
    rpe_matrix: torch.Tensor | None = None,
    return_denominator: bool = False,
    window: int | None = None,
    window_gain: float | torch.Tensor = 1.0,
):
    """Fastmax by its definition. q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv).

    Only the coefficients are validated here (by ``FastmaxOptions``), not the tensors; use
    ``fastmax_hf.fastmax(..., backend="reference")`` for checked input.
    """
    check_flag("causal", causal)
    check_flag("return_denominator", return_denominator)
    options = FastmaxOptions.resolve(q.shape[-1], scale=scale, p=p, a0=a0, a1=a1, a2=a2, normalize=normalize,
                                     lim=lim, window=window, window_gain=window_gain)
    check_window_causal(options.window, causal)
    out, denominator = reference_attention(q, k, v, options, causal=causal, key_padding_mask=key_padding_mask,
                                           rpe_matrix=rpe_matrix)
    out = apply_dropout(out, dropout, drop_noise)
    if return_denominator:
        return out, denominator
    return out


def reference_attention(q, k, v, options: FastmaxOptions, *, causal, key_padding_mask, rpe_matrix=None):
    """(out (B, Hq, Nq, Dv), denominator (B, Hq, Nq)), both in the inputs' dtype, without dropout."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    groups = Hq // Hk
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        # a padded key is removed by selection: nothing it holds, not even inf or NaN, is read
        pad = key_padding_mask[:, None, :, None]
        k, v = torch.where(pad, k, zero), torch.where(pad, v, zero)
    k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Nk, D)
    v = v.repeat_interleave(groups, dim=1)  # (B, Hq, Nk, Dv)

    query_pos = torch.arange(Nq, device=q.device) + (Nk - Nq)  # t_i
    key_pos = torch.arange(Nk, device=q.device)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = key_pos[None, :] <= query_pos[:, None]
    visible = visible[None, None].expand(B, Hq, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]

    if options.normalize:
        # padded positions count towards no maximum; queries share the keys' padding when
        # they are the same tokens (Nq == Nk)
        query_mask = key_padding_mask if Nq == Nk else None
        q = q * _norm_scale(q, options.lim, causal, query_mask)[..., None]
        k = k * _norm_scale(k, options.lim, causal, key_padding_mask)[..., None]

    # Invisible pairs are removed by selection in every product over the key axis (scores,
    # numerator, and the backward products autograd derives from them): a non-finite key or
    # value at position j reaches no query that cannot see it (see selection.py).
    scores = masked_scores(q, k, visible)  # (B, Hq, Nq, Nk), 0 where invisible
    if rpe_matrix is not None:
        centre = (rpe_matrix.shape[0] - 1) // 2
        rows = centre - (query_pos[:, None] - key_pos[None, :])  # (Nq, Nk)
        r = rpe_matrix.to(q.dtype)[rows]  # (Nq, Nk, D)
        scores = scores + torch.einsum("bhid,ijd->bhij", q, r)
    scores = scores * options.scale

    weights = options.a0 + options.a1 * scores
    if options.p == 2:
        weights = weights + options.a2 * scores * scores
    weights = torch.where(visible, weights, zero)
    if options.window is not None:
        weights = _window_weights(scores, weights, visible, query_pos, key_pos, options)

    numerator = masked_matmul(weights, v, visible)  # (B, Hq, Nq, Dv)
    denominator = weights.sum(dim=-1)  # (B, Hq, Nq)
    return _RowDivide.apply(numerator, denominator), denominator


def _window_weights(scores, poly, visible, query_pos, key_pos, options: FastmaxOptions):
    """The hybrid window's weights (B, Hq, Nq, Nk): exp(s - m_i) on the last W visible positions,
    gamma e^{-m_i} f(s) on the earlier visible ones, 0 elsewhere (``poly`` = f(s), 0 where invisible).

    m_i (the largest window score of row i) only keeps the exponentials in range: the output does
    not depend on it (it scales numerator and denominator alike), so it is taken without gradient."""
    in_window = visible & (key_pos[None, :] > query_pos[:, None] - options.window)  # (B, Hq, Nq, Nk)
    rest = visible & ~in_window
    minus_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    m = torch.where(in_window, scores, minus_inf).amax(dim=-1, keepdim=True).detach()  # (B, Hq, Nq, 1)
    m = torch.where(in_window.any(dim=-1, keepdim=True), m, zero)  # no window key: any finite shift works
    gain = options.window_gain
    if isinstance(gain, torch.Tensor):
        gain = gain.to(scores.dtype).reshape(-1)[None, :, None, None] if gain.dim() == 1 else gain.to(scores.dtype)
    exact = torch.exp(torch.where(in_window, scores - m, minus_inf))  # exactly 0 outside the window
    approx = gain * torch.exp(-m) * torch.where(rest, poly, zero)
    return exact + approx


class _RowDivide(torch.autograd.Function):
    """numerator / denominator row by row, 0 on rows whose denominator is 0.

    Autograd's own division backward multiplies a zero cotangent by the output (0 * NaN =
    NaN), so a row the loss does not read would still carry a NaN of its own into the gradients
    of every key it saw. Here zero cotangents stay exactly zero, by selection, as in the fast
    paths (chunked._surrogate_terms): the same derivative, d out_i = (d num_i - out_i d den_i)
    / den_i."""

    @staticmethod
    def forward(ctx, numerator, denominator):
        empty = denominator == 0
        safe = torch.where(empty, torch.ones_like(denominator), denominator)
        out = torch.where(empty[..., None], torch.zeros_like(numerator), numerator / safe[..., None])
        ctx.save_for_backward(out, denominator)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, denominator = ctx.saved_tensors
        empty = denominator == 0
        safe = torch.where(empty, torch.ones_like(denominator), denominator)
        zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
        g = torch.where(empty[..., None] | (grad_out == 0), zero, grad_out / safe[..., None])
        return g, -torch.where(g == 0, zero, g * out).sum(-1)
