"""The Python API (cxrkit.load / Model.predict / Model.explain), DICOM by content with its UIDs in the CSV,
a lateral ViewPosition not judged, and the inference defaults (issue 23). Uses the SHIPPED ONNX model on a
few real X-rays: no training."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrkit.core.config import ONNX_PATH
from tests.helpers import CXR_DATA, NO_DATA_REASON, REPO, assert_one_line_error, make_dicom, read_predictions

ONNX = REPO / ONNX_PATH
pytestmark = pytest.mark.skipif(not ONNX.is_file(), reason=f"shipped model {ONNX} not found")


def _real(n):
    if not (CXR_DATA / "COVID" / "images").is_dir():
        pytest.skip(NO_DATA_REASON)
    out = []
    for c in ("COVID", "Normal", "Viral Pneumonia"):
        out += sorted((CXR_DATA / c / "images").glob("*.png"))[:1]
    return out[:n]


def _dicom_from_png(png, path, view="PA", age="061Y"):
    """A DICOM (no .dcm name needed) holding the PNG's 8-bit pixels, with UIDs, ViewPosition, PatientAge."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
    return make_dicom(path, cv2.imread(str(png), cv2.IMREAD_GRAYSCALE), bits_stored=8,
                      sop_class=DigitalXRayImageStorageForPresentation, StudyInstanceUID=generate_uid(),
                      SeriesInstanceUID=generate_uid(), ViewPosition=view, PatientAge=age)


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """Three real PNGs and two of them as extension-less DICOMs (PA and lateral), run by the ONNX CLI."""
    from cxrkit.cli import infer_onnx
    d = tmp_path_factory.mktemp("api")
    pngs = _real(3)
    src = d / "in"
    src.mkdir()
    files = [shutil.copy2(p, src / p.name) for p in pngs]
    pa = _dicom_from_png(pngs[0], src / "IM000001")
    lat = _dicom_from_png(pngs[1], src / "IM000002", view="LL")
    (src / "notes.txt").write_text("not an image\n")
    out = d / "out"
    rc = infer_onnx.main(["--onnx_path", str(ONNX), "--data_dir", str(src), "--save_dir", str(out), "--quiet",
                          "--outputs", "csv", "--workers", "1"])
    return {"rc": rc, "src": src, "files": [str(f) for f in files], "out": out, "pa": pa, "lat": lat,
            "rows": read_predictions(out, by_name=True)}


def test_dicom_found_by_content_with_uids_and_lateral_not_judged(api_run):
    assert api_run["rc"] == 0
    rows = api_run["rows"]
    assert set(rows) == {Path(f).name for f in api_run["files"]} | {"IM000001", "IM000002"}
    pa, lat = rows["IM000001"], rows["IM000002"]
    for r, ds in ((pa, api_run["pa"]), (lat, api_run["lat"])):
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ViewPosition", "PatientAge"):
            assert r[k] == str(getattr(ds, k)), k
    png = rows[Path(api_run["files"][0]).name]
    assert png["SOPInstanceUID"] == "" and png["ViewPosition"] == ""
    # the same pixels as the PNG: the same answer
    assert pa["predicted_class"] == png["predicted_class"] and pa["prob_COVID"] == png["prob_COVID"]
    # a lateral view: not judged, whatever the model says; its output only in the unjudged_* columns
    assert "lateral_view" in lat["quality_flags"].split(";")
    assert lat["predicted_class"] == "" and lat["confidence"] == "" and lat["correct"] == ""
    assert lat["unjudged_model_class"] and float(lat["unjudged_model_confidence"]) > 0
    assert pa["unjudged_model_class"] == "" and pa["unjudged_model_confidence"] == ""
    import json
    s = json.loads((api_run["out"] / "summary.json").read_text())
    assert sum(s["predicted_counts"].values()) == 4 and s["n_not_judged"] == 1
    assert s["quality"]["counts"]["lateral_view"] == 1


def test_list_images_and_read_gray_recognise_dicom_by_content(api_run):
    from cxrkit.core.decode import is_dicom, list_images, read_gray_info
    found = {p.name for p in list_images(api_run["src"])}
    assert {"IM000001", "IM000002"} <= found and "notes.txt" not in found
    assert is_dicom(api_run["src"] / "IM000001") and not is_dicom(api_run["src"] / "notes.txt")
    tags = {}
    g, _ = read_gray_info(api_run["src"] / "IM000002", tags)
    assert g.dtype == np.uint8 and tags["ViewPosition"] == "LL" and tags["PatientAge"] == "061Y"


def test_images_flag_takes_an_extensionless_dicom(api_run, tmp_path):
    from cxrkit.cli import infer_onnx
    out = tmp_path / "one"
    assert infer_onnx.main(["--onnx_path", str(ONNX), "--images", str(api_run["src"] / "IM000001"),
                            "--save_dir", str(out), "--quiet", "--outputs", "csv"]) == 0
    (r,) = read_predictions(out)
    assert r["SOPInstanceUID"] == str(api_run["pa"].SOPInstanceUID) and r["predicted_class"]


