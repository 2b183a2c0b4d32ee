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

from dataclasses import dataclass

from .validation import check_kernel_options, check_scale


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

    Construction validates every field (a ValueError or TypeError naming it).
    """

    scale: float
    p: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    normalize: bool = False
    lim: float = 1.0

    def __post_init__(self):
        check_scale(self.scale)
        check_kernel_options(p=self.p, a0=self.a0, a1=self.a1, a2=self.a2, normalize=self.normalize, lim=self.lim)

    @classmethod
    def resolve(cls, dim: int, *, scale: float | None = None, p: int = 2, a0: float = 1.0, a1: float = 1.0,
                a2: float = 0.5, normalize: bool = False, lim: float = 1.0) -> "FastmaxOptions":
        """Validated options for head dim ``dim``; ``scale=None`` means ``default_scale(dim)``."""
        check_scale(scale, allow_none=True)  # before float(), which would take True or "2"
        resolved_scale = default_scale(dim) if scale is None else float(scale)
        return cls(scale=resolved_scale, p=p, a0=a0, a1=a1, a2=a2, normalize=normalize, lim=lim)

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
