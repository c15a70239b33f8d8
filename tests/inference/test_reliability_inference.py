"""Issue 9, "Reliability": one test (or more) per finding, each failing before the fix.

  F1  two runs into one --save_dir           -> a lock, unique temporary names
  F2  a used --save_dir / one inside the data -> refused unless --overwrite (manifest), never read back
  F3  a meta file that disagrees with its ONNX graph (class order, checksum) -> exit 2, one line
  F4  a checkpoint listing 3 classes for a 4-output network -> exit 2, one line
  F5  0-byte / truncated / wrong-format model files -> `error:` one line, exit 2, in every CLI
  F6  inputs the model cannot judge -> quality_flags (CSV, summary.json, overlay) or a plain skip reason;
      the bad-input table runs against BOTH inference CLIs
  F7  training with a class whose every image is undecodable -> exit 2 naming the class and count
  F8  symlinked folders, uncalibrated checkpoints, mask aspect ratio, multi-page TIFFs

Issue 15, "Reliability, round 3" (R1..R8 below; MISUSE is the one-line-error table run against both
inference CLIs, training, --evaluate and export):
  R1  training owns --output_dir (lock naming the pid, manifest, --overwrite removes only its files)
  R2  --overwrite never removes a file no manifest lists, nor one changed since
  R3  a damaged manifest (truncated, checksum mismatch) marks an unknown folder: refused, never cleaned
  R4  a killed run's thumbnails (and report.html) are in its manifest
  R5  a sub-folder that cannot be read is an error, not silently left out
  R6  Grad-CAM from another checkpoint than the ONNX model's is refused unless --cam_checkpoint_mismatch_ok
  R7  disk full / undeletable old output / bad flags / NaN weights / bad temperature: one line, exit 2
  R8  --num_epochs 0, export over an existing model, --batch_size 100000, FIFOs, no masks/ folder,
      a class missing from validation/test, an all-zero ground-truth mask

The findings live with the modules they protect: this file (inference), tests/core/test_reliability_core.py
(F2 crashed run, F6 pixel limit, F8 TIFF), tests/training/test_reliability_training.py (F5 init_from, F7,
F8 masks, R1, R5/R7 training, R8 export/notes) and tests/cli/test_reliability_cli.py (F4, F5 every CLI,
the R7/R8 misuse table). Shared pieces are in tests/helpers.py.
"""
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

from cxrkit.cli import infer_pth as pth_cli
from cxrkit.cli import infer_onnx as onnx_cli
from tests.helpers import CLASSES, REPO, assert_one_line_error, png_header_only, real_images
from tests.helpers import HOLD_LOCK as _HOLD_LOCK
from tests.helpers import make_unreadable as _unreadable
from tests.helpers import read_manifest as _manifest
from tests.helpers import read_predictions as read_csv


# ------------------------------------------------------------------------------------------ helpers
def error_line(capsys) -> str:
    """The CLI's stderr, log records removed, must be ONE line starting with `error:`."""
    return assert_one_line_error(capsys, log_lines_ok=True)


def run_cli(backend, model, args):
    """One inference CLI in-process; backend 'pth' or 'onnx'."""
    if backend == "pth":
        return pth_cli.main(["--checkpoint", str(model.checkpoint), "--device", "cpu", "--quiet", *args])
    return onnx_cli.main(["--onnx_path", str(model.onnx), "--quiet", *args])


BACKENDS = ["pth", "onnx"]


# =============================================================================== F1: concurrent runs
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_f1_save_dir_written_by_another_process_is_refused(backend, tiny_model, cxr_eval_dir, tmp_path, capsys):
    out = tmp_path / "shared_out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=str(REPO), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # "locked" (or EOF when it could not lock)
        rc = run_cli(backend, tiny_model, ["--images", str(real_images(cxr_eval_dir, 1)[0]), "--save_dir", str(out)])
        assert rc == 2
        line = error_line(capsys)
        assert "being written by another running process" in line and str(out) in line
        assert not (out / "predictions.csv").exists()
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait(30)
    assert run_cli(backend, tiny_model, ["--images", str(real_images(cxr_eval_dir, 1)[0]),
                                         "--save_dir", str(out)]) == 0


