"""Where the hybrid window's cost over plain fastmax goes at a short, host-bound length (4k).

At 4k tokens, B=1, H=16 both calls run the quadratic kernels and take less GPU time than the
host needs to launch them, so a do_bench ratio mixes kernel time with host time and drifts with
the host. Sections, each printing JSON lines (bf16, causal, W = 64, the public
``fastmax_hf.fastmax`` unless named):

  kernels  per call, for plain fastmax and the window: CUDA-event wall of fwd, bwd and fwd+bwd
           (200 calls each, after 10), host time per fwd+bwd with the GPU not awaited (200 calls
           queued), and torch.profiler's GPU time per kernel over 20 calls (what
           benchmarks/h100/window/shipped/ab.jsonl holds, --dims 64);
  rounds   interleaved rounds in one process, each 20 fwd+bwd calls of plain then 20 of the
           window (synchronised), and the median of the per-round ratios: host drift cancels;
  tiles    the window's three quadratic kernels at other tiles and warps (plain fastmax kept at
           its defaults), each checked against the default tiles' gradients, then timed by GPU
           kernel sums and by interleaved rounds against plain fastmax (D=64 only);
  cprofile cProfile of 50 fwd+bwd calls of each: the Python functions with the most own time;
  host     host time of each layer of the call (public forward, the kernels' entry, the raw
           forward and backward launchers, the autograd backward), plain against the window.

    python tools/window_ab.py --sections kernels,rounds --tag f5c4aaa > window_ab.jsonl

Every configuration is first checked against float64 on its last 128 query rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gpu_common import host_profile, rel_err, require_cuda

WINDOW = 64


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def make_inputs(N: int, D: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16, generator=g)


def public_calls(q, k, v, do):
    """{"fastmax": fwd+bwd, "window": fwd+bwd} through the public function, and their forwards."""
    import fastmax_hf

    forwards = {"fastmax": lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton"),
                "window": lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton", window=WINDOW)}
    steps = {name: (lambda f=f: torch.autograd.grad(f(), (q, k, v), do)) for name, f in forwards.items()}
    return forwards, steps


def check_last_rows(q, k, v, forwards, rows: int = 128) -> dict:
    """rel. error of each forward's last ``rows`` query rows against float64 Fastmax."""
    from fastmax_hf import fastmax_reference

    exact = [x.detach().double() for x in (q, k, v)]
    q_tail = exact[0][:, :, -rows:]
    errors = {}
    for name, forward in forwards.items():
        kw = {"window": WINDOW} if name == "window" else {}
        want = fastmax_reference(q_tail, exact[1], exact[2], causal=True, **kw)
        errors[name] = rel_err(forward().detach()[:, :, -rows:], want)
    return errors


def wall_ms(fn, reps: int = 200, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def host_ms(fn, reps: int = 200) -> float:
    """Host time per call with the GPU not awaited (the calls queue up)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return elapsed


def kernel_ms(fn, reps: int = 20) -> dict:
    """GPU time per call of each kernel (torch.profiler), in ms."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        t = getattr(event, "device_time_total", 0) or 0
        if t > 0:
            times[event.key[:40]] = round(t / reps / 1e3, 4)
    return times


def section_kernels(args):
    for D in args.dims:
        q, k, v, do = make_inputs(args.N, D)
        forwards, steps = public_calls(q, k, v, do)
        errors = check_last_rows(q, k, v, forwards)
        for name, forward in forwards.items():
            out = forward()
            backward = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            sums = kernel_ms(steps[name])
            emit({"section": "kernels", "tag": args.tag, "N": args.N, "D": D, "impl": name,
                  "rel_err_last_rows": errors[name], "fwd_ms": wall_ms(forward), "bwd_ms": wall_ms(backward),
                  "fwdbwd_ms": wall_ms(steps[name]), "fwdbwd_host_ms": host_ms(steps[name]),
                  "gpu_kernels_ms": sums, "gpu_sum_ms": round(sum(sums.values()), 4)})


def interleaved_ratio(steps: dict, rounds: int) -> dict:
    """Rounds of 20 synchronised calls of steps["fastmax"] then 20 of steps["window"]: the
    median per-call times and the median (min, max) of the per-round ratios window / fastmax."""
    for step in steps.values():
        wall_ms(step, reps=10)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(wall_ms(step, reps=20, warmup=0))
    ratios = sorted(w / f for w, f in zip(times["window"], times["fastmax"]))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"fastmax_ms_median": median(times["fastmax"]), "window_ms_median": median(times["window"]),
            "ratio_median": median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "fastmax_ms": times["fastmax"], "window_ms": times["window"]}


def section_rounds(args):
    for D in args.dims:
        q, k, v, do = make_inputs(args.N, D)
        forwards, steps = public_calls(q, k, v, do)
        errors = check_last_rows(q, k, v, forwards)
        emit({"section": "rounds", "tag": args.tag, "N": args.N, "D": D, "rel_err_last_rows": errors,
              **interleaved_ratio(steps, args.rounds)})


