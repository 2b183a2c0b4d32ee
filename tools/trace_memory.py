"""Peak memory and time of long causal Fastmax training on one GPU, by the backward's scratch budget.

B=1, H=16 (--heads), N=1048576 (--n), bf16, the linear kernels, forward+backward, D=64 and 128
(--dims). For each budget in --budgets (kernel settings, JSON list of objects passed to
fastmax_hf.kernels.settings; the default is the budget's two settings at their defaults and at
a tighter pair) the step is repeated --repeats times (the first includes compilation). What it
measures is what is visible from outside the kernels: memory allocated and its peak after the
forward and after the backward, the peak of each pass, the wall time, and the heads per launch
of the linear backward (fastmax_hf.kernels.ops.heads_per_launch). "peak total" adds q, k, v and
the output gradient to the peak the step allocates; io is q, k, v, o and their gradients.

Prints one line per repetition; --out also writes them as JSON with the run's metadata (GPU,
versions, date, command, kernel settings).

    python tools/trace_memory.py --out benchmarks/<gpu>/kernels/memory_1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from gpu_common import (GiB, add_settings_argument, fastmax_options, json_object, kernel_settings, require_cuda,
                        run_metadata, settings_record)

DEFAULT_BUDGETS = '[{}, {"scratch_fraction": 0.1, "scratch_min_bytes": 2147483648}]'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1 << 20, help="sequence length")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dims", default="64,128", help="head dims (D = Dv)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="JSON list of kernel-setting objects, one measurement each ({} = the defaults); "
                             "default: %(default)s")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions of each measurement")
    add_settings_argument(parser)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        budgets = json.loads(args.budgets)
    except json.JSONDecodeError as err:
        parser.error(f"--budgets: not JSON ({err})")
    if not isinstance(budgets, list) or not all(isinstance(b, dict) for b in budgets) or not budgets:
        parser.error(f"--budgets: expected a non-empty JSON list of objects, got {args.budgets!r}")
    args.budget_list = budgets
    args.dim_list = [int(d) for d in args.dims.split(",") if d]
    args.settings_changes = json_object(args.settings)
    if args.n < 1 or args.heads < 1 or args.repeats < 1:
        parser.error("--n, --heads and --repeats must be positive")
    return args


def _memory():
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def measure(N, H, D, repetition):
    """One forward+backward of causal linear-regime Fastmax; memory in bytes, time in ms."""
    from fastmax_hf import kernels

    q, k, v = [torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    inputs = 4 * q.numel() * q.element_size()  # q, k, v, grad_out
    io = 8 * q.numel() * q.element_size()  # q, k, v, o and their gradients
    options = fastmax_options(D ** -0.5)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out, _ = kernels.triton_attention(q, k, v, options, causal=True, regime="linear")
    after_forward, forward_peak = _memory()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad_out)
    after_backward, backward_peak = _memory()
    ms = (time.perf_counter() - start) * 1e3
    peak = max(forward_peak, backward_peak) - base + inputs
    row = dict(D=D, N=N, heads=H, repetition=repetition, ms=round(ms, 1),
               heads_per_launch=kernels.ops.heads_per_launch(q, k, v),
               after_forward_gib=after_forward / GiB, forward_peak_gib=forward_peak / GiB,
               after_backward_gib=after_backward / GiB, backward_peak_gib=backward_peak / GiB,
               peak_total_gib=peak / GiB, io_gib=io / GiB, peak_over_io=peak / io)
    del out, q, k, v, grad_out
    return row


def line(row, budget):
    return (f"D={row['D']} N={row['N']} H={row['heads']} settings={json.dumps(budget)} "
            f"heads/launch={row['heads_per_launch']} repetition {row['repetition']}: {row['ms']:.0f} ms, "
            f"alloc/max after forward {row['after_forward_gib']:.2f}/{row['forward_peak_gib']:.2f} GiB, "
            f"after backward {row['after_backward_gib']:.2f}/{row['backward_peak_gib']:.2f} GiB, "
            f"peak total {row['peak_total_gib']:.2f} GiB = {row['peak_over_io']:.3f} x io")


def main(argv=None):
    args = parse_args(argv)
    rows = []
    with kernel_settings(args.settings_changes):
        for budget in args.budget_list:  # names and values are checked before the GPU is needed
            with kernel_settings(budget):
                pass
        require_cuda("trace_memory")
        meta = run_metadata()
        print(json.dumps(meta), flush=True)
        for D in args.dim_list:
            for budget in args.budget_list:
                with kernel_settings(budget):
                    for repetition in range(args.repeats):
                        row = measure(args.n, args.heads, D, repetition)
                        row["settings"] = budget
                        row["kernel_settings"] = settings_record()
                        rows.append(row)
                        print(line(row, budget), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
