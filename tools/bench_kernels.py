"""Benchmark the Fastmax kernels against their peers on a GPU; every number from one run.

Sections (``--sections``, comma separated):
  seed       the seed library's configurations (B=64, forward): fastmax bf16/fp32 vs the
             seed's PyTorch formulation (materialised D^2 features, cumsum for the causal
             mask) vs SDPA
  long       B=1, H=16, bf16, causal, forward and forward+backward, N from 1k to 1M,
             D = 64 and 128: fastmax vs SDPA (flash and cuDNN), time and peak memory,
             with the useful TFLOP/s of the linear regime
  crossover  quadratic vs linear kernel by N: where the linear one starts to win
  quadratic  the quadratic regime forced, causal and not, B = 1 and 8, H = 16, D = 64 and 128,
             N from 1k to 16k, forward and forward+backward: fastmax vs SDPA (flash, cuDNN),
             and at B = 1 (causal) vs FlexAttention computing exact Fastmax (score_mod = log f)
  fla        D=16, Dv=64 against fla's parallel_based / fused_chunk_based (if installed)
  peers      shapes of the kernel issues: B=1, H=8 and B=4, H=32; non-causal (against cuDNN)
  p1         p=1 with normalize against fla's chunk_linear_attn(normalize=True), D = 64 and 128,
             N from 4k to 128k (its first call autotunes: give it minutes); fastmax also with
             normalize's scaling on its kernels (setting fused_normalize), and the ratios
  retention  power retention (PyPI retention, deg=2, chunk 1024) at D=64 (autotunes first)
  window     the hybrid window (W = --window_size) against plain fastmax, B=1, H=16, bf16,
             causal, forward and forward+backward, N from --window_lengths, D = 64 and 128,
             both through fastmax_hf.fastmax: the window's overhead (issue target: at most 15%
             forward+backward), eager and with each call replayed from a CUDA graph (the
             kernels' cost without the host's launches)
  decode     per-token latency of the recurrent step vs SDPA over a KV cache
  tune       kernel settings swept over a grid (--tune: a JSON object of lists of values
             of fastmax_hf.kernels settings), each combination timed in --tune_regimes

Before a configuration is timed its output is checked against float64 Fastmax (on the
last query rows where the full reference would not fit). Times are medians of
triton.testing.do_bench; peak memory is torch.cuda.max_memory_allocated over one call.
Kernel settings for the whole run come from --settings (JSON, passed to
fastmax_hf.kernels.settings).

Writes --out (JSON, rewritten after each section): "meta" (GPU, versions, date, command,
the kernel settings in force) and one list of rows per section; rows are also printed.
tools/report_benchmarks.py turns it into tables and plots.

    python tools/bench_kernels.py --sections long,crossover --out benchmarks/<gpu>/kernels/bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_common import (add_settings_argument, bench_ms, fastmax_options, graph_bench_ms, is_oom, json_object,
                        kernel_settings, peak_mib, rel_err, require_cuda, run_metadata, sweep_combinations)

# fastmax_hf is imported where it is used, so that --help and the argument checks need no GPU stack
SECTION_NAMES = ("seed", "long", "crossover", "quadratic", "fla", "peers", "p1", "retention", "window", "decode",
                 "tune")
RESULTS: dict = {}


def check_tail(out, q, k, v, causal, scale, rows=128, heads=2):
    """Relative error of the last query rows of the first heads against float64 Fastmax."""
    from fastmax_hf import fastmax_reference

    expected = fastmax_reference(q[:1, :heads, -rows:].double(), k[:1, :heads].double(), v[:1, :heads].double(),
                                 causal=causal, scale=scale)
    return rel_err(out[:1, :heads, -rows:], expected)


def bf16_inputs(B, H, N, D, backward):
    """A maker of fresh q, k, v (B, H, N, D) bf16 CUDA tensors (with gradients for a backward)."""
    def make():
        return [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                for _ in range(3)]
    return make


def fastmax_call(q, k, v, causal, regime="auto", scale=None):
    from fastmax_hf import kernels

    options = fastmax_options(q.shape[-1] ** -0.5 if scale is None else scale)
    return lambda: kernels.triton_attention(q, k, v, options, causal=causal, regime=regime)[0]


def fwd_bwd(call, inputs):
    def run():
        out = call()
        out.backward(grad_out_for(out))
        for x in inputs:
            x.grad = None
    return run


_GRADS = {}


def grad_out_for(out):
    key = (tuple(out.shape), out.dtype)
    if key not in _GRADS:
        _GRADS[key] = torch.randn_like(out)
    return _GRADS[key]


def feature_count(D):
    return 1 + D + D * (D + 1) // 2


def linear_flops(N, H, D, Dv, backward):
    """Useful FLOPs of the linear regime: 4 F Dv per token and head forward (state, readout),
    8 F Dv more backward (query-side state, dq, dk, dv; recomputing the forward state not counted)."""
    return (12 if backward else 4) * feature_count(D) * Dv * N * H


def sdpa_call(q, k, v, causal, backend):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def timed(label, make_inputs, call_for, backward, check=None, graph=False):
    """Time one configuration; record OOM or errors instead of stopping the sweep. With
    ``graph``, also the replay of the same work captured in a CUDA graph ("graph_ms"), or why
    it could not be captured ("graph_error")."""
    try:
        inputs = make_inputs()
        call = call_for(*inputs)
        if check is not None:
            err = check(call(), *inputs)
            if not err < 2e-2:
                return {"error": f"check failed: rel err {err:.2e}"}
        run = fwd_bwd(call, inputs) if backward else call
        mem = peak_mib(run)
        ms = bench_ms(run)
        res = {"ms": ms, "peak_mib": mem}
        if check is not None:
            res["rel_err"] = err
        if graph:
            try:
                res["graph_ms"] = graph_bench_ms(run)
            except Exception as graph_err:  # noqa: BLE001 - recorded beside the eager time
                res["graph_error"] = f"{type(graph_err).__name__}: {str(graph_err)[:200]}"
        return res
    except Exception as err:  # noqa: BLE001 - a sweep records failures and goes on
        torch.cuda.empty_cache()
        return {"error": "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:200]}"}


# ---------------------------------------------------------------------------------------


def section_long(args):
    from fastmax_hf import kernels

    rows = []
    for D in ints(args.dims):
        for N in ints(args.lengths):
            for backward in (False, True):
                make = bf16_inputs(1, 16, N, D, backward)
                entry = {"D": D, "N": N, "pass": "fwd+bwd" if backward else "fwd"}
                check = (lambda out, q, k, v: check_tail(out, q, k, v, True, q.shape[-1] ** -0.5))
                entry["fastmax"] = timed("fastmax", make, lambda q, k, v: fastmax_call(q, k, v, True), backward, check)
                entry["regime"] = kernels.choose_regime(N, D, 2, backward)
                if "ms" in entry["fastmax"] and entry["regime"] == "linear":
                    entry["fastmax"]["tflops"] = linear_flops(N, 16, D, D, backward) / entry["fastmax"]["ms"] / 1e9
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    if N > args.sdpa_max:
                        entry[name] = {"error": f"skipped: N > {args.sdpa_max} (quadratic cost)"}
                        continue
                    entry[name] = timed(name, make, lambda q, k, v, b=backend: sdpa_call(q, k, v, True, b), backward)
                best = [entry[n]["ms"] for n in ("sdpa_flash", "sdpa_cudnn") if "ms" in entry[n]]
                if best and "ms" in entry["fastmax"]:
                    entry["ratio_to_best_sdpa"] = entry["fastmax"]["ms"] / min(best)
                if N >= 2**20 and backward and "peak_mib" in entry["fastmax"]:
                    io = 4 * 16 * N * D * 2 * 2  # q, k, v, o and their gradients, bf16
                    entry["io_mib"] = io / 2**20
                    # peak_mib counts what the call allocates; q, k, v were there before it
                    entry["peak_over_io"] = (entry["fastmax"]["peak_mib"] + 3 * 16 * N * D * 2 / 2**20) / entry["io_mib"]
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    RESULTS["long"] = rows


def section_crossover(args):
    rows = []
    for D in ints(args.crossover_dims):
        for N in ints(args.crossover_lengths):
            for backward in (False, True):
                make = bf16_inputs(1, 16, N, D, backward)
                entry = {"D": D, "N": N, "pass": "fwd+bwd" if backward else "fwd"}
                for regime in ("quadratic", "linear"):
                    entry[regime] = timed(regime, make, lambda q, k, v, r=regime: fastmax_call(q, k, v, True, r), backward)
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    RESULTS["crossover"] = rows


def flex_fastmax_call(q, k, v, causal):
    """Exact Fastmax through FlexAttention: softmax of log f(s) is f(s) / sum f(s) (f > 0 for
    the default 1 + s + s^2/2), compiled as FlexAttention must be to be fast."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _FLEX
    if "_FLEX" not in globals():
        _FLEX = torch.compile(flex_attention)

    def log_f(score, b, h, i, j):
        return torch.log(1.0 + score + 0.5 * score * score)

    block_mask = None
    if causal:
        N = q.shape[2]
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, N, N, device="cuda")
    return lambda: _FLEX(q, k, v, score_mod=log_f, block_mask=block_mask)


