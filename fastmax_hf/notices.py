"""Warnings that are worth saying once per process, not once per attention call."""

from __future__ import annotations

import warnings

# The keys of the warnings already given (a test may discard a key to see its warning again).
WARNED: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message, stacklevel=stacklevel)`` as if called by the caller, the first time ``key`` is seen.

    The default 2 points the warning at the code that called the function that warns."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(message, stacklevel=stacklevel + 1)  # + 1: this function's own frame
