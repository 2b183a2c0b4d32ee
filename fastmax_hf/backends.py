"""Which implementation computes a call: decided here, and only here.

    "reference"  the direct O(N^2) form (reference.py): any dtype, every option; the only
                 one that adds relative position vectors (rpe_matrix)
    "chunked"    PyTorch, linear time, O(N) memory (chunked.py): any device, any float dtype
    "triton"     the fused kernels (fastmax_hf.kernels, source in kernels/): CUDA tensors of
                 TRITON_DTYPES; CPU tensors too under TRITON_INTERPRET=1 (Triton's interpreter,
                 which the CPU test-suite uses)

``backend="auto"`` takes Triton for CUDA tensors, the reference when an rpe_matrix is given
and the chunked form otherwise. Nothing is silently slower: when CUDA tensors cannot take the
kernels, the chunked form runs and a warning (once per reason) says why and how to fix it;
a kernels module that fails to import (missing, or broken: any exception) or a triton that
fails to import is named with its import error. An explicit ``backend="triton"`` that cannot
run is a ValueError naming the reason, chained to that import error.

A hybrid ``window`` (``fastmax_hf.window``) runs on the Triton kernels like any other call;
its recurrent step (the window's key/value tail beside the state) has no Triton form yet:
there "triton" is refused, and "auto" runs the chunked step (with a warning, once, for CUDA
tensors).

``fastmax``, ``fastmax_step`` and the Hugging Face cache (through ``step_with_options``) all
call ``choose_backend``.
"""

from __future__ import annotations

import os

import torch

from .notices import warn_once

BACKENDS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")


def _import_kernels():
    """The module ``fastmax_hf.kernels`` (a function of its own so that tests can make it fail)."""
    from . import kernels

    return kernels


def _import_triton():
    """The module ``triton`` (a function of its own so that tests can make it fail)."""
    import triton

    return triton


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _triton_problem(device: torch.device, dtype: torch.dtype) -> tuple[str | None, BaseException | None]:
    """(why the Triton kernels cannot take tensors of ``device`` and ``dtype``, with how to fix
    it, or None when they can; and the exception behind it, when an import failed).

    A kernels module that is missing or broken (any exception while importing it, not only an
    ImportError) and a triton that does not import are reported with their own error message."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return f"the Triton kernels need a CUDA device, got {device}", None
    if dtype not in TRITON_DTYPES:
        return (f"the Triton kernels take float16, bfloat16 or float32 inputs, got {dtype}: cast the inputs "
                "(or the model) to one of those"), None
    try:
        kernels = _import_kernels()
    except Exception as error:  # noqa: BLE001 - a broken module can raise anything while importing
        return (f"fastmax_hf.kernels cannot be imported ({_describe(error)}): install the package from the "
                "repository root with `pip install -e .`"), error
    if not kernels.HAS_TRITON:
        try:  # the kernels swallow triton's import error: recover it, for the message
            _import_triton()
            error = None
        except Exception as triton_error:  # noqa: BLE001
            error = triton_error
        detail = f" (importing it failed with {_describe(error)})" if error is not None else ""
        return f"triton is not installed{detail}: `pip install triton` (Linux; a dependency of the package there)", error
    return None, None


def triton_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take tensors of ``device`` and ``dtype`` (with how to fix
    it), or None when they can."""
    return _triton_problem(device, dtype)[0]


def triton_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` (and ``dtype``)."""
    return triton_refusal(device, dtype) is None


WINDOW_REFUSAL = (
    "the Triton kernels do not implement the recurrent step of `window` (the hybrid softmax window) yet: "
    "use backend='chunked' (the PyTorch step) or backend='auto'"
)


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, *, rpe_matrix: bool = False,
                   stateful: bool = False, window: bool = False) -> str:
    """The implementation that runs a call: "reference", "chunked" or "triton".

    Args:
        requested: the caller's ``backend``: "auto", "reference", "chunked" or "triton".
        device, dtype: those of q.
        rpe_matrix: whether the call adds relative position vectors (only the reference can).
        stateful: a recurrent step (``fastmax_step``, the cache). A state has no O(N^2) form,
            so "reference" there means the exact PyTorch step, "chunked".
        window: the call has a hybrid ``window`` (``fastmax_hf.window``). A whole call takes
            the usual choice; a recurrent step (``stateful``) with a window has only the PyTorch
            form: "triton" is refused, and "auto" on CUDA tensors runs the chunked step with a
            warning (once).

    Raises:
        ValueError naming the argument: an unknown backend, an rpe_matrix with a backend
        other than "reference"/"auto", a "triton" that cannot run here (and why).
    """
    check_backend(requested)
    if rpe_matrix:
        if requested not in ("auto", "reference"):
            raise ValueError(
                f"`rpe_matrix` is only supported by the exact O(N^2) path: use backend='reference' "
                f"(or 'auto'), not backend={requested!r}"
            )
        return "reference"
    if requested == "reference":
        return "chunked" if stateful else "reference"
    if requested == "chunked":
        return "chunked"
    if window and stateful:
        if requested == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {WINDOW_REFUSAL}")
        if device.type == "cuda":  # "auto": nothing silently slower
            warn_once(
                "backend-fallback:window",
                "fastmax: the recurrent step with `window` runs on the PyTorch path (backend='chunked') because "
                "the Triton kernels do not implement it yet. Pass backend='chunked' to choose that path "
                "explicitly and silence this warning.",
            )
        return "chunked"
    if requested == "triton":
        refusal, error = _triton_problem(device, dtype)
        if refusal is not None:
            # chained: the traceback shows the import error itself
            raise ValueError(f"backend='triton' cannot run this call: {refusal}") from error
        return "triton"
    # "auto"
    if device.type != "cuda":
        return "chunked"  # the PyTorch form is the one meant for CPU tensors: nothing to warn about
    refusal, _ = _triton_problem(device, dtype)
    if refusal is None:
        return "triton"
    warn_once(
        f"backend-fallback:{refusal}",
        f"fastmax: CUDA tensors run on the slower PyTorch path (backend='chunked') because {refusal}. "
        "Pass backend='chunked' to choose that path explicitly and silence this warning.",
    )
    return "chunked"