def section_quadratic(args):
    """Issue targets of the quadratic regime: ratios to the best SDPA backend and to FlexAttention."""
    rows = []
    flex_lengths = set(ints(args.quad_flex_lengths))
    for B in ints(args.quad_batches):
        for D in ints(args.dims):
            for causal in (True, False):
                for N in ints(args.quad_lengths):
                    for backward in (False, True):
                        make = bf16_inputs(B, 16, N, D, backward)
                        check = (lambda out, q, k, v, c=causal: check_tail(out, q, k, v, c, q.shape[-1] ** -0.5))
                        calls = {
                            "fastmax": lambda q, k, v, c=causal: fastmax_call(q, k, v, c, "quadratic"),
                            "sdpa_flash": lambda q, k, v, c=causal: sdpa_call(q, k, v, c, SDPBackend.FLASH_ATTENTION),
                            "sdpa_cudnn": lambda q, k, v, c=causal: sdpa_call(q, k, v, c, SDPBackend.CUDNN_ATTENTION),
                        }
                        if B == 1 and causal and N in flex_lengths:
                            calls["flex_log_f"] = lambda q, k, v, c=causal: flex_fastmax_call(q, k, v, c)
                        entry = _peer_row(f"quadratic B={B} D={D} causal={causal} N={N}", make, calls, backward, check)
                        entry.update(B=B, H=16, D=D, N=N, causal=causal)
                        best = [entry[n]["ms"] for n in ("sdpa_flash", "sdpa_cudnn") if "ms" in entry[n]]
                        if best and "ms" in entry["fastmax"]:
                            entry["ratio_to_best_sdpa"] = entry["fastmax"]["ms"] / min(best)
                            if "ms" in entry["sdpa_cudnn"]:
                                entry["ratio_to_cudnn"] = entry["fastmax"]["ms"] / entry["sdpa_cudnn"]["ms"]
                        if "ms" in entry.get("flex_log_f", {}) and "ms" in entry["fastmax"]:
                            entry["flex_over_fastmax"] = entry["flex_log_f"]["ms"] / entry["fastmax"]["ms"]
                        rows.append(entry)
    RESULTS["quadratic"] = rows


