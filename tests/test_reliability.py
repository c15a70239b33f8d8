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
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import export_to_onnx as export_cli
import model_arch
import run_model_pth_inference as pth_cli
import run_onnx_inference as onnx_cli
from cxrkit.preprocess import ImageReadError, read_gray

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


# ------------------------------------------------------------------------------------------ helpers
def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def error_line(capsys) -> str:
    """The CLI's stderr, log records removed, must be ONE line starting with `error:`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def real_images(cxr_eval_dir, n):
    return [p for p in sorted(cxr_eval_dir.glob("*/images/*.png")) if "corrupt" not in p.name][:n]


def run_cli(backend, model, args):
    """One inference CLI in-process; backend 'pth' or 'onnx'."""
    if backend == "pth":
        return pth_cli.main(["--checkpoint", str(model.checkpoint), "--device", "cpu", "--quiet", *args])
    return onnx_cli.main(["--onnx_path", str(model.onnx), "--quiet", *args])


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (tiny on disk): the size must be refused before decoding."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1) * 4)) + chunk(b"IEND", b""))
    return path


BACKENDS = ["pth", "onnx"]


# =============================================================================== F1: concurrent runs
_HOLD_LOCK = """
import sys
from cxrkit.outdir import claim_save_dir
claim = claim_save_dir(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


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
    from cxrkit.outdir import tmp_name
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


def test_f2_a_crashed_runs_outputs_are_known_and_refused_until_overwrite(tmp_path):
    """The manifest is written before the first output: a run killed half-way leaves a list of what it
    wrote, and the next run needs --overwrite, which removes exactly those files."""
    from cxrkit.outdir import SaveDirError, claim_save_dir
    out = tmp_path / "out"
    dead = claim_save_dir(out).acquire()
    dead.plan(["predictions.csv", "annotated/a.png", "annotated/b.png"])
    (out / "annotated").mkdir()
    (out / "annotated" / "a.png").write_bytes(b"half")       # b.png was never written
    dead.release()                                           # what the OS does when the process dies
    with pytest.raises(SaveDirError, match="did not finish.*--overwrite"):
        claim_save_dir(out).acquire()
    with claim_save_dir(out, overwrite=True) as again:
        assert again.removed == ["annotated/a.png"] and not (out / "annotated").exists()


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
    from cxrkit.io_utils import sha256_file
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


# ============================================================================ F4: class list vs outputs
def test_f4_checkpoint_with_fewer_class_names_than_outputs_is_refused(tiny_model, mdt_subset, tmp_path, capsys):
    from cxrkit.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(tiny_model.checkpoint)
    ck["class_names"] = CLASSES[:3]
    bad = tmp_path / "three.pth"
    atomic_torch_save(ck, bad)
    with pytest.raises(CheckpointError, match="3 class names"):
        model_from_checkpoint(bad)
    img = str(sorted(mdt_subset.glob("Normal/images/*.png"))[0])
    assert pth_cli.main(["--checkpoint", str(bad), "--images", img, "--device", "cpu", "--quiet",
                         "--save_dir", str(tmp_path / "o")]) == 2
    assert "3 class names" in error_line(capsys) and not (tmp_path / "o" / "predictions.csv").exists()
    assert export_cli.main(["--checkpoint", str(bad), "--onnx_path", str(tmp_path / "m.onnx")]) == 2
    assert "4 class outputs" in error_line(capsys)
    assert model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "e"), "--quiet",
                            "--evaluate", str(bad)]) == 2
    assert "3 class names" in error_line(capsys)


