"""Fastmax in PyTorch with O(N) memory in forward and backward.

Two tilings of the same function (see ``reference.py`` for its definition):

* linear: the factorised form f(q.k) = phi_q(q) . phi_k(k), with
  phi_k(k) = [1, k, sym(k (x) k)] and phi_q(q) = [a0, a1 scale q, a2 scale^2 sym(q (x) q)],
  where sym keeps the m <= n entries of the outer product, weighted sqrt(2) off the
  diagonal, so F = 1 + D + D(D+1)/2. Keys are folded into an fp32 state
  S = sum_j phi_k(k_j) v_j^T (F x Dv), z = sum_j phi_k(k_j) (F), chunk by chunk;
  under a causal mask each chunk sees the state of the chunks before it plus its
  own masked C x C tile.
* quadratic: tiles of C queries against every visible key, f(s) in place of exp.

The linear form costs ~ F Dv per token, the quadratic one ~ Nk D; ``mode="auto"``
takes the quadratic one while Nk <= F.

Backward stores no per-chunk state. With g_i = do_i / d_i and c_i = (do_i . o_i) / d_i
(d_i the denominator), the gradients of the loss equal those of the surrogate

    L = sum_ij A_ij (g_i . v_j - c_i),   A_ij = f(s_ij) [j visible to i],

with g and c held constant. A forward sweep rebuilds (S, z) and differentiates the
query side of L chunk by chunk; a reverse sweep builds R = sum_i phi_q(q_i) g_i^T,
r = sum_i phi_q(q_i) c_i over the queries after each key chunk and differentiates
the key side. Local derivatives come from autograd on one chunk at a time.

Masked pairs are removed by selection, never by multiplying by zero (``selection.py``): an
inf key or a NaN value at position j reaches only the queries that see j, in forward and
backward, and a padded key reaches nobody.
"""

from __future__ import annotations

import functools
import math

import torch

from .options import FastmaxOptions
from .selection import masked_matmul, masked_scores

DEFAULT_CHUNK = 128


