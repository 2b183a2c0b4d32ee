"""The hybrid window: exact softmax over the last W keys, fastmax over the earlier ones.

Definition (causal only). Query i sits at position t_i = i + (Nk - Nq) on the key timeline
(bottom-right alignment); key j is visible to it iff j <= t_i and j is not padding. Its visible
keys split in two by position:

    window   t_i - W < j <= t_i     weight  exp(s_ij)
    rest     j <= t_i - W           weight  gamma_h f(s_ij),   f(s) = a0 + a1 s + a2 s^2

    o_i = (sum_win e^{s} v + gamma sum_rest f(s) v) / (sum_win e^{s} + gamma sum_rest f(s))

Why gamma = 1 makes the two parts commensurate. f is the second-order Taylor expansion of e^s
(a0 = a1 = 1, a2 = 1/2 by default), so both parts weight a key by (an approximation of) e^s on
one and the same scale: with gamma = 1 a far key counts as much as it would under softmax, up
to the error of the expansion, and a model trained with softmax keeps its relative attention
between near and far tokens. gamma_h (one positive factor per query head, or one for all) lets
training rebalance the two where the expansion is poor, as LoLCATs' learnable mixing factor.

Stable form. m_i = max_win s_ij (0 for a row whose window holds no visible key) scales
numerator and denominator alike, so it changes nothing and carries no gradient:

    o_i = (sum_win e^{s-m_i} v + c_i sum_rest f(s) v) / (sum_win e^{s-m_i} + c_i sum_rest f(s)),
    c_i = gamma_h e^{-m_i}

(the c of issue 17). The combine below applies it with the shift M_i = max(m_i, 0) instead of
m_i, which is the same quotient: the window part is multiplied by e^{m_i - M_i} <= 1 and the
rest by gamma e^{-M_i} <= gamma, so neither factor overflows when every window score is very
negative (e^{-m_i} alone would).

Cost. The window part is a band: a block of C queries needs only the keys of positions
(t_{i0} - W, t_{i1 - 1}], at most C + W - 1 of them, so each block forms one C x (C + W - 1)
tile of scores (never Nq x Nk). The rest part is plain fastmax with every query moved W
positions back on the key timeline (``chunked._Problem(lag=W)``): the polynomial state of the
keys before the window, by the existing linear (or quadratic) sweeps. Both are custom autograd
functions that keep only q, k, v and per-row quantities and recompute their tiles in backward,
so memory is O(N) in forward and backward (plus one band tile at a time); time is
O(N (C + W) D) for the window and the fastmax cost for the rest.

Non-finite inputs follow ``selection.py``: pairs outside a row's window are removed by
selection, so a NaN or inf key reaches only the queries that see it.
"""

from __future__ import annotations

import torch

from .chunked import (
    DEFAULT_CHUNK,
    _backward_linear,
    _backward_quadratic,
    _forward_linear,
    _forward_quadratic,
    _Problem,
    choose_mode,
    chunked_state,
    fold_token_,
    state_readout,
)
from .options import FastmaxOptions
from .selection import masked_matmul, masked_scores


# ---------------------------------------------------------------------------------------------
# The window part: exp(s - m) on a band of keys
# ---------------------------------------------------------------------------------------------


def _band(P: _Problem, i0: int, i1: int, window: int) -> tuple[int, int]:
    """Keys [b0, b1) holding the windows of the queries [i0, i1): positions t_i - W < j <= t_i."""
    b0 = max(0, i0 + P.offset - window + 1)
    b1 = min(P.Nk, i1 - 1 + P.offset + 1)
    return b0, b1


def _window_keep(P: _Problem, i0: int, i1: int, b0: int, b1: int, window: int) -> torch.Tensor:
    """Bool, broadcastable to (B, Hk, G, i1 - i0, b1 - b0): the pairs in the window and not padding."""
    qpos = torch.arange(i0, i1, device=P.q.device) + P.offset  # t_i
    kpos = torch.arange(b0, b1, device=P.q.device)
    keep = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)  # (nq, nb)
    if P.valid is not None:
        keep = keep & P.valid[..., None, b0:b1]  # (B, 1, 1, nq, nb)
    return keep


