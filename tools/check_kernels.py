"""Check the Triton kernels against float64 Fastmax on a GPU, before anything is timed.

For every case: fresh random inputs, outputs poisoned with NaN before the call (every
element must be written), relative error ||x - ref|| / ||ref|| of the output and of every
gradient against float64. Targets: fp32 <= 1e-4, fp16 <= 5e-3, bf16 <= 2e-2.

The ground truth is ``fastmax_reference`` in float64. Long sequences cannot afford its
N x N matrix, so there the forward is checked on the first and last query rows (the
reference of a query block that ends a longer key sequence is exact thanks to the
bottom-right causal alignment), and gradients against the chunked PyTorch form in
float64 (itself tested against the reference in tests/).

Prints one line per case (ok/BAD and the errors) and a count; --out writes them as JSON with
the run's metadata (GPU, versions, date, command, the kernel settings in force). Exits with
status 1 when a case fails. --settings changes kernel settings for the whole run;
--group-heads makes the linear backward run one key/value head per launch (the path taken
past ~256k tokens) by setting its scratch budget to nothing.

    python tools/check_kernels.py --out benchmarks/<gpu>/kernels/check.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from gpu_common import (Poisoned, add_settings_argument, fastmax_options, json_object, kernel_settings, rel_err,
                        require_cuda, run_metadata)

# fastmax_hf is imported where it is used, so that --help and the argument checks need no GPU stack
TARGET = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# the linear backward's scratch budget set to nothing: one key/value head per launch
ONE_HEAD_PER_LAUNCH = {"scratch_min_bytes": 1, "scratch_fraction": 0.0}


def make(B, Hq, Hk, Nq, Nk, D, Dv, dtype, pad, layout, gen, device="cuda"):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    if layout == "bnhd":  # Hugging Face's memory, viewed as (B, H, N, D)
        q, k, v = rnd(B, Nq, Hq, D).transpose(1, 2), rnd(B, Nk, Hk, D).transpose(1, 2), rnd(B, Nk, Hk, Dv).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Nq, D), rnd(B, Hk, Nk, D), rnd(B, Hk, Nk, Dv)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen, device=device) > 0.2
        mask[0, : Nk // 4] = False
        if B > 1:
            mask[-1] = False
    return q, k, v, mask


def check_case(case, gen, grads=True, device="cuda"):
    """One case of the grid (a tuple as grid() makes them): errors of the output and gradients."""
    from fastmax_hf import fastmax, fastmax_reference
    from fastmax_hf.kernels import triton_attention

    B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, pad, layout = case
    q, k, v, mask = make(B, Hq, Hk, Nq, Nk, D, Dv, dtype, pad, layout, gen, device)
    a0, a1, a2 = (1.0, 1.0, 0.5) if p == 2 else (6.0, 1.0, 0.0)
    opts = dict(causal=causal, key_padding_mask=mask, scale=D ** -0.5, p=p, a0=a0, a1=a1, a2=a2)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    options = fastmax_options(D ** -0.5, p=p, a0=a0, a1=a1, a2=a2)
    with Poisoned():
        out, _ = triton_attention(qs, ks, vs, options, causal=causal, key_padding_mask=mask, regime=regime)
        do = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        got = torch.autograd.grad(out, (qs, ks, vs), do) if grads else ()
    result = {"nan": bool(torch.isnan(out).any()) or any(bool(torch.isnan(g).any()) for g in got)}

    q64, k64, v64 = (x.double().detach().requires_grad_() for x in (q, k, v))
    if Nq * Nk <= 4096 * 4096:
        expected = fastmax_reference(q64, k64, v64, **opts)
        result["out"] = rel_err(out, expected)
        if grads:
            want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    else:
        rows = 256
        head = fastmax_reference(q64[:, :, :rows], k64, v64, **{**opts, "causal": False}) if not causal else None
        tail = fastmax_reference(q64[:, :, -rows:], k64, v64, **opts)
        errs = [rel_err(out[:, :, -rows:], tail)]
        if head is not None:
            errs.append(rel_err(out[:, :, :rows], head))
        result["out"] = max(errs)
        if grads:
            expected = fastmax(q64, k64, v64, backend="chunked", **opts)  # O(N) memory, float64
            want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want if grads else ()):
        result[name] = rel_err(a, b)
    worst = max(v for key, v in result.items() if key != "nan")
    result["pass"] = (not result["nan"]) and worst <= TARGET[dtype]
    return result


def check_decode(gen, dtype, D, Dv, N=2000, split=1900, device="cuda"):
    """Prefill of `split` tokens, then one token at a time, against float64 Fastmax over all N."""
    from fastmax_hf import fastmax_reference
    from fastmax_hf.recurrent import fastmax_step

    B, Hq, Hk = 2, 8, 2
    q, k, v, _ = make(B, Hq, Hk, N, N, D, Dv, dtype, False, "bhnd", gen, device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[1, :123] = False
    expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    out, state = fastmax_step(q[:, :, :split], k[:, :, :split], v[:, :, :split], None, key_padding_mask=mask[:, :split])
    outs = [out]
    for t in range(split, N):
        s = slice(t, t + 1)
        out, state = fastmax_step(q[:, :, s], k[:, :, s], v[:, :, s], state, key_padding_mask=mask[:, s])
        outs.append(out)
    err = rel_err(torch.cat(outs, 2), expected)
    return {"out": err, "layout": state.layout, "pass": err <= TARGET[dtype]}


def grid(quick, dtypes_filter=None, dims_filter=None, long_cases=True):
    cases = [c for c in _grid(quick, long_cases)
             if (dtypes_filter is None or str(c[7]).split(".")[-1] in dtypes_filter)
             and (dims_filter is None or c[5] in dims_filter or c[3] * c[4] > 4096 * 4096)]
    return cases


def _grid(quick, long_cases):
    cases = []
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        for D, Dv in ((64, 64), (128, 128), (80, 48)) if quick else ((16, 16), (32, 32), (64, 64), (128, 128), (80, 48)):
            for causal in (False, True):
                for regime in ("quadratic", "linear"):
                    # odd lengths, Nq != Nk both ways, GQA, padding, HF strides
                    cases.append((2, 8, 2, 1003, 1003, D, Dv, dtype, causal, regime, 2, True, "bnhd"))
                    # no padding: whole tiles before the causal diagonal run without masks
                    cases.append((1, 4, 4, 257, 1531, D, Dv, dtype, causal, regime, 2, False, "bhnd"))
                    if not quick:
                        cases.append((3, 6, 3, 777, 129, D, Dv, dtype, causal, regime, 1, True, "bhnd"))
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)) if long_cases else ():
        for D in (64, 128):
            cases.append((1, 4, 2, 16384, 16384, D, D, dtype, True, "linear", 2, False, "bnhd"))
            cases.append((1, 2, 1, 131072, 131072, D, D, dtype, True, "linear", 2, False, "bhnd"))
    return cases


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--dtypes", default=None, help="only these, e.g. float32,bfloat16")
    parser.add_argument("--dims", default=None, help="only these head dims, e.g. 128,80 (the 16k and 128k cases stay)")
    parser.add_argument("--no-long", action="store_true", help="skip the 16k and 128k cases")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding checks")
    parser.add_argument("--group-heads", action="store_true",
                        help=f"run the linear backward one key/value head per launch (its path past ~256k tokens): "
                             f"kernel settings {json.dumps(ONE_HEAD_PER_LAUNCH)}")
    add_settings_argument(parser)
    args = parser.parse_args(argv)
    args.dtype_list = args.dtypes.split(",") if args.dtypes else None
    known = {str(d).split(".")[-1] for d in TARGET}
    if args.dtype_list and not set(args.dtype_list) <= known:
        parser.error(f"--dtypes: unknown {sorted(set(args.dtype_list) - known)}; choose from {sorted(known)}")
    try:
        args.dim_list = [int(d) for d in args.dims.split(",")] if args.dims else None
    except ValueError:
        parser.error(f"--dims: comma-separated integers, got {args.dims!r}")
    args.settings_changes = {**json_object(args.settings), **(ONE_HEAD_PER_LAUNCH if args.group_heads else {})}
    return args


def main(argv=None):
    args = parse_args(argv)
    with kernel_settings(args.settings_changes):  # bad names or values stop here, before the GPU is needed
        require_cuda("check_kernels")
        summary = run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if summary["failed"] else 0


def run(args):
    dtypes, dims = args.dtype_list, args.dim_list
    gen = torch.Generator(device="cuda").manual_seed(int(time.time()))
    rows = []
    for case in grid(args.quick, dtypes, dims, not args.no_long):
        B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, pad, layout = case
        t0 = time.time()
        res = check_case(case, gen)
        row = dict(B=B, Hq=Hq, Hk=Hk, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=str(dtype).split(".")[-1], causal=causal,
                   regime=regime, p=p, padding=pad, layout=layout, **res, seconds=round(time.time() - t0, 2))
        rows.append(row)
        errs = " ".join(f"{k}={row[k]:.1e}" for k in ("out", "dq", "dk", "dv") if k in row)
        print(f"{'ok ' if row['pass'] else 'BAD'} {row['dtype']:8s} N={Nq}x{Nk} D={D}/{Dv} H={Hq}/{Hk} "
              f"causal={causal} {regime:9s} p={p} pad={pad} {layout}: {errs}", flush=True)
    decode_dtypes = [d for d in (torch.bfloat16, torch.float16, torch.float32)
                     if dtypes is None or str(d).split(".")[-1] in dtypes]
    for dtype in () if args.no_decode else decode_dtypes:
        for D in (64, 128):
            res = check_decode(gen, dtype, D, D)
            rows.append(dict(kind="decode", dtype=str(dtype).split(".")[-1], D=D, **res))
            print(f"{'ok ' if res['pass'] else 'BAD'} decode {dtype} D={D}: out={res['out']:.1e} ({res['layout']})")
    summary = {"meta": run_metadata(), "grouped_backward": args.group_heads, "cases": len(rows),
               "failed": sum(not r["pass"] for r in rows), "rows": rows}
    print(f"{summary['cases'] - summary['failed']} passed, {summary['failed']} failed")
    return summary


if __name__ == "__main__":
    sys.exit(main())
