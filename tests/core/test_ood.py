"""Issue 18: the out-of-distribution gate (cxrkit.core.ood, cxrkit.core.ood_head) and EXIF orientation.

The detection tests use the SHIPPED model (models/covid_multitask.onnx and its checkpoint), whose
gate was fitted on cxr4's training split with the threshold from its validation split; they run a
small generated set through both backends (transforms of real X-rays, pydicom's CT / MR test files,
scikit-image-free pictures made here)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrkit.core import ood

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CK = REPO / "model_checkpoints" / "best_covid_model.pth"
SHIPPED_ONNX = REPO / "models" / "covid_multitask.onnx"
from tests.helpers import CXR_DATA  # noqa: E402  (honours CXR_DATA_DIR like the fixtures)


# ------------------------------------------------------------------------------ rules (no model)
def test_decide_names_the_view_that_looks_like_a_chest_xray():
    th = 2.0
    assert ood.decide(1.0, th, {}) == []
    assert ood.decide(3.0, th, {}) == [ood.FLAG_NOT_CXR]
    assert ood.decide(3.0, th, {"inverse": 1.0, "rot90": 2.9}) == [ood.FLAG_INVERTED]
    assert ood.decide(3.0, th, {"inverse": 2.5, "rot270": 0.9}) == [ood.FLAG_ROTATED]
    assert ood.decide(3.0, th, {"inverse": 2.5, "rot90": 2.4}) == [ood.FLAG_NOT_CXR]  # no view is in range
    assert ood.decide(1.8, th, {"inverse": 0.7}) == [ood.FLAG_INVERTED]  # below the threshold, clearly inverted
    assert ood.decide(1.8, th, {"inverse": 1.7}) == []  # not clearly lower: no flag
    assert ood.views_needed(0.5, th) == ()
    assert ood.views_needed(1.5, th) == ("inverse", "rot180")
    assert ood.views_needed(2.5, th) == ood.VIEWS


def test_aspect_flag_and_threshold_override():
    assert ood.aspect_flags((100, 301)) == [ood.FLAG_ASPECT]
    assert ood.aspect_flags((300, 100)) == []
    assert ood.GateSpec().resolve() is None
    g = ood.GateSpec.from_dict({"threshold": 2.0, "class_means": "x"}).resolve(5.0).to_dict()
    assert g["threshold"] == 5.0 and g["stored_threshold"] == 2.0 and "class_means" not in g
    with pytest.raises(ValueError):
        ood.GateSpec(threshold=2.0).resolve(-1.0)


# ------------------------------------------------------------------------------------- EXIF
def test_jpeg_stored_sideways_with_orientation_6_is_read_as_a_viewer_shows_it(tmp_path):
    from PIL import Image

    from cxrkit.core.decode import read_gray
    shown = np.zeros((40, 80), np.uint8)
    shown[:10, :20] = 255  # a bright block at the top left of what a viewer shows (landscape)
    stored = np.rot90(shown, 1)  # the camera stored it turned; tag 6 = rotate 90 clockwise to display
    ex = Image.Exif()
    ex[0x0112] = 6
    p = tmp_path / "sideways.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(p, exif=ex.tobytes(), quality=95)
    g = read_gray(p)
    assert g.shape == (40, 80)
    assert g[:10, :20].mean() > 200 and g[-10:, -20:].mean() < 50
    q = tmp_path / "plain.jpg"  # no tag: unchanged
    Image.fromarray(np.ascontiguousarray(stored)).save(q, quality=95)
    assert read_gray(q).shape == (80, 40)


# ---------------------------------------------------------------- fitting on a tiny model (CPU)
def test_fit_ood_attaches_a_head_that_lives_in_the_checkpoint(tiny_model, mdt_cache, tmp_path):
    import torch

    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint, model_from_checkpoint
    from cxrkit.training.export import export_to_onnx
    from cxrkit.core.model import predict
    from cxrkit.core.ood_head import fit_ood
    model, ck = model_from_checkpoint(tiny_model.checkpoint)
    n = len(mdt_cache.labels)
    tr, va = np.arange(0, n - 12), np.arange(n - 12, n)
    assert fit_ood(model, mdt_cache, tr, va, torch.device("cpu")) is None  # 12 < 50 validation images
    stats = fit_ood(model, mdt_cache, tr, va, torch.device("cpu"), min_val=5)
    assert stats["threshold"] > 0 and stats["n_val"] == 12
    assert 0 <= stats["val_two_lungs_fraction"] <= 1  # the pixel view check's own-validation pass rate
    x = torch.rand(3, 3, 64, 64)
    s1 = predict(model, x, with_ood=True)[2]
    assert s1.shape == (3,)
    assert set(model.state_dict()) == set(ck["state_dict"])  # statistics stay out of the state_dict
    ck["ood"] = stats
    p = tmp_path / "gated.pth"
    atomic_torch_save(ck, p)
    model2, _ = model_from_checkpoint(load_checkpoint(p))
    assert torch.allclose(predict(model2, x, with_ood=True)[2], s1)
    meta = export_to_onnx(p, tmp_path / "gated.onnx")
    assert meta["ood"]["threshold"] == stats["threshold"] and "whitening" not in meta["ood"]
    assert max(v["max_abs_diff_ood_score"] for v in meta["parity"]["batches"].values()) <= 1e-4


# ----------------------------------------------------------------------- the pixel view check
def _one_side(img, side):
    h, w = img.shape
    c = img[:, :int(0.55 * w)] if side == 0 else img[:, int(0.45 * w):]
    return cv2.resize(c, (h, h), interpolation=cv2.INTER_AREA)


def test_two_lungs_rule_on_drawn_masks():
    m = np.zeros((128, 128), np.uint8)
    cv2.ellipse(m, (40, 64), (18, 40), 0, 0, 360, 1, -1)
    one = m.copy()
    cv2.ellipse(m, (88, 64), (16, 38), 0, 0, 360, 1, -1)
    assert ood.two_lungs(m)                               # a frontal film's two lungs
    assert not ood.two_lungs(one)                         # one lung field: lateral-like
    stacked = np.zeros_like(m)
    cv2.ellipse(stacked, (40, 40), (18, 20), 0, 0, 360, 1, -1)
    cv2.ellipse(stacked, (40, 90), (18, 20), 0, 0, 360, 1, -1)
    assert not ood.two_lungs(stacked)                     # two fields on the same side
    small = one.copy()
    cv2.circle(small, (90, 64), 6, 1, -1)
    assert not ood.two_lungs(small)                       # a speck opposite is no second lung
    assert ood.view_flags(None, one) == [ood.FLAG_LATERAL] and ood.view_flags(None, m) == []
    assert ood.view_flags("LL", m) == [ood.FLAG_LATERAL]  # the DICOM header wins
    assert ood.view_flags(None, None) == []               # check off: nothing from pixels
    assert ood.view_check_fields([True] * 99 + [False])["view_check"] == "two_lungs"
    assert ood.view_check_fields([True] * 90 + [False] * 10)["view_check"] is None  # a model that segments poorly


# ----------------------------------------------------------------------- the shipped model
def _generated_set(root: Path, per: int = 4) -> dict:
    """{file name: expected gate flag (None: a real X-ray, no flag)} written under root."""
    import shutil

    from pydicom.data import get_testdata_file
    names = sorted((CXR_DATA / "Normal" / "images").iterdir())[:per] + \
        sorted((CXR_DATA / "COVID" / "images").iterdir())[:per]
    want = {}
    for i, f in enumerate(names):
        a = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        for name, img, flag in ((f"real{i}.png", a, None), (f"inverted{i}.png", 255 - a, ood.FLAG_INVERTED),
                                (f"turned90_{i}.png", np.rot90(a), ood.FLAG_ROTATED),
                                (f"turned180_{i}.png", np.rot90(a, 2), ood.FLAG_ROTATED),
                                (f"strip{i}.png", a[96:160], ood.FLAG_ASPECT),
                                # a lateral-film proxy (scripts/lateral_proxy.py): one side, stretched square;
                                # set aside by the two-lung view check, or by the gate itself
                                (f"oneside{i}.png", _one_side(a, i % 2), (ood.FLAG_LATERAL, ood.FLAG_NOT_CXR))):
            cv2.imwrite(str(root / name), np.ascontiguousarray(img))
            want[name] = flag
    for k, dcm in enumerate(("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "693_J2KI.dcm")):
        shutil.copy2(get_testdata_file(dcm), root / f"other_{k}.dcm")
        want[f"other_{k}.dcm"] = ood.FLAG_NOT_CXR
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :300]
    for k in range(3):  # "pictures": smooth gradients with shapes and texture, not radiographs
        img = (127 + 60 * np.sin(xx / (9 + 5 * k)) * np.cos(yy / (13 + k)) + rng.normal(0, 10, xx.shape))
        cv2.circle(img, (80 + 40 * k, 100), 40, 250, -1)
        cv2.imwrite(str(root / f"picture{k}.png"), np.clip(img, 0, 255).astype(np.uint8))
        want[f"picture{k}.png"] = ood.FLAG_NOT_CXR
    return want


@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory, cxr_data_available):
    if not SHIPPED_ONNX.is_file() or not SHIPPED_CK.is_file():
        pytest.skip("shipped model not found")
    from cxrkit.inference import InputItem, OnnxBackend, PipelineOptions, TorchBackend, run_pipeline
    root = tmp_path_factory.mktemp("ood_set")
    src = root / "in"
    src.mkdir()
    want = _generated_set(src)
    runs = {}
    # PyTorch against ONNX Runtime FP32 (the BF16 path has its own threshold and is checked in test_speed_paths)
    for name, backend in (("pth", TorchBackend(SHIPPED_CK, "cpu")), ("onnx", OnnxBackend(SHIPPED_ONNX, precision="fp32"))):
        assert backend.ood and backend.ood["threshold"] > 0
        items = [InputItem(path=p, rel=p.name) for p in sorted(src.iterdir())]
        out = root / name
        s = run_pipeline(backend, items, out, PipelineOptions(batch_size=8, progress=False, report=True))
        rows = {Path(r["image_path"]).name: r for r in csv.DictReader(open(out / "predictions.csv"))}
        runs[name] = {"summary": s, "rows": rows, "out": out}
    return want, runs


def test_shipped_gate_detects_the_generated_set_in_both_backends(shipped_runs):
    want, runs = shipped_runs
    for name, run in runs.items():
        rows = run["rows"]
        gate = {k: [f for f in r["quality_flags"].split(";") if f in ood.OOD_FLAG_CODES] for k, r in rows.items()}
        real = [k for k, w in want.items() if w is None]
        assert sum(bool(gate[k]) for k in real) == 0, {k: gate[k] for k in real}
        bad = [k for k, w in want.items() if w is not None and not set(w if isinstance(w, tuple) else (w,)) & set(gate[k])]
        n_ood = sum(w is not None for w in want.values())
        assert len(bad) <= 0.05 * n_ood, (name, {k: (want[k], gate[k], rows[k]["ood_score"]) for k in bad})
        assert all(rows[k]["prob_COVID"] for k in rows)  # probabilities kept for flagged images too
        s = run["summary"]["quality"]
        assert s["counts"][ood.FLAG_INVERTED] == sum(ood.FLAG_INVERTED in g for g in gate.values())
        assert s["n_not_judged"] == sum(bool(g) for g in gate.values())
        html = (run["out"] / "report.html").read_text()
        assert "Not judged (" in html and "inverted grey levels" in html


def test_both_backends_agree_on_score_and_every_flag(shipped_runs):
    _, runs = shipped_runs
    a, b = runs["pth"]["rows"], runs["onnx"]["rows"]
    assert set(a) == set(b)
    for k in a:
        assert abs(float(a[k]["ood_score"]) - float(b[k]["ood_score"])) <= 1e-4, k
        assert a[k]["quality_flags"] == b[k]["quality_flags"], k


def test_threshold_override_and_overlay_names_the_reason(shipped_runs, tmp_path):
    from cxrkit.inference import InputItem, OnnxBackend, PipelineOptions, run_pipeline
    want, runs = shipped_runs
    src = next(iter(runs["onnx"]["rows"].values()))["image_path"]
    folder = Path(src).parent
    items = [InputItem(path=folder / "real0.png", rel="real0.png")]
    s = run_pipeline(OnnxBackend(SHIPPED_ONNX, precision="fp32"), items, tmp_path / "o",
                     PipelineOptions(progress=False, report=False, ood_threshold=1e-3))
    assert s["quality"]["counts"][ood.FLAG_NOT_CXR] == 1 and s["quality"]["ood"]["source"] == "--ood_threshold"
    ann = cv2.imread(str(runs["onnx"]["out"] / runs["onnx"]["rows"]["other_0.dcm"]["annotated_png"]))
    assert tuple(int(v) for v in ann[0, 0]) == (0, 0, 255)  # red frame: flagged
    js = json.loads((runs["onnx"]["out"] / "summary.json").read_text())
    assert js["quality"]["ood"]["threshold"] == pytest.approx(OnnxBackend(SHIPPED_ONNX, precision="fp32").ood["threshold"])
