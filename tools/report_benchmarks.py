"""Turn the benchmark JSON written by bench_kernels.py into BENCHMARKS.md tables and PNG plots.

Reads --results (bench_kernels' JSON: its "long", "seed", "fla" and "decode" sections),
--quadratic (a bench_kernels JSON with a "quadratic" section: the quadratic regime's targets)
and --crossover (a bench_kernels JSON with a "crossover" section; by default the --quadratic
file's, else crossover.json beside --results, else --results' own). Writes --out (markdown: the tables, the plots linked relative to
it, then --analysis appended as written) and the plots long_context.png and crossover.png into
--plots (by default the folder of --results). Needs no GPU.

    python tools/report_benchmarks.py --results benchmarks/h100/kernels/bench.json --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ms(entry, key):
    value = entry.get(key, {})
    if isinstance(value, dict) and "ms" in value:
        return value["ms"]
    return None


def cell(entry, key, digits=2):
    value = entry.get(key, {})
    if isinstance(value, dict) and "ms" in value:
        return f"{value['ms']:.{digits}f}"
    if isinstance(value, dict) and "error" in value:
        return "OOM" if value["error"] == "OOM" else "–"
    return "–"


def mem(entry, key):
    value = entry.get(key, {})
    return f"{value['peak_mib'] / 1024:.2f}" if isinstance(value, dict) and "peak_mib" in value else "–"


def regime_of(entry, D, passname):
    """The regime that ran, as bench_kernels recorded it (older files: the kernels' current choice)."""
    if "regime" in entry:
        return entry["regime"]
    from fastmax_hf import kernels

    return kernels.choose_regime(entry["N"], D, 2, backward=passname == "fwd+bwd")


def long_table(rows, D, passname):
    lines = [f"| N | fastmax ms | SDPA flash ms | SDPA cuDNN ms | fastmax / best SDPA | fastmax GiB | cuDNN GiB | fastmax TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for e in rows:
        if e["D"] != D or e["pass"] != passname:
            continue
        ratio = f"{e['ratio_to_best_sdpa']:.2f}" if "ratio_to_best_sdpa" in e else "–"
        tflops = e["fastmax"].get("tflops") if isinstance(e.get("fastmax"), dict) else None
        if regime_of(e, D, passname) == "quadratic":
            tflops = None  # the quadratic kernel ran: the linear-regime count does not apply
        lines.append(f"| {e['N']:,} | {cell(e, 'fastmax')} | {cell(e, 'sdpa_flash')} | {cell(e, 'sdpa_cudnn')} | {ratio} | "
                     f"{mem(e, 'fastmax')} | {mem(e, 'sdpa_cudnn')} | {f'{tflops:.0f}' if tflops else '–'} |")
    return "\n".join(lines)


def plot_long(rows, path):
    dims = sorted({e["D"] for e in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), squeeze=False)
    for ax, D in zip(axes[0], dims):
        for key, label, style in (("fastmax", "fastmax", "o-"), ("sdpa_flash", "SDPA flash", "s--"),
                                  ("sdpa_cudnn", "SDPA cuDNN", "^--")):
            pts = [(e["N"], ms(e, key)) for e in rows if e["D"] == D and e["pass"] == "fwd+bwd" and ms(e, key)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("forward+backward ms")
        ax.set_title(f"causal, bf16, B=1, H=16, D={D}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_crossover(rows, path):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for D in (16, 32, 64, 128):
        pts = [(e["N"], ms(e, "linear") / ms(e, "quadratic")) for e in rows
               if e["D"] == D and e["pass"] == "fwd+bwd" and ms(e, "linear") and ms(e, "quadratic")]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"D={D}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("linear ms / quadratic ms (fwd+bwd)")
    ax.set_title("Where the linear kernel starts to win")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quadratic_section(data, path):
    """The quadratic regime forced: fastmax against SDPA and FlexAttention, by B, D, mask and N."""
    meta = data["meta"]
    lines = ["| B | D | causal | N | pass | fastmax | SDPA flash | SDPA cuDNN | fastmax / best SDPA | "
             "FlexAttention log f | Flex / fastmax |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in data["quadratic"]:
        ratio = f"{e['ratio_to_best_sdpa']:.2f}" if "ratio_to_best_sdpa" in e else "–"
        flex = cell(e, "flex_log_f", 3) if "flex_log_f" in e else ""
        flex_ratio = f"{e['flex_over_fastmax']:.2f}" if "flex_over_fastmax" in e else ""
        lines.append(f"| {e['B']} | {e['D']} | {e['causal']} | {e['N']:,} | {e['pass']} | {cell(e, 'fastmax', 3)} | "
                     f"{cell(e, 'sdpa_flash', 3)} | {cell(e, 'sdpa_cudnn', 3)} | {ratio} | {flex} | {flex_ratio} |")
    return (f"## Quadratic regime forced: H=16, bf16 (ms)\n\n{meta['gpu']}, torch {meta['torch']}, Triton "
            f"{meta['triton']}, {meta['date']}; raw numbers `{path}`. FlexAttention computes exact Fastmax "
            "(score_mod = log f, compiled), timed at B=1 with the causal mask.\n\n" + "\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/h200/kernels/bench.json", help="bench_kernels' JSON")
    parser.add_argument("--quadratic", default="benchmarks/h200/quadratic/bench_quadratic.json",
                        help="JSON with a quadratic section ('none': no table)")
    parser.add_argument("--crossover", default=None,
                        help="JSON with a crossover section (default: crossover.json beside --results, else the "
                             "--quadratic file's; 'none': no table)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--plots", default=None, help="folder for the PNG plots (default: the folder of --results)")
    parser.add_argument("--analysis", default="benchmarks/analysis.md",
                        help="hand-written notes appended at the end ('none': nothing)")
    args = parser.parse_args(argv)
    results_dir = Path(args.results).parent
    if args.crossover is None:
        quadratic = Path(args.quadratic)
        has_own = args.quadratic != "none" and quadratic.exists() and "crossover" in json.loads(quadratic.read_text())
        beside = results_dir / "crossover.json"
        args.crossover = str(beside if beside.exists() or not has_own else quadratic)
    if args.plots is None:
        args.plots = str(results_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    if args.crossover == "none":
        crossover = []
    elif Path(args.crossover).exists():
        crossover = json.loads(Path(args.crossover).read_text()).get("crossover", [])
    else:  # a bench run that timed its own crossover section
        crossover = results.get("crossover", [])
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    link = lambda name: Path(os.path.relpath(plots / name, out.parent)).as_posix()  # noqa: E731
    meta = results["meta"]
    parts = [f"# Benchmarks\n\nGPU: **{meta['gpu']}**, torch {meta['torch']}, Triton {meta['triton']}, "
             f"fastmax_hf {meta['fastmax_hf']}, {meta['date']}. Produced by `tools/bench_kernels.py` "
             f"(raw numbers: `{args.results}`) and rendered by `tools/report_benchmarks.py`. Times are medians "
             "of `triton.testing.do_bench`; every fastmax configuration was checked against float64 Fastmax "
             "before it was timed (`rel_err` in the JSON). Peak memory is `torch.cuda.max_memory_allocated` "
             "above the inputs' allocation during one call."]
    if "long" in results:
        plot_long(results["long"], plots / "long_context.png")
        parts.append(f"## Long context: B=1, H=16, bf16, causal\n\n![long context]({link('long_context.png')})")
        for D in sorted({e["D"] for e in results["long"]}):
            for passname in ("fwd", "fwd+bwd"):
                parts.append(f"### D={D}, {passname}\n\n" + long_table(results["long"], D, passname))
        parts.append("TFLOP/s counts the useful work of the linear regime: 4 F Dv FLOPs per token and head "
                     "forward, 12 F Dv forward+backward, F = 1 + D + D(D+1)/2. Up to the crossover the "
                     "quadratic kernel runs instead (`kernels/ops.py::CROSSOVER`); its TFLOP/s cell is left empty.")
    quadratic = Path(args.quadratic)
    if args.quadratic != "none" and quadratic.exists():
        parts.append(quadratic_section(json.loads(quadratic.read_text()), args.quadratic))
    if crossover:
        plot_crossover(crossover, plots / "crossover.png")
        lines = ["| D | N | quadratic fwd | linear fwd | quadratic fwd+bwd | linear fwd+bwd |", "|---|---|---|---|---|---|"]
        by_key = {}
        for e in crossover:
            by_key.setdefault((e["D"], e["N"]), {})[e["pass"]] = e
        for (D, N), passes in sorted(by_key.items()):
            f, b = passes.get("fwd", {}), passes.get("fwd+bwd", {})
            lines.append(f"| {D} | {N:,} | {cell(f, 'quadratic')} | {cell(f, 'linear')} | {cell(b, 'quadratic')} | {cell(b, 'linear')} |")
        parts.append("## Crossover between the two kernels (ms, bf16, causal, B=1, H=16)\n\n"
                     f"![crossover]({link('crossover.png')})\n\n" + "\n".join(lines) +
                     "\n\n`backend=\"auto\"` switches at the lengths in `kernels/ops.py::CROSSOVER`, read off "
                     "this table (forward alone stays quadratic longer than forward+backward).")
    if "seed" in results:
        lines = ["| B | H | N | D | causal | pass | fastmax bf16 | fastmax fp32 | seed PyTorch fp32 | SDPA bf16 |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for e in results["seed"]:
            lines.append(f"| {e['B']} | {e['H']} | {e['N']} | {e['D']} | {e['causal']} | {e.get('pass', 'fwd')} | "
                         f"{cell(e, 'fastmax_bfloat16')} | {cell(e, 'fastmax_float32')} | {cell(e, 'seed_pytorch_fp32')} | "
                         f"{cell(e, 'sdpa_bf16')} |")
        parts.append("## The seed library's configurations (ms)\n\n" + "\n".join(lines) +
                     "\n\nThe seed's own CUDA kernels, measured on an H100 (SPEC): B=64,H=16,N=10000,D=64 forward "
                     "3108 ms non-causal / 2077 ms causal; B=64,H=8,N=10000,D=32 1066 / 769 ms; B=64,H=8,N=1000,D=64 "
                     "295 / 191 ms; forward+backward B=64,H=8,N=10000,D=32 5683 / 4757 ms. The seed's PyTorch "
                     "formulation runs out of the 80 GB wherever OOM is written.")
    if isinstance(results.get("fla"), list):
        lines = ["| N | pass | fastmax | fla parallel_based | fla fused_chunk_based |", "|---|---|---|---|---|"]
        for e in results["fla"]:
            lines.append(f"| {e['N']:,} | {e['pass']} | {cell(e, 'fastmax')} | {cell(e, 'parallel_based')} | "
                         f"{cell(e, 'fused_chunk_based')} |")
        parts.append("## Against fla's Based kernels: D=16, Dv=64, B=1, H=16, bf16, causal (ms)\n\n" + "\n".join(lines))
    if isinstance(results.get("peers"), list) and results["peers"]:
        lines = ["| B | H | N | D | causal | pass | fastmax ms | cuDNN ms | fastmax / cuDNN |", "|---|---|---|---|---|---|---|---|---|"]
        for e in results["peers"]:
            if "sdpa_cudnn" not in e:
                continue
            a, b = ms(e, "fastmax"), ms(e, "sdpa_cudnn")
            ratio = f"{a / b:.2f}" if a and b else "–"
            lines.append(f"| {e['B']} | {e['H']} | {e['N']:,} | {e['D']} | {e['causal']} | {e['pass']} | "
                         f"{cell(e, 'fastmax')} | {cell(e, 'sdpa_cudnn')} | {ratio} |")
        note = f"\n\n{results['peers_note']}" if results.get("peers_note") else ""
        parts.append("## Other batch sizes, heads and non-causal attention (bf16)\n\n" + "\n".join(lines) + note)
    if "decode" in results:
        lines = ["| D | context | fastmax step ms | state MiB | SDPA over KV cache ms | KV cache MiB |", "|---|---|---|---|---|---|"]
        for e in results["decode"]:
            fm, sd = e.get("fastmax_step", {}), e.get("sdpa_kv_cache", {})
            lines.append(f"| {e['D']} | {e['context']:,} | {fm.get('ms', float('nan')):.3f} | {fm.get('state_mib', float('nan')):.1f} | "
                         f"{sd.get('ms', float('nan')):.3f} | {sd.get('cache_mib', float('nan')):.0f} |")
        parts.append("## Decoding one token, one layer (B=1, Hq=32, Hk=8, bf16)\n\n" + "\n".join(lines))
    analysis = Path(args.analysis)
    if args.analysis != "none" and analysis.exists():
        parts.append(analysis.read_text().strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out} and {plots}/")


if __name__ == "__main__":
    main()
