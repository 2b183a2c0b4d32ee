"""Argument checks shared by every entry point.

Every check raises a ``ValueError`` or ``TypeError`` whose message names the
offending argument, so that bad input never turns into a wrong answer, a hang
or a device-side crash inside a kernel.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Shapes:
    """Sizes of a validated 4-D call: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv)."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    dim: int
    dim_v: int

    @property
    def groups(self) -> int:
        return self.heads_q // self.heads_kv


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; fastmax takes float16, bfloat16, float32 or float64"
        )


def check_qkv(q, k, v) -> Shapes:
    """Check q, k, v as 4-D tensors (3-D inputs are reshaped before this)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(
                f"`{name}` must have 3 dims (B*H, N, D) or 4 dims (B, H, N, D), got shape {tuple(x.shape)}"
            )
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k`, `v` are on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = q.shape
    Bk, Hk, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q has {B}, `k` has {Bk}, `v` has {Bv}")
    if Hv != Hk:
        raise ValueError(f"`k` has {Hk} heads but `v` has {Hv}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(
            f"`q` has {Hq} heads, which is not a multiple of the {Hk} key/value heads of `k` (grouped-query attention)"
        )
    if Nv != Nk:
        raise ValueError(f"`k` has {Nk} tokens but `v` has {Nv}")
    if Dk != D:
        raise ValueError(f"`q` has head dim {D} but `k` has {Dk}")
    if D == 0 or Dv == 0:
        raise ValueError("head dims of `q`, `k` and `v` must be positive")
    return Shapes(B, Hq, Hk, Nq, Nk, D, Dv)


def check_flag(name: str, value) -> bool:
    """A flag of the public API (``causal``, ``normalize``, the seed API's ``mask``,
    ``use_custom_gradient``, ...) is a Python ``bool``, and nothing else.

    ``causal="no"`` or ``causal=0`` would otherwise be read by truthiness (``"no"`` is causal).
    NumPy bools and 0-dim bool tensors are refused too, for one simple rule: pass
    ``bool(x)`` to use them. Returns the value; raises a TypeError naming the argument."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    return value


def check_finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}")


def check_kernel_options(*, p, a0, a1, a2, normalize, lim) -> None:
    """The kernel f(s) = a0 + a1 s (+ a2 s^2) and the normalisation of q and k."""
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"`p` must be 1 or 2, got {p!r}")
    for name, value in (("a0", a0), ("a1", a1), ("a2", a2), ("lim", lim)):
        check_finite_number(name, value)
    if lim <= 0:
        raise ValueError(f"`lim` must be positive, got {lim}")
    check_flag("normalize", normalize)


def check_window(window) -> None:
    """``window``: None (plain fastmax) or a positive Python int, the number of positions attended
    to by exact softmax (see ``fastmax_hf.window``)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"`window` must be None or a positive int, got {window!r} of type {type(window).__name__}")
    if window < 1:
        raise ValueError(f"`window` must be a positive int (at least 1), got {window}")


def check_window_causal(window, causal) -> None:
    """The hybrid window is defined for causal attention only: refuse it otherwise."""
    if window is not None and causal is not True:
        raise ValueError(
            f"`window`={window} needs causal=True: the hybrid window (exact softmax over the last W keys, fastmax "
            "over the earlier ones) is defined for causal attention only"
        )


def check_window_gain(gain) -> None:
    """``window_gain``: a positive finite number, or a floating tensor of shape () or (Hq,) (one
    gain per query head; its shape and positivity are checked per call, ``check_window_gain_tensor``)."""
    if isinstance(gain, torch.Tensor):
        if not gain.is_floating_point():
            raise TypeError(f"`window_gain` must be a floating tensor, got dtype {gain.dtype}")
        if gain.dim() > 1:
            raise ValueError(f"`window_gain` must be a number or a tensor of shape () or (Hq,), got {tuple(gain.shape)}")
        return
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
        raise TypeError(f"`window_gain` must be a positive finite number or a tensor, got {gain!r}")
    if gain <= 0:
        raise ValueError(f"`window_gain` must be positive, got {gain}")


# Gain tensors whose values were checked when they were made (a model config's per-layer gains,
# ``integration.config``): reading a tensor's values back is a device synchronisation, which every
# attention call of every decoding step would otherwise pay.
# (keyed by id, the tensor itself the weak value: tensors compare by value, not identity)
_CHECKED_GAINS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def mark_window_gain_checked(gain: torch.Tensor) -> torch.Tensor:
    """Record that ``gain``'s values are positive and finite (checked by the caller); returns it."""
    _CHECKED_GAINS[id(gain)] = gain
    return gain


