"""Bulk mode (--outputs), sharded runs (--shard K/N) and their merge (cxrkit.inference.shard), with the
shipped ONNX model on SYNTHETIC images (labels and masks from the folder layout, one corrupt file)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrkit.cli import infer_onnx as run_onnx_inference
from cxrkit.core.config import ONNX_PATH
from cxrkit.inference import gather_inputs
from cxrkit.inference.shard import InferenceError, merge, parse_shard, select_shard, shard_of
from cxrkit.training.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    if not (REPO / ONNX_PATH).is_file():
        pytest.skip(f"shipped model {ONNX_PATH} not in this checkout")
    d = generate(tmp_path_factory.mktemp("syn") / "data", per_class=5, seed=3)
    (d / "Normal" / "images" / "broken scan.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


def _infer(data, out, *extra):
    rc = run_onnx_inference.main(["--data_dir", str(data), "--onnx_path", str(REPO / ONNX_PATH), "--save_dir", str(out),
                                  "--num_samples", "0", "--quiet", "--workers", "1", *extra])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "predictions.csv", newline="")))
    return json.loads((out / "summary.json").read_text()), rows


def _close(a, b, path=""):
    """Equal, floats to 1e-9, recursively; returns the first difference's path or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(set(a) ^ set(b))}"
        return next((r for k in a if (r := _close(a[k], b[k], f"{path}/{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} vs {len(b)}"
        return next((r for i, (x, y) in enumerate(zip(a, b)) if (r := _close(x, y, f"{path}/{i}"))), None)
    if isinstance(a, float) or isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=0, abs_tol=1e-9) else f"{path}: {a} vs {b}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def test_shard_rule_is_stable_and_order_free(syn):
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(InferenceError, match="--shard"):
            parse_shard(bad)
    # pinned: sha256 of the relative path, not Python's per-process salted hash(); a change of rule
    # would silently re-shard everyone's archives
    assert shard_of("COVID/images/COVID-1.png", 1000) == 834
    items = gather_inputs(syn, class_names=CLASSES)
    parts = [select_shard(items, k, 4)[0] for k in range(4)]
    assert sorted(it.rel for p in parts for it in p) == sorted(it.rel for it in items)  # a partition
    rev = list(reversed(items))
    for k in range(4):
        assert {it.rel for it in select_shard(rev, k, 4)[0]} == {it.rel for it in parts[k]}


@pytest.mark.slow
def test_bulk_csv_only_matches_default_rows(syn, tmp_path):
    s_def, rows_def = _infer(syn, tmp_path / "default")
    s_csv, rows_csv = _infer(syn, tmp_path / "csv", "--outputs", "csv")
    assert not (tmp_path / "csv" / "annotated").exists() and not (tmp_path / "csv" / "report.html").exists()
    assert not (tmp_path / "csv" / "thumbs").exists() or not any((tmp_path / "csv" / "thumbs").iterdir())
    assert len(rows_csv) == len(rows_def) == 20 and s_csv["n_skipped"] == 1
    for a, b in zip(rows_def, rows_csv):
        assert b["annotated_png"] == "" and a["annotated_png"].startswith("annotated/")
        assert ({k: v for k, v in a.items() if k != "annotated_png"}
                == {k: v for k, v in b.items() if k != "annotated_png"})
    assert _close(s_def["classification"], s_csv["classification"]) is None
    assert s_csv["outputs"]["annotated"] is None and s_csv["outputs"]["report"] is None
    # the report from the CSV alone: thumbnails only for the images the gallery shows
    s_rep, _ = _infer(syn, tmp_path / "csv_rep", "--outputs", "csv,report", "--overwrite")
    page = (tmp_path / "csv_rep" / "report.html").read_text()
    thumbs = sorted((tmp_path / "csv_rep" / "thumbs").iterdir())
    assert len(thumbs) == 20 and page.count('<figure class="g') == 20
    assert all(f'src="thumbs/{t.name}"' in page for t in thumbs)
    from cxrkit.inference.thumbs import write_gallery_thumbnails
    rows = [dict(r) for r in rows_csv]
    assert write_gallery_thumbnails(tmp_path / "capped", rows, cap=5) == 5
    assert len(list((tmp_path / "capped" / "thumbs").iterdir())) == 5 and sum("thumb" in r for r in rows) == 5
    # masks only, no drawing
    _infer(syn, tmp_path / "masks", "--outputs", "csv,masks")
    assert len(list((tmp_path / "masks" / "masks").iterdir())) == 20 and not (tmp_path / "masks" / "annotated").exists()
    assert run_onnx_inference.main(["--data_dir", str(syn), "--outputs", "csv,pictures", "--save_dir",
                                    str(tmp_path / "bad")]) == 2


@pytest.mark.slow
def test_four_shard_processes_merge_to_the_single_run(syn, tmp_path):
    single, rows_single = _infer(syn, tmp_path / "single")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(REPO / "run_onnx_inference.py"), "--data_dir", str(syn),
                               "--onnx_path", str(REPO / ONNX_PATH), "--num_samples", "0", "--quiet", "--workers", "1",
                               "--threads", "1", "--shard", f"{k}/4", "--save_dir", str(tmp_path / f"s{k}")],
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for k in range(4)]
    for p in procs:
        out = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, out
    sizes = [json.loads((tmp_path / f"s{k}" / "summary.json").read_text())["n_inputs"] for k in range(4)]
    assert sum(sizes) == single["n_inputs"] == 21 and max(sizes) < 21
    shards = [tmp_path / f"s{k}" for k in (2, 0, 3, 1)]  # any order
    merged = merge(shards, tmp_path / "merged")
    # the same rows, byte for byte, in the single run's order
    assert ((tmp_path / "merged" / "predictions.csv").read_bytes()
            == (tmp_path / "single" / "predictions.csv").read_bytes())
    on_disk = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert on_disk["skipped"] == single["skipped"] and len(single["skipped"]) == 1
    for key in ("n_inputs", "n_processed", "n_skipped", "predicted_counts", "quality", "classification",
                "segmentation", "class_names", "inputs", "temperature", "notes"):
        assert _close(on_disk[key], single[key], key) is None, key
    judged = (single["classification"] or {}).get("n_labelled", 0)  # metrics: judged images only
    assert judged + single["quality"]["n_not_judged"] == 20 and single["segmentation"]["n_masks"] == 20
    assert merged["merged_from"] == [str(tmp_path / f"s{k}") for k in range(4)]
    page = (tmp_path / "merged" / "report.html").read_text()
    assert page.count('<figure class="g') == 20 and "broken scan.png" in page
    assert len(list((tmp_path / "merged" / "thumbs").iterdir())) == 20  # copied from the shards' thumbs/
    # a missing or doubled shard is refused, naming it
    with pytest.raises(InferenceError, match="missing shard"):
        merge(shards[:3], tmp_path / "m2")
    with pytest.raises(InferenceError, match="shard given twice"):
        merge(shards + [tmp_path / "s0"], tmp_path / "m3")
    with pytest.raises(InferenceError, match="no \"shard\" block"):
        merge([tmp_path / "single"], tmp_path / "m4")


def test_empty_shard_writes_a_folder_the_merge_accepts(syn, tmp_path):
    items = gather_inputs(syn, class_names=CLASSES)
    n = 64
    empty = next(k for k in range(n) if not select_shard(items, k, n)[0])
    out = tmp_path / "empty"
    assert run_onnx_inference.main(["--data_dir", str(syn), "--onnx_path", str(REPO / ONNX_PATH), "--num_samples", "0",
                                    "--quiet", "--shard", f"{empty}/{n}", "--save_dir", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["empty_shard"] and s["n_inputs"] == 0 and s["shard"]["n_inputs_all"] == 21
    header = (out / "predictions.csv").read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("image_path,predicted_class")
    with pytest.raises(InferenceError, match="missing shard"):  # the other 63 are not there
        merge([out], tmp_path / "m")


# ------------------------------------------------- damaged shard folders: one line naming the file
@pytest.fixture(scope="module")
def csv_shards(syn, tmp_path_factory):
    """Two --shard K/2 runs (CSV only) over the synthetic images; tests copy them before damaging them."""
    root = tmp_path_factory.mktemp("csv_shards")
    for k in range(2):
        _infer(syn, root / f"s{k}", "--outputs", "csv", "--shard", f"{k}/2")
    return [root / "s0", root / "s1"]


def _merge_cli(shards, out, capsys, *extra) -> tuple[int, str]:
    from cxrkit.cli import merge as merge_cli
    capsys.readouterr()
    rc = merge_cli.main([*map(str, shards), "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def _edit_json(path: Path, fn) -> None:
    s = json.loads(path.read_text())
    fn(s)
    path.write_text(json.dumps(s))


@pytest.mark.parametrize("damage", ["truncated_json", "shard_is_a_list", "no_shard_inputs", "skipped_without_path"])
def test_merge_of_a_damaged_shard_summary_names_it_and_says_rerun(damage, csv_shards, tmp_path, capsys):
    """A cut summary.json gave `error: Unterminated string ...`; one without shard.inputs `error: 'inputs'`;
    a skipped entry without its path `error: 'path'`: each names the shard's summary.json and says to rerun it
    (the shard's manifest is gone, as when the folder was copied without hidden files: no hash to compare)."""
    from tests.helpers import assert_one_line_error
    import shutil
    shards = []
    for s in csv_shards:
        shutil.copytree(s, tmp_path / s.name)
        shards.append(tmp_path / s.name)
    (shards[1] / ".cxrkit_outputs.json").unlink()
    p = shards[1] / "summary.json"
    if damage == "truncated_json":
        p.write_text(p.read_text()[:60])
    elif damage == "shard_is_a_list":
        _edit_json(p, lambda s: s.update(shard=[1]))
    elif damage == "no_shard_inputs":
        _edit_json(p, lambda s: s["shard"].pop("inputs"))
    else:
        _edit_json(p, lambda s: s.update(skipped=[{"reason": "not decodable"}], n_inputs=s["n_inputs"] + 1))
    rc, err = _merge_cli(shards, tmp_path / "merged", capsys)
    assert rc == 2, err
    assert_one_line_error(err, str(p), "not a complete shard run's summary.json", "rerun that shard",
                          log_lines_ok=True)
    assert not (tmp_path / "merged" / "predictions.csv").exists()


def test_merge_into_an_earlier_merge_names_the_out_flag(csv_shards, tmp_path, capsys):
    """The merge's option is --out (not --save_dir): the refusal names it."""
    from tests.helpers import assert_one_line_error
    out = tmp_path / "merged"
    assert _merge_cli(csv_shards, out, capsys)[0] == 0
    rc, err = _merge_cli(csv_shards, out, capsys)
    assert rc == 2
    line = assert_one_line_error(err, f"--out {out}", "holds an earlier run's outputs", "--overwrite",
                                 log_lines_ok=True)
    assert "--save_dir" not in line
    assert _merge_cli(csv_shards, out, capsys, "--overwrite")[0] == 0


def test_a_requeued_shard_replaces_its_own_outputs_and_nothing_else(syn, tmp_path, capsys):
    """SLURM requeue / a retried pod: the same shard job into its own folder runs again without --overwrite;
    another job (other shard, other options) into that folder is still refused."""
    from tests.helpers import assert_one_line_error
    out = tmp_path / "s0"
    first, rows = _infer(syn, out, "--outputs", "csv", "--shard", "0/2")
    (out / "mine.txt").write_text("a user's file")
    again, rows2 = _infer(syn, out, "--outputs", "csv", "--shard", "0/2")   # no --overwrite needed
    assert rows2 == rows and (out / "mine.txt").read_text() == "a user's file"
    capsys.readouterr()
    rc = run_onnx_inference.main(["--data_dir", str(syn), "--onnx_path", str(REPO / ONNX_PATH), "--save_dir", str(out),
                                  "--num_samples", "0", "--quiet", "--workers", "1", "--outputs", "csv",
                                  "--shard", "1/2"])
    assert rc == 2
    assert_one_line_error(capsys, "holds an earlier run's outputs", "--overwrite", log_lines_ok=True)


def test_summary_and_report_carry_provenance(syn, tmp_path):
    """cxrkit version, the model's SHA-256, the command line and the date, in summary.json and the report."""
    import cxrkit
    from cxrkit.core.io_utils import sha256_file
    s, _ = _infer(syn, tmp_path / "p")
    p = s["provenance"]
    assert p["cxrkit_version"] == cxrkit.__version__ and p["model_sha256"] == sha256_file(REPO / ONNX_PATH)
    assert p["date"] and "command" in p
    html = (tmp_path / "p" / "report.html").read_text()
    assert f"sha256 {p['model_sha256'][:12]}" in html and f"cxrkit {cxrkit.__version__}" in html


def test_report_shows_score_and_lung_area_histograms_against_the_models_limits(syn, tmp_path):
    s, rows = _infer(syn, tmp_path / "h")
    html = (tmp_path / "h" / "report.html").read_text()
    assert 'id="distributions"' in html and html.count("<svg") >= 2
    thr = s["quality"]["ood"]["threshold"]
    assert f"model limit {thr:.3g}" in html  # the gate's threshold drawn on the ood_score histogram


def test_report_roc_and_calibration_panels_from_labelled_rows():
    """ROC curves per class and a reliability diagram with ECE and Brier, from the judged labelled rows."""
    from cxrkit.inference.report import _roc_and_calibration
    summary = {"class_names": ["COVID", "Normal"]}
    rows = [{"true_class": t, "prob_COVID": f"{pc:.2f}", "prob_Normal": f"{1 - pc:.2f}", "quality_flags": q}
            for t, pc, q in (("COVID", .9, ""), ("COVID", .6, ""), ("Normal", .2, ""), ("Normal", .7, ""),
                             ("Normal", .95, "not_chest_xray"))]
    roc, cal = _roc_and_calibration(summary, rows)
    assert roc.count("<polyline") == 2 and "ROC curves" in roc
    assert "n = 4" in cal and "ECE" in cal and "Brier" in cal  # the not-judged row is left out