def section_tune(args):
    """Every combination of --tune (kernel settings), in each of --tune_regimes, at N = --tune_n,
    with and without the causal mask (--tune_causal): times, forward+backward peak memory."""
    from fastmax_hf import kernels

    rows = []
    combinations = sweep_combinations(json_object(args.tune, "--tune"))
    for D in ints(args.tune_dims):
        inputs = [torch.randn(1, 16, args.tune_n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3)]
        for regime, causal in itertools.product(args.tune_regimes.split(","), bools(args.tune_causal)):
            for combo in combinations:
                entry = {"regime": regime, "D": D, "N": args.tune_n, "causal": causal, "settings": combo}
                with kernel_settings(combo):
                    for backward in (False, True):
                        check = None if backward else (lambda out, q, k, v: check_tail(out, q, k, v, causal, q.shape[-1] ** -0.5))
                        res = timed("tune", lambda: inputs, lambda q, k, v: fastmax_call(q, k, v, causal, regime), backward,
                                    check)
                        entry["fwd+bwd" if backward else "fwd"] = res.get("ms", res.get("error"))
                        if backward and "peak_mib" in res:
                            entry["peak_mib_fwd+bwd"] = res["peak_mib"]
                # registers and spills of the kernels compiled last, where the kernels report them
                stats = kernels.ops.compiled_stats()
                entry["stats"] = {name: list(value) for name, value in stats.items() if name.startswith(regime)}
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    RESULTS["tune"] = rows