def _window_tile(P: _Problem, qc, kb, keep, m=None):
    """(w, m): w = exp(s - m) on the window pairs, exactly 0 elsewhere (B, Hk, G, nq, nb), and
    m (B, Hk, G, nq), the largest window score of each row (0 on a row without one) unless given."""
    scores = qc @ kb.transpose(-1, -2) if P.finite else masked_scores(qc, kb, keep)
    scores = scores * P.options.scale
    minus_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    if m is None:
        m = torch.where(keep, scores, minus_inf).amax(-1)
        m = torch.where(keep.any(-1), m, P.zero)
    w = torch.exp(torch.where(keep, scores - m[..., None], minus_inf))  # exp(-inf) = 0: removed by selection
    return w, m


def _forward_window(P: _Problem, window: int, chunk: int):
    """(Nw (B, Hk, G, Nq, Dv), Dw (B, Hk, G, Nq), m (B, Hk, G, Nq)): sum_win e^{s-m} v, sum_win e^{s-m}, m."""
    Nw = P.q.new_zeros(P.q.shape[:-1] + (P.v.shape[-1],))
    Dw = P.q.new_zeros(P.q.shape[:-1])
    m = P.q.new_zeros(P.q.shape[:-1])
    for i0 in range(0, P.Nq, chunk):
        i1 = min(i0 + chunk, P.Nq)
        b0, b1 = _band(P, i0, i1, window)
        if b1 <= b0:  # no query of the block has a visible position in its window
            continue
        keep = _window_keep(P, i0, i1, b0, b1, window)
        w, mc = _window_tile(P, P.q[..., i0:i1, :], P.k[..., b0:b1, :], keep)
        vb = P.v[..., b0:b1, :]
        Nw[..., i0:i1, :] = w @ vb if P.finite else masked_matmul(w, vb, keep)
        Dw[..., i0:i1] = w.sum(-1)
        m[..., i0:i1] = mc
    return Nw, Dw, m


def _backward_window(P: _Problem, m, gN, gD, window: int, chunk: int):
    """Gradients of sum_i gN_i . Nw_i + gD_i Dw_i with m held constant (it cancels in the output).

    Per block, the surrogate L = sum_win w_ij (gN_i . v_j + gD_i), w_ij = exp(s_ij - m_i),
    differentiated by autograd on that block's band only."""
    dq, dk, dv = torch.zeros_like(P.q), torch.zeros_like(P.k), torch.zeros_like(P.v)
    finite_g = bool(torch.isfinite(gN).all() & torch.isfinite(gD).all())
    for i0 in range(0, P.Nq, chunk):
        i1 = min(i0 + chunk, P.Nq)
        b0, b1 = _band(P, i0, i1, window)
        if b1 <= b0:
            continue
        keep = _window_keep(P, i0, i1, b0, b1, window)
        gc, hc = gN[..., i0:i1, :], gD[..., i0:i1]  # (B, Hk, G, nq, Dv), (B, Hk, G, nq)
        with torch.enable_grad():
            qc = P.q[..., i0:i1, :].detach().requires_grad_()
            kb = P.k[..., b0:b1, :].detach().requires_grad_()
            vb = P.v[..., b0:b1, :].detach().requires_grad_()
            w, _ = _window_tile(P, qc, kb, keep, m[..., i0:i1])
            if P.finite and finite_g:
                L = (w * (gc @ vb.transpose(-1, -2) + hc[..., None])).sum()
            else:
                # a row the loss does not read (zero cotangent) is left out by selection, so that
                # a non-finite weight of its own reaches no key's gradient (0 * NaN = NaN)
                active = (gc != 0).any(-1) | (hc != 0)  # (B, Hk, G, nq)
                w = torch.where(active[..., None] & keep, w, P.zero)
                gv = masked_scores(gc, vb, keep)
                L = torch.where(active[..., None] & keep, w * (gv + hc[..., None]), P.zero).sum()
            gq, gk, gv_ = torch.autograd.grad(L, (qc, kb, vb))
        dq[..., i0:i1, :] = gq  # each query row lies in exactly one block
        dk[..., b0:b1, :] += gk
        dv[..., b0:b1, :] += gv_
    return dq, dk, dv


