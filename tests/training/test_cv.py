"""k-fold cross-validation (cxrkit/cv.py), fold runs of model_arch.py, and the ensemble model
(model.EnsembleNet, python -m cxrkit ensemble)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import assert_one_line_error


# ------------------------------------------------------------------------------------ folds
def test_folds_are_stratified_grouped_and_deterministic():
    from cxrkit.training.split import fold_split, make_folds
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    groups = np.arange(400)
    groups[10:14] = 10          # a near-duplicate group of four
    labels[10:14] = labels[10]
    f1, f2 = make_folds(labels, groups, 5, seed=3), make_folds(labels, groups, 5, seed=3)
    assert np.array_equal(f1, f2)
    assert not np.array_equal(f1, make_folds(labels, groups, 5, seed=4))
    assert len(set(f1[10:14])) == 1, "a near-duplicate group was split across folds"
    for c in range(4):
        per_fold = np.bincount(f1[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 4, per_fold  # at most one group apart
    held = np.concatenate([fold_split(f1, k)["test"] for k in range(5)])
    assert sorted(held.tolist()) == list(range(400)), "every image is held out exactly once"
    s = fold_split(f1, 2)
    assert not set(s["train"]) & set(s["test"]) and np.array_equal(s["val"], s["test"])
    assert len(fold_split(f1, "all")["train"]) == 400


def test_parse_fold_rejects_out_of_range():
    from cxrkit.training.cv import parse_fold
    assert parse_fold("all", 5) == "all" and parse_fold("4", 5) == 4
    for bad in ("5", "-1", "x"):
        with pytest.raises(ValueError, match="--fold"):
            parse_fold(bad, 5)


def test_pooled_figures_and_paired_difference():
    from sklearn.metrics import accuracy_score, f1_score
    from cxrkit.training.cv import paired_difference, pooled_figures
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    p = rng.dirichlet(np.ones(3), 600)
    p[np.arange(600)[:400], y[:400]] += 1.0   # 2/3 made right
    p /= p.sum(1, keepdims=True)
    f = pooled_figures(y, p, ["a", "b", "c"], dice=np.r_[np.full(300, 0.9), np.full(300, np.nan)])
    assert f["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert f["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert f["accuracy_ci95"][0] < f["accuracy"] < f["accuracy_ci95"][1]
    assert f["dice"] == pytest.approx(0.9) and f["dice_n_masks"] == 300
    same = paired_difference(y, p, p)
    assert same["accuracy_diff"] == 0 and not same["differs"]
    better = p.copy()
    better[np.arange(600), y] += 5.0
    d = paired_difference(y, p, better)
    assert d["differs"] and d["accuracy_diff_ci95"][0] > 0


# ------------------------------------------------------------------------ fold runs (training)
@pytest.fixture(scope="module")
def fold_runs(mdt_subset, tmp_path_factory):
    """model_arch.py --folds 2, fold 0, 1 and all (arch tiny, 64 px, 1 epoch), sharing one cache."""
    from cxrkit.cli import train as model_arch
    root = tmp_path_factory.mktemp("cv")
    data = root / "data"
    shutil.copytree(mdt_subset, data)
    for f in ("0", "1", "all"):
        rc = model_arch.main(["--data_dir", str(data), "--arch", "tiny", "--img_size", "64", "--num_epochs", "1",
                              "--batch_size", "8", "--output_dir", str(root / "s1" / f"fold{f}"), "--workers", "0",
                              "--cache_dir", str(root / "cache"), "--quiet", "--folds", "2", "--fold", f])
        assert rc == 0
    return root


def test_fold_runs_write_oof_and_pool(fold_runs, capsys):
    from cxrkit.cli import cv as cv_cli
    from cxrkit.training import cv
    s0 = json.loads((fold_runs / "s1" / "fold0" / "split.json").read_text())
    s1 = json.loads((fold_runs / "s1" / "fold1" / "split.json").read_text())
    assert s0["fold_of"] == s1["fold_of"], "fold runs must share one fold assignment"
    assert set(s0["test"]) == set(s1["train"]) and s0["test"] == s0["val"]
    pooled = cv.load_oof(fold_runs / "s1")
    assert pooled["n_folds"] == 2
    assert len(pooled["paths"]) == len(s0["fold_of"]) - 0  # every decodable image held out once
    assert set(pooled) >= {"logits", "tta4_probs", "lungs_only_probs", "dice", "labels"}
    rc = cv_cli.main([str(fold_runs / "s1"), "--out", str(fold_runs / "rep")])
    assert rc == 0
    rep = json.loads((fold_runs / "rep" / "cv_report.json").read_text())
    assert rep["n_images"] == len(pooled["paths"])
    assert "accuracy_ci95" in rep["runs"][str(fold_runs / "s1")]["plain"]
    assert "Pooled out-of-fold" in capsys.readouterr().out
    summ = json.loads((fold_runs / "s1" / "foldall" / "model_checkpoints" / "training_summary.json").read_text())
    assert summ["split_sizes"]["train"] == len(s0["fold_of"]) and summ["split_sizes"]["test"] == 0


def test_fold_flag_errors_are_one_line(tmp_path, mdt_subset, capsys):
    from cxrkit.cli import train as model_arch
    base = ["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "o"), "--arch", "tiny",
            "--img_size", "64", "--num_epochs", "1", "--workers", "0", "--quiet"]
    assert model_arch.main(base + ["--fold", "1"]) == 2
    assert "needs --folds" in capsys.readouterr().err
    assert model_arch.main(base + ["--folds", "3", "--fold", "3"]) == 2
    assert "fold number from 0 to 2" in capsys.readouterr().err


def test_pool_without_fold_runs_is_one_line(tmp_path, capsys):
    from cxrkit.cli import cv
    assert cv.main([str(tmp_path)]) == 2
    assert "no fold*/test_results/oof_predictions.npz" in capsys.readouterr().err


def test_fold_count_below_two_is_one_line_before_the_data_is_read(tmp_path, capsys):
    """--folds 1 --fold 0 reached make_folds' ValueError (a traceback); --folds -3 printed "from 0 to -4"."""
    from cxrkit.cli import train as model_arch
    from cxrkit.core.config import TrainConfig
    from cxrkit.core.errors import UsageError
    from cxrkit.training.cv import parse_fold
    from cxrkit.training.synthetic import generate
    from cxrkit.training.train import load_split
    data = generate(tmp_path / "syn", per_class=2, seed=1)
    base = ["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--arch", "tiny", "--img_size", "32",
            "--num_epochs", "1", "--workers", "0", "--quiet"]
    for folds in ("1", "-3"):
        assert model_arch.main(base + ["--folds", folds, "--fold", "0"]) == 2
        line = assert_one_line_error(capsys, f"--folds {folds}", "2 or more", log_lines_ok=True)
        assert "-4" not in line and "to 0" not in line
    assert not (tmp_path / "o" / "split.json").exists()
    for folds in (1, -3):
        with pytest.raises(ValueError, match="--folds"):
            parse_fold("0", folds)
        with pytest.raises(UsageError, match="2 or more"):  # the training entry point too, not only the CLI
            load_split(TrainConfig(folds=folds, fold="0"), None, tmp_path / "split.json", 0, 1)