def seed_pytorch(q, k, v, causal):
    """The seed's PyTorch formulation: materialised [1, x, x (x) x] features, cumsum for causal."""
    B, H, N, D = q.shape
    qf = torch.cat([torch.ones_like(q[..., :1]), q, (q[..., :, None] * q[..., None, :]).flatten(-2) / math.sqrt(2)], -1)
    kf = torch.cat([torch.ones_like(k[..., :1]), k, (k[..., :, None] * k[..., None, :]).flatten(-2) / math.sqrt(2)], -1)
    if causal:
        kv = torch.cumsum(kf[..., :, None] * v[..., None, :], dim=2)  # (B, H, N, F, Dv)
        num = (qf[..., None] * kv).sum(-2)
        den = (qf * torch.cumsum(kf, 2)).sum(-1, keepdim=True)
    else:
        num = qf @ (kf.transpose(-1, -2) @ v)
        den = qf @ kf.sum(2, keepdim=True).transpose(-1, -2)
    return num / den


def section_seed(args):
    rows = []
    for H, N, D in itertools.product((8, 16), (1000, 10000), (32, 64)):
        for causal in (False, True):
            entry = {"B": 64, "H": H, "N": N, "D": D, "causal": causal}
            for dtype in (torch.bfloat16, torch.float32):
                def make(dtype=dtype):
                    # the seed scales by temperature: s = q.k / T with T = 1; the same unit-variance scores here
                    return [torch.randn(64, H, N, D, device="cuda", dtype=dtype) / D ** 0.25 for _ in range(3)]
                check = (lambda out, q, k, v, c=causal: check_tail(out[:1, :2], q[:1, :2], k[:1, :2], v[:1, :2], c, 1.0))
                entry[f"fastmax_{str(dtype)[6:]}"] = timed(
                    "fastmax", make, lambda q, k, v, c=causal: fastmax_call(q, k, v, c, scale=1.0), False, check)
            entry["seed_pytorch_fp32"] = timed(
                "seed", lambda: [torch.randn(64, H, N, D, device="cuda") / D ** 0.25 for _ in range(3)],
                lambda q, k, v, c=causal: (lambda: seed_pytorch(q, k, v, c)), False)
            entry["sdpa_bf16"] = timed(
                "sdpa", lambda: [torch.randn(64, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)],
                lambda q, k, v, c=causal: (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c)), False)
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    # forward+backward of the seed's one measured training configuration
    for causal in (False, True):
        entry = {"B": 64, "H": 8, "N": 10000, "D": 32, "causal": causal, "pass": "fwd+bwd"}
        make = lambda: [torch.randn(64, 8, 10000, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) / 32 ** 0.25
                        for _ in range(3)]
        entry["fastmax_bfloat16"] = timed(
            "fastmax", lambda: [x.detach().requires_grad_() for x in make()],
            lambda q, k, v, c=causal: fastmax_call(q, k, v, c, scale=1.0), True)
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    RESULTS["seed"] = rows


