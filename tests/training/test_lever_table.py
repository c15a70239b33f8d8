"""scripts/lever_table.py: arms of one run or of several seeds, compared on the same images."""
import json
import subprocess
import sys

from tests.helpers import REPO


def run_table(data_dir, tmp_path, conditions: str, *arms: str):
    """scripts/lever_table.py as a user runs it: (the finished process, its JSON, its markdown)."""
    out = tmp_path / "table"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "lever_table.py"), "--data_dir", str(data_dir),
                        "--per_class", "0", "--conditions", conditions, *(x for arm in arms for x in ("--arm", arm)),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_a_multi_run_arm_is_the_mean_of_its_runs_and_pairs_with_the_baseline(tiny_model, cxr_eval_dir, tmp_path):
    onnx, pth = str(tiny_model.onnx), str(tiny_model.checkpoint)
    r, rep, md = run_table(cxr_eval_dir, tmp_path, "none,noise@1", f"one={onnx}", f"two={onnx},{pth}")
    for cond in ("none", "noise@1"):
        one, two = rep["rows"][cond]["one"], rep["rows"][cond]["two"]
        assert "per_run" not in one and len(two["per_run"]) == 2
        assert abs(two["accuracy"] - sum(two["per_run"]) / 2) < 1e-9
        # the same weights through both backends: the runs agree with each other and with the one-run arm
        assert abs(two["per_run"][0] - one["accuracy"]) < 1e-9
        d = two["diff_vs_baseline"]
        assert abs(d["diff"] - (two["accuracy"] - one["accuracy"])) < 1e-9 and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        assert two["ci95"][0] <= two["accuracy"] <= two["ci95"][1]
    assert "two - one" in md
    for cond in ("none", "noise@1"):  # each run's own difference from the baseline's run of the same position
        per_run = rep["rows"][cond]["two"]["diff_vs_baseline"]
        assert "per_run" not in per_run  # the baseline has one run, the arm two: no pairing by position
    assert rep["n"] == 12 and len(rep["skipped"]) == 1 and "1 of 13 images skipped" in r.stderr  # the fixture's corrupt file: counted, no traceback
    assert "Traceback" not in r.stderr


def test_arms_of_several_runs_each_show_every_run_s_own_difference(tiny_model, cxr_eval_dir, tmp_path):
    onnx, pth = str(tiny_model.onnx), str(tiny_model.checkpoint)
    _, rep, md = run_table(cxr_eval_dir, tmp_path, "none", f"a={onnx},{pth}", f"b={pth},{onnx}")
    d = rep["rows"]["none"]["b"]["diff_vs_baseline"]
    assert len(d["per_run"]) == 2 and all(abs(v) < 1e-9 for v in d["per_run"])  # the same weights, both backends
    assert "by run)" in md


def test_where_the_films_went_adds_up_to_each_class_once_per_run(tiny_model, cxr_eval_dir, tmp_path):
    onnx, pth = str(tiny_model.onnx), str(tiny_model.checkpoint)
    _, rep, md = run_table(cxr_eval_dir, tmp_path, "none", f"one={onnx}", f"two={onnx},{pth}")
    for arm, runs in (("one", 1), ("two", 2)):
        row = rep["rows"]["none"][arm]
        got = row["predicted"]
        assert sum(sum(v.values()) for v in got.values()) == runs * rep["n"]
        right = sum(got[t].get(t, 0) for t in got)  # the diagonal is the accuracy's numerator
        assert abs(right / (runs * rep["n"]) - row["accuracy"]) < 1e-9
    assert "Where the clean films went" in md and "- two: " in md
