"""Convert SmolLM2-135M (a GGUF file) to fastmax and compare the results with the teacher (issue 18).

    python tools/smollm2_study.py --gguf_file /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out_dir runs/smollm2

(tools/smollm2_carry.py brings the file to a GPU machine.) Runs, each a run of the user scripts,
scripts/finetune.py then scripts/eval_long_context.py, into --out_dir/<run>/:

  teacher   no training: the GGUF model evaluated with sdpa (the teacher) and with fastmax
            swapped in (the straight swap);
  fastmax   finetune.py --mode distill: attention transfer for --distill_fraction of the
            steps, then fine-tuning on the teacher's KL, plain fastmax;
  window    the same with the hybrid window (--window, default 64: exact softmax over the last
            64 positions, fastmax over the earlier ones);
  fastmax_lr / window_lr  the same two at --alt_learning_rate (a second learning rate);
  window_learned  window with a learned gain per query head and layer on the fastmax part
            (finetune.py --learn_window_gain);
  swap_kd   no attention transfer: fastmax swapped in and fine-tuned on the teacher's KL
            for the same steps.

Training data: finetune.py's default corpus (the standard library's sources without the
held-out texts of fastmax_hf.data). Evaluation (eval_long_context.py) on the held-out texts
only: perplexity at --lengths on pydoc-topics and heldout-stdlib, passkey retrieval on
--passkey_lengths x --depths, and the dozen factual prompts. finetune.py's own log adds the
stdlib validation perplexity at the switch (step 0), at the end of attention transfer and at
the end.

--jobs runs that many runs at once (a 135M model leaves most of a large GPU idle). Every run
resumes: a finished finetune.py run (results.json) is not repeated, an interrupted one continues
from its latest checkpoint, and eval_long_context.py skips the points already measured. Writes
--out_dir/summary.json (every figure, ratios to the teacher, tokens, times, run metadata),
summary.md (the tables) and quality.png (perplexity by length, passkey accuracy by length).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "scripts" / "finetune.py"
EVALUATE = ROOT / "scripts" / "eval_long_context.py"
DATASETS = ("pydoc-topics", "heldout-stdlib")  # fastmax_hf.data.HELD_OUT_CORPORA
RUNS = ("teacher", "fastmax", "window", "fastmax_lr", "window_lr", "window_learned", "swap_kd")
TEACHER = "sdpa"  # the teacher's rows in the teacher run's results; "fastmax" there is the straight swap


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf_file", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--runs", default="teacher,fastmax,window", help=f"comma-separated, of {','.join(RUNS)}")
    p.add_argument("--jobs", type=int, default=3, help="runs at once")
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8, help="blocks per step")
    p.add_argument("--max_train_steps", type=int, default=600, help="steps of every conversion (all stages)")
    p.add_argument("--distill_fraction", type=float, default=0.1, help="share of the steps in attention transfer")
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--alt_learning_rate", type=float, default=6e-4, help="of the *_lr runs")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--lengths", default="2048,4096,8192,16384", help="perplexity lengths")
    p.add_argument("--passkey_lengths", default="1024,2048,4096,8192")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--ppl_documents", type=int, default=8)
    p.add_argument("--mixed_precision", default="bf16", choices=("no", "bf16"), help="of the conversions")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="of the evaluations")
    p.add_argument("--cache_dir", default=None, help="finetune.py / eval_long_context.py token caches")
    p.add_argument("--finetune_args", default="", help="more finetune.py arguments for every conversion")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def conversion_args(args, name: str) -> list[str]:
    """finetune.py's arguments of one conversion run."""
    steps = args.max_train_steps
    lr = args.alt_learning_rate if name.endswith("_lr") else args.learning_rate
    common = ["--gguf_file", args.gguf_file, "--block_size", str(args.block_size),
              "--per_device_train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
              "--learning_rate", str(lr), "--kd_weight", "1", "--mixed_precision", args.mixed_precision,
              "--eval_every", str(max(1, steps // 6)), "--eval_blocks", "64", "--checkpointing_steps", "100"]
    if name == "swap_kd":
        return ["--mode", "swap", *common]
    distill = ["--mode", "distill", *common, "--distill_steps", str(max(1, round(steps * args.distill_fraction)))]
    return distill + (["--window", str(args.window)] if name.startswith("window") else []) + (
        ["--learn_window_gain"] if name == "window_learned" else [])


def run_command(cmd: list[str], log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}  > {log}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed ({done.returncode}); see {log}")


def evaluations(args, model: list[str], attn: str, run_dir: Path) -> list[tuple[list[str], Path]]:
    """eval_long_context.py commands: perplexity on each held-out text; passkey and factual once."""
    cache = ["--cache_dir", args.cache_dir] if args.cache_dir else []
    longest = max(ints(args.lengths))
    positions = max(longest, *ints(args.passkey_lengths)) + 64  # RoPE past the teacher's 8k; room for generated tokens
    commands = []
    for i, dataset in enumerate(DATASETS):
        sections = "perplexity,factual" if i == 0 else "perplexity"
        out = run_dir / f"eval_{dataset}"
        cmd = [sys.executable, str(EVALUATE), *model, "--attn", attn, "--dtype", args.dtype,
               "--sections", sections, "--dataset", dataset, "--lengths", args.lengths,
               "--document_tokens", str(longest), "--ppl_documents", str(args.ppl_documents),
               "--max_positions", str(positions), *cache, "--output_dir", str(out)]
        if i == 0:  # the passkey grid has its own lengths: a second call with them (results merge)
            commands.append((cmd, out))
            cmd = [c if c != args.lengths else args.passkey_lengths for c in cmd]
            cmd[cmd.index("--sections") + 1] = "passkey"
            cmd += ["--depths", args.depths, "--trials", str(args.trials)]
            out = run_dir / "eval_passkey"
            cmd[cmd.index("--output_dir") + 1] = str(out)
        commands.append((cmd, out))
    return commands


def one_run(args, name: str) -> str:
    run_dir = Path(args.out_dir) / name
    started = time.perf_counter()
    if name == "teacher":
        model, attn = ["--gguf_file", args.gguf_file], f"{TEACHER},fastmax"
    else:
        model_dir = run_dir / "model"
        if not (model_dir / "results.json").exists():
            cmd = [sys.executable, str(FINETUNE), *conversion_args(args, name), "--output_dir", str(model_dir),
                   *(["--cache_dir", args.cache_dir] if args.cache_dir else []), *shlex.split(args.finetune_args)]
            if any((model_dir / "checkpoints").glob("step_*")):
                cmd += ["--resume_from_checkpoint", "latest"]
            run_command(cmd, run_dir / "finetune.log")
        model, attn = ["--model", str(model_dir)], "fastmax"
    for cmd, _ in evaluations(args, model, attn, run_dir):
        run_command(cmd, run_dir / "eval.log")
    (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return name


# --------------------------------------------------------------------------- summary


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run_figures(run_dir: Path, implementation: str) -> dict:
    """Perplexity by dataset and length, passkey accuracy by length (and by depth), factual answers."""
    figures = {"perplexity": {}, "passkey": {}, "passkey_by_depth": {}}
    for dataset in DATASETS:
        results = _read(run_dir / f"eval_{dataset}" / "results.json") or {}
        points = results.get("perplexity", {}).get(implementation, {})
        figures["perplexity"][dataset] = {n: r["perplexity"] for n, r in points.items() if "perplexity" in r}
    factual = (_read(run_dir / f"eval_{DATASETS[0]}" / "results.json") or {}).get("factual", {}).get(implementation)
    if factual:
        figures["factual"] = {"answered": factual["answered"], "total": factual["total"],
                              "completions": [p["completion"] for p in factual["prompts"]]}
    grid = (_read(run_dir / "eval_passkey" / "results.json") or {}).get("passkey", {}).get(implementation, {})
    for length, cells in grid.items():
        measured = [c for c in cells.values() if "accuracy" in c]
        if measured:
            figures["passkey"][length] = sum(c["correct"] for c in measured) / sum(c["trials"] for c in measured)
            figures["passkey_by_depth"][length] = {d: c["accuracy"] for d, c in cells.items() if "accuracy" in c}
    return figures


def training_figures(model_dir: Path) -> dict | None:
    """finetune.py's results: tokens, time, and the stdlib validation perplexity at the switch,
    after attention transfer and at the end."""
    results = _read(model_dir / "results.json")
    if results is None:
        return None
    evals = results["evaluations"]
    transfer = [e for e in evals if e["stage"] == "transfer"]
    return dict(tokens=results["tokens"], steps=results["steps"], train_time_s=results["train_time_s"],
                stages=results["stages"], fastmax=results["fastmax"],
                stdlib_val_ppl=dict(switched=evals[0]["val_ppl"], after_transfer=transfer[-1]["val_ppl"] if transfer else None,
                                    final=evals[-1]["val_ppl"]))


def summarize(args) -> dict:
    from gpu_common import run_metadata

    out = Path(args.out_dir)
    rows = {}
    if (out / "teacher").exists():
        rows["teacher"] = run_figures(out / "teacher", TEACHER)
        rows["swap"] = run_figures(out / "teacher", "fastmax")
    for name in RUNS[1:]:
        if (out / name).exists():
            rows[name] = run_figures(out / name, "fastmax")
            rows[name]["training"] = training_figures(out / name / "model")
    teacher = rows.get("teacher")
    if teacher:
        for row in rows.values():
            row["perplexity_over_teacher"] = {
                dataset: {n: ppl / teacher["perplexity"][dataset][n] for n, ppl in points.items()
                          if n in teacher["perplexity"][dataset]}
                for dataset, points in row["perplexity"].items()}
    targets = {}
    for name, row in rows.items():
        if name in ("teacher", "swap") or not teacher:
            continue
        ratios = [r for dataset in DATASETS for n, r in row["perplexity_over_teacher"][dataset].items()
                  if n in ("2048", "8192")]
        training = row.get("training") or {}
        targets[name] = dict(
            perplexity_within_10_percent_at_2k_and_8k=bool(ratios) and max(ratios) <= 1.10,
            worst_ratio_at_2k_and_8k=max(ratios) if ratios else None,
            at_most_20M_training_tokens=training.get("tokens", math.inf) <= 20_000_000,
            passkey_at_least_the_teachers=all(row["passkey"].get(n, -1) >= acc for n, acc in teacher["passkey"].items()),
            factual_as_many_as_the_teacher=row.get("factual", {}).get("answered", -1) >= teacher.get("factual", {}).get("answered", 0),
        )
    return dict(settings=vars(args), meta=run_metadata(), rows=rows, targets=targets)


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    lines = []
    lengths = sorted({n for r in rows.values() for d in DATASETS for n in r["perplexity"][d]}, key=int)
    for dataset in DATASETS:
        lines += [f"Perplexity on {dataset} (ratio to the teacher in brackets)", "",
                  "| run | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        for name, r in rows.items():
            cells = []
            for n in lengths:
                ppl = r["perplexity"][dataset].get(n)
                ratio = r.get("perplexity_over_teacher", {}).get(dataset, {}).get(n)
                cells.append("-" if ppl is None else f"{ppl:.2f}" + (f" ({ratio:.3f})" if ratio and name != "teacher" else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    passkey_lengths = sorted({n for r in rows.values() for n in r["passkey"]}, key=int)
    lines += ["Passkey accuracy by length (all depths) and factual prompts answered", "",
              "| run | " + " | ".join(passkey_lengths) + " | factual | training tokens (M) | stdlib val. ppl: switched / after transfer / final |",
              "|---|" + "---|" * (len(passkey_lengths) + 3)]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for name, r in rows.items():
        cells = [fmt(r["passkey"].get(n)) for n in passkey_lengths]
        factual = r.get("factual")
        cells.append(f"{factual['answered']}/{factual['total']}" if factual else "-")
        training = r.get("training")
        if training:
            ppl = training["stdlib_val_ppl"]
            cells += [f"{training['tokens'] / 1e6:.1f}", f"{fmt(ppl['switched'])} / {fmt(ppl['after_transfer'])} / {fmt(ppl['final'])}"]
        else:
            cells += ["0", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, axes = plt.subplots(1, len(DATASETS) + 1, figsize=(5 * (len(DATASETS) + 1), 4))
    for ax, dataset in zip(axes, DATASETS):
        for name, r in rows.items():
            points = sorted((int(n), p) for n, p in r["perplexity"][dataset].items())
            if points:
                ax.plot(*zip(*points), "o-", label=name, color="black" if name == "teacher" else None)
        ax.set_title(f"perplexity, {dataset} (held out)")
        ax.set_yscale("log")
    ax = axes[-1]
    for name, r in rows.items():
        points = sorted((int(n), a) for n, a in r["passkey"].items())
        if points:
            ax.plot(*zip(*points), "o-", label=name, color="black" if name == "teacher" else None)
    ax.set_title("passkey retrieval accuracy")
    ax.set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct converted to fastmax (bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(args) -> dict:
    summary = summarize(args)
    out = Path(args.out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    try:
        plot(summary, out / "quality.png")
    except ImportError:
        pass
    return summary


def main(argv=None):
    args = parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from {list(RUNS)}")
    if not Path(args.gguf_file).is_file():
        raise SystemExit(f"--gguf_file {args.gguf_file}: no such file")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(one_run, args, name): name for name in runs}
        for future, name in futures.items():
            try:
                future.result()
                print(f"done: {name}", flush=True)
            except RuntimeError as err:
                failures.append(str(err))
                print(f"FAILED: {err}", flush=True)
            write_summary(args)
    summary = write_summary(args)
    print((Path(args.out_dir) / "summary.md").read_text())
    print(json.dumps(summary["targets"], indent=2))
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tools"))
    main()
