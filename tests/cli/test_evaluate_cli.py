"""model_arch.py --evaluate: --calibrate, --shortcut_check and --tta_eval on a small real subset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrkit.cli import train as model_arch
from cxrkit.core.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def evaluated(mdt_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalcli")
    common = ["--data_dir", str(mdt_subset), "--output_dir", str(out), "--img_size", "32", "--workers", "0",
              "--quiet", "--device", "cpu"]
    assert model_arch.main(common + ["--arch", "tiny", "--num_epochs", "1", "--batch_size", "8",
                                     "--no-prior_correction"]) == 0
    ck_path = out / "model_checkpoints" / "best_covid_model.pth"
    before = load_checkpoint(ck_path)
    rc = model_arch.main(common + ["--evaluate", str(ck_path), "--calibrate", "--shortcut_check",
                                   "--tta_eval", "1,3"])
    return rc, out, before, load_checkpoint(ck_path)


def test_evaluate_exits_cleanly(evaluated):
    assert evaluated[0] == 0


def test_calibrate_writes_prior_correction_and_temperature(evaluated):
    _, _, before, after = evaluated
    assert not before.get("prior_correction")
    assert after["prior_correction"]["logit_offset"] and len(after["prior_correction"]["logit_offset"]) == 4
    assert after["temperature"] > 0
    b0, b1 = before["state_dict"]["cls_head.mlp.9.bias"], after["state_dict"]["cls_head.mlp.9.bias"]
    assert torch.allclose(b1 - b0, torch.tensor(after["prior_correction"]["logit_offset"]), atol=1e-6)


def test_shortcut_check_file(evaluated):
    _, out, _, after = evaluated
    res = json.loads((out / "test_results" / "shortcut_check.json").read_text())
    rep = json.loads((out / "test_results" / "classification_report.json").read_text())
    n = res["n_images"]
    assert n == rep["n_images"] > 0
    for k in ("original", "lungs_only", "lungs_removed"):
        cm = np.asarray(res[k]["confusion_matrix"])
        assert cm.shape == (4, 4) and cm.sum() == n
        assert 0.0 <= res[k]["accuracy"] <= 1.0
        assert res[k]["accuracy"] == pytest.approx(np.trace(cm) / n)
    # "original" is the plain test evaluation of the same checkpoint
    assert res["original"]["accuracy"] == pytest.approx(rep["accuracy"])
    assert "ground truth" in res["mask_source"]


def test_tta_report(evaluated):
    _, out, _, _ = evaluated
    rep = json.loads((out / "test_results" / "tta_report.json").read_text())
    cls = json.loads((out / "test_results" / "classification_report.json").read_text())
    assert set(rep["rows"]) == {"1", "3"}
    assert rep["rows"]["1"]["accuracy"] == pytest.approx(cls["accuracy"])  # 1 view = plain inference
    for r in rep["rows"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["dice"] <= 1 and r["ms_per_image"] > 0


def test_shortcut_check_reports_cam_mass_and_validation(evaluated):
    _, out, _, _ = evaluated
    res = json.loads((out / "test_results" / "shortcut_check.json").read_text())
    cam = res["cam_mass_in_lungs"]
    assert cam["n_images"] > 0 and 0.0 <= cam["mean"] <= 1.0
    assert 0.0 < cam["lung_area_share_mean"] < 1.0 and cam["layer"].startswith("net.")
    val = res["validation"]  # what model selection reads (never the test split)
    split = json.loads((out / "split.json").read_text())
    assert val["n_images"] == len(split["val"]) > 0 and res["n_images"] == len(split["test"])
    assert 0.0 <= val["cam_mass_in_lungs"]["mean"] <= 1.0
    for k in ("original", "lungs_only", "lungs_removed"):
        assert 0.0 <= val[k]["accuracy"] <= 1.0


def test_cam_mass_in_lungs_measures_where_the_map_lies(monkeypatch):
    """A Grad-CAM map that lies inside the lung mask scores 1, one outside it 0."""
    from types import SimpleNamespace

    from cxrkit.training import diagnostics

    s = 32
    masks = np.zeros((2, s, s), np.uint8)
    masks[:, 8:24, 4:14] = 1
    data = SimpleNamespace(images=np.full((2, s, s), 128, np.uint8), masks=masks, has_mask=np.array([True, True]))

    class FakeCam:
        layer = "net.fake"

        def __init__(self, *a, **k):
            self.net = lambda x: torch.zeros(x.shape[0], 4)

        def __call__(self, x, idx):
            m = np.zeros((x.shape[0], s, s), np.float32)
            m[0] = masks[0]          # image 0: all mass inside the lungs
            m[1] = 1 - masks[1]      # image 1: all mass outside
            return m

    monkeypatch.setattr(diagnostics, "GradCamExplainer", FakeCam)
    r = diagnostics.cam_mass_in_lungs(None, {}, data, np.array([0, 1]), torch.device("cpu"))
    assert r["n_images"] == 2 and r["mean"] == pytest.approx(0.5)
    assert r["lung_area_share_mean"] == pytest.approx(masks[0].mean())


def test_evaluate_joins_the_runs_manifest_and_an_overwrite_retrain_removes_its_files(evaluated, mdt_subset,
                                                                                      capsys):
    """--evaluate holds the folder (lock) and records what it wrote: a later --overwrite training is not
    blocked by evaluate's outputs (they were 'changed since' the training's manifest before)."""
    from cxrkit.core.outdir import MANIFEST_NAME, claim_save_dir
    rc, out, _, _ = evaluated
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["tool"] == "cxrkit evaluate" and m["status"] == "complete"
    assert "test_results/classification_report.json" in m["files"]
    assert "model_checkpoints/best_covid_model.pth" in m["files"]  # carried, re-hashed after --calibrate
    common = ["--data_dir", str(mdt_subset), "--output_dir", str(out), "--img_size", "32", "--workers", "0",
              "--quiet", "--device", "cpu"]
    ck = out / "model_checkpoints" / "best_covid_model.pth"
    with claim_save_dir(out, keep_earlier=True):  # a training (or another evaluation) holds the folder
        capsys.readouterr()
        assert model_arch.main(common + ["--evaluate", str(ck)]) == 2
        assert "--output_dir" in capsys.readouterr().err
    assert model_arch.main(common + ["--arch", "tiny", "--num_epochs", "1", "--batch_size", "8", "--overwrite",
                                     "--no_report"]) == 0
    assert not (out / "test_results" / "shortcut_check.json").exists()  # evaluate's own file went with --overwrite
