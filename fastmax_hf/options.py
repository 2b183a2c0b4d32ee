"""The kernel's coefficients and score scale, as one frozen object.

Every public entry point (``fastmax``, ``fastmax_step``, the seed API, the Hugging Face
attention function) resolves its loose arguments into a ``FastmaxOptions`` once, through
``FastmaxOptions.resolve``, and passes that object down: to the reference, to the PyTorch
chunked form and to the Triton kernels (which read its attributes and know nothing else of
this package).

    f(s) = a0 + a1 s + a2 s^2   (p = 2)     f(s) = a0 + a1 s   (p = 1)
    s_ij = (q_i . k_j) * scale
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import check_options, kernel_can_vanish


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
    """

    scale: float
    p: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    normalize: bool = False
    lim: float = 1.0

    @classmethod
    def resolve(cls, dim: int, *, scale: float | None = None, p: int = 2, a0: float = 1.0, a1: float = 1.0,
                a2: float = 0.5, normalize: bool = False, lim: float = 1.0) -> "FastmaxOptions":
        """Validated options for head dim ``dim``; ``scale=None`` means ``default_scale(dim)``."""
        check_options(p=p, a0=a0, a1=a1, a2=a2, dropout=0.0, lim=lim, scale=scale, backend="auto")
        if not isinstance(normalize, bool):
            raise TypeError(f"`normalize` must be a bool, got {normalize!r}")
        resolved_scale = default_scale(dim) if scale is None else float(scale)
        return cls(scale=resolved_scale, p=int(p), a0=float(a0), a1=float(a1), a2=float(a2),
                   normalize=normalize, lim=float(lim))

    def score_bound(self) -> float | None:
        """A bound on |s| when ``normalize`` provides one, else None."""
        return self.lim * self.lim * abs(self.scale) if self.normalize else None

    def can_vanish(self) -> bool:
        """Whether some reachable score makes f(s) <= 0, so that a denominator can reach 0."""
        return kernel_can_vanish(self.p, self.a0, self.a1, self.a2, self.score_bound())

    def kernel(self, s):
        """f(s), elementwise on a tensor or number."""
        out = self.a0 + self.a1 * s
        if self.p == 2:
            out = out + self.a2 * s * s
        return out
