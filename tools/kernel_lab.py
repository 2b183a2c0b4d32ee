"""Check and time kernel variants on the GPU in one call: the maintainer's bench for kernel work.

Sections (``--sections``):
  check     the kernels against float64 Fastmax on a few shapes (bf16, fp16, fp32; both
            regimes; causal and not; GQA; padding; Nq != Nk; HF strides; p = 1 and 2)
  quad      the quadratic kernel, forward and forward+backward, against SDPA (flash, cuDNN)
  linear    the linear kernels at long N, with the useful TFLOP/s (4 F Dv forward, 12 F Dv
            forward+backward per token and head)
  variants  the same timings under kernel settings given as a JSON list (``--variants``)
  overhead  host time of one forward+backward call at a short length (launch-bound)
  hostprof  cProfile of that call
  quadsweep quadratic tile settings from --variants, with per-kernel GPU times and cuDNN's
  linkernels the linear kernels at --lin_n tokens, D = 64 and 128: each kernel's GPU time
            (torch.profiler) forward and forward+backward, at the defaults and under each of
            --variants' settings (a JSON list of kernel-settings dicts, without "_shape")
  hoststub  (CPU, no GPU needed) the host time of one quadratic forward+backward call with every
            kernel launch replaced by a no-op: what the package's own Python costs, apart from
            Triton's launcher and the GPU; and the call's count of top-level ATen operations

Every timing is a median of triton.testing.do_bench after a float64 check of the same
configuration. Results are JSON lines on stdout and in ``--out``.

    python tools/kernel_lab.py --sections check,quad,linear --out /tmp/lab.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from fastmax_hf import fastmax, fastmax_reference, kernels
from fastmax_hf.options import FastmaxOptions

OUT = None
TARGET = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def emit(record):
    line = json.dumps(record)
    print(line, flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(line + "\n")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn, warmup=10, rep=40):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def feature_count(D):
    return 1 + D + D * (D + 1) // 2


def run_fastmax(q, k, v, causal, regime, mask=None, p=2, a=(1.0, 1.0, 0.5)):
    options = FastmaxOptions(scale=q.shape[-1] ** -0.5, p=p, a0=a[0], a1=a[1], a2=a[2])
    return kernels.triton_attention(q, k, v, options, causal=causal, key_padding_mask=mask, regime=regime)[0]


# ---------------------------------------------------------------------------------------


def check_case(B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, pad, layout, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    if layout == "bnhd":
        q, k, v = rnd(B, Nq, Hq, D).transpose(1, 2), rnd(B, Nk, Hk, D).transpose(1, 2), rnd(B, Nk, Hk, Dv).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Nq, D), rnd(B, Hk, Nk, D), rnd(B, Hk, Nk, Dv)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=gen, device="cuda") > 0.2
        mask[0, : Nk // 4] = False
        if B > 1:
            mask[-1] = False
    a = (1.0, 1.0, 0.5) if p == 2 else (6.0, 1.0, 0.0)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    out = run_fastmax(qs, ks, vs, causal, regime, mask, p, a)
    do = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    got = torch.autograd.grad(out, (qs, ks, vs), do)
    q64, k64, v64 = (x.double().detach().requires_grad_() for x in (q, k, v))
    opts = dict(causal=causal, key_padding_mask=mask, scale=D ** -0.5, p=p, a0=a[0], a1=a[1], a2=a[2])
    if Nq * Nk <= 4096 * 4096:
        expected = fastmax_reference(q64, k64, v64, **opts)
    else:
        expected = fastmax(q64, k64, v64, backend="chunked", **opts)  # O(N) memory, float64
    want = torch.autograd.grad(expected, (q64, k64, v64), do.double())
    errs = {"out": rel_err(out, expected)}
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        errs[name] = rel_err(x, y)
    nan = bool(torch.isnan(out).any()) or any(bool(torch.isnan(g).any()) for g in got)
    return {**errs, "nan": nan, "pass": (not nan) and max(errs.values()) <= TARGET[dtype]}


def section_check(args):
    gen = torch.Generator(device="cuda").manual_seed(int(time.time()))
    shapes = [
        (2, 8, 2, 1003, 1003, 64, 64, True, "bnhd", 2),
        (1, 4, 4, 257, 1531, 128, 128, False, "bhnd", 2),
        (3, 6, 3, 777, 129, 80, 48, True, "bhnd", 1),
        (1, 4, 2, 1531, 1200, 32, 32, False, "bnhd", 2),
        (1, 2, 1, 5000, 5000, 64, 64, False, "bnhd", 2),
    ]
    for dtype in (getattr(torch, name) for name in args.check_dtypes.split(",")):
        for B, Hq, Hk, Nq, Nk, D, Dv, pad, layout, p in shapes:
            for causal in (False, True):
                for regime in args.check_regimes.split(","):
                    if dtype == torch.float32 and Nq * Nk > 2000 * 2000:
                        continue
                    t0 = time.time()
                    try:
                        res = check_case(B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, pad, layout, gen)
                    except Exception as err:  # noqa: BLE001
                        res = {"error": f"{type(err).__name__}: {str(err)[:300]}", "pass": False}
                    emit({"section": "check", "dtype": str(dtype)[6:], "shape": [B, Hq, Hk, Nq, Nk, D, Dv],
                          "causal": causal, "regime": regime, "p": p, "pad": pad, "layout": layout, **res,
                          "s": round(time.time() - t0, 2)})


def _inputs(N, D, H=16, B=1, dtype=torch.bfloat16, grad=False, Hk=None):
    Hk = Hk or H
    q = torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hk, N, D, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hk, N, D, device="cuda", dtype=dtype, requires_grad=grad)
    return q, k, v


def _fwd_bwd(call, inputs, do):
    def run():
        out = call()
        out.backward(do)
        for x in inputs:
            x.grad = None
    return run


def time_pair(label, N, D, causal, regime, backward, H=16, B=1, Hk=None, extra=None):
    """Time fastmax (checked first on the last rows) and the SDPA backends on one shape."""
    record = {"section": label, "N": N, "D": D, "H": H, "B": B, "Hk": Hk or H, "causal": causal,
              "regime": regime, "pass": "fwd+bwd" if backward else "fwd", **(extra or {})}
    try:
        q, k, v = _inputs(N, D, H, B, grad=backward, Hk=Hk)
        call = lambda: run_fastmax(q, k, v, causal, regime)  # noqa: E731
        out = call()
        rows = min(N, 256)
        exp = fastmax_reference(q[:1, :2, -rows:].double(), k[:1, :2].double(), v[:1, :2].double(),
                                causal=causal, scale=D ** -0.5) if N <= 65536 or causal else None
        if exp is not None:
            record["rel_err"] = rel_err(out[:1, :2, -rows:], exp)
        do = torch.randn_like(out)
        fn = _fwd_bwd(call, (q, k, v), do) if backward else call
        record["fastmax_ms"] = bench(fn)
        if regime == "linear":
            flops = (12 if backward else 4) * feature_count(D) * D * N * H * B
            record["tflops"] = flops / record["fastmax_ms"] / 1e9
        del out
        if N <= args_global.sdpa_max:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    def sd(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=(Hk or H) != H)
                    fn = _fwd_bwd(sd, (q, k, v), do) if backward else sd
                    record[f"{name}_ms"] = bench(fn)
                except Exception as err:  # noqa: BLE001
                    record[f"{name}_ms"] = None
                    record[f"{name}_error"] = str(err)[:120]
            best = [record[k] for k in ("flash_ms", "cudnn_ms") if record.get(k)]
            if best:
                record["ratio_to_best_sdpa"] = record["fastmax_ms"] / min(best)
    except Exception as err:  # noqa: BLE001
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    record["stats"] = kernels.ops.compiled_stats()
    emit(record)
    torch.cuda.empty_cache()


def section_quad(args):
    for D in (64, 128):
        for N in (1024, 4096, 16384):
            for backward in (False, True):
                time_pair("quad", N, D, True, "quadratic", backward)
        time_pair("quad", 4096, D, False, "quadratic", True)


def section_linear(args):
    for D in (64, 128):
        for N in (16384, 65536, 131072):
            for backward in (False, True):
                time_pair("linear", N, D, True, "linear", backward)


def section_variants(args):
    for variant in json.loads(args.variants):
        shape = variant.pop("_shape")
        with kernels.settings(**variant):
            time_pair("variant", shape["N"], shape["D"], shape.get("causal", True), shape["regime"],
                      shape.get("backward", True), extra={"settings": variant})


def kernel_ms(fn, reps=10):
    """GPU time per call of each kernel that ``fn`` launches (torch.profiler), ms."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / reps / 1e3, 4) for e in prof.key_averages() if e.device_time_total > 0}