# ------------------------------------------------------ pooling: incomplete and damaged fold runs
def _fake_fold_runs(root, folds: int, written, n: int = 6, seed: int = 0):
    """Fold runs as model_arch.py --folds K leaves them: fold<k>/split.json for every k, and
    fold<k>/test_results/oof_predictions.npz (cv.write_oof) for the folds in `written`."""
    from types import SimpleNamespace
    from cxrkit.training.cv import OOF_FILE, write_oof
    rng = np.random.default_rng(seed)
    classes = ["a", "b"]
    for k in range(folds):
        d = root / f"fold{k}"
        (d / "test_results").mkdir(parents=True)
        (d / "split.json").write_text(json.dumps({"folds": folds, "fold": k, "fold_seed": 0, "classes": classes}))
        if k in written:
            data = SimpleNamespace(paths=[f"a/{k}_{i}.png" for i in range(n)], classes=classes)
            res = {"labels": rng.integers(0, 2, n), "logits": rng.normal(size=(n, 2)).astype(np.float32),
                   "dice_per_image": np.full(n, np.nan)}
            write_oof(d / "test_results" / OOF_FILE, data, np.arange(n), res, tta_probs=rng.dirichlet([1, 1], n))
    return root


def test_pool_with_a_fold_missing_is_refused_naming_it(tmp_path, capsys):
    """Pooling reported "over N images" with one fold's oof file missing: the runs' split.json say K."""
    from cxrkit.cli import cv as cv_cli
    run = _fake_fold_runs(tmp_path / "s1", 3, written=(0, 2))
    assert cv_cli.main([str(run), "--out", str(tmp_path / "rep")]) == 2
    line = assert_one_line_error(capsys, str(run), "fold 1 of its 3 folds", "--fold 1",
                                 str(run / "fold1"), "--allow_incomplete", log_lines_ok=True)
    assert "Pooled" not in line and not (tmp_path / "rep").exists()
    # explicitly allowed: pooled, and the report says it is not over every image
    assert cv_cli.main([str(run), "--out", str(tmp_path / "rep"), "--allow_incomplete"]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
    rep = json.loads((tmp_path / "rep" / "cv_report.json").read_text())
    row = rep["runs"][str(run)]
    assert rep["n_images"] == 12 and row["missing_folds"] == [1] and row["folds_expected"] == 3
    assert "INCOMPLETE" in (tmp_path / "rep" / "cv_report.md").read_text()
    complete = _fake_fold_runs(tmp_path / "s2", 3, written=(0, 1, 2))
    assert cv_cli.main([str(complete)]) == 0
    assert "INCOMPLETE" not in capsys.readouterr().out


def _damage(path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("these are not predictions\n")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif how == "no_logits":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "logits"}
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif how == "object_array":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["paths"] = np.array([{"pickled": 1}] * len(arrays["paths"]), dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **arrays)


DAMAGES = ["empty", "text", "truncated", "no_logits", "object_array"]


@pytest.mark.parametrize("how", DAMAGES)
def test_pool_of_a_damaged_oof_file_is_one_line_naming_it(how, tmp_path, capsys):
    from cxrkit.cli import cv as cv_cli
    from cxrkit.training.cv import OOF_FILE
    run = _fake_fold_runs(tmp_path / "s1", 2, written=(0, 1))
    bad = run / "fold1" / "test_results" / OOF_FILE
    _damage(bad, how)
    assert cv_cli.main([str(run)]) == 2
    line = assert_one_line_error(capsys, str(bad), "not an out-of-fold predictions file written by a fold run",
                                 "rerun that fold", log_lines_ok=True)
    assert "allow_pickle" not in line and "pickle.load" not in line


@pytest.mark.parametrize("how", DAMAGES)
def test_ensemble_oof_of_a_damaged_oof_file_is_one_line_naming_it(how, tmp_path, capsys):
    """cxrkit ensemble --oof reads the same files (and reads them before the members' checkpoints)."""
    from cxrkit.cli.ensemble import main as ens_main
    from cxrkit.training.cv import OOF_FILE
    run = _fake_fold_runs(tmp_path / "s1", 2, written=(0, 1))
    bad = run / "fold0" / "test_results" / OOF_FILE
    _damage(bad, how)
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"member a")
    b.write_bytes(b"member b")
    assert ens_main([str(a), str(b), "--oof", str(run), "--out", str(tmp_path / "e.pth")]) == 2
    line = assert_one_line_error(capsys, str(bad), "not an out-of-fold predictions file", log_lines_ok=True)
    assert "allow_pickle" not in line
    assert not (tmp_path / "e.pth").exists()


