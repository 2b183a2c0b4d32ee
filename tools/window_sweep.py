"""Tiles and warps of the hybrid window's band kernels (linear regime), timed on the GPU.

For each (D, N) and each candidate (window_block_m, window_block_n, window_warps): the hybrid
window (W = --window) forward+backward, bf16, B=1, H=16, causal, with the linear regime forced
(the band kernels of kernels/window.py run only there), checked on its last 128 rows against
float64 before it is timed, and plain fastmax in the same run for the ratio. Writes JSON lines.

    python tools/window_sweep.py --out window_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from gpu_common import run_metadata

CANDIDATES = ((64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 4))


def main(argv=None):
    import fastmax_hf
    from fastmax_hf import fastmax_reference
    from fastmax_hf.kernels import settings as kernel_settings
    from fastmax_hf.kernels import triton_window_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON lines written here")
    parser.add_argument("--window", type=int, default=64, help="W")
    parser.add_argument("--shapes", default="64:16384,64:65536,64:131072,128:65536", help="D:N pairs")
    args = parser.parse_args(argv)
    out = open(args.out, "w")
    out.write(json.dumps({"meta": run_metadata()}) + "\n")
    W = args.window
    for shape in args.shapes.split(","):
        D, N = (int(x) for x in shape.split(":"))
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16)
        options = fastmax_hf.FastmaxOptions.resolve(D, window=W)

        def fwd_bwd(call):
            def run():
                o = call()
                o.backward(grad)
            return run

        plain = triton.testing.do_bench(fwd_bwd(lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton")))
        want = fastmax_reference(q[:1, :2, -128:].double(), k[:1, :2].double(), v[:1, :2].double(), causal=True,
                                 window=W)
        for block_m, block_n, warps in CANDIDATES:
            row = {"D": D, "N": N, "W": W, "block_m": block_m, "block_n": block_n, "warps": warps, "fastmax_ms": plain}
            try:
                with kernel_settings(window_block_m=block_m, window_block_n=block_n, window_warps=warps):
                    def call():
                        return triton_window_attention(q, k, v, options, window=W, regime="linear")[0]
                    got = call()[:1, :2, -128:].double()
                    row["rel_err"] = ((got - want).norm() / want.norm()).item()
                    row["window_ms"] = triton.testing.do_bench(fwd_bwd(call))
                    row["ratio"] = row["window_ms"] / plain
            except Exception as err:  # noqa: BLE001  (a tile that does not fit is a result too)
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            q.grad = k.grad = v.grad = None
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