def test_predict_matches_the_cli_csv(api_run):
    import cxrkit
    m = cxrkit.load()  # the shipped ONNX model
    rows = api_run["rows"]
    files = api_run["files"] + [str(api_run["src"] / "IM000001"), str(api_run["src"] / "IM000002")]
    preds = m.predict(files)
    assert len(preds) == len(files)
    for p in preds:
        r = rows[Path(p.source).name]
        assert (p.predicted_class or "") == r["predicted_class"]
        assert p.flags == tuple(f for f in r["quality_flags"].split(";") if f)
        for c in m.class_names:
            assert abs(p.probabilities[c] - float(r[f"prob_{c}"])) <= 1e-6
        assert abs(p.lung_area_fraction - float(r["lung_area_fraction"])) <= 1e-6
        assert abs(p.ood_score - float(r["ood_score"])) <= 1e-6
        if p.judged:
            assert abs(p.confidence - float(r["confidence"])) <= 1e-6
        else:
            assert p.confidence is None and r["unjudged_model_class"]
    lat = preds[-1]
    assert not lat.judged and lat.predicted_class is None and lat.dicom["ViewPosition"] == "LL"
    # one file -> one Prediction; its lung mask at the input's own size
    one = m.predict(files[0])
    img = cv2.imread(files[0], cv2.IMREAD_UNCHANGED)
    assert one.lung_mask.shape == img.shape[:2] and one.lung_mask.dtype == bool
    # a folder: every image of it, like --data_dir
    assert len(m.predict(api_run["src"])) == len(files)


def test_predict_arrays_and_pil_give_the_files_numbers(api_run):
    import cxrkit
    from PIL import Image
    m = cxrkit.load()
    f = api_run["files"][0]
    want = m.predict(f)
    g8 = cv2.imread(f, cv2.IMREAD_GRAYSCALE)
    rgb = np.repeat(g8[:, :, None], 3, axis=2)
    for x in (g8, rgb, g8.astype(np.uint16) * 257, g8.astype(np.float32) / 255.0, Image.open(f)):
        p = m.predict(x)
        assert p.predicted_class == want.predicted_class
        assert max(abs(p.probabilities[c] - want.probabilities[c]) for c in m.class_names) <= 1e-6, type(x)
        assert p.lung_mask.shape == g8.shape
    assert len(m.predict([g8, f])) == 2
    with pytest.raises(cxrkit.inference.InferenceError, match="H x W"):
        m.predict(np.zeros((2, 64, 64, 5), np.uint8))


def test_explain_without_a_checkpoint_is_one_line(monkeypatch):
    import cxrkit
    from cxrkit.inference import api
    m = cxrkit.load()

    def missing(*a, **k):
        raise FileNotFoundError("nope")
    monkeypatch.setattr(api, "resolve_default", missing)
    with pytest.raises(cxrkit.inference.InferenceError, match=r"explain needs the PyTorch checkpoint") as e:
        m.explain(np.zeros((64, 64), np.uint8))
    assert "\n" not in str(e.value)


def test_data_dir_file_suggests_images_and_one_file_prints_its_answer(api_run, tmp_path, capsys):
    from cxrkit.cli import infer_onnx
    f = api_run["files"][0]
    assert infer_onnx.main(["--onnx_path", str(ONNX), "--data_dir", f, "--save_dir", str(tmp_path / "x")]) == 2
    assert_one_line_error(capsys, "--images", "is a file", log_lines_ok=True)
    assert infer_onnx.main(["--onnx_path", str(ONNX), "--images", f, "--save_dir", str(tmp_path / "y"), "--quiet",
                            "--outputs", "csv"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    r = read_predictions(tmp_path / "y")[0]
    assert r["predicted_class"] in last and f"confidence {float(r['confidence']):.3f}" in last
    assert infer_onnx.main(["--onnx_path", str(ONNX), "--images", str(api_run["src"] / "IM000002"),
                            "--save_dir", str(tmp_path / "z"), "--quiet", "--outputs", "csv"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NOT JUDGED (lateral view)" in last and "lateral_view" in last


def test_num_samples_defaults_to_all():
    from cxrkit.cli.infer_onnx import parse_args
    from cxrkit.core.config import InferConfig
    assert InferConfig.num_samples == 0 and parse_args(["--data_dir", "x"]).num_samples == 0


@pytest.mark.slow
def test_explain_gives_a_gradcam_map_at_the_input_size(api_run):
    """Grad-CAM through the API: from the ONNX model (gradients from the shipped .pth beside it) and from
    the .pth itself."""
    import cxrkit
    from cxrkit.core.config import CHECKPOINT_PATH
    if not (REPO / CHECKPOINT_PATH).is_file():
        pytest.skip(f"shipped checkpoint {CHECKPOINT_PATH} not in this checkout")
    f = api_run["files"][0]
    shape = cv2.imread(f, cv2.IMREAD_UNCHANGED).shape[:2]
    cam = cxrkit.load().explain(f)
    assert cam.shape == shape and cam.dtype == np.float32 and cam.min() >= 0 and np.isfinite(cam).all()
    maps = cxrkit.load(REPO / CHECKPOINT_PATH, device="cpu").explain([f], target="Normal")
    assert len(maps) == 1 and maps[0].shape == shape
