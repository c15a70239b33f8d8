#!/usr/bin/env bash
# The lean install (pyproject.toml's dependencies, no extras) in a fresh venv that does NOT see the system
# site-packages: torch must be absent, the Python API and the ONNX CLIs must work from another directory,
# the PyTorch-only commands must say in one line which extra they need, and the environment's size is
# printed (target: <= 500 MB, README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
T="$(mktemp -d /tmp/cxrkit_lean.XXXXXX)"
trap 'rm -rf "$T"' EXIT
"$PY" -m pip wheel --no-deps -q -w "$T/dist" .
rm -rf build
"$PY" -m venv "$T/venv"
V="$T/venv/bin"
"$V/python" -m pip install -q "$T"/dist/cxrkit-*.whl
cd "$T"
"$V/cxrkit" synth --out data --per_class 2 --seed 3 >/dev/null
"$V/python" - <<'PY'
import importlib.util, cxrkit
assert importlib.util.find_spec("torch") is None, "torch is installed in the lean venv"
m = cxrkit.load()
r = m.predict("data/Normal/images/Normal-1.png")
print("lean API:", r)
import sys
assert "torch" not in sys.modules, "the ONNX path imported torch"
PY
"$V/cxrkit-infer-onnx" --data_dir data --outputs csv --save_dir out --quiet
for k in 0 1; do "$V/cxrkit-infer-onnx" --data_dir data --outputs csv --shard "$k/2" --save_dir "s$k" --quiet; done
"$V/cxrkit-merge" s0 s1 --out merged --no_report
cmp <(sort out/predictions.csv | cut -d, -f1-9) <(sort merged/predictions.csv | cut -d, -f1-9)
set +e
err="$("$V/cxrkit-infer-pth" --data_dir data --save_dir out_pth --checkpoint x.pth --quiet 2>&1)"; rc=$?
set -e
[ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == *"cxrkit[torch]"* ]] \
  || { echo "bad infer-pth answer in the lean venv: rc=$rc: $err"; exit 1; }
size=$(du -sm "$T/venv" | cut -f1)
echo "lean check passed: venv ${size} MB (target <= 500 MB), torch absent, API + infer-onnx + merge ran"
[ "$size" -le 500 ] || { echo "lean venv is ${size} MB, over 500 MB"; exit 1; }
