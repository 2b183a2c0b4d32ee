#!/bin/bash
R=$PWD; export PYTHONPATH=$R
pip install --no-deps --no-index --target /tmp/pk .whl/fla_core*.whl .whl/einops*.whl -q > /dev/null 2>&1
timeout 130 python tools/kernel_lab.py --sections check --check_regimes linear --check_dtypes bfloat16 --out $OUT/check_bf16_linear.jsonl > /dev/null 2>$OUT/check.err
echo "check: $(grep -c '"pass": true' $OUT/check_bf16_linear.jsonl) pass of $(grep -c '"section": "check"' $OUT/check_bf16_linear.jsonl) $SECONDS s"
grep '"pass": false' $OUT/check_bf16_linear.jsonl | head -3
timeout 230 python tools/bench_kernels.py --sections crossover --crossover_dims 64,128 --crossover_lengths 4096,8192,16384,32768,65536 --out $OUT/crossover.json > $OUT/crossover.log 2>&1
echo "crossover rc=$? $SECONDS s"
python3 -c "
import json
for r in json.load(open('$OUT/crossover.json'))['crossover']:
    print(r['D'], r['N'], r['pass'], round(r['quadratic']['ms'], 3), round(r['linear']['ms'], 3))
" 2>&1 | tail -20
PYTHONPATH=$R:/tmp/pk timeout $((575 - SECONDS)) python tools/bench_kernels.py --sections p1 --out $OUT/p1.json > $OUT/p1.log 2>&1
echo "p1 rc=$? $SECONDS s"
grep -h '"p=1 N=' $OUT/p1.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print(r['label'], r.get('pass'), round(r['fastmax']['ms'], 3), round(r.get('fla_chunk_linear_attn', {}).get('ms', 0), 3))
"
