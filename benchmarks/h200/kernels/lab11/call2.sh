#!/bin/bash
# head (HEAD) against new (working tree): correctness of new, per-kernel times p = 2 and p = 1, variants; fla p = 1
R=$PWD; T=$R/lab/v/trees
pip install --no-deps --no-index --target /tmp/pk .whl/fla_core*.whl .whl/einops*.whl -q 2>&1 | tail -1
VAR='[{"linear_dkdv_block_m": 64}, {"linear_state_warps": 8, "linear_state_block_dv": 128}]'
run_lk() {  # tree p variants out
  (cd $T/$1 && PYTHONPATH=$T/$1 timeout 240 python tools/kernel_lab.py --sections linkernels --lin_p $2 --variants "$3" --out $4 > /dev/null 2>$4.err)
}
# phase 1, in parallel: compile everything (throwaway timings) and the correctness grid of new
run_lk head 2 '[]' /tmp/w1.jsonl & run_lk head 1 '[]' /tmp/w2.jsonl & run_lk new 2 "$VAR" /tmp/w3.jsonl & run_lk new 1 '[]' /tmp/w4.jsonl &
(cd $T/new && PYTHONPATH=$T/new timeout 300 python tools/kernel_lab.py --sections check --check_regimes linear --check_dtypes bfloat16,float16 --out $OUT/check_new.jsonl > /dev/null 2>$OUT/check_new.err) &
wait
echo "phase 1 $SECONDS s; check: $(grep -c '"pass": true' $OUT/check_new.jsonl) pass of $(grep -c '"section": "check"' $OUT/check_new.jsonl)"
grep '"pass": false' $OUT/check_new.jsonl | head -5
# phase 2, serial timings
run_lk head 2 '[]' $OUT/lk_head_p2.jsonl; echo "t $SECONDS"
run_lk new 2 "$VAR" $OUT/lk_new_p2.jsonl; echo "t $SECONDS"
run_lk head 1 '[]' $OUT/lk_head_p1.jsonl; echo "t $SECONDS"
run_lk new 1 '[]' $OUT/lk_new_p1.jsonl; echo "t $SECONDS"
python3 - <<'PY'
import json, os, glob
OUT = os.environ["OUT"]
for f in sorted(glob.glob(f"{OUT}/lk_*.jsonl")):
    for line in open(f):
        r = json.loads(line)
        if "D" not in r: continue
        print(os.path.basename(f), r["D"], r.get("settings"), r.get("rel_err"), r.get("error"))
        for k in ("fwd", "fwd+bwd"):
            if k in r: print("   ", k, round(r[k]["ms"], 3), round(r[k]["tflops"], 1), {n[:22]: round(v, 3) for n, v in r[k]["kernels_ms"].items()})
        print("    stats", r.get("stats"))
PY
# fla p = 1 against new, D = 64 then 128 (fla autotunes), what fits
(cd $T/new && PYTHONPATH=$T/new:/tmp/pk timeout $((570 - SECONDS)) python tools/bench_kernels.py --sections p1 --out $OUT/p1_fla.json > $OUT/p1_fla.log 2>&1)
echo "fla rc=$? $SECONDS s"
grep -h "p=1 N=" $OUT/p1_fla.log | cut -c1-400 | head -20