def test_f1_temporary_names_are_unique_per_process(tiny_model, cxr_eval_dir, tmp_path):
    """Fixed `<file>.tmp` names made one run fail on (or publish) the other's temporary file."""
    # another process's fixed temporary names are in the way (here: folders, so they cannot be opened)
    img = real_images(cxr_eval_dir, 1)[0]
    out = tmp_path / "out"
    (out / "annotated").mkdir(parents=True)
    stem = f"{img.stem}"
    for blocker in (out / "predictions.csv.tmp", out / "summary.json.tmp", out / "annotated" / f"{stem}.png.tmp"):
        blocker.mkdir()
    assert run_cli("onnx", tiny_model, ["--images", str(img), "--save_dir", str(out)]) == 0
    assert (out / "annotated" / f"{stem}.png").is_file() and (out / "predictions.csv").is_file()
    from cxrkit.core.io_utils import tmp_name
    a, b = tmp_name(tmp_path / "x.png"), tmp_name(tmp_path / "x.png")
    assert a != b and str(os.getpid()) in a.name and a.parent == tmp_path and a.name.endswith(".tmp")


# ================================================================================ F2: a used save_dir
@pytest.mark.parametrize("backend", BACKENDS)
def test_f2_used_save_dir_is_refused_and_overwrite_removes_exactly_the_old_files(backend, tiny_model, cxr_eval_dir,
                                                                                 tmp_path, capsys):
    imgs = real_images(cxr_eval_dir, 3)
    out = tmp_path / "out"
    assert run_cli(backend, tiny_model, ["--images", *map(str, imgs), "--save_dir", str(out), "--save_masks"]) == 0
    first = sorted(p.name for p in (out / "annotated").iterdir())
    assert len(first) == 3
    (out / "my_notes.txt").write_text("not an output")  # a user's file in the folder
    capsys.readouterr()
    assert run_cli(backend, tiny_model, ["--images", str(imgs[0]), "--save_dir", str(out)]) == 2
    line = error_line(capsys)
    assert "earlier run's outputs" in line and "--overwrite" in line
    assert sorted(p.name for p in (out / "annotated").iterdir()) == first  # nothing touched
    assert run_cli(backend, tiny_model, ["--images", str(imgs[2]), "--save_dir", str(out), "--overwrite"]) == 0
    assert [p.name for p in (out / "annotated").iterdir()] == [f"{imgs[2].stem}.png"]  # no stale PNGs
    assert not (out / "masks").exists()                                                # nor stale masks
    assert (out / "my_notes.txt").read_text() == "not an output"                       # other files kept
    rows = read_csv(out / "predictions.csv")
    assert [Path(r["image_path"]).name for r in rows] == [imgs[2].name]
    manifest = json.loads((out / ".cxrkit_outputs.json").read_text())
    assert manifest["status"] == "complete" and "my_notes.txt" not in manifest["files"]
    assert f"annotated/{imgs[2].stem}.png" in manifest["files"] and "predictions.csv" in manifest["files"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_f2_save_dir_inside_data_dir_is_never_read_back(backend, tiny_model, cxr_eval_dir, tmp_path):
    data = tmp_path / "data"
    for p in real_images(cxr_eval_dir, 4):
        (data / p.parent.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, data / p.parent.parent.name / p.name)
    common = ["--data_dir", str(data), "--num_samples", "0"]
    assert run_cli(backend, tiny_model, common + ["--save_dir", str(data / "out")]) == 0
    assert run_cli(backend, tiny_model, common + ["--save_dir", str(data / "out2")]) == 0  # out/ is skipped too
    assert run_cli(backend, tiny_model, ["--images", str(data), "--num_samples", "0",       # and via --images
                                         "--save_dir", str(data / "out3")]) == 0
    for d in ("out", "out2", "out3"):
        s = json.loads((data / d / "summary.json").read_text())
        assert s["n_inputs"] == 4, s["n_inputs"]
        assert not any("/out" in r["image_path"].replace("\\", "/").split("/data/", 1)[1]
                       for r in read_csv(data / d / "predictions.csv"))


# ====================================================================== F3: meta bound to its graph
def test_f3_graph_records_class_names_and_meta_identity(tiny_model):
    import onnxruntime as ort
    props = ort.InferenceSession(str(tiny_model.onnx), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    meta = json.loads(tiny_model.meta_path.read_text())
    assert json.loads(props["cxrkit_class_names"]) == CLASSES == meta["class_names"]
    assert props["cxrkit_meta_id"] == meta["meta_id"] and int(props["cxrkit_img_size"]) == meta["img_size"]
    assert float(props["cxrkit_temperature"]) == meta["temperature"]
    assert json.loads(props["cxrkit_lung_area_range"]) == meta["lung_area_range"]


@pytest.mark.parametrize("change, needle", [
    (lambda m: {**m, "class_names": [CLASSES[2], CLASSES[1], CLASSES[0], CLASSES[3]]}, "class names or their order"),
    (lambda m: {**m, "onnx_sha256": "0" * 64}, "written for another ONNX file"),
    (lambda m: {**m, "temperature": 1.0}, "temperature"),
    (lambda m: {**m, "meta_id": "someone-elses"}, "identity"),
])
def test_f3_meta_that_disagrees_with_its_model_is_an_error(tiny_model, cxr_eval_dir, tmp_path, capsys, change,
                                                           needle):
    from cxrkit.inference import InferenceError, OnnxBackend
    bad = tmp_path / "bad.meta.json"
    bad.write_text(json.dumps(change(json.loads(tiny_model.meta_path.read_text()))))
    with pytest.raises(InferenceError, match="re-export"):
        OnnxBackend(tiny_model.onnx, bad)
    assert onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--meta_path", str(bad), "--quiet",
                          "--images", str(real_images(cxr_eval_dir, 1)[0]), "--save_dir", str(tmp_path / "o")]) == 2
    assert needle in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_f3_older_export_without_binding_still_loads_with_one_warning(tiny_model, tmp_path, caplog):
    import onnx

    from cxrkit.inference import OnnxBackend
    from cxrkit.core.io_utils import sha256_file
    proto = onnx.load(str(tiny_model.onnx))
    del proto.metadata_props[:]
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    meta = json.loads(tiny_model.meta_path.read_text())
    (tmp_path / "old.onnx.meta.json").write_text(json.dumps({**meta, "onnx_sha256": sha256_file(old)}))
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        a, b = OnnxBackend(old), OnnxBackend(old)
    assert a.class_names == b.class_names == CLASSES
    assert sum("records no class names" in r.getMessage() for r in caplog.records) == 1