# (forward, dq, dk/dv) tiles: (block_m, block_n, warps, stages); the first row is plain Fastmax's defaults,
# the second the hybrid's own (window_ops._hybrid_quad_config)
TILES = [
    ((128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3)),
    ((64, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
    ((128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
    ((64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3)),
    ((64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3)),
    ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)),
    ((128, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)),
    ((128, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2)),
    ((64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3)),
]


def section_tiles(args):
    """Each row of TILES for the window's kernels only: its gradients against the default
    tiles', its GPU kernel sums, and interleaved rounds against plain fastmax at its defaults."""
    from fastmax_hf import kernels

    q, k, v, do = make_inputs(args.N, 64)
    _, steps = public_calls(q, k, v, do)
    default = [x.float() for x in steps["window"]()]
    for fwd, dq, dkdv in TILES:
        chosen = {}
        for prefix, tiles in (("quad_fwd_", fwd), ("quad_dq_", dq), ("quad_dkdv_", dkdv)):
            chosen.update(dict(zip((prefix + "block_m", prefix + "block_n", prefix + "warps", prefix + "stages"), tiles)))

        def window_step(chosen=chosen):
            with kernels.settings(**chosen):
                return steps["window"]()

        record = {"section": "tiles", "tag": args.tag, "N": args.N, "fwd": fwd, "dq": dq, "dkdv": dkdv}
        try:
            got = [x.float() for x in window_step()]
            record["rel_err_vs_default"] = max(rel_err(a, b) for a, b in zip(got, default))
            sums = kernel_ms(window_step)
            rounds = interleaved_ratio({"fastmax": steps["fastmax"], "window": window_step}, max(args.rounds // 2, 1))
        except Exception as error:  # a tile that does not compile or fit is reported, not fatal
            emit({**record, "error": repr(error)[:300]})
            continue
        emit({**record, "gpu_kernels_ms": sums, "gpu_sum_ms": round(sum(sums.values()), 4),
              **{key: rounds[key] for key in ("ratio_median", "ratio_min", "ratio_max", "window_ms_median",
                                              "fastmax_ms_median")}})


def section_cprofile(args):
    q, k, v, do = make_inputs(args.N, 64)
    _, steps = public_calls(q, k, v, do)
    for name, step in steps.items():
        wall_ms(step, reps=10)
        profile = host_profile(step, calls=50, top=22)
        emit({"section": "cprofile", "tag": args.tag, "N": args.N, "impl": name, "profile": profile[-5000:]})


def host_layers(q, k, v, do) -> dict:
    """{layer: {"fastmax": call, "window": call}}, from the public call down to the raw
    launchers, each a host-timed unit (``section_host``)."""
    import fastmax_hf
    from fastmax_hf import kernels
    from fastmax_hf.kernels import ops, window_ops
    from fastmax_hf.options import FastmaxOptions

    options = FastmaxOptions.resolve(q.shape[-1], window=WINDOW)
    plain_options = FastmaxOptions.resolve(q.shape[-1])
    coefficients = (float(options.scale), int(options.p), float(options.a0), float(options.a1), float(options.a2))
    gain = window_ops._constant_gain(1.0, q.shape[1], str(q.device))
    with torch.no_grad():
        out_p, den_p = ops.quadratic_forward(q, k, v, None, True, *coefficients)
        out_w, den_w, m_w = window_ops.fused_quadratic_forward(q, k, v, None, gain, coefficients, WINDOW)
    graph_p = fastmax_hf.fastmax(q, k, v, causal=True, backend="triton")
    graph_w = fastmax_hf.fastmax(q, k, v, causal=True, backend="triton", window=WINDOW)
    return {
        "public_fwd": {"fastmax": lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton"),
                       "window": lambda: fastmax_hf.fastmax(q, k, v, causal=True, backend="triton", window=WINDOW)},
        "core_fwd": {"fastmax": lambda: kernels.triton_attention(q, k, v, plain_options, causal=True),
                     "window": lambda: kernels.triton_window_attention(q, k, v, options, window=WINDOW)},
        "launch_fwd": {"fastmax": lambda: ops.quadratic_forward(q, k, v, None, True, *coefficients),
                       "window": lambda: window_ops.fused_quadratic_forward(q, k, v, None, gain, coefficients,
                                                                             WINDOW)},
        "launch_bwd": {"fastmax": lambda: ops.quadratic_backward(q, k, v, None, out_p, den_p, do, True, *coefficients),
                       "window": lambda: window_ops.fused_quadratic_backward(q, k, v, None, out_w, den_w, m_w, gain,
                                                                              do, coefficients, WINDOW)},
        "autograd_bwd": {"fastmax": lambda: torch.autograd.grad(graph_p, (q, k, v), do, retain_graph=True),
                         "window": lambda: torch.autograd.grad(graph_w, (q, k, v), do, retain_graph=True)},
    }


def section_host(args):
    """Host time per call (GPU not awaited, 200 calls, median of 5 interleaved repeats) of each
    layer of a 4k forward+backward, plain fastmax against the window (quadratic regime, D=64):
    the public forward, the kernels' entry point, the raw forward and backward launchers, and
    the autograd backward; which layer holds the window's extra host time."""
    q, k, v, do = make_inputs(args.N, 64)
    for layer, calls in host_layers(q, k, v, do).items():
        for call in calls.values():
            wall_ms(call, reps=10)
        times = {name: [] for name in calls}
        for _ in range(5):
            for name, call in calls.items():
                times[name].append(host_ms(call))
        median = {name: sorted(ts)[2] for name, ts in times.items()}
        emit({"section": "host", "tag": args.tag, "N": args.N, "D": 64, "layer": layer,
              "fastmax_host_ms": median["fastmax"], "window_host_ms": median["window"],
              "window_minus_fastmax_ms": median["window"] - median["fastmax"], "all_ms": times})


SECTIONS = {"kernels": section_kernels, "rounds": section_rounds, "tiles": section_tiles, "cprofile": section_cprofile,
            "host": section_host}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="kernels,rounds", help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--N", type=int, default=4096, help="tokens")
    parser.add_argument("--dims", default="64,128", help="head sizes of the kernels and rounds sections")
    parser.add_argument("--rounds", type=int, default=30, help="rounds: interleaved rounds")
    parser.add_argument("--tag", default="", help="a label copied into every record (the tree timed)")
    args = parser.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",") if x]
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    require_cuda("window_ab")
    for name in sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