class _WindowPart(torch.autograd.Function):
    """(Nw, Dw, m) of the window part, in the (B, Hk, G, Nq, ...) layout of ``_Problem``."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, options, window, chunk):
        P = _Problem(q, k, v, key_padding_mask, True, options)
        Nw, Dw, m = _forward_window(P, window, chunk)
        ctx.save_for_backward(q, k, v, key_padding_mask, m)
        ctx.settings = (options, window, chunk)
        ctx.mark_non_differentiable(m)
        return Nw, Dw, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gN, gD, _gm):
        q, k, v, key_padding_mask, m = ctx.saved_tensors
        options, window, chunk = ctx.settings
        P = _Problem(q, k, v, key_padding_mask, True, options)
        dq, dk, dv = _backward_window(P, m, gN.to(P.compute_dtype), gD.to(P.compute_dtype), window, chunk)
        dk, dv = P._select_valid(dk), P._select_valid(dv)  # a padded key has no gradient
        return dq.reshape(q.shape).to(q.dtype), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# The rest: plain fastmax over the keys at least W positions back
# ---------------------------------------------------------------------------------------------


class _RestPart(torch.autograd.Function):
    """(Nr (B, Hk, G, Nq, Dv), Dr (B, Hk, G, Nq)): sum_{j <= t_i - W} f(s_ij) v_j and sum f(s_ij).

    Backward reuses the chunked form's sweeps, whose surrogate sum_ij A_ij (g_i . v_j - c_i) is
    sum_i g_i . Nr_i - c_i Dr_i: with g = dL/dNr and c = -dL/dDr its gradients are those of L."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, options, window, mode, chunk):
        P = _Problem(q, k, v, key_padding_mask, True, options, lag=window)
        forward_impl = _forward_quadratic if mode == "quadratic" else _forward_linear
        Nr, Dr = forward_impl(P, chunk)
        ctx.save_for_backward(q, k, v, key_padding_mask)
        ctx.settings = (options, window, mode, chunk)
        return Nr, Dr

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gN, gD):
        q, k, v, key_padding_mask = ctx.saved_tensors
        options, window, mode, chunk = ctx.settings
        P = _Problem(q, k, v, key_padding_mask, True, options, lag=window)
        g, c = gN.to(P.compute_dtype), -gD.to(P.compute_dtype)
        P.finite_g = bool(torch.isfinite(g).all() & torch.isfinite(c).all())
        backward_impl = _backward_quadratic if mode == "quadratic" else _backward_linear
        dq, dk, dv = backward_impl(P, g, c, chunk)
        dk, dv = P._select_valid(dk), P._select_valid(dv)
        return (dq.reshape(q.shape).to(q.dtype), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype)) + (None,) * 5


# ---------------------------------------------------------------------------------------------
# The combine: one normaliser for both parts
# ---------------------------------------------------------------------------------------------


class _Combine(torch.autograd.Function):
    """out = (a Nw + c Nr) / (a Dw + c Dr) row by row (0 on rows whose denominator is 0), and
    that denominator. a = e^{m - M} (no gradient), c = gamma e^{-M} (gamma's gradient flows).

    With g = do / den and rho = g . out (both exactly 0 where do is, by selection, as in
    ``chunked._surrogate_terms``): dNw = a g, dDw = -a rho, dNr = c g, dDr = -c rho,
    dc = g . Nr - rho Dr."""

    @staticmethod
    def forward(ctx, Nw, Dw, Nr, Dr, a, c):
        num = a[..., None] * Nw + c[..., None] * Nr  # (B, Hk, G, Nq, Dv)
        den = a * Dw + c * Dr  # (B, Hk, G, Nq)
        empty = den == 0
        safe = torch.where(empty, torch.ones_like(den), den)
        out = torch.where(empty[..., None], torch.zeros_like(num), num / safe[..., None])
        ctx.save_for_backward(out, den, Nr, Dr, a, c)
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_den):
        out, den, Nr, Dr, a, c = ctx.saved_tensors
        empty = den == 0
        safe = torch.where(empty, torch.ones_like(den), den)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        grad_out = grad_out.to(out.dtype)
        g = torch.where(empty[..., None] | (grad_out == 0), zero, grad_out / safe[..., None])
        rho = torch.where(g == 0, zero, g * out).sum(-1)
        dc = None
        if ctx.needs_input_grad[5]:
            dc = torch.where(g == 0, zero, g * Nr).sum(-1) - torch.where(rho == 0, zero, rho * Dr)
        # by selection: a row the loss does not read gets exactly 0, also where a or c is not
        # finite (a row that sees an inf key has m = inf, so a = e^{m - M} = NaN)
        rows = (g != 0).any(-1)
        a = torch.where(rows, a, zero)
        c = torch.where(rows, c, zero)
        return a[..., None] * g, -a * rho, c[..., None] * g, -c * rho, None, dc


