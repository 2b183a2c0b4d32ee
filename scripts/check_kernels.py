"""Check the Triton kernels against float64 Fastmax on a GPU, before anything is timed.

For every case: fresh random inputs, outputs poisoned with NaN before the call (every
element must be written), relative error ||x - ref|| / ||ref|| of the output and of every
gradient against float64. Targets: fp32 <= 1e-4, fp16 <= 5e-3, bf16 <= 2e-2.

The ground truth is ``fastmax_reference`` in float64. Long sequences cannot afford its
N x N matrix, so there the forward is checked on the first and last query rows (the
reference of a query block that ends a longer key sequence is exact thanks to the
bottom-right causal alignment), and gradients against the chunked PyTorch form in
float64 (itself tested against the reference in tests/).

    python scripts/check_kernels.py --out benchmarks/results/check_<gpu>.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import fastmax_hf
from fastmax_hf import fastmax_reference
from fastmax_hf.chunked import chunked_attention
from fastmax_hf.kernels import triton_attention
from fastmax_hf.recurrent import fastmax_step

TARGET = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class Poisoned:
    """torch.empty / empty_like return NaN-filled tensors while active: unwritten outputs show."""

    def __enter__(self):
        self.empty, self.empty_like = torch.empty, torch.empty_like

        def poison(t):
            if t.is_floating_point():
                t.fill_(math.nan)
            return t

        torch.empty = lambda *a, **k: poison(self.empty(*a, **k))
        torch.empty_like = lambda *a, **k: poison(self.empty_like(*a, **k))

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self.empty, self.empty_like


def make(B, Hq, Hk, Nq, Nk, D, Dv, dtype, pad, layout, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    if layout == "bnhd":  # Hugging Face's memory, viewed as (B, H, N, D)
        q, k, v = rnd(B, Nq, Hq, D).transpose(1, 2), rnd(B, Nk, Hk, D).transpose(1, 2), rnd(B, Nk, Hk, Dv).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Nq, D), rnd(B, Hk, Nk, D), rnd(B, Hk, Nk, Dv)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen, device="cuda") > 0.2
        mask[0, : Nk // 4] = False
        if B > 1:
            mask[-1] = False
    return q, k, v, mask


def check_case(case, gen, grads=True):
    B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, pad, layout = case
    q, k, v, mask = make(B, Hq, Hk, Nq, Nk, D, Dv, dtype, pad, layout, gen)
    a0, a1, a2 = (1.0, 1.0, 0.5) if p == 2 else (6.0, 1.0, 0.0)
    opts = dict(causal=causal, key_padding_mask=mask, scale=D ** -0.5, p=p, a0=a0, a1=a1, a2=a2)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    with Poisoned():
        out, _ = triton_attention(qs, ks, vs, regime=regime, **opts)
        do = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
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
            expected, _ = chunked_attention(q64, k64, v64, chunk_size=512, **opts)
            want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want if grads else ()):
        result[name] = rel_err(a, b)
    worst = max(v for key, v in result.items() if key != "nan")
    result["pass"] = (not result["nan"]) and worst <= TARGET[dtype]
    return result


def check_decode(gen, dtype, D, Dv, N=2000, split=1900):
    B, Hq, Hk = 2, 8, 2
    q, k, v, _ = make(B, Hq, Hk, N, N, D, Dv, dtype, False, "bhnd", gen)
    mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
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
                    if not quick:
                        cases.append((1, 4, 4, 257, 1531, D, Dv, dtype, causal, regime, 2, False, "bhnd"))
                        cases.append((3, 6, 3, 777, 129, D, Dv, dtype, causal, regime, 1, True, "bhnd"))
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)) if long_cases else ():
        for D in (64, 128):
            cases.append((1, 4, 2, 16384, 16384, D, D, dtype, True, "linear", 2, False, "bnhd"))
            cases.append((1, 2, 1, 131072, 131072, D, D, dtype, True, "linear", 2, False, "bhnd"))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--dtypes", default=None, help="only these, e.g. float32,bfloat16")
    parser.add_argument("--dims", default=None, help="only these head dims, e.g. 128,80")
    parser.add_argument("--no-long", action="store_true", help="skip the 16k and 128k cases")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding checks")
    parser.add_argument("--group-heads", action="store_true",
                        help="run the linear backward one key/value head per launch (its path past ~256k tokens)")
    args = parser.parse_args()
    if args.group_heads:
        from fastmax_hf.kernels import ops

        ops.SCRATCH_MIN_BYTES, ops.SCRATCH_FRACTION = 1, 0.0
    dtypes = args.dtypes.split(",") if args.dtypes else None
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
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
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "fastmax_hf": fastmax_hf.__version__,
               "grouped_backward": args.group_heads, "cases": len(rows), "failed": sum(not r["pass"] for r in rows), "rows": rows}
    print(f"{summary['cases'] - summary['failed']} passed, {summary['failed']} failed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
