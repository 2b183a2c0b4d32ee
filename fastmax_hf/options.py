"""The kernel's coefficients and score scale, as one frozen object.

Every public entry point (``fastmax``, ``fastmax_step``, ``fastmax_reference``, the seed API,
the Hugging Face attention function through ``FastmaxConfig.options_for``) resolves its loose
arguments into a ``FastmaxOptions`` once and passes that object down: to the reference, to
the PyTorch chunked form, to the recurrent step and to the Triton kernels (which read its
attributes ``scale``, ``p``, ``a0``, ``a1``, ``a2`` and know nothing else of this package).

    f(s) = a0 + a1 s + a2 s^2   (p = 2)     f(s) = a0 + a1 s   (p = 1)
    s_ij = (q_i . k_j) * scale
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .validation import check_kernel_options, check_scale, check_window, check_window_gain


def default_scale(dim: int) -> float:
    """The score scale when none is given: 1/sqrt(D), as in SDPA. The one place it is decided."""
    return dim ** -0.5


@dataclass(frozen=True)
class FastmaxOptions:
    """What the function computes, apart from its inputs and masks.

    Attributes:
        scale: s_ij = (q_i . k_j) * scale.
        p: 2 (a0 + a1 s + a2 s^2, the default 2nd-order Taylor expansion of exp) or 1 (a0 + a1 s).
        a0, a1, a2: the kernel's coefficients (a2 is unused when p = 1).
        normalize, lim: scale q and k by lim / max ||x_n|| first (the running maximum under a
            causal mask), so that |s| <= lim^2 * |scale|.
        window: None (plain fastmax) or W >= 1: the hybrid of ``fastmax_hf.window``, exact
            softmax over the last W visible positions and f(s) over the earlier ones (causal only).
        window_gain: gamma, the weight of the fastmax part against the softmax window: a positive
            number or a floating tensor of shape () or (Hq,) (per head, differentiable). Unused
            without a window. Not part of equality (a tensor has no truth value).

    Construction validates every field (a ValueError or TypeError naming it).
    """

    scale: float
    p: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    normalize: bool = False
    lim: float = 1.0
    window: int | None = None
    window_gain: float | torch.Tensor = field(default=1.0, compare=False)

    def __post_init__(self):
        check_scale(self.scale)
        check_kernel_options(p=self.p, a0=self.a0, a1=self.a1, a2=self.a2, normalize=self.normalize, lim=self.lim)
        check_window(self.window)
        check_window_gain(self.window_gain)

    @classmethod
    def resolve(cls, dim: int, *, scale: float | None = None, p: int = 2, a0: float = 1.0, a1: float = 1.0,
                a2: float = 0.5, normalize: bool = False, lim: float = 1.0, window: int | None = None,
                window_gain: float | torch.Tensor = 1.0) -> "FastmaxOptions":
        """Validated options for head dim ``dim``; ``scale=None`` means ``default_scale(dim)``."""
        check_scale(scale, allow_none=True)  # before float(), which would take True or "2"
        resolved_scale = default_scale(dim) if scale is None else float(scale)
        return cls(scale=resolved_scale, p=p, a0=a0, a1=a1, a2=a2, normalize=normalize, lim=lim, window=window,
                   window_gain=window_gain)

    def kernel(self, s):
        """f(s), elementwise on a tensor or a number."""
        out = self.a0 + self.a1 * s
        if self.p == 2:
            out = out + self.a2 * s * s
        return out

    def formula(self) -> str:
        """f(s) written out, for error messages: '1.0 + 1.0*s + 0.5*s^2'."""
        return f"{self.a0} + {self.a1}*s" + (f" + {self.a2}*s^2" if self.p == 2 else "")

    def score_bound(self, *, rpe: bool = False) -> float | None:
        """A bound on |s| when ``normalize`` provides one, else None.

        Relative position vectors (``rpe``) are added to the keys after normalisation, so
        with them normalisation bounds nothing."""
        if not self.normalize or rpe:
            return None
        return self.lim * self.lim * abs(self.scale)

    def can_vanish(self, *, rpe: bool = False) -> bool:
        """Whether some reachable score makes f(s) <= 0, so that a denominator can reach 0.

        The one place this is decided: ``fastmax`` checks its denominators when it is True,
        and the recurrent state (which cannot check them) is refused."""
        bound = self.score_bound(rpe=rpe)
        if bound is None:  # every real s is reachable
            if self.p == 1 or self.a2 == 0:
                return not (self.a1 == 0 and self.a0 > 0)
            if self.a2 < 0:
                return True
            return self.a1 * self.a1 - 4.0 * self.a0 * self.a2 >= 0  # the upward parabola has a real root
        # |s| <= bound: the minimum of f sits at an end of the interval or at the parabola's vertex
        candidates = [-bound, bound]
        if self.p == 2 and self.a2 != 0:
            vertex = -self.a1 / (2.0 * self.a2)
            if -bound < vertex < bound:
                candidates.append(vertex)
        return min(self.kernel(s) for s in candidates) <= 0