# ======================================================== F6: inputs the model cannot judge (both CLIs)
def _low_contrast(u8):
    return (110 + u8.astype(np.float32) * 20 / 255).astype(np.uint8)


# name -> (what the user gets: "skip" / "flag" / "ok" / "note", the reason substring / flag code)
BAD_INPUTS = {
    "empty.png": ("skip", "empty file"),
    "truncated.png": ("skip", "not a decodable image"),
    "text_file.png": ("skip", "not a decodable image"),
    "nan_pixel.tiff": ("skip", "not finite (NaN or inf)"),
    "inf_pixels.tiff": ("skip", "not finite (NaN or inf)"),
    "huge_40000x40000.png": ("skip", "image is 40000x40000 px, over the 100 MP limit"),
    "huge_30000x30000.png": ("skip", "image is 30000x30000 px, over the 100 MP limit"),
    "no_pixel_data.dcm": ("skip", "unreadable DICOM"),
    "uniform_grey.png": ("flag", "uniform"),
    "black.png": ("flag", "uniform"),
    "low_contrast.png": ("flag", "low_contrast"),
    "multi_page.tiff": ("note", "multi-page TIFF (3 pages): only the first page was used"),
    "cmyk.jpg": ("ok", None),
    "sixteen_bit.png": ("ok", None),
    "rgba.png": ("ok", None),
    "mono1.dcm": ("ok", None),
    "name with, comma and\nnewline.png": ("ok", None),
    "good.png": ("ok", None),
    "fifo.png": ("skip", "not a regular file (a FIFO"),  # issue 15: was "file not found"
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, cxr_eval_dir, tmp_path_factory):
    from PIL import Image

    from tests.inference.test_inference import _make_dicom
    root = tmp_path_factory.mktemp("bad_inputs")
    d = root / "inputs"
    d.mkdir()
    src = real_images(cxr_eval_dir, 1)[0]
    u8 = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(src.read_bytes()[:300])
    (d / "text_file.png").write_text("this is not an image\n")
    f = u8.astype(np.float32) / 255
    f[10, 10] = np.nan
    cv2.imwrite(str(d / "nan_pixel.tiff"), f)
    f = u8.astype(np.float32) / 255
    f[:5] = np.inf
    cv2.imwrite(str(d / "inf_pixels.tiff"), f)
    png_header_only(d / "huge_40000x40000.png", 40000, 40000)
    png_header_only(d / "huge_30000x30000.png", 30000, 30000)
    _make_dicom(d / "no_pixel_data.dcm", u8.astype(np.uint16) * 16, "MONOCHROME2")
    import pydicom
    ds = pydicom.dcmread(d / "no_pixel_data.dcm")
    del ds.PixelData
    ds.save_as(d / "no_pixel_data.dcm")
    cv2.imwrite(str(d / "uniform_grey.png"), np.full_like(u8, 128))
    cv2.imwrite(str(d / "black.png"), np.zeros_like(u8))
    cv2.imwrite(str(d / "low_contrast.png"), _low_contrast(u8))
    pages = [Image.fromarray(u8), Image.fromarray(255 - u8), Image.fromarray(u8 // 2)]
    pages[0].save(d / "multi_page.tiff", save_all=True, append_images=pages[1:])
    Image.fromarray(u8).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    cv2.imwrite(str(d / "sixteen_bit.png"), u8.astype(np.uint16) * 257)
    cv2.imwrite(str(d / "rgba.png"), cv2.cvtColor(u8, cv2.COLOR_GRAY2BGRA))
    _make_dicom(d / "mono1.dcm", (4095 - u8.astype(np.uint16) * 16).astype(np.uint16), "MONOCHROME1")
    shutil.copy2(src, d / "name with, comma and\nnewline.png")
    shutil.copy2(src, d / "good.png")
    os.mkfifo(d / "fifo.png")  # never opened: reading it would block
    assert sorted(p.name for p in d.iterdir()) == sorted(BAD_INPUTS)
    runs = {}
    for backend in BACKENDS:
        out = root / backend
        rc = run_cli(backend, tiny_model, ["--data_dir", str(d), "--num_samples", "0", "--save_dir", str(out),
                                           "--batch_size", "4"])
        assert rc == 0
        runs[backend] = {"summary": json.loads((out / "summary.json").read_text()),
                         "rows": {Path(r["image_path"]).name: r for r in read_csv(out / "predictions.csv")},
                         "out": out}
    return runs


def _check_row(run, name) -> str | None:
    """What is wrong with one input's outcome (None: what the table says)."""
    kind, want = BAD_INPUTS[name]
    s, rows = run["summary"], run["rows"]
    skipped = {Path(x["path"]).name: x["reason"] for x in s["skipped"]}
    if kind == "skip":
        if name not in skipped or name in rows:
            return f"not skipped (flags {rows.get(name, {}).get('quality_flags')!r})"
        r = skipped[name]
        if want not in r or "cv::" in r or "error:" in r or "\n" in r:
            return f"skip reason {r!r}, expected {want!r}"
        return None
    if name not in rows:
        return f"skipped: {skipped.get(name)!r}"
    flags = [f for f in rows[name].get("quality_flags", "<no quality_flags column>").split(";") if f]
    image_flags = [f for f in flags if f != "lung_area_out_of_range"]  # the 1-epoch test model's lungs vary
    ann = cv2.imread(str(run["out"] / rows[name]["annotated_png"]))
    framed = tuple(int(v) for v in ann[0, 0]) == (0, 0, 255) and tuple(int(v) for v in ann[-1, -1]) == (0, 0, 255)
    if framed != bool(flags):  # a flagged image's overlay has a red frame, an unflagged one none
        return f"overlay frame {framed} for flags {flags}"
    if image_flags != ([want] if kind == "flag" else []):
        return f"flags {flags}"
    if kind == "note":
        notes = {Path(x["path"]).name: x["note"] for x in s.get("notes", [])}
        if notes.get(name) != want:
            return f"note {notes.get(name)!r}"
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_f6_bad_input_table(bad_input_runs, backend):
    """Every row of BAD_INPUTS (the README's table) against one CLI; all mismatches reported at once."""
    wrong = {name: _check_row(bad_input_runs[backend], name) for name in sorted(BAD_INPUTS)}
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, wrong


def test_f6_flags_counted_in_summary_and_equal_across_backends(bad_input_runs):
    for backend in BACKENDS:
        s, rows = bad_input_runs[backend]["summary"], bad_input_runs[backend]["rows"]
        q = s["quality"]
        counted = {c: sum(c in r["quality_flags"].split(";") for r in rows.values()) for c in q["counts"]}
        assert q["counts"] == counted and q["n_flagged"] == sum(bool(r["quality_flags"]) for r in rows.values())
        assert set(q["counts"]) >= {"uniform", "low_contrast", "lung_area_out_of_range"}
        assert q["lung_area_range"]["low"] < q["lung_area_range"]["high"]
        header = list(next(iter(rows.values())))
        assert "quality_flags" in header
    a, b = bad_input_runs["pth"], bad_input_runs["onnx"]
    flags = {k: (r["quality_flags"], b["rows"][k]["quality_flags"]) for k, r in a["rows"].items()}
    assert all(x == y for x, y in flags.values()), flags
    assert a["summary"]["quality"]["lung_area_range"] == b["summary"]["quality"]["lung_area_range"]
    for k in a["rows"]:  # the two backends still agree on every class and to 1e-4
        assert a["rows"][k]["predicted_class"] == b["rows"][k]["predicted_class"]
        for c in CLASSES:
            assert abs(float(a["rows"][k][f"prob_{c}"]) - float(b["rows"][k][f"prob_{c}"])) <= 1e-4


def test_f6_lung_area_outside_the_training_range_is_flagged_by_both_backends(tiny_model, cxr_eval_dir, tmp_path):
    """The range comes from the checkpoint (finalize) and, exported, from the ONNX meta and graph."""
    from types import SimpleNamespace

    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    from cxrkit.training.export import export_to_onnx
    ck = load_checkpoint(tiny_model.checkpoint)
    assert ck["lung_area_range"]["low"] < ck["lung_area_range"]["high"]  # finalize stored it
    ck["lung_area_range"] = {**ck["lung_area_range"], "low": 0.95, "high": 1.0}  # nothing real is inside
    narrow = tmp_path / "narrow.pth"
    atomic_torch_save(ck, narrow)
    export_to_onnx(narrow, tmp_path / "narrow.onnx")
    model = SimpleNamespace(checkpoint=narrow, onnx=tmp_path / "narrow.onnx")
    imgs = [str(p) for p in real_images(cxr_eval_dir, 2)]
    for backend in BACKENDS:
        out = tmp_path / backend
        assert run_cli(backend, model, ["--images", *imgs, "--save_dir", str(out)]) == 0
        rows = read_csv(out / "predictions.csv")
        assert all("lung_area_out_of_range" in r["quality_flags"].split(";") for r in rows)
        s = json.loads((out / "summary.json").read_text())
        assert s["quality"]["counts"]["lung_area_out_of_range"] == 2
        assert s["quality"]["lung_area_range"]["low"] == 0.95


# ============================================================================ F8: the smaller items
def test_f8_symlinked_subfolders_are_searched_once_and_loops_cut(cxr_eval_dir, tmp_path):
    from cxrkit.inference import gather_inputs
    from cxrkit.core.decode import list_images
    elsewhere = tmp_path / "elsewhere" / "Normal"
    elsewhere.mkdir(parents=True)
    imgs = real_images(cxr_eval_dir, 3)
    for p in imgs[:2]:
        shutil.copy2(p, elsewhere / p.name)
    data = tmp_path / "data"
    (data / "COVID").mkdir(parents=True)
    shutil.copy2(imgs[2], data / "COVID" / imgs[2].name)
    try:
        os.symlink(elsewhere, data / "Normal", target_is_directory=True)
        os.symlink(data, data / "COVID" / "loop", target_is_directory=True)      # a loop
        os.symlink(elsewhere, data / "again", target_is_directory=True)          # the same folder twice
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available here")
    found = list_images(data)
    assert len(found) == 3 and len({p.resolve() for p in found}) == 3
    items = gather_inputs(data, class_names=CLASSES)
    assert sorted(i.true_class for i in items) == ["COVID", "Normal", "Normal"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_f8_self_referencing_symlink_given_with_images_is_a_counted_skip(backend, tmp_path, capsys):
    """`ln -s loop.png loop.png` given with --images: gather_inputs' Path.resolve() raised RuntimeError
    ("Symlink loop", a traceback). Now it is a counted, logged skip saying "symlink loop" (a broken
    link says so too), and a loop given alone is one line. Shipped models on a SYNTHETIC image."""
    from types import SimpleNamespace
    from cxrkit.core.config import ONNX_PATH
    from cxrkit.training.synthetic import generate
    shipped = SimpleNamespace(onnx=REPO / ONNX_PATH, checkpoint=REPO / "model_checkpoints" / "best_covid_model.pth")
    if not (shipped.onnx.is_file() and shipped.checkpoint.is_file()):
        pytest.skip("shipped models not in this checkout")
    good = next(generate(tmp_path / "syn", per_class=1, seed=3).glob("Normal/images/*.png"))
    loop, broken = tmp_path / "loop.png", tmp_path / "broken.png"
    try:
        os.symlink("loop.png", loop)
        os.symlink("nowhere.png", broken)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available here")
    out = tmp_path / "out"
    assert run_cli(backend, shipped, ["--images", str(loop), str(broken), str(good), "--save_dir", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    reasons = {Path(x["path"]).name: x["reason"] for x in s["skipped"]}
    assert s["n_skipped"] == 2 and s["n_processed"] == 1
    assert "symlink loop" in reasons["loop.png"] and "broken symlink" in reasons["broken.png"]
    assert "Traceback" not in capsys.readouterr().err
    assert run_cli(backend, shipped, ["--images", str(loop), "--save_dir", str(tmp_path / "out2")]) == 2
    assert_one_line_error(capsys, str(loop), "symlink loop", log_lines_ok=True)


def test_f8_uncalibrated_checkpoint_is_warned_about(tiny_model, cxr_eval_dir, tmp_path, caplog):
    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    ck = load_checkpoint(tiny_model.checkpoint)
    ck["temperature"] = 1.0
    ck.pop("prior_correction", None)  # what a best checkpoint saved during training looks like
    raw = tmp_path / "intermediate.pth"
    atomic_torch_save(ck, raw)
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        assert pth_cli.main(["--checkpoint", str(raw), "--device", "cpu", "--quiet", "--save_dir", str(out),
                             "--images", str(real_images(cxr_eval_dir, 1)[0])]) == 0
    assert any("has not been calibrated" in r.getMessage() for r in caplog.records)
    s = json.loads((out / "summary.json").read_text())
    assert s["calibrated"] is False and "intermediate checkpoint" in s["calibration_problem"]


# ------------------------------------------------------- R2: --overwrite never removes a user's file
@pytest.mark.parametrize("backend", BACKENDS)
def test_r2_overwrite_never_removes_files_no_manifest_lists(backend, tiny_model, cxr_eval_dir, tmp_path, capsys):
    out = tmp_path / "users_folder"
    (out / "annotated").mkdir(parents=True)
    (out / "masks").mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    (out / "annotated" / "holiday.png").write_bytes(b"mine")
    (out / "masks" / "x_mask.png").write_bytes(b"mine")
    img = str(real_images(cxr_eval_dir, 1)[0])
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert run_cli(backend, tiny_model, ["--images", img, "--save_dir", str(out), *extra]) == 2
        line = error_line(capsys)
        assert "summary.json" in line and "no cxrkit run recorded" in line and "nothing was removed" in line
    assert (out / "summary.json").read_text() == '{"mine": true}'
    assert (out / "annotated" / "holiday.png").read_bytes() == b"mine"
    assert (out / "masks" / "x_mask.png").read_bytes() == b"mine"


def test_r2_overwrite_keeps_an_output_changed_since_the_run(tiny_model, cxr_eval_dir, tmp_path):
    imgs = real_images(cxr_eval_dir, 3)
    out = tmp_path / "out"
    assert run_cli("onnx", tiny_model, ["--images", *map(str, imgs[:2]), "--save_dir", str(out)]) == 0
    edited = out / "annotated" / f"{imgs[0].stem}.png"
    edited.write_bytes(b"my edited copy")
    assert run_cli("onnx", tiny_model, ["--images", str(imgs[2]), "--save_dir", str(out), "--overwrite"]) == 0
    assert edited.read_bytes() == b"my edited copy"                           # changed: kept
    assert not (out / "annotated" / f"{imgs[1].stem}.png").exists()           # unchanged: removed


# ------------------------------------------------------------------- R3: damaged manifest = unknown
@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_r3_damaged_manifest_is_an_unknown_folder_refused_and_never_cleaned(damage, tiny_model, cxr_eval_dir,
                                                                           tmp_path, capsys):
    imgs = real_images(cxr_eval_dir, 2)
    out = tmp_path / "out"
    assert run_cli("onnx", tiny_model, ["--images", *map(str, imgs), "--save_dir", str(out)]) == 0
    mp = out / ".cxrkit_outputs.json"
    if damage == "truncated":
        mp.write_bytes(mp.read_bytes()[:40])
    else:  # valid JSON, but not what the run wrote
        m = json.loads(mp.read_text())
        m["files"]["../../elsewhere.txt"] = {}
        mp.write_text(json.dumps(m))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert run_cli("onnx", tiny_model, ["--images", str(imgs[0]), "--save_dir", str(out), *extra]) == 2
        line = error_line(capsys)
        assert "unknown folder" in line and ("checksum" in line if damage == "edited" else "cannot be read" in line)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert len(read_csv(out / "predictions.csv")) == 2


# ---------------------------------------------------------------- R4: a killed run's thumbnails
def test_r4_killed_runs_thumbnails_are_removed_by_overwrite(tiny_model, cxr_eval_dir, tmp_path, monkeypatch):
    import cxrkit.inference.report
    imgs = real_images(cxr_eval_dir, 3)
    out = tmp_path / "out"

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # the run dies after the per-image files, before report.html
    monkeypatch.setattr(cxrkit.inference.report, "write_report", killed)
    assert run_cli("onnx", tiny_model, ["--images", *map(str, imgs[:2]), "--save_dir", str(out)]) == 130
    assert len(list((out / "thumbs").iterdir())) == 2
    m = _manifest(out)
    assert m["status"] == "running" and "report.html" in m["files"]
    assert {f"thumbs/{p.stem}.jpg" for p in imgs[:2]} <= set(m["files"])
    monkeypatch.undo()
    assert run_cli("onnx", tiny_model, ["--images", str(imgs[2]), "--save_dir", str(out), "--overwrite"]) == 0
    assert [p.name for p in (out / "thumbs").iterdir()] == [f"{imgs[2].stem}.jpg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_r5_unreadable_class_folder_is_an_error_not_a_missing_class(backend, tiny_model, cxr_eval_dir, tmp_path,
                                                                   capsys, monkeypatch):
    _unreadable(monkeypatch, "Lung_Opacity/images")
    assert run_cli(backend, tiny_model, ["--data_dir", str(cxr_eval_dir), "--num_samples", "0",
                                         "--save_dir", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "cannot read folder" in line and "Lung_Opacity" in line and "Permission denied" in line
    assert not (tmp_path / "o" / "predictions.csv").exists()


# ------------------------------------------------------------ R6: Grad-CAM from another checkpoint
def test_r6_gradcam_with_another_checkpoint_is_refused_unless_allowed(tiny_model, cxr_eval_dir, tmp_path, capsys):
    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    ck = load_checkpoint(tiny_model.checkpoint)
    ck["temperature"] = 1.7  # same network and classes, another file
    other = tmp_path / "other.pth"
    atomic_torch_save(ck, other)
    img = str(real_images(cxr_eval_dir, 1)[0])

    def common(ck):
        return ["--onnx_path", str(tiny_model.onnx), "--quiet", "--gradcam", "--checkpoint", str(ck), "--images", img]
    assert onnx_cli.main(common(other) + ["--save_dir", str(tmp_path / "refused")]) == 2
    line = error_line(capsys)
    assert "other.pth" in line and "not the checkpoint" in line and "--cam_checkpoint_mismatch_ok" in line
    assert not (tmp_path / "refused" / "predictions.csv").exists()
    out = tmp_path / "allowed"
    assert onnx_cli.main(common(other) + ["--save_dir", str(out), "--cam_checkpoint_mismatch_ok"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "not the checkpoint" in s["gradcam"]["checkpoint_mismatch"]
    assert "Grad-CAM warning" in (out / "report.html").read_text()
    same = tmp_path / "same"  # the exported checkpoint itself: no note
    assert onnx_cli.main(common(tiny_model.checkpoint) + ["--save_dir", str(same)]) == 0
    assert json.loads((same / "summary.json").read_text())["gradcam"]["checkpoint_mismatch"] is None


# ---------------------------------------------- R7: failures while writing are one line, exit 2
@pytest.mark.parametrize("target", ["predictions.csv", "summary.json", "report.html"])
def test_r7_disk_full_while_writing_is_one_line_naming_the_file(target, tiny_model, cxr_eval_dir, tmp_path, capsys,
                                                                monkeypatch):
    import errno
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == target:
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    assert run_cli("onnx", tiny_model, ["--images", str(real_images(cxr_eval_dir, 1)[0]),
                                        "--save_dir", str(out)]) == 2
    line = error_line(capsys)
    assert str(out / target) in line and "ENOSPC" in line and "disk is full" in line
    assert not list(out.glob(f".{target}.*.tmp"))  # no temporary file left behind


def test_r7_overwrite_when_an_old_output_cannot_be_removed(tiny_model, cxr_eval_dir, tmp_path, capsys, monkeypatch):
    import pathlib
    imgs = real_images(cxr_eval_dir, 2)
    out = tmp_path / "out"
    assert run_cli("onnx", tiny_model, ["--images", str(imgs[0]), "--save_dir", str(out)]) == 0
    real = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.parent.name == "annotated":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    capsys.readouterr()
    assert run_cli("onnx", tiny_model, ["--images", str(imgs[1]), "--save_dir", str(out), "--overwrite"]) == 2
    line = error_line(capsys)
    assert "cannot remove the earlier output" in line and f"{imgs[0].stem}.png" in line and "EACCES" in line


def test_r8_all_zero_ground_truth_mask_is_not_scored_and_noted(tiny_model, cxr_eval_dir, tmp_path):
    src = real_images(cxr_eval_dir, 2)
    data = tmp_path / "data" / "Normal"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for p in src:
        shutil.copy2(p, data / "images" / p.name)
    shutil.copy2(src[0].parent.parent / "masks" / src[0].name, data / "masks" / src[0].name)
    cv2.imwrite(str(data / "masks" / src[1].name), np.zeros((64, 64), np.uint8))
    for backend in BACKENDS:
        out = tmp_path / backend
        assert run_cli(backend, tiny_model, ["--data_dir", str(tmp_path / "data"), "--num_samples", "0",
                                             "--save_dir", str(out)]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["segmentation"]["n_masks"] == 1
        assert [Path(m["path"]).name for m in s["mask_problems"]] == [src[1].name]
        assert "empty mask" in s["mask_problems"][0]["reason"]
        rows = {Path(r["image_path"]).name: r for r in read_csv(out / "predictions.csv")}
        assert rows[src[1].name]["dice"] == "" and rows[src[0].name]["dice"] != ""
        assert "Ground-truth masks not scored" in (out / "report.html").read_text()
