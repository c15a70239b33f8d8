#!/usr/bin/env bash
# LENT-GPU HELPER: runs scripts/lent_gpu/sweep.py on a lent GPU machine and packs what comes back.
# Carried: .whl (MONAI + efficientnet-lite0 wheels), .devcache (packed 128-px cxr4 cache + split.json).
# Env: PARALLEL, DEADLINE_S, EPOCHS, ONLY (comma list of run names).
set -u
source scripts/lent_gpu/setup.sh
python3 scripts/lent_gpu/sweep.py --data $CACHE --split .devcache/split.json --out runs_sweep \
    --parallel ${PARALLEL:-4} --deadline_s ${DEADLINE_S:-400} --epochs ${EPOCHS:-20} --only "${ONLY:-}" \
    2>&1 | tee "$OUT/sweep_log.txt"
python3 scripts/outside_lung_table.py runs_sweep | tee "$OUT/table.md"
# small files of every run in one archive; checkpoints (15.7 MB each) of the chosen setting and P = 0
tar czf "$OUT/sweep.tgz" --exclude='*.pth' --exclude='cache' runs_sweep
chosen=$(python3 scripts/outside_lung_table.py runs_sweep --choice)
n=0
for name in ${chosen}_s42 ${chosen}_s7 lite0_p0_s42 lite0_noise50_s42; do
  f=runs_sweep/$name/model_checkpoints/best_covid_model.pth
  [ -f "$f" ] && [ ! -f "$OUT/$name.pth" ] && [ $n -lt 3 ] && cp "$f" "$OUT/$name.pth" && n=$((n+1))
done
ls -la "$OUT"