def _gain(options: FastmaxOptions, Hk: int, G: int, dtype) -> torch.Tensor | float:
    """gamma as a float or a tensor broadcastable to (B, Hk, G, Nq); differentiable when it is a tensor."""
    gain = options.window_gain
    if not isinstance(gain, torch.Tensor):
        return float(gain)
    gain = gain.to(dtype)
    if gain.dim() == 1:  # (Hq,): query head h = hk * G + g, as q.reshape(B, Hk, G, Nq, D) groups them
        gain = gain.reshape(Hk, G)[None, :, :, None]
    return gain


def _combine(Nw, Dw, m, Nr, Dr, gain):
    """(out, den) in the (B, Hk, G, Nq, ...) layout, shifted by M = max(m, 0) (see the module docstring)."""
    shift = m.clamp_min(0)
    a = torch.exp(m - shift)  # (B, Hk, G, Nq), in (0, 1]
    c = gain * torch.exp(-shift)  # (B, Hk, G, Nq), gamma e^{-M}
    return _Combine.apply(Nw, Dw, Nr, Dr, a, c)


def window_attention(q, k, v, options: FastmaxOptions, *, key_padding_mask, mode="auto", chunk_size=DEFAULT_CHUNK,
                     implementation="chunked"):
    """The hybrid window core (causal; no normalize/dropout): (out (B, Hq, Nq, Dv) in q's dtype, den (B, Hq, Nq)).

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), key_padding_mask bool (B, Nk) or None;
    ``options.window`` is W, ``options.window_gain`` gamma (a tensor one gets the gradient of).
    ``mode`` picks the rest part's sweep ("auto", "linear", "quadratic"; see ``chunked``).
    ``implementation``: "chunked" (the PyTorch parts below, joined by ``_combine``) or "triton"
    (``fastmax_hf.kernels.triton_window_attention``: the same function in one autograd Function
    whose window kernel joins the parts itself; under torch.compile, custom operators with the
    same kernels)."""
    window = options.window
    if window is None:
        raise ValueError("window_attention needs `window` set in the options")
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hk
    if implementation == "triton":
        from .kernels import triton_window_attention

        return triton_window_attention(q, k, v, options, key_padding_mask=key_padding_mask, window=window,
                                       regime=mode)
    if implementation != "chunked":
        raise ValueError(f"`implementation` must be 'chunked' or 'triton', got {implementation!r}")
    if mode == "auto":
        mode = choose_mode(Nk, D, options.p)
    if mode not in ("linear", "quadratic"):
        raise ValueError(f"`mode` must be 'auto', 'linear' or 'quadratic', got {mode!r}")
    Nw, Dw, m = _WindowPart.apply(q, k, v, key_padding_mask, options, window, chunk_size)
    if Nk - 1 - window >= 0:  # some query has keys before its window (the last one, t = Nk - 1)
        Nr, Dr = _RestPart.apply(q, k, v, key_padding_mask, options, window, mode, chunk_size)
    else:
        Nr, Dr = torch.zeros_like(Nw), torch.zeros_like(Dw)
    out, den = _combine(Nw, Dw, m, Nr, Dr, _gain(options, Hk, G, Nw.dtype))
    return out.reshape(B, Hq, Nq, Dv).to(q.dtype), den.reshape(B, Hq, Nq)


