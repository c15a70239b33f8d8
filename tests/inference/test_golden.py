"""Golden predictions: the SHIPPED ONNX model over a fixed SYNTHETIC set must keep giving the predictions.csv
committed in tests/data/golden_predictions_onnx.csv (made by the code at 6e482cb, regenerated for
issue 23: gated rows have empty predicted_class / confidence / correct, the model output in unjudged_model_*,
and the DICOM columns were added; every number unchanged; regenerated again when the shipped model became
the source-aware ensemble (cxr4 + db_extra, appearance augmentation: MODEL_CARD.md), and again when it was
re-exported with an element-wise log-sum-exp (OpenVINO reads it; last-digit changes only), and again when the
shipped ensemble was retrained with source-balanced sampling (MODEL_CARD.md); made with
cxrkit.training.synthetic.generate(per_class=3, seed=5); image paths relative to the data folder).
Text fields must be equal; numbers within 2e-6 (ONNX Runtime kernels round differently on other CPUs).
FP32 in ONNX Runtime is pinned (--precision fp32): the BF16 path is checked against FP32 elsewhere.

To regenerate after an INTENDED change of the outputs: run this command and replace the file with its
predictions.csv (paths made relative), saying why in the commit."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxrkit.core.config import ONNX_PATH
from tests.helpers import REPO, read_predictions

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_predictions_onnx.csv"
TOL = 2e-6


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def test_shipped_onnx_predictions_match_the_golden_file(tmp_path):
    from cxrkit.cli import infer_onnx
    from cxrkit.training.synthetic import generate
    onnx = REPO / ONNX_PATH
    if not onnx.is_file():
        pytest.skip(f"shipped model {onnx} not found")
    data = generate(tmp_path / "syn", per_class=3, seed=5)
    out = tmp_path / "out"
    assert infer_onnx.main(["--data_dir", str(data), "--onnx_path", str(onnx), "--save_dir", str(out),
                            "--outputs", "csv", "--num_samples", "0", "--quiet", "--workers", "0",
                            "--precision", "fp32"]) == 0
    header, rows = read_predictions(out, header=True)
    want_header, want = read_predictions(GOLDEN, header=True)
    assert header == want_header
    for r in rows:
        r["image_path"] = Path(r["image_path"]).relative_to(data).as_posix()
    assert [r["image_path"] for r in rows] == [r["image_path"] for r in want]
    wrong = []
    for got, exp in zip(rows, want):
        for col in want_header:
            g, e = got[col], exp[col]
            if _is_number(e) and _is_number(g) and col not in ("correct",):
                if abs(float(g) - float(e)) > TOL:
                    wrong.append(f"{exp['image_path']} {col}: {g} != {e}")
            elif g != e:
                wrong.append(f"{exp['image_path']} {col}: {g!r} != {e!r}")
    assert not wrong, "\n".join(wrong)
