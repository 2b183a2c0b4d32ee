"""What every section does as it goes through the lengths: skip what is over budget or would run
out of memory, recognise and clean up after out-of-memory errors, share records between processes."""

from __future__ import annotations

import gc
import math

import torch
from accelerate.utils import gather_object


def share(records: list) -> list:
    """Every process's records, concatenated in process order, on every process.

    Each process then updates its copy of the results identically, so decisions taken from
    them (what to skip next) agree and no process waits forever in a collective.
    """
    return gather_object(records)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors of the CPU allocator and cuBLAS that mean the same."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def skip_reason(done: dict, length: int, max_seconds: float | None) -> str | None:
    """Why ``length`` need not be tried, given this implementation's results at shorter lengths.

    After an out-of-memory error, longer lengths would fail too. With a time budget, the next
    time is extrapolated from the last two lengths as t ~ length^e, e clamped to [1, 2]
    (attention costs grow at least linearly and at most quadratically; one point: e = 1).
    """
    shorter = sorted((int(n), r) for n, r in done.items() if int(n) < length and "skipped" not in r)
    if any(r.get("out_of_memory") for _, r in shorter):
        return f"out of memory at {min(n for n, r in shorter if r.get('out_of_memory'))} tokens"
    timed = [(n, r["seconds"]) for n, r in shorter if "seconds" in r]
    if max_seconds is None or not timed:
        return None
    (n1, t1), (n0, t0) = timed[-1], timed[-2] if len(timed) > 1 else (None, None)
    exponent = 1.0 if n0 is None or t0 <= 0 else min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    predicted = t1 * (length / n1) ** exponent
    if predicted > max_seconds:
        return f"predicted {predicted:.0f} s > --max_seconds_per_point {max_seconds:g}"
    return None