def test_pool_out_onto_a_regular_file_is_refused_before_pooling(tmp_path, capsys):
    from cxrkit.cli import cv as cv_cli
    run = _fake_fold_runs(tmp_path / "s1", 2, written=(0, 1))
    blocker = tmp_path / "report.txt"
    blocker.write_text("a file, not a folder\n")
    for out in (blocker, blocker / "sub"):
        assert cv_cli.main([str(run), "--out", str(out)]) == 2
        cap = capsys.readouterr()
        assert "Pooled" not in cap.out, "refused before the report is computed and printed"
        assert_one_line_error(cap.err, f"--out {out}", "is a file, not a folder", log_lines_ok=True)
    assert blocker.read_text() == "a file, not a folder\n"


def test_ensemble_refuses_the_same_member_twice(tmp_path, capsys):
    """The same checkpoint twice was accepted as a two-member ensemble (that model weighed double)."""
    import shutil as _shutil
    from cxrkit.cli.ensemble import main as ens_main
    from tests.helpers import REPO
    ck = REPO / "model_checkpoints" / "best_covid_model.pth"
    if not ck.is_file():
        pytest.skip("shipped checkpoint not in this checkout")
    out = tmp_path / "e.pth"
    assert ens_main([str(ck), str(ck), "--out", str(out)]) == 2
    assert_one_line_error(capsys, str(ck), "the same file", "given once", log_lines_ok=True)
    copy = tmp_path / "copy.pth"
    _shutil.copy2(ck, copy)
    assert ens_main([str(ck), str(copy), "--out", str(out)]) == 2
    assert_one_line_error(capsys, str(copy), str(ck), "identical bytes", log_lines_ok=True)
    assert not out.exists()


