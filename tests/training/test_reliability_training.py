"""Reliability findings (issue 9 F1-F8, issue 15 R1-R8; index in tests/inference/test_reliability_inference.py)
that protect cxrkit.training: training data checks, the training output folder (R1), --init_from, export."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from cxrkit.cli import export as export_cli
from cxrkit.cli import train as model_arch
from tests.helpers import REPO, assert_one_line_error
from tests.helpers import HOLD_LOCK as _HOLD_LOCK
from tests.helpers import make_unreadable as _unreadable
from tests.helpers import read_manifest as _manifest
from tests.helpers import train_tiny as _train_tiny


def error_line(capsys) -> str:
    """The CLI's stderr, log records removed, must be ONE line starting with `error:`."""
    return assert_one_line_error(capsys, log_lines_ok=True)


def test_f5_training_init_from_an_empty_checkpoint(tiny_model, mdt_subset, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "t"), "--arch", "tiny",
                            "--img_size", "32", "--workers", "0", "--quiet", "--device", "cpu",
                            "--init_from", str(empty)]) == 2
    assert "empty.pth" in error_line(capsys)


# ================================================================ F7: a class with no usable image
@pytest.mark.slow
def test_f7_training_refuses_a_class_whose_every_image_is_undecodable(mdt_subset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(mdt_subset, data)
    broken = sorted((data / "Normal" / "images").iterdir())
    for p in broken:
        p.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc = model_arch.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--arch", "tiny",
                          "--img_size", "32", "--num_epochs", "1", "--batch_size", "8", "--workers", "0", "--quiet",
                          "--device", "cpu"])
    assert rc == 2
    line = error_line(capsys)
    assert "'Normal'" in line and f"{len(broken)} unreadable" in line
    assert not (tmp_path / "out" / "model_checkpoints" / "best_covid_model.pth").exists()


def test_f8_masks_of_another_aspect_ratio_warn_once(tmp_path, caplog):
    from cxrkit.training.data import build_cache
    rng = np.random.default_rng(0)
    for c in ("A", "B"):
        for k in range(3):
            img = rng.integers(0, 255, (80, 80), dtype=np.uint8)
            (tmp_path / "d" / c / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / c / "masks").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "d" / c / "images" / f"{k}.png"), img)
            mask = np.zeros((40, 80) if c == "A" else (64, 64), np.uint8)  # A: 2:1 masks for square images
            mask[10:30, 10:50] = 255
            cv2.imwrite(str(tmp_path / "d" / c / "masks" / f"{k}.png"), mask)
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        build_cache(tmp_path / "d", 32, tmp_path / "cache", workers=0, progress=False)
    msgs = [r.getMessage() for r in caplog.records if "aspect ratio" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("3 masks") and "80x40 for a 80x80 image" in msgs[0]


# ----------------------------------------------------------------- R1: training owns its output folder
@pytest.mark.slow
def test_r1_training_into_a_folder_in_use_is_refused_naming_the_pid(mdt_subset, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=str(REPO), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train_tiny(mdt_subset, out) == 2
        line = error_line(capsys)
        assert "being written by another running process" in line and f"pid {holder.pid}" in line
        assert not (out / "model_checkpoints" / "best_covid_model.pth").exists()
    finally:
        holder.kill()
        holder.wait(30)


@pytest.mark.slow
def test_r1_training_overwrite_removes_only_what_the_earlier_run_listed(mdt_subset, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_tiny(mdt_subset, out) == 0
    m = _manifest(out)
    assert m["status"] == "complete" and m["tool"] == "cxrkit training"
    best = "model_checkpoints/best_covid_model.pth"
    assert {best, "split.json", "test_results/classification_report.json"} <= set(m["files"])
    assert m["files"][best]["size"] == (out / best).stat().st_size and len(m["files"][best]["sha256"]) == 64
    (out / "model_checkpoints" / "my_notes.txt").write_text("mine")
    (out / "test_results" / "my_plot.png").write_bytes(b"mine")
    capsys.readouterr()
    assert _train_tiny(mdt_subset, out, "--seed", "5") == 2                     # no flag: refused
    assert "--overwrite" in error_line(capsys)
    assert _train_tiny(mdt_subset, out, "--seed", "5", "--overwrite") == 0
    assert (out / "model_checkpoints" / "my_notes.txt").read_text() == "mine"
    assert (out / "test_results" / "my_plot.png").read_bytes() == b"mine"
    assert json.loads((out / "split.json").read_text())["seed"] == 5            # the old split was removed
    assert _manifest(out)["status"] == "complete"


def test_r1_training_refuses_to_replace_a_checkpoint_no_run_recorded(mdt_subset, tmp_path, capsys):
    out = tmp_path / "legacy"
    (out / "model_checkpoints").mkdir(parents=True)
    best = out / "model_checkpoints" / "best_covid_model.pth"
    best.write_bytes(b"somebody's model")
    assert _train_tiny(mdt_subset, out, "--overwrite") == 2
    line = error_line(capsys)
    assert "model_checkpoints/best_covid_model.pth" in line and "no cxrkit run recorded" in line
    assert best.read_bytes() == b"somebody's model"


def test_r5_training_with_an_unreadable_class_folder(mdt_subset, tmp_path, capsys, monkeypatch):
    _unreadable(monkeypatch, "Normal/images")
    assert _train_tiny(mdt_subset, tmp_path / "t") == 2
    assert "cannot read folder" in error_line(capsys)


@pytest.mark.slow
def test_r7_disk_full_while_training_names_the_checkpoint(mdt_subset, tmp_path, capsys, monkeypatch):
    import errno
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "last_checkpoint.pth":
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    assert _train_tiny(mdt_subset, tmp_path / "t") == 2
    line = error_line(capsys)
    assert str(tmp_path / "t" / "model_checkpoints" / "last_checkpoint.pth") in line and "ENOSPC" in line


def test_r8_export_overwrite_replaces_model_and_meta(tiny_model, tmp_path):
    target = tmp_path / "m.onnx"
    assert export_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--onnx_path", str(target)]) == 0
    first = json.loads((tmp_path / "m.onnx.meta.json").read_text())["meta_id"]
    assert export_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--onnx_path", str(target)]) == 2
    assert export_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--onnx_path", str(target),
                            "--overwrite"]) == 0
    assert json.loads((tmp_path / "m.onnx.meta.json").read_text())["meta_id"] != first


# ------------------------------------------------------------------------- R8: notes that were missing
def _tiny_folder(root: Path, counts: dict, masks: set) -> Path:
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c / "images").mkdir(parents=True, exist_ok=True)
        if c in masks:
            (root / c / "masks").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img = rng.integers(0, 255, (40, 40), dtype=np.uint8)
            cv2.imwrite(str(root / c / "images" / f"{k}.png"), img)
            if c in masks:
                cv2.imwrite(str(root / c / "masks" / f"{k}.png"), (img > 128).astype(np.uint8) * 255)
    return root


