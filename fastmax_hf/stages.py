"""What a Fastmax call does around its attention core, in this order:

1. ``normalize_qk``: with ``options.normalize``, q and k scaled by lim / max ||x_n||
   (``norm_scale``; the running maximum under a causal mask, which decoding continues);
2. the core, chosen by ``backends.choose_backend``: reference, chunked or triton, each
   returning (out, den) with den_i = sum_j f(s_ij);
3. ``check_denominators``: when the kernel can reach 0 (``FastmaxOptions.can_vanish``), a
   row that sees keys but whose denominator reached 0 is an error, not a wrong answer;
4. ``apply_dropout``: the seed's output dropout, out * (1 + dropout * xi), xi ~ N(0, 1).

``fastmax`` runs all four, the recurrent step 1 (in its running form) and the core, the Hugging
Face attention function adds 4 to the step. The reference applies its own normalisation (it
shares no attention code with the fast paths) and ``apply_dropout``.
"""

from __future__ import annotations

import torch

from .options import FastmaxOptions
from .validation import Shapes


def norm_scale(x, lim, causal, valid=None, prev_peak=None):
    """lim / max ||x_n|| for every position: (B, H, N, 1) in x's dtype, and the last peak (B, H).

    Without a causal mask the maximum runs over the whole sequence (as in the seed); with
    one, over n <= i, continuing ``prev_peak`` (the maximum over earlier tokens, for
    decoding), so that no position reads the future. ``valid`` (B, N) leaves padded
    positions out of the maximum."""
    if prev_peak is not None:
        work = x.to(prev_peak.dtype)  # the state's precision
    else:
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if valid is not None:  # padded positions by selection: nothing they hold reaches a norm or its gradient
        work = torch.where(valid[:, None, :, None], work, torch.zeros((), dtype=work.dtype, device=work.device))
    norms = torch.linalg.vector_norm(work, dim=-1)  # (B, H, N)
    if norms.shape[-1] == 0:  # no token: nothing to scale, and the peak stays what it was
        last = prev_peak if prev_peak is not None else norms.new_zeros(norms.shape[:-1])
        return x.new_zeros(x.shape[:-1] + (1,)), last
    if valid is not None:
        norms = norms.masked_fill(~valid[:, None, :], 0.0)
    peak = torch.cummax(norms, dim=-1).values if causal else norms.amax(-1, keepdim=True)
    if prev_peak is not None:
        peak = torch.maximum(peak, prev_peak[..., None])
    return _peak_factor(peak, lim).to(x.dtype).unsqueeze(-1), peak[..., -1]


def _peak_factor(peak, lim):
    """lim / peak, and 0 where the peak is 0: every vector so far is 0 (or padded), so any
    factor works."""
    return torch.where(peak > 0, lim / peak.clamp_min(torch.finfo(peak.dtype).tiny), torch.zeros_like(peak))


class _ScaleByPeak(torch.autograd.Function):
    """x * lim / max ||x_n|| (the factor of ``norm_scale`` without a previous peak), with its
    backward written out: the same gradient as autograd's through ``norm_scale``, in a few
    passes over x instead of the dozens that the composed norm, cast, maximum and products
    take (at 64k tokens, 16 heads, D=64 those made up half of a p = 1 forward+backward).

    Backward, with f_n = lim / P_n, P_n = max_{n' <= n} ||x_n'|| reached at n* (cummax; the
    whole sequence without a causal mask): dx_n = g_n f_n + x_n / ||x_n|| sum_{i: i* = n}
    (-f_i / P_i) (g_i . x_i) = g_n f_n + x_n / ||x_n|| sum_{i: i* = n} (-f_i^2 / lim) (g_i . x_i),
    where the second term counts only the positions that count towards the maximum (``valid``)
    and only where ||x_n|| > 0.

    Each PyTorch operation here is a launch and several microseconds of host time, which at
    4k-16k tokens is what a call waits for: so the row terms are written with as few as the
    edge cases allow (a scalar, never a zeros tensor, as ``torch.where``'s other branch; the
    row factor's square over lim kept from the forward)."""

    @staticmethod
    def forward(ctx, x, lim, causal, valid):
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=work)  # (B, H, N)
        counted = None
        if valid is not None:
            counted = valid[:, None, :].expand_as(norms)
            norms = torch.where(counted, norms, 0.0)
        if causal:
            peak, at = torch.cummax(norms, dim=-1)
        else:
            peak, at = norms.max(dim=-1, keepdim=True)
        positive = peak > 0
        factor_w = torch.where(positive, lim / peak, 0.0)  # lim / 0 is not selected
        factor = factor_w.to(x.dtype)
        ctx.save_for_backward(x, norms, at, positive, factor_w, factor, counted)
        ctx.lim = lim
        return x * factor.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        x, norms, at, positive, factor_w, factor, counted = ctx.saved_tensors
        # row terms (B, H, N) in the norms' precision; the (.., D) tensors in x's dtype, three passes
        g_factor = torch.linalg.vecdot(grad, x, dim=-1).to(norms.dtype)
        if g_factor.shape != positive.shape:  # one factor for the whole sequence (no causal mask)
            g_factor = g_factor.sum(-1, keepdim=True)
        # dL/dP = -(g . x) lim / P^2 = -(g . x) f^2 / lim, 0 where P = 0 (selected: g may be inf there)
        g_peak = torch.where(positive, g_factor * factor_w.square(), 0.0).mul_(-1.0 / ctx.lim)
        g_norms = torch.zeros_like(norms).scatter_add_(-1, at, g_peak)
        through_norm = norms > 0
        if counted is not None:
            through_norm = through_norm & counted
            # selected, not multiplied: a non-finite x where no gradient passes gives 0, not inf * 0
            x = x.masked_fill(~through_norm.unsqueeze(-1), 0)
        coef = torch.where(through_norm, g_norms / norms, 0.0)  # norms = 0 is not selected
        grad_x = torch.addcmul(grad * factor.unsqueeze(-1), x, coef.to(x.dtype).unsqueeze(-1))
        return grad_x, None, None, None


