"""Issue 25, "Reliability, round 4": the inference findings (R4-01 ...), each failing before its fix.

  R4-01  every step from bytes to the model input sits inside the per-file guard: a multi-frame colour
         DICOM (pydicom's SC_rgb_rle_2frame.dcm, examples_ybr_color.dcm) never stops a run
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

from tests.helpers import read_predictions, real_images
from tests.inference.test_reliability_inference import BACKENDS, run_cli

PYDICOM_COLOUR = ["SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"]


def _pydicom_beside_png(cxr_eval_dir, d: Path) -> Path:
    from pydicom.data import get_testdata_file
    d.mkdir(parents=True, exist_ok=True)
    for n in PYDICOM_COLOUR:
        shutil.copy2(get_testdata_file(n), d / n)
    shutil.copy2(real_images(cxr_eval_dir, 1)[0], d / "good.png")
    return d


def _outcome(out: Path) -> tuple[dict, dict]:
    s = json.loads((out / "summary.json").read_text())
    return ({Path(r["image_path"]).name: r for r in read_predictions(out)},
            {Path(x["path"]).name: x["reason"] for x in s["skipped"]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_r4_01_multiframe_colour_dicom_never_stops_a_run(backend, tiny_model, cxr_eval_dir, tmp_path):
    d = _pydicom_beside_png(cxr_eval_dir, tmp_path / "in")
    out = tmp_path / "out"
    assert run_cli(backend, tiny_model, ["--data_dir", str(d), "--num_samples", "0", "--save_dir", str(out)]) == 0
    rows, skipped = _outcome(out)
    assert "good.png" in rows
    for n in PYDICOM_COLOUR:  # decoded: the first frame, with a note
        assert n in rows and n not in skipped, (n, skipped)
    notes = {Path(x["path"]).name for x in json.loads((out / "summary.json").read_text()).get("notes", [])}
    assert set(PYDICOM_COLOUR) <= notes


@pytest.mark.parametrize("backend", BACKENDS)
def test_r4_01_any_exception_after_decoding_is_a_counted_skip(backend, tiny_model, cxr_eval_dir, tmp_path,
                                                             monkeypatch):
    from cxrkit.inference import pipeline
    real = pipeline.resize_gray

    def resize(img, size):  # fails on the marked file only
        if img[0, 0] == 7 and img[0, 1] == 7:
            raise cv2.error("OpenCV(5) matrix_wrap.cpp:501: error: (-215:Assertion failed)\n m->dims <= 2")
        return real(img, size)
    monkeypatch.setattr(pipeline, "resize_gray", resize)
    d = tmp_path / "in"
    d.mkdir()
    src = real_images(cxr_eval_dir, 2)
    shutil.copy2(src[0], d / "good.png")
    bad = cv2.imread(str(src[1]), cv2.IMREAD_GRAYSCALE)
    bad[0, :2] = 7
    cv2.imwrite(str(d / "bad.png"), bad)
    out = tmp_path / "out"
    assert run_cli(backend, tiny_model, ["--data_dir", str(d), "--num_samples", "0", "--save_dir", str(out)]) == 0
    rows, skipped = _outcome(out)
    assert "good.png" in rows and "bad.png" not in rows
    assert "Assertion failed" in skipped["bad.png"] and "\n" not in skipped["bad.png"]
    assert json.loads((out / "summary.json").read_text())["n_skipped"] == 1
