#!/usr/bin/env bash
# One device-machine session: per-layer conv costs (CPU, 2 pinned cores; CUDA), the CUDA bf16 table and the
# --quick CPU table, run side by side on disjoint cores. Results land in $OUT (or benchmarks/results).
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
PY=${PY:-python3}
$PY -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
(timeout 150 taskset -c 0,1 $PY benchmarks/conv_layers.py --threads 2 --out $OUT/conv_cpu.json;
 timeout 330 taskset -c 0,1 $PY benchmarks/run.py --quick --threads 2 --out $OUT) > $OUT/log_cpu.txt 2>&1 &
(timeout 60 taskset -c 4-7 $PY benchmarks/conv_layers.py --device cuda --rounds 5 --reps 5 --out $OUT/conv_cuda.json;
 timeout 400 taskset -c 4-7 $PY benchmarks/run.py --device cuda --rounds 3 --reps 3 --out $OUT) > $OUT/log_cuda.txt 2>&1 &
wait
tail -n 30 $OUT/log_cpu.txt $OUT/log_cuda.txt