def section_linkernels(args):
    for D in (64, 128):
        for variant in [{}] + [v for v in json.loads(args.variants) if "_shape" not in v]:
            record = {"section": "linkernels", "N": args.lin_n, "D": D, "H": 16, "B": 1, "causal": True,
                      "p": args.lin_p, "settings": variant}
            try:
                with kernels.settings(**variant):
                    q, k, v = _inputs(args.lin_n, D, grad=True)
                    a = (1.0, 1.0, 0.5) if args.lin_p == 2 else (1.0, 1.0, 0.0)
                    call = lambda: run_fastmax(q, k, v, True, "linear", p=args.lin_p, a=a)  # noqa: E731
                    out = call()
                    rows = 256
                    exp = fastmax_reference(q[:1, :2, -rows:].double(), k[:1, :2].double(), v[:1, :2].double(),
                                            causal=True, scale=D ** -0.5, p=args.lin_p, a0=a[0], a1=a[1], a2=a[2])
                    record["rel_err"] = rel_err(out[:1, :2, -rows:], exp)
                    do = torch.randn_like(out)
                    run = _fwd_bwd(call, (q, k, v), do)
                    features = feature_count(D) if args.lin_p == 2 else 1 + D
                    for name, fn, count in (("fwd", call, 4), ("fwd+bwd", run, 12)):
                        ms = bench(fn)
                        record[name] = {"ms": ms, "tflops": count * features * D * args.lin_n * 16 / ms / 1e9,
                                        "kernels_ms": kernel_ms(fn)}
                    record["stats"] = kernels.ops.compiled_stats()
                    del q, k, v, out, do
            except Exception as err:  # noqa: BLE001
                record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            emit(record)
            torch.cuda.empty_cache()


