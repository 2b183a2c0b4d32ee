"""Launch parameters and scratch budgets of the kernels: one frozen object, changed only through here.

    from fastmax_hf import kernels
    print(kernels.current_settings())
    with kernels.settings(quad_fwd_block_n=128, linear_chunk=1024):   # a benchmark sweep
        ...

``None`` means "chosen by the launcher for the shapes and dtype" (the measured defaults).
Unknown names or bad values raise a ValueError naming them; the previous settings are
restored when the ``with`` block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSettings:
    # quadratic (tile) kernels: query rows and key rows per tile, warps, pipeline depth
    quad_fwd_block_m: int | None = None
    quad_fwd_block_n: int | None = None
    quad_fwd_warps: int | None = None
    quad_fwd_stages: int | None = None
    # backward: the kernel over key blocks (dk, dv) and the one over query blocks (dq)
    quad_dkdv_block_m: int | None = None
    quad_dkdv_block_n: int | None = None
    quad_dkdv_warps: int | None = None
    quad_dkdv_stages: int | None = None
    quad_dq_block_m: int | None = None
    quad_dq_block_n: int | None = None
    quad_dq_warps: int | None = None
    quad_dq_stages: int | None = None
    # True: the key-block kernel also adds every tile's dq into an fp32 accumulator (five
    # products per tile pair instead of seven, no dq kernel); False: the separate dq kernel;
    # None: the measured default for the GPU
    quad_dq_fused: bool | None = None
    # the hybrid window's band kernels (kernels/window.py): query rows and key rows per tile
    window_block_m: int | None = None
    window_block_n: int | None = None
    window_warps: int | None = None
    # linear (chunked state) kernels: tokens per chunk; the per-chunk state kernel's rows per
    # step, value columns per program, warps and stages; the readouts' query rows and key rows
    # per tile, warps and stages (the forward readout's; the dq and dk/dv readouts' own
    # warps and stages where given, and the dk/dv readout's own query rows per diagonal tile)
    linear_chunk: int | None = None
    linear_state_block_k: int | None = None
    linear_state_block_dv: int | None = None
    linear_state_warps: int | None = None
    linear_state_stages: int | None = None
    linear_block_m: int | None = None
    linear_block_n: int | None = None
    linear_warps: int | None = None
    linear_stages: int | None = None
    linear_dq_warps: int | None = None
    linear_dq_stages: int | None = None
    linear_dkdv_warps: int | None = None
    linear_dkdv_stages: int | None = None
    linear_dkdv_block_m: int | None = None
    # True: the forward's per-chunk key states are kept for the backward (its dq readout reads
    # them instead of recomputing them: one state pass and one scan fewer); False: recomputed;
    # None: kept where they take no more memory than q, k, v, o and their gradients (always
    # without a causal mask, where one total state per head is kept)
    linear_keep_states: bool | None = None
    # normalize's scaling of q and k (``fastmax(..., normalize=True)`` on the kernels): True on
    # the kernels of kernels/normalize.py (four launches for q and k together per forward+backward
    # instead of about forty PyTorch operations); False or None (the default until it is timed on a GPU):
    # the PyTorch form (fastmax_hf.stages._ScaleByPeak). torch.compile always traces the latter.
    fused_normalize: bool | None = None
    # scratch of the linear kernels (per-chunk states): past scratch_min_bytes, key/value heads
    # run in groups whose scratch stays under scratch_fraction of the size of q, k, v, o and
    # their gradients
    scratch_fraction: float = 0.2
    scratch_min_bytes: int = 3 << 30

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("quad_dq_fused", "linear_keep_states", "fused_normalize"):
                if value is not None and not isinstance(value, bool):
                    raise ValueError(f"kernel setting `{field.name}` must be True, False or None, got {value!r}")
                continue
            if field.name == "scratch_fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ValueError(f"kernel setting `scratch_fraction` must be a number in [0, 1], got {value!r}")
                continue
            if value is None and field.default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"kernel setting `{field.name}` must be a positive integer"
                                 f"{' or None' if field.default is None else ''}, got {value!r}")
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if value is None or not (name.endswith("_warps") or "block" in name or name == "linear_chunk"):
                continue
            if value & (value - 1):
                raise ValueError(f"kernel setting `{name}` must be a power of 2, got {value}")
            if ("block" in name or name == "linear_chunk") and value < 16:
                raise ValueError(f"kernel setting `{name}` must be at least 16 (the tensor cores' tile), got {value}")


_current = KernelSettings()


def current_settings() -> KernelSettings:
    """The settings the next launch uses."""
    return _current


def names() -> list[str]:
    return [field.name for field in dataclasses.fields(KernelSettings)]


def _replaced(changes: dict) -> KernelSettings:
    unknown = sorted(set(changes) - set(names()))
    if unknown:
        raise ValueError(f"unknown kernel setting(s) {unknown}; known: {names()}")
    return dataclasses.replace(_current, **changes)


def set_settings(**changes) -> KernelSettings:
    """Change settings for the rest of the process; returns the previous ones."""
    global _current
    previous, _current = _current, _replaced(changes)
    return previous


@contextlib.contextmanager
def settings(**changes):
    """Change settings inside a ``with`` block (benchmarks, checks of a rarely taken path)."""
    global _current
    previous = _current
    _current = _replaced(changes)
    try:
        yield _current
    finally:
        _current = previous
