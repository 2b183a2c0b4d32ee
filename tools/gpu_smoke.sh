#!/usr/bin/env bash
# Every maintainer tool once, at a small size, on a machine with a CUDA GPU: a check that the
# tools still run against the kernels, not a measurement.
#
#     bash tools/gpu_smoke.sh /tmp/smoke        # from anywhere; about 3 minutes on an H200
#
# Writes under the given directory: kernels/check.json, kernels/bench.json, kernels/tune.json,
# kernels/memory.json, BENCHMARKS.md with kernels/*.png, conversion/ (the tiny conversion
# experiment), one <tool>.log per tool, and summary.txt: one line per tool, also printed.
# Each tool has a time limit (the kernel tools 30-75 s each, one after the other; the conversion
# experiment 200 s beside them), so the whole run stays under ~4.5 minutes even when one hangs.
# Exits with the number of tools that failed. PYTHON picks the interpreter (default: python).
set -u
OUT=${1:?usage: bash tools/gpu_smoke.sh OUTPUT_DIR}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT/kernels" "$OUT/conversion"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
: > "$OUT/summary.txt"

# the tools import the installed package (sys.path[0] is tools/, not the repository root)
if ! (cd "$OUT" && "$PY" -c "import fastmax_hf.kernels, torch; assert torch.cuda.is_available()") 2> "$OUT/setup.log"; then
    echo "setup: fastmax_hf.kernels not importable or no CUDA GPU (pip install -e \".[dev]\"?): see $OUT/setup.log" | tee -a "$OUT/summary.txt"
    exit 1
fi

failures=0
smoke_start=$(date +%s)
report() {  # report NAME RC SECONDS: a summary line from the tool's outputs
    local name=$1 rc=$2 seconds=$3 detail
    if [ "$rc" -eq 0 ]; then
        detail=$("$PY" - "$name" "$OUT" 2>&1 <<'EOF'
import json, math, sys
from pathlib import Path

name, out = sys.argv[1], Path(sys.argv[2])
load = lambda rel: json.loads((out / rel).read_text())
if name == "check_kernels":
    d = load("kernels/check.json")
    assert d["cases"] > 0 and d["failed"] == 0, f"{d['failed']} of {d['cases']} cases failed"
    print(f"ok, {d['cases']} cases passed")
elif name == "bench_kernels":
    rows = load("kernels/bench.json")["long"]
    timed = [r for r in rows if "ms" in r["fastmax"]]
    assert len(timed) == len(rows) > 0, [r["fastmax"] for r in rows if "ms" not in r["fastmax"]]
    worst = max(r["fastmax"]["rel_err"] for r in timed)
    print(f"ok, {len(timed)} long rows timed, worst rel_err {worst:.1e}, "
          + ", ".join(f"D={r['D']} N={r['N']} {r['pass']} {r['fastmax']['ms']:.2f} ms" for r in timed if r["pass"] == "fwd+bwd"))
elif name == "bench_kernels_tune":
    rows = load("kernels/tune.json")["tune"]
    bad = [r for r in rows if not isinstance(r["fwd"], float) or not isinstance(r["fwd+bwd"], float)]
    assert rows and not bad, bad
    print(f"ok, {len(rows)} setting combinations timed: "
          + ", ".join(f"{json.dumps(r['settings'])} {r['fwd+bwd']:.2f} ms" for r in rows))
elif name == "trace_memory":
    rows = load("kernels/memory.json")["rows"]
    assert rows and all(math.isfinite(r["peak_over_io"]) for r in rows)
    print("ok, " + ", ".join(f"heads/launch {r['heads_per_launch']}: peak {r['peak_over_io']:.2f} x io, {r['ms']:.0f} ms"
                             for r in rows if r["repetition"] == max(x["repetition"] for x in rows)))
elif name == "report_benchmarks":
    text = (out / "BENCHMARKS.md").read_text()
    assert "### D=64, fwd+bwd" in text and (out / "kernels" / "long_context.png").stat().st_size > 0
    print(f"ok, BENCHMARKS.md ({len(text.splitlines())} lines) and kernels/long_context.png")
elif name == "finetune_experiment":
    runs = load("conversion/summary.json")["runs"]
    assert set(runs) == {"teacher", "swap", "distill"} and all(math.isfinite(r["val_ppl"]) for r in runs.values())
    print("ok, validation perplexity " + ", ".join(f"{k} {v['val_ppl']:.1f}" for k, v in runs.items()))
EOF
) || { rc=1; detail="FAILED: $(printf '%s\n' "$detail" | tail -n 1)"; }
    else
        detail="exit status $rc (timed out if 124); see $OUT/$name.log: $(tail -n 1 "$OUT/$name.log" 2>/dev/null)"
    fi
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
    echo "$name ($seconds s): $detail" | tee -a "$OUT/summary.txt"
}

run() {  # run NAME LIMIT_S ARGS...: one tool with a time limit, output to NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    report "$name" "$rc" $(( $(date +%s) - start ))
}

# the conversion experiment at a tiny scale runs beside the kernel tools (it is mostly start-up)
lora=()
"$PY" -c "import peft" 2> /dev/null || lora=(--distill_lora_rank 0)
finetune_start=$(date +%s)
timeout 200 "$PY" tools/finetune_experiment.py --out_dir "$OUT/conversion" --model llama-tiny --seq_len 32 \
    --batch_size 4 --convert_batch_size 4 --pretrain_steps 20 --eval_blocks 8 --runs teacher,swap,distill ${lora[@]+"${lora[@]}"} \
    --finetune_args "--vocab_size 512 --max_files 150 --cache_dir $OUT/cache" > "$OUT/finetune_experiment.log" 2>&1 &
finetune_pid=$!

run check_kernels 75 tools/check_kernels.py --quick --no-long --dims 64 --dtypes bfloat16 --out "$OUT/kernels/check.json"
run bench_kernels 60 tools/bench_kernels.py --sections long --lengths 1024,4096 --sdpa_max 4096 --out "$OUT/kernels/bench.json"
run bench_kernels_tune 60 tools/bench_kernels.py --sections tune --tune_n 4096 --tune_dims 64 --out "$OUT/kernels/tune.json"
# the default budget, then one key/value head per backward launch
run trace_memory 45 tools/trace_memory.py --n 65536 --heads 4 --dims 64 \
    --budgets '[{}, {"scratch_min_bytes": 1, "scratch_fraction": 0.0}]' --out "$OUT/kernels/memory.json"
run report_benchmarks 30 tools/report_benchmarks.py --results "$OUT/kernels/bench.json" --out "$OUT/BENCHMARKS.md" --analysis none

wait "$finetune_pid"
report finetune_experiment $? $(( $(date +%s) - finetune_start ))
echo "$failures tool(s) failed in $(( $(date +%s) - smoke_start )) s; outputs in $OUT" | tee -a "$OUT/summary.txt"
exit "$failures"