def section_overhead(args):
    for regime in ("quadratic", "linear"):
        q, k, v = _inputs(1024, 64, grad=True)
        call = lambda: run_fastmax(q, k, v, True, regime)  # noqa: E731
        do = torch.randn(1, 16, 1024, 64, device="cuda", dtype=torch.bfloat16)
        run = _fwd_bwd(call, (q, k, v), do)
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            run()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / 50 * 1e3
        gpu = sum(kernel_ms(run).values())
        emit({"section": "overhead", "regime": regime, "host_ms_per_call": host, "wall_ms_per_call": total,
              "gpu_kernel_ms_per_call": gpu, "bench_ms": bench(run)})


def section_hostprof(args):
    """Where the host time of one quadratic forward+backward call goes (cProfile, 1k tokens)."""
    from gpu_common import host_profile

    q, k, v = _inputs(1024, 64, grad=True)
    do = torch.randn(1, 16, 1024, 64, device="cuda", dtype=torch.bfloat16)
    run = _fwd_bwd(lambda: run_fastmax(q, k, v, True, "quadratic"), (q, k, v), do)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    emit({"section": "hostprof", "profile": host_profile(run, calls=50, top=30)[-6000:]})


def section_hoststub(args):
    """Host time of triton_attention forward+backward (quadratic, causal, 64 tokens, CPU tensors)
    with the kernels replaced by no-op stubs: the launchers, autograd and allocations only; with
    --hoststub_window W also the hybrid window's fused quadratic call (W < 64: with a rest); with
    --hoststub_normalize p = 1 with normalize=True, its scaling in PyTorch and on its kernels
    (setting fused_normalize). Each record also counts the call's top-level ATen operations
    (torch.profiler; on a GPU most of them are a launch and some microseconds of host time)."""
    from torch.profiler import ProfilerActivity, profile

    from fastmax_hf.kernels import normalize_ops, ops, window_ops

    class _NoLaunch:
        n_regs, n_spills = 0, 0

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self

    stubbed = [(ops, name) for name in ("quadratic_fwd_kernel", "quadratic_bwd_dq_kernel",
                                        "quadratic_bwd_dkdv_kernel", "backward_rows_kernel")]
    stubbed += [(window_ops, name) for name in ("hybrid_quadratic_fwd_kernel", "hybrid_quadratic_bwd_dq_kernel",
                                                "hybrid_quadratic_bwd_dkdv_kernel")]
    stubbed += [(normalize_ops, name) for name in ("row_norms_kernel", "scale_rows_kernel", "peak_grad_kernel",
                                                   "scale_grad_kernel")]
    saved = {(module, name): getattr(module, name) for module, name in stubbed}
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors pass the launchers' device checks
    try:
        for module, name in stubbed:
            setattr(module, name, _NoLaunch())
        q, k, v = (torch.randn(1, 16, 64, 64, requires_grad=True) for _ in range(3))
        do = torch.randn(1, 16, 64, 64)
        calls = {"fastmax": (lambda: run_fastmax(q, k, v, True, "quadratic"), {})}
        if args.hoststub_window:  # both through the public function, for a like-for-like pair
            calls["fastmax_hf.fastmax"] = (lambda: fastmax(q, k, v, causal=True, backend="triton"), {})
            calls[f"fastmax_hf.fastmax window={args.hoststub_window}"] = (lambda: fastmax(
                q, k, v, causal=True, backend="triton", window=args.hoststub_window), {})
        if args.hoststub_normalize:
            p1 = lambda: fastmax(q, k, v, causal=True, backend="triton", p=1, normalize=True)  # noqa: E731
            calls["fastmax_hf.fastmax p=1 normalize"] = (p1, {})
            calls["fastmax_hf.fastmax p=1 normalize fused_normalize"] = (p1, {"fused_normalize": True})
        for label, (call, chosen) in calls.items():
            run = _fwd_bwd(call, (q, k, v), do)
            with kernels.settings(**chosen):
                for _ in range(20):
                    run()
                t0 = time.perf_counter()
                for _ in range(200):
                    run()
                elapsed = (time.perf_counter() - t0) / 200 * 1e3
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run()
            aten = [e for e in prof.events() if e.name.startswith("aten::")]
            top = [e for e in aten if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
            emit({"section": "hoststub", "call": label, "settings": chosen, "host_ms_per_call": elapsed,
                  "aten_ops": len(top), "threads": torch.get_num_threads()})
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


def section_quadsweep(args):
    """Backward and forward tile choices at 4k and 16k (B=1, H=16, causal, bf16), with the
    GPU time of every kernel, beside cuDNN's; each configuration checked against float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for variant in json.loads(args.variants):
        shape = variant.pop("_shape")
        N, D, backward = shape["N"], shape["D"], shape.get("backward", True)
        causal, B = shape.get("causal", True), shape.get("B", 1)
        record = {"section": "quadsweep", "N": N, "D": D, "B": B, "causal": causal,
                  "pass": "fwd+bwd" if backward else "fwd", "settings": variant}
        try:
            with kernels.settings(**variant):
                q, k, v = _inputs(N, D, B=B, grad=backward)
                call = lambda: run_fastmax(q, k, v, causal, "quadratic")  # noqa: E731
                out = call()
                do = torch.randn_like(out)
                rows = min(N, 256)
                q64, k64, v64 = (x[:1, :2].double().detach().requires_grad_() for x in (q, k, v))
                exp = fastmax_reference(q64, k64, v64, causal=causal, scale=D ** -0.5)
                record["rel_err"] = rel_err(out[:1, :2, -rows:], exp[:, :, -rows:])
                if backward:
                    got = torch.autograd.grad(out, (q, k, v), do)
                    want = torch.autograd.grad(exp, (q64, k64, v64), do[:1, :2].double())
                    record["grad_rel_err"] = max(rel_err(a[:1, :2], b) for a, b in zip(got, want))
                fn = _fwd_bwd(call, (q, k, v), do) if backward else call
                record["fastmax_ms"] = bench(fn)
                record["kernels"] = kernel_ms(fn)
                def sd():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                fn = _fwd_bwd(sd, (q, k, v), do) if backward else sd
                record["cudnn_ms"] = bench(fn)
                record["ratio"] = record["fastmax_ms"] / record["cudnn_ms"]
        except Exception as err:  # noqa: BLE001
            record["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        record["stats"] = kernels.ops.compiled_stats()
        emit(record)
        torch.cuda.empty_cache()


def main():
    global OUT, args_global
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="check,quad,linear")
    parser.add_argument("--variants", default="[]")
    parser.add_argument("--sdpa_max", type=int, default=131072)
    parser.add_argument("--lin_n", type=int, default=65536, help="tokens of the linkernels section")
    parser.add_argument("--lin_p", type=int, default=2, choices=(1, 2), help="order p of the linkernels section")
    parser.add_argument("--check_dtypes", default="bfloat16,float16,float32", help="dtypes of the check section")
    parser.add_argument("--check_regimes", default="quadratic,linear", help="regimes of the check section")
    parser.add_argument("--hoststub_normalize", action="store_true",
                        help="hoststub: also p = 1 with normalize, its scaling in PyTorch and on its kernels")
    parser.add_argument("--hoststub_window", type=int, default=0,
                        help="hoststub: also time the hybrid window with this W (0: plain fastmax only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args_global = args
    OUT = args.out
    import triton

    emit({"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
          "torch": torch.__version__, "triton": triton.__version__,
          "settings": kernels.current_settings().__dict__})
    for name in args.sections.split(","):
        t0 = time.time()
        globals()[f"section_{name}"](args)
        emit({"section_done": name, "s": round(time.time() - t0, 1)})


args_global = None

if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