def section_fla(args):
    rows = []
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception as err:  # noqa: BLE001
        RESULTS["fla"] = {"error": f"fla not importable: {err}"}
        print(RESULTS["fla"])
        return
    for N in (4096, 16384, 65536):
        for backward in (False, True):
            def make(N=N, backward=backward):
                q = torch.randn(1, 16, N, 16, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                k = torch.randn(1, 16, N, 16, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                v = torch.randn(1, 16, N, 64, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                return [q, k, v]
            entry = {"N": N, "D": 16, "Dv": 64, "pass": "fwd+bwd" if backward else "fwd"}
            entry["fastmax"] = timed("fastmax", make, lambda q, k, v: fastmax_call(q, k, v, True), backward)
            # fla takes (B, N, H, D)
            for name, fn in (("parallel_based", parallel_based), ("fused_chunk_based", fused_chunk_based)):
                entry[name] = timed(name, make, lambda q, k, v, fn=fn: (
                    lambda: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))), backward)
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    RESULTS["fla"] = rows


def _peer_row(label, make, calls, backward, check_call=None):
    """One row: every call in ``calls`` (name -> call_for) timed on the same inputs' shapes."""
    entry = {"label": label, "pass": "fwd+bwd" if backward else "fwd"}
    for name, call_for in calls.items():
        entry[name] = timed(name, make, call_for, backward, check_call if name == "fastmax" else None)
    print(json.dumps(entry), flush=True)
    return entry


def section_peers(args):
    """The shapes of the kernel issues against cuDNN: fewer and more heads, a batch, non-causal."""
    rows = []
    # batch and heads users have (a 1B model at B=1 has 8 key/value heads), and non-causal
    for B, H, N, causal in ((1, 8, 16384, True), (1, 8, 65536, True), (4, 32, 16384, True), (4, 32, 65536, True),
                            (1, 16, 16384, False), (1, 16, 65536, False)):
        for backward in (False, True):
            make = bf16_inputs(B, H, N, 64, backward)
            check = (lambda out, q, k, v, c=causal: check_tail(out, q, k, v, c, q.shape[-1] ** -0.5))
            entry = _peer_row(f"B={B} H={H} N={N} D=64 causal={causal}", make, {
                "fastmax": lambda q, k, v, c=causal: fastmax_call(q, k, v, c),
                "sdpa_cudnn": lambda q, k, v, c=causal: sdpa_call(q, k, v, c, SDPBackend.CUDNN_ATTENTION),
            }, backward, check)
            entry.update(B=B, H=H, N=N, D=64, causal=causal)
            rows.append(entry)
    RESULTS["peers"] = rows


def section_p1(args):
    """p = 1 against fla's chunked linear attention (normalize=True divides by the running key sum)."""
    import fastmax_hf

    rows = []
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:  # noqa: BLE001
        chunk_linear_attn = None
        rows.append({"label": "fla chunk_linear_attn", "error": f"fla not importable: {err}"})
    for D in (64, 128):
        for N in (4096, 16384, 65536, 131072):
            def make(N=N, D=D):
                return [torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(3)]
            calls = {"fastmax": lambda q, k, v: (lambda: fastmax_hf.fastmax(q, k, v, causal=True, p=1, normalize=True))}
            if chunk_linear_attn is not None:
                calls["fla_chunk_linear_attn"] = bnhd(lambda q, k, v: chunk_linear_attn(q, k, v, normalize=True))
            entry = _peer_row(f"p=1 N={N} D={D}", make, calls, True)
            # the same call with normalize's scaling on its kernels (kernels/normalize.py)
            with kernel_settings({"fused_normalize": True}):
                entry["fastmax_fused_normalize"] = timed("fastmax_fused_normalize", make, calls["fastmax"], True)
            for name in ("fastmax", "fla_chunk_linear_attn"):
                if "ms" in entry.get(name, {}) and "ms" in entry["fastmax_fused_normalize"]:
                    entry[f"fused_normalize_over_{name}"] = entry["fastmax_fused_normalize"]["ms"] / entry[name]["ms"]
            entry.update(N=N, D=D, p=1)
            ratios = {key: entry[key] for key in entry if key.startswith("fused_normalize_over")}
            print(json.dumps({"label": entry["label"], **ratios}), flush=True)
            rows.append(entry)
    RESULTS["p1"] = rows


def section_retention(args):
    """Power retention (q . k)^2, a 2560-feature state at D=64; its first call autotunes."""
    rows = []
    scale_check = lambda out, q, k, v: check_tail(out, q, k, v, True, q.shape[-1] ** -0.5)  # noqa: E731
    try:
        from retention import power_retention
    except Exception as err:  # noqa: BLE001
        power_retention = None
        rows.append({"label": "power_retention", "error": f"retention not importable: {err}"})
    if power_retention is not None:
        for N in (16384, 65536):
            def make(N=N):
                return [torch.randn(1, 16, N, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(3)]
            call = bnhd(lambda q, k, v: power_retention(q, k, v, deg=2, chunk_size=1024))
            t0 = time.time()
            timed("warm-up", make, call, True)  # autotuning, outside the timing
            entry = _peer_row(f"retention N={N} D=64", make, {"fastmax": lambda q, k, v: fastmax_call(q, k, v, True),
                                                               "power_retention": call}, True, scale_check)
            entry.update(N=N, D=64, warmup_s=round(time.time() - t0, 1))
            rows.append(entry)
    RESULTS["retention"] = rows


def section_window(args):
    """fastmax(window=W) on the kernels against plain fastmax, each checked on its last rows."""
    import fastmax_hf

    rows = []
    W = args.window_size
    for D in ints(args.dims):
        for N in ints(args.window_lengths):
            for backward in (False, True):
                make = bf16_inputs(1, 16, N, D, backward)
                entry = {"N": N, "D": D, "W": W, "pass": "fwd+bwd" if backward else "fwd"}

                def check_window(out, q, k, v, rows=128):
                    from fastmax_hf import fastmax_reference

                    want = fastmax_reference(q[:1, :2, -rows:].double(), k[:1, :2].double(), v[:1, :2].double(),
                                             causal=True, window=W)
                    got = out[:1, :2, -rows:].double()
                    return ((got - want).norm() / want.norm()).item()

                # both through the public function: at short N the calls wait on the host, and
                # plain fastmax called on the kernels directly would skip the host work the
                # window's call does in fastmax_hf.fastmax
                entry["fastmax"] = timed("fastmax", make, lambda q, k, v: (
                    lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton")), backward,
                    lambda out, q, k, v: check_tail(out, q, k, v, True, q.shape[-1] ** -0.5), graph=True)
                entry["window"] = timed("window", make, lambda q, k, v: (
                    lambda: fastmax_hf.fastmax(q, k, v, causal=True, window=W, backend="triton")), backward,
                    check_window, graph=True)
                if "ms" in entry["fastmax"] and "ms" in entry["window"]:
                    entry["window_over_fastmax"] = entry["window"]["ms"] / entry["fastmax"]["ms"]
                if "graph_ms" in entry["fastmax"] and "graph_ms" in entry["window"]:
                    # the kernels' cost alone: the same work replayed from CUDA graphs
                    entry["window_over_fastmax_graph"] = entry["window"]["graph_ms"] / entry["fastmax"]["graph_ms"]
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    RESULTS["window"] = rows


def bnhd(fn):
    """call_for of a peer that takes (B, N, H, D) inputs and may return a tuple, on (B, H, N, D) ones."""
    return lambda q, k, v: (lambda: _first(fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def section_decode(args):
    from fastmax_hf.recurrent import fastmax_step

    rows = []
    B, Hq, Hk = 1, 32, 8
    for D in (64, 128):
        for ctx in (4096, 16384, 65536, 131072):
            entry = {"B": B, "Hq": Hq, "Hk": Hk, "D": D, "context": ctx}
            q1 = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
            k1 = torch.randn(B, Hk, 1, D, device="cuda", dtype=torch.bfloat16)
            v1 = torch.randn(B, Hk, 1, D, device="cuda", dtype=torch.bfloat16)
            try:
                kp = torch.randn(B, Hk, 256, D, device="cuda", dtype=torch.bfloat16)
                _, state = fastmax_step(torch.randn(B, Hq, 256, D, device="cuda", dtype=torch.bfloat16), kp, kp, None)
                entry["fastmax_step"] = {"ms": bench_ms(lambda: fastmax_step(q1, k1, v1, state)),
                                         "state_mib": state.nbytes() / 2**20}
            except Exception as err:  # noqa: BLE001
                entry["fastmax_step"] = {"error": str(err)[:200]}
            try:
                kc = torch.randn(B, Hk, ctx, D, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn(B, Hk, ctx, D, device="cuda", dtype=torch.bfloat16)
                entry["sdpa_kv_cache"] = {
                    "ms": bench_ms(lambda: F.scaled_dot_product_attention(q1, kc, vc, enable_gqa=True)),
                    "cache_mib": 2 * kc.numel() * 2 / 2**20}
                del kc, vc
            except Exception as err:  # noqa: BLE001
                entry["sdpa_kv_cache"] = {"error": "OOM" if is_oom(err) else str(err)[:200]}
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    RESULTS["decode"] = rows


def bools(text):
    return [part.strip().lower() == "true" for part in text.split(",")]  # parse_args checked them


def ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="long,crossover,seed,fla,decode",
                        help=f"comma-separated, from {','.join(SECTION_NAMES)}")
    parser.add_argument("--lengths", default="1024,4096,16384,65536,131072,262144,1048576", help="long: N")
    parser.add_argument("--dims", default="64,128", help="long: head dims")
    parser.add_argument("--sdpa_max", type=int, default=262144, help="longest N timed for SDPA")
    parser.add_argument("--crossover_lengths", default="256,512,1024,2048,4096,8192,16384")
    parser.add_argument("--crossover_dims", default="16,32,64,128")
    parser.add_argument("--quad_lengths", default="1024,2048,4096,8192,16384", help="quadratic: N")
    parser.add_argument("--quad_batches", default="1,8", help="quadratic: batch sizes")
    parser.add_argument("--window_size", type=int, default=64, help="window: W")
    parser.add_argument("--window_lengths", default="4096,16384,65536,131072", help="window: N")
    parser.add_argument("--quad_flex_lengths", default="1024,4096,16384", help="quadratic: N timed for FlexAttention")
    parser.add_argument("--tune", default='{"linear_chunk": [512, 1024], "linear_block_m": [64, 128]}',
                        help="tune: JSON object mapping kernel setting names to lists of values; "
                             "every combination is timed (default: %(default)s)")
    parser.add_argument("--tune_regimes", default="linear", help="tune: the regimes timed, e.g. linear,quadratic")
    parser.add_argument("--tune_n", type=int, default=16384, help="tune: sequence length")
    parser.add_argument("--tune_dims", default="64,128", help="tune: head dims")
    parser.add_argument("--tune_causal", default="true", help="tune: with the causal mask, without, or both "
                                                              "(true,false)")
    add_settings_argument(parser)
    parser.add_argument("--out", default=None, help="JSON results file (rewritten after each section)")
    args = parser.parse_args(argv)
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTION_NAMES))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTION_NAMES)}")
    if "tune" in sections:
        sweep_combinations(json_object(args.tune, "--tune"))  # refuse a malformed grid before anything runs
        bad = sorted(set(args.tune_regimes.split(",")) - {"linear", "quadratic"})
        if bad:
            parser.error(f"--tune_regimes: unknown {bad}; choose from linear, quadratic")
        if not set(args.tune_causal.lower().split(",")) <= {"true", "false"}:
            parser.error(f"--tune_causal: a comma-separated list of true/false, got {args.tune_causal!r}")
    args.section_list = sections
    args.settings_changes = json_object(args.settings)
    return args


def check_settings(args):
    """Refuse unknown setting names or bad values (of --settings and of every --tune combination)
    before anything runs: the kernels' settings validate them."""
    with kernel_settings(args.settings_changes):
        for combo in sweep_combinations(json_object(args.tune, "--tune")) if "tune" in args.section_list else ():
            with kernel_settings(combo):
                pass


def main(argv=None):
    args = parse_args(argv)
    check_settings(args)
    require_cuda("bench_kernels")
    torch.backends.cuda.matmul.allow_tf32 = True
    with kernel_settings(args.settings_changes):
        RESULTS["meta"] = run_metadata()
        print(json.dumps(RESULTS["meta"]), flush=True)
        for name in args.section_list:
            t0 = time.time()
            globals()[f"section_{name}"](args)
            print(f"# section {name}: {time.time() - t0:.0f} s", flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
