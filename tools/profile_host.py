"""Host time of eager fastmax forward+backward calls on a GPU: cProfile over 30 calls.

p = 2 and p = 1 (normalize=True) at 16k, p = 1 at 4k; B=1, H=16, D=64, bf16, causal. For each:
the host time per call with the profiler on (it adds overhead of its own), the wall time per
call without it, and the functions with the most own time. Prints only; the output of a run is
kept as a log beside the benchmark it explains.

    python tools/profile_host.py > benchmarks/<gpu>/kernels/<study>/profile_host.log
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from gpu_common import require_cuda

CASES = ((1, 16384), (2, 16384), (1, 4096))  # (p, N)
CALLS = 30


def main():
    import fastmax_hf

    require_cuda("profile_host")
    for p, N in CASES:
        q, k, v = (torch.randn(1, 16, N, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn_like(q)

        def step():
            out = fastmax_hf.fastmax(q, k, v, causal=True, p=p, normalize=(p == 1))
            out.backward(grad_out)
            for x in (q, k, v):
                x.grad = None

        for _ in range(5):  # compiled and warm
            step()
        torch.cuda.synchronize()
        # host time: the calls are enqueued without synchronising, so the GPU lags behind
        t0 = time.perf_counter()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(CALLS):
            step()
        profile.disable()
        host_ms = (time.perf_counter() - t0) / CALLS * 1e3
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / CALLS * 1e3
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
        print(f"### p={p} N={N}: host (profiled) {host_ms:.2f} ms per call, wall {wall_ms:.2f} ms")
        print("\n".join(line[:150] for line in text.getvalue().splitlines()[6:32]))


if __name__ == "__main__":
    main()
