"""Paths the other test files do not reach: the PyTorch CLI with Grad-CAM and TTA, DICOM windowing,
--max_minutes, the overwrite guard, --init_from, and one-line errors for wrong flags."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cxrkit.cli import train as model_arch
from cxrkit.cli import infer_pth as run_model_pth_inference
from cxrkit.core.checkpoint import load_checkpoint, model_from_checkpoint
from cxrkit.core.decode import read_gray
from tests.helpers import train_tiny
from tests.inference.test_inference import _make_dicom


def test_pth_cli_gradcam_and_tta(tiny_model, cxr_eval_dir, tmp_path):
    out = tmp_path / "pth"
    rc = run_model_pth_inference.main(["--data_dir", str(cxr_eval_dir), "--checkpoint", str(tiny_model.checkpoint),
                                       "--save_dir", str(out), "--num_samples", "0", "--device", "cpu", "--quiet",
                                       "--gradcam", "--cam_class", "Normal", "--save_cams", "--tta", "2"])
    assert rc == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["tta"] == 2 and summ["gradcam"]["target"] == "Normal"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert rows and all(r["cam_class"] == "Normal" for r in rows)
    cam = np.load(out / rows[0]["cam_file"])
    assert cam.shape == (64, 64) and np.isfinite(cam).all()
    assert (out / rows[0]["annotated_png"]).is_file()


def test_dicom_voi_window_is_applied(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (64, 1))
    plain, windowed = tmp_path / "plain.dcm", tmp_path / "win.dcm"
    _make_dicom(plain, ramp, "MONOCHROME2")
    _make_dicom(windowed, ramp, "MONOCHROME2")
    import pydicom
    ds = pydicom.dcmread(windowed)
    ds.WindowCenter, ds.WindowWidth = 1000, 500   # linear window: <= ~750 black, >= ~1250 white
    ds.save_as(windowed)
    a, b = read_gray(plain), read_gray(windowed)
    assert a[0, 0] == 0 and a[0, -1] == 255 and 0 < a[0, 32] < 255   # no window: the full ramp
    col = ramp[0]
    assert (b[0, col <= 700] == 0).all() and (b[0, col >= 1300] == 255).all()
    inside = (col > 800) & (col < 1200)
    assert inside.any() and ((b[0, inside] > 0) & (b[0, inside] < 255)).all()


def _train(data, out, *extra):
    return train_tiny(data, out, *extra)   # every call passes its own --num_epochs


@pytest.mark.slow
def test_max_minutes_stops_cleanly_and_still_reports(mdt_subset, tmp_path, capsys):
    out = tmp_path / "mm"
    assert _train(mdt_subset, out, "--num_epochs", "3", "--max_minutes", "0.0001") == 0
    assert "--max_minutes" in capsys.readouterr().out
    summ = json.loads((out / "model_checkpoints" / "training_summary.json").read_text())
    assert summ["epochs_run"] == 1
    assert (out / "test_results" / "classification_report.json").is_file()


@pytest.mark.slow
def test_existing_best_checkpoint_is_not_overwritten(mdt_subset, tmp_path, capsys):
    out = tmp_path / "ow"
    assert _train(mdt_subset, out, "--num_epochs", "1") == 0
    best = out / "model_checkpoints" / "best_covid_model.pth"
    before = best.read_bytes()
    capsys.readouterr()
    assert _train(mdt_subset, out, "--num_epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "--overwrite" in err[-1]
    assert best.read_bytes() == before
    assert _train(mdt_subset, out, "--num_epochs", "1", "--overwrite", "--seed", "3") == 0
    assert best.read_bytes() != before


@pytest.mark.slow
def test_init_from_removes_the_prior_correction_first(mdt_subset, tmp_path):
    a = tmp_path / "a"
    assert _train(mdt_subset, a, "--num_epochs", "1") == 0
    src = a / "model_checkpoints" / "best_covid_model.pth"
    ck = load_checkpoint(src)
    assert ck["prior_correction"]                       # finalize applied it
    from cxrkit.core.config import make_config
    from cxrkit.core.model import build_model
    from cxrkit.training.train import init_from_checkpoint
    m = build_model(make_config("tiny"))
    init_from_checkpoint(m, make_config("tiny"), ck["class_names"], src)
    ref, _ = model_from_checkpoint(src)
    off = torch.tensor(ck["prior_correction"]["logit_offset"])
    assert torch.allclose(m.cls_head.mlp[-1].bias + off, ref.cls_head.mlp[-1].bias, atol=1e-6)
    assert torch.equal(m.cls_head.mlp[-1].weight, ref.cls_head.mlp[-1].weight)
    # and a run started from it trains and finishes
    assert _train(mdt_subset, tmp_path / "b", "--num_epochs", "1", "--init_from", str(src)) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--device", "gpu"], "--device 'gpu'"),
    (["--evaluate", "model_checkpoints/best_covid_model.pth", "--tta_eval", "1,x"], "--tta_eval"),
    (["--evaluate", "model_checkpoints/best_covid_model.pth", "--tta_eval", "0"], "between 1 and"),
])
def test_wrong_flags_give_one_line_errors(mdt_subset, tmp_path, capsys, extra, needle):
    rc = model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "e"), "--quiet", *extra])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