WINDOW_GAIN_VALUES = "`window_gain` must be positive and finite in every head"


def check_window_gain_tensor(gain, heads_q: int, device) -> None:
    """A tensor ``window_gain`` against the call: shape () or (Hq,), q's device, every entry positive
    and finite (the values only for tensors not made by ``mark_window_gain_checked``'s callers)."""
    if not isinstance(gain, torch.Tensor):
        return
    if gain.dim() == 1 and gain.shape[0] != heads_q:
        raise ValueError(f"`window_gain` must have shape () or (Hq,) = ({heads_q},), got {tuple(gain.shape)}")
    if gain.device != device:
        raise ValueError(f"`window_gain` is on {gain.device} but `q` is on {device}")
    if torch.compiler.is_compiling():  # traced: a device-side assertion, no host read (no graph break)
        torch._assert_async((torch.isfinite(gain) & (gain > 0)).all(), WINDOW_GAIN_VALUES)
        return
    if _CHECKED_GAINS.get(id(gain)) is gain:
        return
    if not bool((torch.isfinite(gain) & (gain > 0)).all()):
        raise ValueError(WINDOW_GAIN_VALUES)


def check_scale(scale, *, allow_none: bool = False) -> None:
    """``allow_none``: where None stands for the default scale (``options.default_scale``)."""
    if scale is None and allow_none:
        return
    check_finite_number("scale", scale)


def check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}")


def check_key_padding_mask(mask, shapes: Shapes, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`key_padding_mask` must be a bool tensor of shape (B, Nk), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`key_padding_mask` must have dtype torch.bool (True = attend), got {mask.dtype}"
        )
    if tuple(mask.shape) != (shapes.batch, shapes.len_k):
        raise ValueError(
            f"`key_padding_mask` must have shape (B, Nk) = ({shapes.batch}, {shapes.len_k}), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"`key_padding_mask` is on {mask.device} but `q` is on {device}")
    return mask


def check_drop_noise(noise, out_shape, device) -> None:
    if noise is None:
        return
    _check_tensor("drop_noise", noise)
    if noise.device != device:
        raise ValueError(f"`drop_noise` is on {noise.device} but `q` is on {device}")
    try:
        torch.broadcast_shapes(tuple(noise.shape), tuple(out_shape))
    except RuntimeError:
        raise ValueError(
            f"`drop_noise` of shape {tuple(noise.shape)} does not broadcast to the output shape {tuple(out_shape)}"
        ) from None


def check_rpe_matrix(rpe, shapes: Shapes, device) -> None:
    if rpe is None:
        return
    _check_tensor("rpe_matrix", rpe)
    if rpe.device != device:
        raise ValueError(f"`rpe_matrix` is on {rpe.device} but `q` is on {device}")
    n_needed = max(shapes.len_q, shapes.len_k)
    if rpe.dim() != 2 or rpe.shape[1] != shapes.dim or rpe.shape[0] % 2 != 1 or rpe.shape[0] < 2 * n_needed - 1:
        raise ValueError(
            f"`rpe_matrix` must have shape (2M-1, D) with M >= max(Nq, Nk) = {n_needed} and D = {shapes.dim} "
            f"(see rpe_matrix_creator), got {tuple(rpe.shape)}"
        )