def normalize_qk(q, k, lim, causal, key_padding_mask, scaler=None):
    """q and k scaled by lim / max ||x_n|| (see ``norm_scale``).

    Padded keys do not count towards the maximum, nor do padded queries when q and k are
    the same tokens (Nq == Nk). Padded keys come back as zeros (no path reads them).
    ``scaler``: a function (q, k, lim, causal, q_valid, k_valid) -> (scaled q, scaled k) to
    use instead of ``_ScaleByPeak`` (the kernels' ``triton_scale_qk_by_peak``), or None."""
    query_mask = key_padding_mask if q.shape[2] == k.shape[2] else None
    if key_padding_mask is not None:
        # padded keys are removed by selection before the product: an inf there would otherwise
        # reach the gradient of the running maximum (inf * 0 in the backward of k * factor)
        k = torch.where(key_padding_mask[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
    if scaler is not None and q.shape[-2] > 0 and k.shape[-2] > 0:
        return scaler(q, k, lim, causal, query_mask, key_padding_mask)
    return _scale_by_peak(q, lim, causal, query_mask), _scale_by_peak(k, lim, causal, key_padding_mask)


def _scale_by_peak(x, lim, causal, valid):
    if x.shape[-2] == 0:  # no token: nothing to scale (and no maximum to take)
        return x * 0
    return _ScaleByPeak.apply(x, lim, causal, valid)


def _visible_rows(shapes: Shapes, causal, key_padding_mask, device):
    """(B, 1, Nq) bool: which query rows see at least one key."""
    last = torch.arange(shapes.len_q, device=device) + (shapes.len_k - shapes.len_q)  # t_i
    if key_padding_mask is None:
        if not causal:
            return torch.ones(1, 1, shapes.len_q, dtype=torch.bool, device=device)
        return (last >= 0)[None, None, :]
    if not causal:
        return key_padding_mask.any(-1)[:, None, None].expand(-1, 1, shapes.len_q)
    seen = torch.cumsum(key_padding_mask.to(torch.int32), dim=-1)  # (B, Nk)
    idx = last.clamp_min(0)[None, :].expand(shapes.batch, -1)
    counts = torch.gather(seen, 1, idx) * (last >= 0)
    return (counts > 0)[:, None, :]


def check_denominators(den, options: FastmaxOptions, shapes: Shapes, causal, key_padding_mask, *, rpe=False):
    """Refuse a denominator (B, Hq, Nq) that reached 0 or below on a row that sees keys.

    Only kernels that can reach 0 are checked: the default 1 + s + s^2/2 >= 1/2 needs no
    look at the (device) tensor."""
    if not options.can_vanish(rpe=rpe):
        return
    visible = _visible_rows(shapes, causal, key_padding_mask, den.device)  # (B, 1, Nq)
    if bool(((den.detach() <= 0) & visible).any()):
        raise ValueError(
            f"the Fastmax denominator sum_j f(s_ij) reached 0 or below: f(s) = {options.formula()} is not positive "
            "for every score. With p=1 use normalize=True with a small enough `lim`, or choose a0, a1, a2 "
            "so that f(s) > 0 (e.g. the default a0=1, a1=1, a2=0.5 with p=2)."
        )


def apply_dropout(out, dropout, drop_noise=None):
    """The seed's output dropout: out * (1 + dropout * xi), xi = ``drop_noise`` or N(0, 1) noise.

    Applied whenever dropout > 0, like SDPA's dropout_p (modules pass 0 outside training)."""
    if dropout <= 0.0:
        return out
    noise = drop_noise if drop_noise is not None else torch.randn_like(out)
    return out * (1.0 + dropout * noise.to(out.dtype))