def test_r8_class_without_masks_folder_is_noted(tmp_path, caplog):
    from cxrkit.training.data import discover
    _tiny_folder(tmp_path / "d", {"A": 3, "B": 3}, masks={"A"})
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        discover(tmp_path / "d")
    assert any("'B' have no masks/ folder" in r.getMessage() for r in caplog.records), caplog.text


def test_r8_class_missing_from_validation_and_test_is_noted(tmp_path, caplog):
    from cxrkit.training.data import build_cache
    from cxrkit.training.split import load_or_make_split
    data = build_cache(_tiny_folder(tmp_path / "d", {"A": 10, "B": 1}, masks=set()), 32, tmp_path / "c", workers=0,
                       progress=False)
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        split = load_or_make_split(data, tmp_path / "split.json", 0.15, 0.15, 0)
    assert 1 not in data.labels[split["val"]] and 1 not in data.labels[split["test"]]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("'B'" in m and "validation split" in m for m in msgs), msgs
    assert any("'B'" in m and "test split" in m for m in msgs), msgs


# ======================================== --resume where a best checkpoint stands alone (the shipped one)
def test_resume_refuses_to_start_afresh_over_a_best_checkpoint_it_cannot_continue(tiny_model, mdt_subset, tmp_path,
                                                                                 capsys):
    """`--resume` with no last checkpoint is a fresh start; over a best checkpoint kept alone (the repository's
    shipped one, with the default --output_dir .) that start would write over it, so it is refused."""
    out = tmp_path / "out"
    (out / "model_checkpoints").mkdir(parents=True)
    best = out / "model_checkpoints" / "best_covid_model.pth"
    shutil.copy(tiny_model.checkpoint, best)
    before = best.read_bytes()
    args = ["--data_dir", str(mdt_subset), "--output_dir", str(out), "--arch", "tiny", "--img_size", "32",
            "--num_epochs", "1", "--workers", "0", "--quiet", "--device", "cpu", "--resume"]
    assert model_arch.main(args) == 2
    line = error_line(capsys)
    assert "best_covid_model.pth" in line and "--overwrite" in line
    assert best.read_bytes() == before


@pytest.mark.parametrize("flags, word", [(["--mixstyle", "1.5"], "--mixstyle"),
                                         (["--mixstyle", "0.5", "--mixstyle_alpha", "0"], "--mixstyle_alpha")])
def test_mixstyle_values_that_would_fail_later_are_refused_up_front(mdt_subset, tmp_path, capsys, flags, word):
    assert model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "o"), "--arch", "tiny",
                            "--img_size", "32", "--workers", "0", "--quiet", "--device", "cpu", *flags]) == 2
    assert word in error_line(capsys)
