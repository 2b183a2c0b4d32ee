"""Causal Fastmax continued from a constant-size state: prefill and token-by-token decoding.

A sequence's keys and values are summarised by

    S = sum_j phi_k(k_j) v_j^T   (B, Hk, F, Dv)    z = sum_j phi_k(k_j)   (B, Hk, F)

in fp32 (F = 1 + D + D(D+1)/2 for p = 2), whatever the number of tokens. New tokens
attend causally to each other and to everything folded into the state before them,
then are folded in. With ``normalize`` the state also carries the running maxima of
||q|| and ||k|| (the causal normalisation of ``fastmax``), so decoding normalises
exactly as a full causal pass would.

With a hybrid ``window`` W (``fastmax_hf.window``) the state also keeps the keys and values of
the last min(W, seen) positions, in order (``tail_k``, ``tail_v``, ``tail_valid``): the new tokens
attend to those by exact softmax and to (S, z) by fastmax; a position that falls more than W
behind the newest token leaves the tail and is folded into (S, z). The state stays constant in
size: F x Dv + W x (D + Dv) per key/value head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .backends import choose_backend
from .chunked import chunked_decode_step_, chunked_step, feature_count
from .options import FastmaxOptions
from .stages import norm_scale
from .validation import check_window_gain_tensor
from .window import pad_tail, window_decode_step_, window_step


@dataclass
class FastmaxState:
    """The recurrent state of one attention layer."""

    S: torch.Tensor  # (B, Hk, F, Dv) fp32
    z: torch.Tensor  # (B, Hk, F) fp32
    q_peak: torch.Tensor | None = None  # (B, Hq) running max ||q|| (normalize only)
    k_peak: torch.Tensor | None = None  # (B, Hk) running max ||k|| over unpadded keys (normalize only)
    # "torch": features [1, k, sym(k k^T)] of fastmax_hf.chunked; "triton": the tiled rows of
    # fastmax_hf.kernels (see kernels/linear.py). A state is continued by the path that made it.
    layout: str = "torch"
    # hybrid window only (``window`` = W): the last L = min(W, seen) positions, oldest first (all W,
    # the missing oldest marked False, once ``with_full_tail`` has run: in-place decoding)
    window: int | None = None
    tail_k: torch.Tensor | None = None  # (B, Hk, L, D) in the keys' dtype (normalised keys with normalize)
    tail_v: torch.Tensor | None = None  # (B, Hk, L, Dv)
    tail_valid: torch.Tensor | None = None  # (B, L) bool, False = a padded position

    @classmethod
    def empty(cls, batch, heads_q, heads_kv, dim, dim_v, p, device, normalize=False, dtype=torch.float32,
              window=None, tail_dtype=None):
        """fp32 state (float64 only for float64 models, as the tests use); with a ``window``, an
        empty tail of keys/values in ``tail_dtype`` (the keys' dtype)."""
        F = feature_count(dim, p)
        S = torch.zeros(batch, heads_kv, F, dim_v, dtype=dtype, device=device)
        z = torch.zeros(batch, heads_kv, F, dtype=dtype, device=device)
        state = cls(S, z)
        if normalize:
            peaks = dict(dtype=dtype, device=device)
            state.q_peak, state.k_peak = torch.zeros(batch, heads_q, **peaks), torch.zeros(batch, heads_kv, **peaks)
        if window is not None:
            tail = dict(dtype=tail_dtype or dtype, device=device)
            state.window = window
            state.tail_k = torch.zeros(batch, heads_kv, 0, dim, **tail)
            state.tail_v = torch.zeros(batch, heads_kv, 0, dim_v, **tail)
            state.tail_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        return state

    def tensors(self):
        held = (self.S, self.z, self.q_peak, self.k_peak, self.tail_k, self.tail_v, self.tail_valid)
        return [t for t in held if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def with_full_tail(self) -> "FastmaxState":
        """A hybrid-window state whose tail has all W positions (``window.pad_tail``: the missing
        oldest ones marked False), the form ``decode_step_`` updates in place. Same sums."""
        if self.window is None or self.tail_k.shape[2] == self.window:
            return self
        tail_k, tail_v, tail_valid = pad_tail(self.tail_k, self.tail_v, self.tail_valid, self.window)
        return dataclasses.replace(self, tail_k=tail_k, tail_v=tail_v, tail_valid=tail_valid)

    def index_select(self, batch_index: torch.Tensor) -> "FastmaxState":
        pick = lambda t: None if t is None else t.index_select(0, batch_index.to(t.device))  # noqa: E731
        return FastmaxState(pick(self.S), pick(self.z), pick(self.q_peak), pick(self.k_peak), self.layout,
                            self.window, pick(self.tail_k), pick(self.tail_v), pick(self.tail_valid))


def _running_normalize(x, prev_peak, lim, valid=None):
    """x (B, H, n, D) scaled by lim / max(prev_peak, running max ||x||); returns (x', new peak)."""
    factor, peak = norm_scale(x, lim, causal=True, valid=valid, prev_peak=prev_peak)
    return x * factor, peak


def fastmax_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: FastmaxState | None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    p: int = 2,
    a0: float = 1.0,
    a1: float = 1.0,
    a2: float = 0.5,
    normalize: bool = False,
    lim: float = 1.0,
    backend: str = "auto",
    window: int | None = None,
    window_gain: float | torch.Tensor = 1.0,
):
    """Attend causally with n new tokens and fold them into the state (no gradient flows).

    Args:
        q: (B, Hq, n, D) queries of the new tokens.
        k, v: (B, Hk, n, D), (B, Hk, n, Dv) their keys and values.
        state: what came before, or None for an empty past.
        key_padding_mask: bool (B, n), True = a real token; padded keys never enter the state.
        scale, p, a0, a1, a2, normalize, lim: as for ``fastmax`` (scale=None: 1/sqrt(D)).
        window, window_gain: the hybrid window of ``fastmax`` (PyTorch path only): the state
            keeps the last W positions' keys and values beside (S, z). A state is continued with
            the window it was built with.
        backend: for a new state, "triton" (the fused kernels), "chunked" (PyTorch; also what
            "reference" means here, a state having no O(N^2) form) or "auto" (Triton for
            float16/bfloat16/float32 CUDA tensors; see ``fastmax_hf.backends``). A given state
            is continued by the path that built it.

    Returns:
        (out (B, Hq, n, Dv) in q's dtype, the new state). The state's tensors are new
        tensors; the old state is left untouched (beam search may still hold it).
    """
    options = FastmaxOptions.resolve(q.shape[-1], scale=scale, p=p, a0=a0, a1=a1, a2=a2, normalize=normalize, lim=lim,
                                     window=window, window_gain=window_gain)
    return step_with_options(q, k, v, state, options, key_padding_mask=key_padding_mask, backend=backend)


@torch.no_grad()
def step_with_options(q, k, v, state: FastmaxState | None, options: FastmaxOptions, *, key_padding_mask=None,
                      backend: str = "auto"):
    """``fastmax_step`` for a caller that holds its ``FastmaxOptions`` already (the cache)."""
    B, Hq, n, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    if k.shape[2] != n:
        raise ValueError(f"`k` must hold the same {n} new tokens as `q`, got {k.shape[2]}")
    check_window_gain_tensor(options.window_gain, Hq, q.device)
    if state is not None and state.window != options.window:
        raise ValueError(f"`window`={options.window} but the state was built with window={state.window}: a state is "
                         "continued with the window it was built with")
    if state is None:
        implementation = choose_backend(backend, q.device, q.dtype, stateful=True, window=options.window is not None)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        state = FastmaxState.empty(B, Hq, Hk, D, Dv, options.p, q.device, normalize=options.normalize, dtype=dtype,
                                   window=options.window, tail_dtype=k.dtype)
        if implementation == "triton":
            from .kernels import empty_state

            state.S, state.z = empty_state(B, Hk, D, Dv, options.p, q.device)
            state.layout = "triton"
    if options.normalize:
        if state.q_peak is None:
            raise ValueError("`state` was built without normalize=True but `normalize` is set")
        q, q_peak = _running_normalize(q, state.q_peak, options.lim, key_padding_mask)
        k, k_peak = _running_normalize(k, state.k_peak, options.lim, key_padding_mask)
    else:
        q_peak = k_peak = None

    if state.layout == "triton":
        from .kernels import triton_step

        out, S, z = triton_step(q, k, v, state.S, state.z, options, key_padding_mask=key_padding_mask)
        return out, FastmaxState(S, z, q_peak, k_peak, "triton")

    if options.window is not None:
        out, S, z, tail_k, tail_v, tail_valid = window_step(
            q, k, v, state.S, state.z, state.tail_k, state.tail_v, state.tail_valid, options,
            key_padding_mask=key_padding_mask)
        return out, FastmaxState(S, z, q_peak, k_peak, "torch", options.window, tail_k, tail_v, tail_valid)

    out, S, z = chunked_step(q, k, v, state.S, state.z, options, key_padding_mask=key_padding_mask)
    return out, FastmaxState(S, z, q_peak, k_peak)


@torch.no_grad()
def decode_step_(q, k, v, state: FastmaxState, options: FastmaxOptions, *, key_valid=None) -> torch.Tensor:
    """One new token per sequence, folded into ``state`` in place; returns out (B, Hq, 1, Dv).

    Unlike ``fastmax_step`` the state's tensors are updated where they lie and keep their
    addresses, and nothing is read back to the host: what a captured CUDA graph replays
    (``FastmaxCache(static=True)``). ``key_valid`` (B,) bool: False = this token is padding
    (it attends and joins nothing). A hybrid-window state needs its tail at full length W
    (``FastmaxState.with_full_tail``)."""
    if q.shape[2] != 1 or k.shape[2] != 1 or v.shape[2] != 1:
        raise ValueError(f"decode_step_ takes one new token per sequence, got `q` {tuple(q.shape)}")
    if state.window is not None and state.tail_k.shape[2] != state.window:
        raise ValueError(f"a hybrid-window state decoded in place needs a tail of {state.window} positions, this one "
                         f"has {state.tail_k.shape[2]}: call `state.with_full_tail()` first")
    if state.window != options.window:
        raise ValueError(f"`window`={options.window} but the state was built with window={state.window}")
    if options.normalize:
        if state.q_peak is None:
            raise ValueError("`state` was built without normalize=True but `normalize` is set")
        valid = None if key_valid is None else key_valid[:, None]
        q, q_peak = _running_normalize(q, state.q_peak, options.lim, valid)
        k, k_peak = _running_normalize(k, state.k_peak, options.lim, valid)
        state.q_peak.copy_(q_peak)
        state.k_peak.copy_(k_peak)
    if state.window is not None:
        return window_decode_step_(q, k, v, state.S, state.z, state.tail_k, state.tail_v, state.tail_valid, options,
                                   key_valid=key_valid)
    if state.layout == "triton":
        from .kernels import decode_step_ as triton_decode_step_

        return triton_decode_step_(q, k, v, state.S, state.z, options, key_valid=key_valid)
    return chunked_decode_step_(q, k, v, state.S, state.z, options, key_valid=key_valid)