def feature_count(dim: int, p: int) -> int:
    """F: the length of the symmetric feature map for head dim ``dim``."""
    return 1 + dim + (dim * (dim + 1) // 2 if p == 2 else 0)


@functools.lru_cache(maxsize=None)
def _pair_index(dim: int, device: torch.device, dtype: torch.dtype):
    """Rows, columns and weights (1 on the diagonal, sqrt(2) off it) of the m <= n pairs.

    Made outside inference mode even when first asked for inside it (generation runs under
    torch.inference_mode): a cached inference tensor could not be saved for a later backward."""
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(dim, dim, device=device)
        weight = torch.full(rows.shape, math.sqrt(2.0), dtype=dtype, device=device)
        weight[rows == cols] = 1.0
    return rows, cols, weight


def _key_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """phi_k(x) = [1, x, sym(x (x) x)] along the last dim: (..., D) -> (..., F)."""
    parts = [torch.ones_like(x[..., :1]), x]
    if p == 2:
        rows, cols, weight = _pair_index(x.shape[-1], x.device, x.dtype)
        parts.append(x[..., rows] * x[..., cols] * weight)
    return torch.cat(parts, dim=-1)


def _query_weights(dim: int, options: FastmaxOptions, like: torch.Tensor):
    """The per-feature weights (F,) that turn phi_k into phi_q: [a0, a1 scale, a2 scale^2]."""
    opts = dict(dtype=like.dtype, device=like.device)
    scale = options.scale
    pieces = [torch.full((1,), options.a0, **opts), torch.full((dim,), options.a1 * scale, **opts)]
    if options.p == 2:
        pieces.append(torch.full((dim * (dim + 1) // 2,), options.a2 * scale * scale, **opts))
    return torch.cat(pieces)


class _Problem:
    """Inputs of one call, upcast and arranged for grouped-query broadcasting.

    q: (B, Hk, G, Nq, D); k: (B, Hk, 1, Nk, D); v: (B, Hk, 1, Nk, Dv); m: (B, 1, 1, Nk) or None.

    ``lag`` (causal only) moves every query ``lag`` positions back on the key timeline: query i
    then sees the keys j <= t_i - lag. The hybrid window (``fastmax_hf.window``) takes the
    fastmax part of its keys that way, lag = W; plain fastmax has lag = 0.
    """

    def __init__(self, q, k, v, key_padding_mask, causal, options: FastmaxOptions, lag: int = 0):
        B, Hq, Nq, D = q.shape
        Hk, Nk = k.shape[1], k.shape[2]
        self.compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cd = self.compute_dtype
        self.zero = torch.zeros((), dtype=cd, device=q.device)
        # valid: (B, 1, 1, Nk) bool, True = a real key. Padded keys are replaced by zeros by
        # selection, so that nothing they hold (not even inf or NaN) enters a product.
        self.valid = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        self.q = q.to(cd).reshape(B, Hk, Hq // Hk, Nq, D)
        self.k = self._select_valid(k.to(cd).unsqueeze(2))
        self.v = self._select_valid(v.to(cd).unsqueeze(2))
        # finite inputs skip the per-tile search for non-finite rows (see selection.py)
        self.finite = bool(torch.isfinite(self.q).all() & torch.isfinite(self.k).all() & torch.isfinite(self.v).all())
        self.causal, self.options, self.p = causal, options, options.p
        self.Nq, self.Nk, self.D = Nq, Nk, D
        self.offset = Nk - Nq - lag  # query i sits at key position i + offset
        self.wq = _query_weights(D, options, self.q)
        self.finite_g = True  # whether the backward's g = do / d is finite (set by backward)

    def _select_valid(self, x):
        """x (B, Hk, 1, Nk, d) with padded keys replaced by zeros (selection, not a product)."""
        return x if self.valid is None else torch.where(self.valid[..., None], x, self.zero)

    def phi_q(self, q):
        return _key_features(q, self.p) * self.wq

    def phi_k(self, k, j0, j1):
        feats = _key_features(k, self.p)
        if self.valid is not None:
            feats = torch.where(self.valid[..., j0:j1, None], feats, self.zero)
        return feats

    def fold_keys(self, S, z, j0, j1):
        """The state (S, z) with keys [j0, j1) folded in (every one visible to the later queries)."""
        fk = self.phi_k(self.k[..., j0:j1, :], j0, j1)
        return S + fk.transpose(-1, -2) @ self.v[..., j0:j1, :], z + fk.sum(-2)

    def fold_queries(self, R, r, g, c, i0, i1):
        """The reverse state (R, r) with queries [i0, i1) folded in, summed over each group.

        A query row whose cotangent is 0 (g and c; see ``_surrogate_terms``) is left out by
        selection, so that a non-finite query nobody differentiates reaches no key's gradient."""
        fq = self.phi_q(self.q[..., i0:i1, :])
        gc, cc = g[..., i0:i1, :], c[..., i0:i1]
        if not self.finite:  # (finite features times a zero cotangent are exactly zero already)
            active = (gc != 0).any(-1) | (cc != 0)
            fq = torch.where(active[..., None], fq, self.zero)
        R = R + (fq.transpose(-1, -2) @ gc).sum(2, keepdim=True)
        r = r + (fq * cc[..., None]).sum((2, 3)).unsqueeze(2)
        return R, r

    def keep(self, nq, nk, i0, j0):
        """Bool, broadcastable to (..., nq, nk): which pairs of queries from i0 and keys from j0
        are visible (a 0-dim True when every pair is)."""
        keep = None
        if self.causal:
            qpos = torch.arange(i0, i0 + nq, device=self.q.device) + self.offset
            kpos = torch.arange(j0, j0 + nk, device=self.q.device)
            keep = kpos[None, :] <= qpos[:, None]
        if self.valid is not None:
            pad = self.valid[..., None, j0 : j0 + nk]
            keep = pad if keep is None else keep & pad
        if keep is None:
            keep = torch.ones((), dtype=torch.bool, device=self.q.device)
        return keep

    def tile(self, q, k, i0, j0):
        """(A, keep): A = f(scale q k^T) on visible pairs (exactly 0 elsewhere, by selection),
        for queries from i0 and keys from j0, and the visibility ``keep`` that ``pairs`` needs."""
        keep = self.keep(q.shape[-2], k.shape[-2], i0, j0)
        # finite inputs: the selection of the weights below is all it takes (a product of
        # finite numbers with a selected 0 is exactly 0, forward and backward)
        scores = q @ k.transpose(-1, -2) if self.finite else masked_scores(q, k, keep)
        weights = torch.where(keep, self.options.kernel(self.options.scale * scores), self.zero)
        return weights, keep

    def pairs(self, A, x, keep):
        """sum_j A_ij x_j over the visible pairs only (see selection.masked_matmul); A is a
        ``tile``, already exactly 0 on the pairs not kept."""
        return A @ x if self.finite else masked_matmul(A, x, keep)

    def surrogate(self, qc, kc, vc, gc, cc, i0, j0):
        """sum over visible pairs of A_ij (g_i . v_j - c_i), every product taken by selection."""
        A, keep = self.tile(qc, kc, i0, j0)
        if self.finite and self.finite_g:
            return (A * (gc @ vc.transpose(-1, -2) - cc[..., None])).sum()
        gv = masked_scores(gc, vc, keep)
        return torch.where(keep, A * (gv - cc[..., None]), self.zero).sum()

    def visible_keys(self, i1):
        """Keys [0, n) that any query before i1 can see."""
        if not self.causal:
            return self.Nk
        return max(0, min(self.Nk, i1 + self.offset))

    def key_chunks(self, chunk):
        """(j0, j1, i0, i1): key chunks and the queries whose position falls inside them."""
        for j0 in range(0, self.Nk, chunk):
            j1 = min(j0 + chunk, self.Nk)
            i0 = min(max(j0 - self.offset, 0), self.Nq)
            i1 = min(max(j1 - self.offset, 0), self.Nq)
            yield j0, j1, i0, i1


def _forward_quadratic(P: _Problem, chunk: int):
    out = P.q.new_zeros(P.q.shape[:-1] + (P.v.shape[-1],))
    den = P.q.new_zeros(P.q.shape[:-1])
    for i0 in range(0, P.Nq, chunk):
        i1 = min(i0 + chunk, P.Nq)
        n = P.visible_keys(i1)
        if n == 0:
            continue
        A, keep = P.tile(P.q[..., i0:i1, :], P.k[..., :n, :], i0, 0)
        out[..., i0:i1, :] = P.pairs(A, P.v[..., :n, :], keep)
        den[..., i0:i1] = A.sum(-1)
    return out, den


def _forward_linear(P: _Problem, chunk: int, initial_state=None, return_state: bool = False):
    """(numerator, denominator), and the final state (S, z) with ``return_state``;
    ``initial_state`` = (S, z) (B, Hk, F, Dv), (B, Hk, F) is what came before the keys."""
    out = P.q.new_zeros(P.q.shape[:-1] + (P.v.shape[-1],))
    den = P.q.new_zeros(P.q.shape[:-1])
    B, Hk = P.k.shape[:2]
    F = P.wq.shape[0]
    if initial_state is None:
        S = P.q.new_zeros(B, Hk, 1, F, P.v.shape[-1])
        z = P.q.new_zeros(B, Hk, 1, F)
    else:
        S, z = (t.to(P.compute_dtype).unsqueeze(2) for t in initial_state)
    if P.causal:
        for j0, j1, i0, i1 in P.key_chunks(chunk):
            if i1 > i0:
                qc, kc, vc = P.q[..., i0:i1, :], P.k[..., j0:j1, :], P.v[..., j0:j1, :]
                fq = P.phi_q(qc)
                A, keep = P.tile(qc, kc, i0, j0)
                out[..., i0:i1, :] = fq @ S + P.pairs(A, vc, keep)
                den[..., i0:i1] = (fq * z.unsqueeze(-2)).sum(-1) + A.sum(-1)
            S, z = P.fold_keys(S, z, j0, j1)
    else:
        for j0 in range(0, P.Nk, chunk):
            S, z = P.fold_keys(S, z, j0, min(j0 + chunk, P.Nk))
        for i0 in range(0, P.Nq, chunk):
            i1 = min(i0 + chunk, P.Nq)
            fq = P.phi_q(P.q[..., i0:i1, :])
            out[..., i0:i1, :] = fq @ S
            den[..., i0:i1] = (fq * z.unsqueeze(-2)).sum(-1)
    if return_state:
        return out, den, (S.squeeze(2), z.squeeze(2))
    return out, den


def _normalise(out, den):
    empty = den == 0
    safe = torch.where(empty, torch.ones_like(den), den)
    return torch.where(empty[..., None], torch.zeros_like(out), out / safe[..., None])


def _surrogate_terms(out, den, grad_out):
    """g = do / d and c = (do . o) / d, zero on rows without visible keys.

    Zero cotangents are kept exactly zero by selection: a row (or entry) that the loss does not
    read contributes nothing to any gradient, even where its output is inf or NaN (0 * NaN
    would otherwise carry a later token's NaN into the gradients of every key it saw)."""
    empty = den == 0
    safe = torch.where(empty, torch.ones_like(den), den)
    zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
    g = torch.where(empty[..., None] | (grad_out == 0), zero, grad_out / safe[..., None])
    c = torch.where(g == 0, zero, g * out).sum(-1)
    return g, c


def _backward_quadratic(P: _Problem, g, c, chunk):
    dq, dk, dv = torch.zeros_like(P.q), torch.zeros_like(P.k), torch.zeros_like(P.v)
    for i0 in range(0, P.Nq, chunk):
        i1 = min(i0 + chunk, P.Nq)
        n = P.visible_keys(i1)
        if n == 0:
            continue
        with torch.enable_grad():
            qc = P.q[..., i0:i1, :].detach().requires_grad_()
            kc = P.k[..., :n, :].detach().requires_grad_()
            vc = P.v[..., :n, :].detach().requires_grad_()
            L = P.surrogate(qc, kc, vc, g[..., i0:i1, :], c[..., i0:i1], i0, 0)
            gq, gk, gv = torch.autograd.grad(L, (qc, kc, vc))
        dq[..., i0:i1, :] = gq
        dk[..., :n, :] += gk
        dv[..., :n, :] += gv
    return dq, dk, dv


def _backward_linear(P: _Problem, g, c, chunk):
    dq, dk, dv = torch.zeros_like(P.q), torch.zeros_like(P.k), torch.zeros_like(P.v)
    B, Hk = P.k.shape[:2]
    F = P.wq.shape[0]
    Dv = P.v.shape[-1]

    # Forward sweep: query side of the surrogate (dq), plus the intra-chunk key side.
    S = P.q.new_zeros(B, Hk, 1, F, Dv)
    z = P.q.new_zeros(B, Hk, 1, F)
    if not P.causal:
        for j0 in range(0, P.Nk, chunk):
            S, z = P.fold_keys(S, z, j0, min(j0 + chunk, P.Nk))
        query_chunks = [(None, None, i0, min(i0 + chunk, P.Nq)) for i0 in range(0, P.Nq, chunk)]
    else:
        query_chunks = list(P.key_chunks(chunk))
    for j0, j1, i0, i1 in query_chunks:
        if i1 > i0:
            with torch.enable_grad():
                qc = P.q[..., i0:i1, :].detach().requires_grad_()
                gc, cc = g[..., i0:i1, :], c[..., i0:i1]
                fq = P.phi_q(qc)
                L = ((fq @ S) * gc).sum() - ((fq * z.unsqueeze(-2)).sum(-1) * cc).sum()
                if P.causal:
                    kc = P.k[..., j0:j1, :].detach().requires_grad_()
                    vc = P.v[..., j0:j1, :].detach().requires_grad_()
                    L = L + P.surrogate(qc, kc, vc, gc, cc, i0, j0)
                    gq, gk, gv = torch.autograd.grad(L, (qc, kc, vc))
                    dk[..., j0:j1, :] += gk
                    dv[..., j0:j1, :] += gv
                else:
                    (gq,) = torch.autograd.grad(L, (qc,))
            dq[..., i0:i1, :] = gq
        if P.causal:
            S, z = P.fold_keys(S, z, j0, j1)

    # Reverse sweep: key side from the queries of later chunks (all queries if not causal).
    R = P.q.new_zeros(B, Hk, 1, F, Dv)
    r = P.q.new_zeros(B, Hk, 1, F)
    if not P.causal:
        for i0 in range(0, P.Nq, chunk):
            R, r = P.fold_queries(R, r, g, c, i0, min(i0 + chunk, P.Nq))
        key_chunks = [(j0, min(j0 + chunk, P.Nk), 0, 0) for j0 in range(0, P.Nk, chunk)]
    else:
        key_chunks = list(P.key_chunks(chunk))[::-1]
    for j0, j1, i0, i1 in key_chunks:
        with torch.enable_grad():
            kc = P.k[..., j0:j1, :].detach().requires_grad_()
            vc = P.v[..., j0:j1, :].detach().requires_grad_()
            fk = P.phi_k(kc, j0, j1)
            L = ((fk @ R) * vc).sum() - (fk * r.unsqueeze(-2)).sum()
            gk, gv = torch.autograd.grad(L, (kc, vc))
        dk[..., j0:j1, :] += gk
        dv[..., j0:j1, :] += gv
        if P.causal and i1 > i0:
            R, r = P.fold_queries(R, r, g, c, i0, i1)
    return dq, dk, dv


def choose_mode(len_k: int, dim: int, p: int) -> str:
    return "quadratic" if len_k <= feature_count(dim, p) else "linear"


class _ChunkedFastmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, options, mode, chunk):
        P = _Problem(q, k, v, key_padding_mask, causal, options)
        forward_impl = _forward_quadratic if mode == "quadratic" else _forward_linear
        raw, den = forward_impl(P, chunk)
        out = _normalise(raw, den)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, den)
        ctx.settings = (causal, options, mode, chunk)
        B, Hq, Nq, _ = q.shape
        return out.reshape(B, Hq, Nq, v.shape[-1]).to(q.dtype), den.reshape(B, Hq, Nq)  # no -1: N or B may be 0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_den):
        q, k, v, key_padding_mask, out, den = ctx.saved_tensors
        causal, options, mode, chunk = ctx.settings
        P = _Problem(q, k, v, key_padding_mask, causal, options)
        grad_out = grad_out.to(P.compute_dtype).reshape(out.shape)
        g, c = _surrogate_terms(out, den, grad_out)
        P.finite_g = bool(torch.isfinite(g).all())
        backward_impl = _backward_quadratic if mode == "quadratic" else _backward_linear
        dq, dk, dv = backward_impl(P, g, c, chunk)
        dk, dv = P._select_valid(dk), P._select_valid(dv)  # a padded key has no gradient, whatever it holds
        return (
            dq.reshape(q.shape).to(q.dtype),
            dk.squeeze(2).to(k.dtype),
            dv.squeeze(2).to(v.dtype),
        ) + (None,) * 5  # key_padding_mask, causal, options, mode, chunk


def chunked_attention(
    q, k, v, options: FastmaxOptions, *, causal, key_padding_mask, mode="auto", chunk_size=DEFAULT_CHUNK
):
    """Fastmax core (no normalize/dropout/rpe): returns (out in q's dtype, fp32 denominator).

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), key_padding_mask bool (B, Nk) or None;
    ``options`` gives scale, p, a0, a1, a2 (q and k arrive already normalised when asked).
    """
    if mode == "auto":
        mode = choose_mode(k.shape[2], q.shape[-1], options.p)
    if mode not in ("linear", "quadratic"):
        raise ValueError(f"`mode` must be 'auto', 'linear' or 'quadratic', got {mode!r}")
    return _ChunkedFastmax.apply(q, k, v, key_padding_mask, causal, options, mode, chunk_size)


@torch.no_grad()
def chunked_step(q, k, v, S, z, options: FastmaxOptions, *, key_padding_mask, chunk_size=DEFAULT_CHUNK):
    """New tokens attend causally to themselves and to the state (S, z), then join it.

    One linear sweep: returns (out in q's dtype, S', z') with the state in S's dtype."""
    P = _Problem(q, k, v, key_padding_mask, True, options)
    raw, den, (S_new, z_new) = _forward_linear(P, chunk_size, initial_state=(S, z), return_state=True)
    B, Hq, n, _ = q.shape
    out = _normalise(raw, den).reshape(B, Hq, n, v.shape[-1]).to(q.dtype)
    return out, S_new.to(S.dtype), z_new.to(z.dtype)


@torch.no_grad()
def chunked_state(k, v, *, key_padding_mask, p, chunk_size=DEFAULT_CHUNK):
    """The fp32 state of a key/value sequence: S (B, Hk, F, Dv) and z (B, Hk, F)."""
    B, Hk, Nk, D = k.shape
    cd = torch.float64 if k.dtype == torch.float64 else torch.float32
    S = k.new_zeros(B, Hk, feature_count(D, p), v.shape[-1], dtype=cd)
    z = k.new_zeros(B, Hk, feature_count(D, p), dtype=cd)
    valid = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    zero = torch.zeros((), dtype=cd, device=k.device)
    for j0 in range(0, Nk, chunk_size):
        j1 = min(j0 + chunk_size, Nk)
        kc, vc = k[:, :, j0:j1].to(cd), v[:, :, j0:j1].to(cd)
        if valid is not None:  # padded keys removed by selection: nothing they hold enters the sums
            kc, vc = torch.where(valid[:, :, j0:j1], kc, zero), torch.where(valid[:, :, j0:j1], vc, zero)
        fk = _key_features(kc, p)
        if valid is not None:
            fk = torch.where(valid[:, :, j0:j1], fk, zero)
        S += fk.transpose(-1, -2) @ vc
        z += fk.sum(-2)
    return S, z


def state_readout(q, S, z, options: FastmaxOptions):
    """Answer queries q (B, Hq, n, D) from a state (S, z) without masking: (num, den) in fp32."""
    B, Hq, n, D = q.shape
    Hk = S.shape[1]
    cd = S.dtype
    wq = _query_weights(D, options, S)
    fq = _key_features(q.to(cd), options.p) * wq  # (B, Hq, n, F)
    fq = fq.reshape(B, Hk, Hq // Hk, n, -1)
    num = fq @ S.unsqueeze(2)  # (B, Hk, G, n, Dv)
    den = (fq * z[:, :, None, None, :]).sum(-1)
    return num.reshape(B, Hq, n, S.shape[-1]), den.reshape(B, Hq, n)


def fold_token_(S, z, k, v, valid, p: int) -> None:
    """S += phi_k(k) v^T, z += phi_k(k) in place for one token per sequence (k, v (B, Hk, 1, D / Dv));
    ``valid`` (B,) bool or None: rows marked False join nothing (their k and v removed by selection)."""
    cd = S.dtype
    kc, vc = k.to(cd), v.to(cd)
    if valid is not None:
        keep = valid[:, None, None, None]
        zero = torch.zeros((), dtype=cd, device=S.device)
        kc, vc = torch.where(keep, kc, zero), torch.where(keep, vc, zero)
    fk = _key_features(kc, p)  # (B, Hk, 1, F)
    if valid is not None:
        fk = torch.where(keep, fk, zero)
    S.add_(fk.transpose(-1, -2) @ vc)
    z.add_(fk[:, :, 0])


@torch.no_grad()
def chunked_decode_step_(q, k, v, S, z, options: FastmaxOptions, *, key_valid=None):
    """One new token per sequence (q (B, Hq, 1, D), k, v (B, Hk, 1, D / Dv)) attends to the
    state and itself and joins it, S and z updated in place; returns out (B, Hq, 1, Dv).

    ``key_valid`` (B,) bool: False = a padded token, which attends but joins nothing (its
    features are zero by selection). The PyTorch twin of the Triton decoding step."""
    fold_token_(S, z, k, v, key_valid, options.p)
    num, den = state_readout(q, S, z, options)
    return _normalise(num, den).to(q.dtype)