# ---------------------------------------------------------------------------------------------
# The recurrent step: the last W positions beside the polynomial state
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def window_step(q, k, v, S, z, tail_k, tail_v, tail_valid, options: FastmaxOptions, *, key_padding_mask,
                chunk_size=DEFAULT_CHUNK):
    """n new tokens attend causally to the last L <= W positions (``tail_*``), to the state (S, z)
    of every position before those, and to each other; then the positions that fall more than W
    behind the newest token leave the tail and are folded into (S, z).

    Args:
        q (B, Hq, n, D); k, v (B, Hk, n, D), (B, Hk, n, Dv): the new tokens.
        S (B, Hk, F, Dv), z (B, Hk, F): the polynomial state of the positions before the tail
            (empty while fewer than W positions were seen: then the tail holds them all).
        tail_k (B, Hk, L, D), tail_v (B, Hk, L, Dv), tail_valid (B, L) bool: the last L positions
            in order (padding kept as a position, marked False, as the full call counts it).
        key_padding_mask: (B, n) bool or None.

    Returns:
        (out (B, Hq, n, Dv) in q's dtype, S', z', tail_k', tail_v', tail_valid'), L' = min(W, L + n).
    """
    window = options.window
    B, Hq, n, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hk
    L = tail_k.shape[2]
    new_valid = key_padding_mask if key_padding_mask is not None else torch.ones(B, n, dtype=torch.bool,
                                                                                 device=q.device)
    keys = torch.cat([tail_k, k.to(tail_k.dtype)], dim=2)  # (B, Hk, L + n, D)
    values = torch.cat([tail_v, v.to(tail_v.dtype)], dim=2)  # (B, Hk, L + n, Dv)
    valid = torch.cat([tail_valid, new_valid], dim=1)  # (B, L + n)
    mask = None if bool(valid.all()) else valid

    # window part: the new queries sit at positions L .. L + n - 1 of the joined keys
    P = _Problem(q, keys, values, mask, True, options)
    Nw, Dw, m = _forward_window(P, window, chunk_size)
    # rest part: the state (every position before the tail is more than W behind every new query)
    # plus the joined keys at least W positions back
    state_num, state_den = state_readout(q, S, z, options)  # (B, Hq, n, Dv), (B, Hq, n)
    Nr = state_num.to(Nw.dtype).reshape(Nw.shape)
    Dr = state_den.to(Dw.dtype).reshape(Dw.shape)
    if L + n - 1 - window >= 0:
        P_rest = _Problem(q, keys, values, mask, True, options, lag=window)
        mode = choose_mode(L + n, D, options.p)
        forward_impl = _forward_quadratic if mode == "quadratic" else _forward_linear
        num, den = forward_impl(P_rest, chunk_size)
        Nr, Dr = Nr + num, Dr + den
    out, _ = _combine(Nw, Dw, m, Nr, Dr, _gain(options, Hk, G, Nw.dtype))
    out = out.reshape(B, Hq, n, Dv).to(q.dtype)

    leaving = max(0, L + n - window)  # positions more than W behind the newest token
    if leaving > 0:
        dS, dz = chunked_state(keys[:, :, :leaving], values[:, :, :leaving],
                               key_padding_mask=valid[:, :leaving], p=options.p, chunk_size=chunk_size)
        S, z = S + dS.to(S.dtype), z + dz.to(z.dtype)
    return (out, S, z, keys[:, :, leaving:].contiguous(), values[:, :, leaving:].contiguous(),
            valid[:, leaving:].contiguous())


