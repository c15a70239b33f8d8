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

from tests.helpers import assert_one_line_error, read_manifest, read_predictions, real_images
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
    from cxrkit.inference import per_image
    real = per_image.resize_gray

    def resize(img, size):  # fails on the marked file only
        if img[0, 0] == 7 and img[0, 1] == 7:
            raise cv2.error("OpenCV(5) matrix_wrap.cpp:501: error: (-215:Assertion failed)\n m->dims <= 2")
        return real(img, size)
    monkeypatch.setattr(per_image, "resize_gray", resize)
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


# ============================================================================ the merge (R4-02 ...)
@pytest.fixture(scope="module")
def two_shards(tiny_model, cxr_eval_dir, tmp_path_factory):
    """Two --shard K/2 runs (ONNX) over 6 real images; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("shards")
    d = root / "in"
    d.mkdir()
    for p in real_images(cxr_eval_dir, 6):
        shutil.copy2(p, d / p.name)
    for k in range(2):
        assert run_cli("onnx", tiny_model, ["--data_dir", str(d), "--num_samples", "0", "--shard", f"{k}/2",
                                            "--save_dir", str(root / f"s{k}")]) == 0
    return [root / "s0", root / "s1"]


def _copies(two_shards, tmp_path) -> list[Path]:
    out = []
    for s in two_shards:
        shutil.copytree(s, tmp_path / s.name)
        out.append(tmp_path / s.name)
    return out


def merge_cli(*args) -> int:
    from cxrkit.cli import merge as merge_cli_mod
    return merge_cli_mod.main([str(a) for a in args])


def test_r4_02_merge_refuses_a_users_report_html(two_shards, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    assert merge_cli(*two_shards, "--out", out) == 2
    assert_one_line_error(capsys, "report.html", "--out", log_lines_ok=True)
    assert (out / "report.html").read_text() == "my own report"
    assert not (out / "predictions.csv").exists()


def test_r4_02_merge_lists_report_and_thumbs_in_its_manifest_and_overwrite_removes_them(two_shards, tmp_path):
    out = tmp_path / "merged"
    assert merge_cli(*two_shards, "--out", out) == 0
    files = set(read_manifest(out)["files"])
    thumbs = {f"thumbs/{p.name}" for p in (out / "thumbs").iterdir()}
    assert thumbs and {"report.html", "predictions.csv", "summary.json"} | thumbs <= files
    assert merge_cli(*two_shards, "--out", out, "--overwrite", "--no_report") == 0
    assert not (out / "report.html").exists() and not (out / "thumbs").exists()


def test_r4_02_merge_out_onto_a_shard_folder_is_refused(two_shards, tmp_path, capsys):
    shards = _copies(two_shards, tmp_path)
    before = (shards[0] / "predictions.csv").read_bytes()
    assert merge_cli(*shards, "--out", shards[0], "--overwrite") == 2
    assert_one_line_error(capsys, "shard folders", log_lines_ok=True)
    assert (shards[0] / "predictions.csv").read_bytes() == before


def _edit_summary(shard: Path, fn) -> None:
    s = json.loads((shard / "summary.json").read_text())
    fn(s)
    (shard / "summary.json").write_text(json.dumps(s))


def _merge_error(shards, tmp_path, capsys, *needles) -> str:
    assert merge_cli(*shards, "--out", tmp_path / "merged") == 2
    assert not (tmp_path / "merged" / "predictions.csv").exists()
    return assert_one_line_error(capsys, *needles, log_lines_ok=True)


def test_r4_03_shards_of_two_different_models_are_refused(two_shards, tmp_path, capsys):
    shards = _copies(two_shards, tmp_path)
    s = json.loads((shards[1] / "summary.json").read_text())
    assert len(s["shard"]["model"]["sha256"]) == 64
    _edit_summary(shards[1], lambda s: s["shard"]["model"].update(sha256="0" * 64))
    (shards[1] / ".cxrkit_outputs.json").unlink()  # as if written by a run of another model
    _merge_error(shards, tmp_path, capsys, "shard.model", str(shards[1]))


def test_r4_04_shards_run_with_different_ood_thresholds_are_refused(two_shards, tmp_path, capsys):
    shards = _copies(two_shards, tmp_path)
    assert json.loads((shards[0] / "summary.json").read_text())["shard"]["options"]["ood_threshold"] is None
    _edit_summary(shards[1], lambda s: s["shard"]["options"].update(ood_threshold=0.5))
    (shards[1] / ".cxrkit_outputs.json").unlink()
    _merge_error(shards, tmp_path, capsys, "shard.options", "0.5")


def _nonempty(shards) -> Path:
    return max(shards, key=lambda d: len(read_predictions(d)))


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "rows, but its summary.json counts"),
    ("duplicated", "listed more often"),
    ("cut_mid_line", "too few fields"),
    ("hand_edited_class", "changed since the shard run wrote it"),
    ("hand_edited_class_no_manifest", "is not a model class"),
    ("foreign_path", "not one of the shard's inputs"),
])
def test_r4_05_merge_checks_each_shards_predictions_csv(damage, needle, two_shards, tmp_path, capsys):
    shards = _copies(two_shards, tmp_path)
    d = _nonempty(shards)
    csv_p = d / "predictions.csv"
    lines = csv_p.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    if damage == "truncated":
        csv_p.write_text("".join(lines[:-1]))
    elif damage == "duplicated":
        csv_p.write_text("".join(lines[:-1] + [lines[1]]))
    elif damage == "cut_mid_line":
        csv_p.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 3] + "\n")
    elif damage.startswith("hand_edited_class"):
        import csv
        header, rows = read_predictions(csv_p, header=True)
        rows[0]["predicted_class"] = "Kovid"
        with open(csv_p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, header, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        if damage.endswith("no_manifest"):
            (d / ".cxrkit_outputs.json").unlink()
    elif damage == "foreign_path":
        csv_p.write_text("".join(lines[:-1]) + lines[-1].replace(str(tmp_path.parent), "/elsewhere", 1)
                         .replace("/in/", "/elsewhere/", 1))
        (d / ".cxrkit_outputs.json").unlink()
    if damage in ("truncated", "duplicated", "cut_mid_line"):
        (d / ".cxrkit_outputs.json").unlink()  # the row checks, not the hash, must catch these
    line = _merge_error(shards, tmp_path, capsys, needle)
    assert str(d) in line and "predictions.csv" in line


@pytest.mark.parametrize("damage, needle", [
    ("shard_is_a_list", "\"shard\" block"),
    ("no_inputs", "\"shard\" block"),
    ("truncated_json", "summary.json"),
])
def test_r4_11_12_damaged_shard_summary_is_one_line_naming_the_file(damage, needle, two_shards, tmp_path, capsys):
    shards = _copies(two_shards, tmp_path)
    (shards[1] / ".cxrkit_outputs.json").unlink()
    if damage == "shard_is_a_list":
        _edit_summary(shards[1], lambda s: s.update(shard=[1]))
    elif damage == "no_inputs":
        _edit_summary(shards[1], lambda s: s["shard"].pop("inputs"))
    else:
        p = shards[1] / "summary.json"
        p.write_text(p.read_text()[:60])
    line = _merge_error(shards, tmp_path, capsys, needle)
    assert str(shards[1]) in line


# ================================================================================= R4-06 options
@pytest.mark.parametrize("backend", BACKENDS)
def test_r4_06_ood_threshold_on_a_model_without_a_gate_is_refused(backend, tiny_model, cxr_eval_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    img = real_images(cxr_eval_dir, 1)[0]
    assert run_cli(backend, tiny_model, ["--images", str(img), "--save_dir", str(out), "--ood_threshold", "0.5"]) == 2
    assert_one_line_error(capsys, "--ood_threshold", "no out-of-distribution gate", log_lines_ok=True)
    assert not (out / "predictions.csv").exists()


# ========================================================================= R4-13 exit codes
def test_r4_13_shard_whose_inputs_are_all_undecodable_exits_0_and_merges(tiny_model, cxr_eval_dir, tmp_path):
    from cxrkit.inference.shard import shard_of
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy2(real_images(cxr_eval_dir, 1)[0], d / "good.png")
    k_good = shard_of("good.png", 2)
    i = 0
    while shard_of(f"broken{i}.png", 2) == k_good:
        i += 1
    (d / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for k in range(2):
        assert run_cli("onnx", tiny_model, ["--data_dir", str(d), "--num_samples", "0", "--shard", f"{k}/2",
                                            "--save_dir", str(tmp_path / f"s{k}")]) == 0
    assert merge_cli(tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "m") == 0
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["n_processed"] == 1 and s["n_skipped"] == 1
