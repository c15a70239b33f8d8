"""The run-level shift warning through the pipeline: a folder of CLAHE-processed real films (another
site's look) against a reference of the same films unprocessed."""
import json

import pytest

from cxrkit.core.decode import read_gray
from cxrkit.core.shift_check import feature_row, make_reference
from cxrkit.inference import OnnxBackend, PipelineOptions, gather_inputs, run_pipeline
from cxrkit.training.shifts import apply_shift
from tests.helpers import REPO, read_predictions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory, cxr_data_available):
    import cv2
    root = tmp_path_factory.mktemp("shift")
    src = sorted((cxr_data_available / "Normal" / "images").iterdir())[:40] + \
        sorted((cxr_data_available / "COVID" / "images").iterdir())[:40]
    for name, level in (("plain", 0.0), ("clahe", 1.0)):
        for i, p in enumerate(src):
            d = root / name / p.parent.parent.name
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{i:03d}.png"), apply_shift(read_gray(p), "clahe", level))
    return root


def run(folder, out, reference):
    from cxrkit.core.config import ONNX_PATH
    backend = OnnxBackend(str(REPO / ONNX_PATH))
    backend.meta.shift_reference = reference
    items = gather_inputs(folder, None, backend.class_names, 0)
    return run_pipeline(backend, items, out, PipelineOptions(annotate=False, report=True, progress=False))


def test_the_warning_fires_on_another_sites_look_and_not_on_the_reference(folders, tmp_path):
    plain = run(folders / "plain", tmp_path / "p", None)
    assert plain["shift_check"] == {"tested": False, "reason": "the model carries no shift reference"}
    # the reference: the same films' features, computed as the pipeline computes them
    from cxrkit.core import quality
    from cxrkit.core.model_input import resize_gray
    rows = read_predictions(tmp_path / "p" / "predictions.csv")
    values, groups = [], []
    for r in rows:
        st = quality.image_stats(resize_gray(read_gray(r["image_path"]), 128))
        values.append(feature_row(float(r["ood_score"]), float(r["lung_area_fraction"]), st))
        groups.append(r["true_class"])
    ref = make_reference(values, groups)
    same = run(folders / "plain", tmp_path / "p2", ref)
    assert same["shift_check"]["tested"] and not same["shift_check"]["fires"]
    shifted = run(folders / "clahe", tmp_path / "c", ref)
    block = shifted["shift_check"]
    assert block["fires"] and block["p_value"] < 0.01
    rows = read_predictions(tmp_path / "c" / "predictions.csv")
    assert all("folder_shift" in r["quality_flags"] for r in rows)
    assert shifted["quality"]["counts"]["folder_shift"] == len(rows) == 80
    html = (tmp_path / "c" / "report.html").read_text()
    assert 'id="shift-warning"' in html and "differs from the data the model was trained on" in html
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["shift_check"]["fires"]