@torch.no_grad()
def window_decode_step_(q, k, v, S, z, tail_k, tail_v, tail_valid, options: FastmaxOptions, *, key_valid=None):
    """One new token per sequence, every tensor of the state updated where it lies: the hybrid
    window's twin of ``chunked.chunked_decode_step_`` (what a captured CUDA graph replays).

    The tail has its full length W here (``pad_tail`` makes it so): the last W positions, oldest
    first, with positions before the first token marked False like padding. Each step the oldest
    position, now W behind the new token, is folded into (S, z) (when real), the tail moves up
    by one and takes the new token, and the token attends to the tail by exact softmax and to
    (S, z) by fastmax: the same sums as ``window_step``, with no shape that depends on the
    data and nothing read back to the host.

    Args:
        q (B, Hq, 1, D); k, v (B, Hk, 1, D), (B, Hk, 1, Dv): the new token.
        S (B, Hk, F, Dv), z (B, Hk, F): the PyTorch-layout state, fp32 (float64 for float64).
        tail_k (B, Hk, W, D), tail_v (B, Hk, W, Dv), tail_valid (B, W) bool.
        key_valid: (B,) bool or None: False = the new token is padding (it attends, and stays in
            the tail as a position marked False).

    Returns:
        out (B, Hq, 1, Dv) in q's dtype.
    """
    B, Hq, n, D = q.shape
    Hk, W, Dv = tail_k.shape[1], tail_k.shape[2], tail_v.shape[-1]
    if n != 1 or k.shape[2] != 1 or v.shape[2] != 1:
        raise ValueError(f"window_decode_step_ takes one new token per sequence, got `q` {tuple(q.shape)}")
    if W != options.window:
        raise ValueError(f"the tail holds {W} positions but `window`={options.window}: pad it with `pad_tail` first")
    G = Hq // Hk
    cd = S.dtype
    zero = torch.zeros((), dtype=cd, device=S.device)

    # 1. the oldest position leaves the window for the polynomial state (by selection when padded)
    fold_token_(S, z, tail_k[:, :, :1], tail_v[:, :, :1], tail_valid[:, 0], options.p)

    # 2. the tail moves up by one position and takes the new token
    new_valid = key_valid if key_valid is not None else torch.ones(B, dtype=torch.bool, device=q.device)
    tail_k[:, :, :-1] = tail_k[:, :, 1:].clone()
    tail_v[:, :, :-1] = tail_v[:, :, 1:].clone()
    tail_valid[:, :-1] = tail_valid[:, 1:].clone()
    tail_k[:, :, -1:] = k.to(tail_k.dtype)
    tail_v[:, :, -1:] = v.to(tail_v.dtype)
    tail_valid[:, -1] = new_valid

    # 3. the window: exact softmax over the tail (positions marked False removed by selection)
    keep = tail_valid[:, None, None, None, :]  # (B, 1, 1, 1, W)
    keys = torch.where(tail_valid[:, None, :, None], tail_k.to(cd), zero)[:, :, None]  # (B, Hk, 1, W, D)
    values = torch.where(tail_valid[:, None, :, None], tail_v.to(cd), zero)[:, :, None]  # (B, Hk, 1, W, Dv)
    qg = q.to(cd).reshape(B, Hk, G, 1, D)
    scores = (qg @ keys.transpose(-1, -2)) * options.scale  # (B, Hk, G, 1, W)
    minus_inf = torch.full((), float("-inf"), dtype=cd, device=S.device)
    m = torch.where(keep, scores, minus_inf).amax(-1)  # (B, Hk, G, 1)
    m = torch.where(keep.any(-1), m, zero)
    w = torch.exp(torch.where(keep, scores - m[..., None], minus_inf))
    Nw, Dw = w @ values, w.sum(-1)  # (B, Hk, G, 1, Dv), (B, Hk, G, 1)

    # 4. the rest: every position before the tail, from the polynomial state
    num, den = state_readout(q, S, z, options)  # (B, Hq, 1, Dv), (B, Hq, 1)
    out, _ = _combine(Nw, Dw, m, num.reshape(B, Hk, G, 1, Dv), den.reshape(B, Hk, G, 1), _gain(options, Hk, G, cd))
    return out.reshape(B, Hq, 1, Dv).to(q.dtype)


def pad_tail(tail_k, tail_v, tail_valid, window: int):
    """A tail of L < W positions lengthened to W at its front with positions marked False (as if
    the sequence had been left-padded): the same sums for every later query, since a position
    marked False is never attended to and joins (S, z) as nothing. New tensors."""
    B, Hk, L, D = tail_k.shape
    missing = window - L
    if missing <= 0:
        return tail_k, tail_v, tail_valid
    front = dict(dtype=tail_k.dtype, device=tail_k.device)
    tail_k = torch.cat([torch.zeros(B, Hk, missing, D, **front), tail_k], dim=2)
    tail_v = torch.cat([torch.zeros(B, Hk, missing, tail_v.shape[-1], **front), tail_v], dim=2)
    tail_valid = torch.cat([torch.zeros(B, missing, dtype=torch.bool, device=tail_valid.device), tail_valid], dim=1)
    return tail_k, tail_v, tail_valid
