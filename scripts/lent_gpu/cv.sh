#!/usr/bin/env bash
# LENT-GPU HELPER: 5-fold CV x 2 seeds + the all-data runs (scripts/lent_gpu/cv_sweep.py), pooled
# with `python -m cxrkit cv`, then (time allowing) the CUDA inference figures of issue 16.
# Carried: .whl (MONAI + efficientnet-lite0 wheels), .devcache (packed 128-px cxr4 cache).
set -u
T0=$(date +%s)
source scripts/lent_gpu/setup.sh
export OMP_NUM_THREADS=1
python3 scripts/lent_gpu/cv_sweep.py --data $CACHE --out runs/cv --max_minutes ${MAXMIN:-6.3} 2>&1 | tee "$OUT/cv_log.txt"
python3 -m cxrkit cv runs/cv/s42 runs/cv/s7 --out runs/cv/report 2>&1 | tee "$OUT/cv_table.md"
for s in 42 7; do cp runs/cv/s$s/foldall/model_checkpoints/best_covid_model.pth "$OUT/all_s$s.pth"; done
tar czf "$OUT/cv_runs.tgz" --exclude='*.pth' --exclude='cache' runs/cv
echo "cv done at $(( $(date +%s) - T0 ))s"
if [ $(( $(date +%s) - T0 )) -lt ${GPU_BENCH_BEFORE_S:-470} ]; then
  timeout 90 python3 scripts/lent_gpu/gpu_infer_bench.py "$OUT/all_s42.pth" 2>&1 | tee "$OUT/gpu_infer.txt"
fi
ls -la "$OUT"
