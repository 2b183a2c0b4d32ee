"""What the maintainer tools share: errors against float64, timing, peak memory, NaN poisoning,
out-of-memory detection, kernel settings from the command line, and the metadata of a run.

Imported by the tools of this folder (``python tools/<tool>.py`` puts tools/ on sys.path).
Nothing here rebinds the kernels' globals: settings go through ``fastmax_hf.kernels.settings``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import torch

GiB = 2**30
MiB = 2**20


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (||actual|| when expected is all zeros)."""
    a, e = actual.detach().double(), expected.detach().double()
    diff, norm = (a - e).norm().item(), e.norm().item()
    return diff / norm if norm > 0 else diff


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` by triton.testing.do_bench (warmup and rep in ms)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_bench_ms(fn, warmup_calls: int = 3) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph: the GPU's time for
    the work with the host's launch cost taken out (``bench_ms`` times the eager calls, which
    wait on the host where the kernels are short). Warmed up on a side stream first, as
    capture requires; raises what the capture raises (an operation that cannot be captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def peak_mib(fn) -> float:
    """MiB that ``fn()`` allocates at its peak on the current CUDA device, above what existed before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def is_oom(err: BaseException) -> bool:
    """Whether an exception is the GPU running out of memory (torch's error or a wrapped message)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Poisoned:
    """While active, torch.empty / torch.empty_like return floating tensors filled with NaN, so an
    output element that a kernel never writes shows up as NaN. The originals come back on exit,
    also after an exception."""

    def __enter__(self):
        self._empty, self._empty_like = torch.empty, torch.empty_like

        def poison(t):
            if t.is_floating_point():
                t.fill_(math.nan)
            return t

        empty, empty_like = self._empty, self._empty_like
        torch.empty = lambda *a, **k: poison(empty(*a, **k))
        torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self._empty, self._empty_like
        return False


# ---------------------------------------------------------------------------- kernel settings


def json_object(text: str | None, what: str = "--settings") -> dict:
    """A JSON object from the command line ('' or None: empty); anything else is refused."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{what}: not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{what}: expected a JSON object of setting names, got {text!r}")
    return value


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", default=None,
                        help="JSON object of kernel settings for the whole run, passed to "
                             "fastmax_hf.kernels.settings, e.g. '{\"quad_block_n\": 128}' "
                             "(names: fastmax_hf.kernels.KernelSettings)")


@contextlib.contextmanager
def kernel_settings(changes: dict):
    """``with kernel_settings({...}):`` the kernels' settings changed for the block, through
    ``fastmax_hf.kernels.settings``; an unknown name or a bad value exits with its message."""
    from fastmax_hf import kernels

    with contextlib.ExitStack() as stack:
        try:
            active = stack.enter_context(kernels.settings(**changes))
        except ValueError as err:
            raise SystemExit(f"kernel settings {changes}: {err}") from None
        yield active


def settings_record() -> dict:
    """The settings the kernels use now, as a plain dict (for results files)."""
    from fastmax_hf import kernels

    return dataclasses.asdict(kernels.current_settings())


def sweep_combinations(grid: dict) -> list[dict]:
    """{'a': [1, 2], 'b': [3]} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}] (a JSON dict of lists)."""
    import itertools

    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"--tune: {name!r} must map to a non-empty list of values, got {values!r}")
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


# ---------------------------------------------------------------------------- run metadata


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_metadata() -> dict:
    """GPU, versions, date, command line and the kernel settings in force: one per results file."""
    import fastmax_hf

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "fastmax_hf": fastmax_hf.__version__,
        # the peers' packages where installed (None where not)
        "peers": {name: _version(name) for name in ("fla-core", "retention", "einops")},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "kernel_settings": _settings_or_error(),
    }


def _settings_or_error() -> dict:
    try:
        return settings_record()
    except ImportError as err:  # a results file is still written; the error says why no settings
        return {"error": f"fastmax_hf.kernels not importable: {err}"}


def fastmax_options(scale: float, p: int = 2, a0: float = 1.0, a1: float = 1.0, a2: float = 0.5):
    """The options object the kernels take (fastmax_hf.options.FastmaxOptions)."""
    from fastmax_hf.options import FastmaxOptions

    return FastmaxOptions(scale=scale, p=p, a0=a0, a1=a1, a2=a2)


def host_profile(fn, calls: int = 50, top: int = 22) -> str:
    """cProfile of ``calls`` calls of ``fn()`` (already warm), the GPU awaited after the last:
    the ``top`` functions by own time, as pstats prints them."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def require_cuda(tool: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{tool} measures the Triton kernels on a CUDA GPU; none is visible here")