# ======================================================================== F5: unreadable model files
def _bad_model_files(tiny_model, d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    ck_bytes, onnx_bytes = tiny_model.checkpoint.read_bytes(), tiny_model.onnx.read_bytes()
    files = {"empty": (b"", b""), "truncated": (ck_bytes[:len(ck_bytes) // 2], onnx_bytes[:len(onnx_bytes) // 2]),
             "wrong_format": (onnx_bytes, ck_bytes), "text": (b"hello, not a model\n", b"hello, not a model\n")}
    out = {}
    for kind, (ckb, onb) in files.items():
        (d / f"{kind}.pth").write_bytes(ckb)
        (d / f"{kind}.onnx").write_bytes(onb)
        shutil.copy2(tiny_model.meta_path, d / f"{kind}.onnx.meta.json")  # so the model file itself is judged
        out[kind] = (d / f"{kind}.pth", d / f"{kind}.onnx")
    return out


def test_f5_unreadable_model_files_give_one_line_errors_in_every_cli(tiny_model, mdt_subset, tmp_path, capsys):
    """0-byte, truncated, wrong-format and text files as checkpoint / ONNX model, in every CLI."""
    img = str(sorted(mdt_subset.glob("Normal/images/*.png"))[0])
    out = str(tmp_path / "o")
    wrong = []
    for kind, (ck, onnx_file) in _bad_model_files(tiny_model, tmp_path / "bad").items():
        calls = {
            "run_model_pth_inference": lambda: pth_cli.main(["--checkpoint", str(ck), "--images", img, "--quiet",
                                                             "--device", "cpu", "--save_dir", out]),
            "run_onnx_inference": lambda: onnx_cli.main(["--onnx_path", str(onnx_file), "--images", img, "--quiet",
                                                         "--save_dir", out]),
            "run_onnx_inference --gradcam": lambda: onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--gradcam",
                                                                   "--checkpoint", str(ck), "--images", img,
                                                                   "--quiet", "--save_dir", out]),
            "export_to_onnx": lambda: export_cli.main(["--checkpoint", str(ck),
                                                       "--onnx_path", str(tmp_path / "x.onnx")]),
            "model_arch --evaluate": lambda: model_arch.main(["--data_dir", str(mdt_subset), "--quiet", "--evaluate",
                                                              str(ck), "--output_dir", str(tmp_path / "e")]),
        }
        for name, call in calls.items():
            capsys.readouterr()
            try:
                rc = call()
            except Exception as e:  # noqa: BLE001 - a traceback is what this test forbids
                wrong.append(f"{kind} / {name}: {type(e).__name__} raised")
                continue
            err = capsys.readouterr().err
            lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]
            named = (onnx_file.name if name == "run_onnx_inference" else ck.name)
            if rc != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or named not in lines[0]:
                wrong.append(f"{kind} / {name}: rc {rc}, stderr {err.strip()[-300:]!r}")
            if (tmp_path / "o" / "predictions.csv").exists():
                wrong.append(f"{kind} / {name}: wrote outputs")
    assert not wrong, "\n".join(wrong)


def test_f5_training_init_from_an_empty_checkpoint(tiny_model, mdt_subset, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "t"), "--arch", "tiny",
                            "--img_size", "32", "--workers", "0", "--quiet", "--device", "cpu",
                            "--init_from", str(empty)]) == 2
    assert "empty.pth" in error_line(capsys)


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
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, cxr_eval_dir, tmp_path_factory):
    from PIL import Image

    from test_inference import _make_dicom
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


def test_f6_pixel_limit_is_decided_before_decoding(tmp_path, monkeypatch):
    huge = png_header_only(tmp_path / "huge.png", 40000, 40000)

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although the header says it is too large")
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageReadError) as e:
        read_gray(huge)
    assert e.value.reason == "image is 40000x40000 px, over the 100 MP limit"


def test_f6_lung_area_outside_the_training_range_is_flagged_by_both_backends(tiny_model, cxr_eval_dir, tmp_path):
    """The range comes from the checkpoint (finalize) and, exported, from the ONNX meta and graph."""
    from types import SimpleNamespace

    from cxrkit.checkpoint import atomic_torch_save, load_checkpoint
    from cxrkit.export import export_to_onnx
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


# ================================================================ F7: a class with no usable image
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


# ============================================================================ F8: the smaller items
def test_f8_symlinked_subfolders_are_searched_once_and_loops_cut(cxr_eval_dir, tmp_path):
    from cxrkit.inference import gather_inputs
    from cxrkit.preprocess import list_images
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


def test_f8_uncalibrated_checkpoint_is_warned_about(tiny_model, cxr_eval_dir, tmp_path, caplog):
    from cxrkit.checkpoint import atomic_torch_save, load_checkpoint
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


def test_f8_masks_of_another_aspect_ratio_warn_once(tmp_path, caplog):
    from cxrkit.data import build_cache
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


def test_f8_multi_page_tiff_is_noted(tmp_path):
    from PIL import Image

    from cxrkit.preprocess import read_gray_info
    u8 = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "m.tiff", save_all=True, append_images=[Image.fromarray(255 - u8)])
    arr, notes = read_gray_info(tmp_path / "m.tiff")
    assert np.array_equal(arr, u8) and notes == ["multi-page TIFF (2 pages): only the first page was used"]
