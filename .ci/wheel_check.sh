#!/usr/bin/env bash
# The wheel as a new user gets it: build it, install it (non-editable) into a fresh venv outside the
# checkout, and run the CLIs from another directory on a generated SYNTHETIC folder. The venv sees
# the system site-packages (torch, MONAI, ... already installed for the tests), so nothing big is
# downloaded; pip still resolves every declared dependency against them.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PY:-python}"
T="$(mktemp -d /tmp/cxrkit_wheel.XXXXXX)"
trap 'rm -rf "$T"' EXIT
"$PY" -m pip wheel --no-deps -q -w "$T/dist" .
rm -rf build
"$PY" -m venv --system-site-packages "$T/venv"
V="$T/venv/bin"
"$V/python" -m pip install -q "$T"/dist/cxrkit-*.whl
cd "$T"
"$V/python" - <<'PY'
import importlib.util, sys, cxrkit, cxrkit.inference, cxrkit.cli.infer_onnx
for shim in ("model_arch", "export_to_onnx", "run_onnx_inference", "run_model_pth_inference"):
    assert importlib.util.find_spec(shim) is None, f"{shim} is installed as a top-level module"
assert cxrkit.__file__.startswith(sys.prefix), f"cxrkit imported from {cxrkit.__file__}, not the venv"
from importlib.metadata import version
assert version("cxrkit") == cxrkit.__version__, (version("cxrkit"), cxrkit.__version__)
print("installed cxrkit", cxrkit.__version__, "at", cxrkit.__file__)
PY
"$V/cxrkit" --version
"$V/cxrkit" synth --out data --per_class 3 --seed 1 >/dev/null
"$V/cxrkit-infer-onnx" --data_dir data --num_samples 0 --save_dir out_onnx --quiet    # the shipped model, found installed
test -s out_onnx/predictions.csv && test -s out_onnx/report.html
for k in 0 1; do "$V/cxrkit-infer-onnx" --data_dir data --num_samples 0 --outputs csv --shard "$k/2" --save_dir "s$k" --quiet; done
"$V/cxrkit-merge" s0 s1 --out merged --no_report
cmp <(sort out_onnx/predictions.csv | cut -d, -f1-9) <(sort merged/predictions.csv | cut -d, -f1-9)
"$V/cxrkit-infer-pth" --data_dir data --num_samples 0 --outputs csv --save_dir out_pth --quiet \
    --checkpoint "$REPO/model_checkpoints/best_covid_model.pth" --device cpu
# the .pth is not in the wheel: a missing default is one line naming the flag, exit 2
set +e
err="$("$V/cxrkit-infer-pth" --data_dir data --save_dir out_x --quiet 2>&1)"; rc=$?
set -e
[ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == *--checkpoint* ]] || { echo "bad: $rc $err"; exit 1; }
echo "wheel check passed: $(ls "$T"/dist)"