# ------------------------------------------------------------------------------- ensemble
def test_ensemble_averages_member_probabilities_and_exports(fold_runs, tmp_path):
    from cxrkit.core.checkpoint import model_from_checkpoint
    from cxrkit.cli.ensemble import main as ens_main
    from cxrkit.training.export import export_to_onnx
    from cxrkit.core.model import predict
    a = fold_runs / "s1" / "fold0" / "model_checkpoints" / "best_covid_model.pth"
    b = fold_runs / "s1" / "fold1" / "model_checkpoints" / "best_covid_model.pth"
    out = tmp_path / "ens.pth"
    assert ens_main([str(a), str(b), "--oof", str(fold_runs / "s1"), "--out", str(out)]) == 0
    assert ens_main([str(a), str(b), "--out", str(out)]) == 2, "must refuse to replace without --overwrite"
    ens, ck = model_from_checkpoint(out)
    ma, _ = model_from_checkpoint(a)
    mb, _ = model_from_checkpoint(b)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        s, lg = predict(ens, x)
        sa, la = predict(ma, x)
        sb, lb = predict(mb, x)
    assert torch.allclose(torch.softmax(lg, 1), (torch.softmax(la, 1) + torch.softmax(lb, 1)) / 2, atol=1e-6)
    assert torch.allclose(s, ((sa + sb) / 2).clamp(1e-6, 1 - 1e-6), atol=1e-5)
    assert ck["calibration"]["fitted_on"] == "pooled out-of-fold logits" and ck["temperature"] > 0
    assert len(ck["ensemble"]["members"]) == 2
    meta = export_to_onnx(out, tmp_path / "ens.onnx")  # the parity gate passes for the averaged graph
    assert meta["temperature"] == pytest.approx(ck["temperature"])


def test_ensemble_refuses_mismatched_members(fold_runs, tmp_path, mdt_subset, capsys):
    from cxrkit.cli import train as model_arch
    from cxrkit.cli.ensemble import main as ens_main
    other = tmp_path / "other"
    rc = model_arch.main(["--data_dir", str(mdt_subset), "--arch", "tiny", "--img_size", "32", "--num_epochs", "1",
                          "--batch_size", "8", "--output_dir", str(other), "--workers", "0", "--quiet"])
    assert rc == 0
    a = fold_runs / "s1" / "fold0" / "model_checkpoints" / "best_covid_model.pth"
    rc = ens_main([str(a), str(other / "model_checkpoints" / "best_covid_model.pth"), "--out", str(tmp_path / "e.pth")])
    assert rc == 2
    assert "img_size differs" in capsys.readouterr().err
