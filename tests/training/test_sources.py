"""Sources as data (cxrkit.training.sources): several roots, a source per image, --holdout_source,
--balance_sources and the per-source test report. Synthetic data: the logic, not the figures."""
import json
import shutil

import numpy as np
import pytest

from cxrkit.core.errors import DataError, UsageError
from cxrkit.training.data import load_data
from cxrkit.training.sources import apply_source_rule, balanced_order, holdout, root_names
from cxrkit.training.synthetic import generate
from tests.helpers import assert_one_line_error, train_tiny


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory):
    """site_a: 4 classes with masks; site_b: COVID and Normal only, no masks (like db_extra)."""
    base = tmp_path_factory.mktemp("roots")
    a = generate(base / "site_a", per_class=10, seed=1)
    b = base / "site_b"
    generate(base / "tmp_b", per_class=12, seed=2, classes=("COVID", "Normal"))
    for c in ("COVID", "Normal"):
        shutil.copytree(base / "tmp_b" / c / "images", b / c / "images")
    return a, b


def test_root_names_are_distinct(tmp_path):
    assert root_names([tmp_path / "x" / "cxr4", tmp_path / "y" / "cxr4", tmp_path / "db"]) == ["cxr4", "cxr4-2", "db"]


def test_two_roots_join_with_a_source_per_image(two_roots, tmp_path):
    a, b = two_roots
    d = load_data([str(a), str(b)], 32, tmp_path / "cache", 0, 0, 1, progress=False)
    assert d.classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert len(d.paths) == 40 + 24 == len(d.sources) == len(d.labels) == d.images.shape[0]
    assert d.sources.count("site_a") == 40 and d.sources.count("site_b") == 24
    assert all(p.startswith(("site_a/", "site_b/")) for p in d.paths)
    b_idx = [i for i, s in enumerate(d.sources) if s == "site_b"]
    assert not d.has_mask[b_idx].any()                        # classification only
    assert {d.classes[l] for l in d.labels[b_idx]} == {"COVID", "Normal"}  # labels mapped into the union
    assert all(d.file(d.paths[i]).is_file() for i in (0, b_idx[0]))
    m = d.native_masks([0, b_idx[0]])                         # masks found through their own root
    assert m[0] is not None and m[0].max() == 1 and m[1] is None


def test_source_rule(two_roots, tmp_path):
    a, b = two_roots
    d = load_data([str(a), str(b)], 32, tmp_path / "cache", 0, 0, 1, progress=False,
                  source_rule=r"^[^/]+/([^/]+)/")
    assert set(d.sources) == {"site_a:COVID", "site_a:Lung_Opacity", "site_a:Normal", "site_a:Viral Pneumonia",
                              "site_b:COVID", "site_b:Normal"}
    one = load_data(str(a), 32, tmp_path / "cache", 0, 0, 1, progress=False, source_rule=r"^[^/]+/(COVID)/")
    assert set(one.sources) == {"site_a", "site_a:COVID"}     # a single root matches the same way
    for bad in ("([", "^site"):
        with pytest.raises(UsageError):
            apply_source_rule(one, bad)


def test_holdout_moves_a_whole_source_to_the_test_side():
    sources = ["a"] * 6 + ["b"] * 4
    split = {"train": np.array([0, 1, 2, 6, 7]), "val": np.array([3, 8]), "test": np.array([4, 5, 9])}
    h = holdout(split, sources, "b")
    assert h["train"].tolist() == [0, 1, 2] and h["val"].tolist() == [3] and h["test"].tolist() == [6, 7, 8, 9]
    with pytest.raises(UsageError, match="no such source"):
        holdout(split, sources, "c")
    with pytest.raises(DataError):
        holdout(split, ["b"] * 10, "b")


def test_balanced_order_gives_each_source_of_a_class_the_same_share():
    labels = np.array([0] * 100 + [1] * 50)
    sources = ["big"] * 90 + ["small"] * 10 + ["x"] * 50
    idx = np.arange(150)
    pos = np.concatenate([balanced_order(labels, sources, idx, np.random.default_rng(e)) for e in range(20)])
    src = np.asarray(sources)[pos]
    assert abs((src == "small").mean() / (src == "big").mean() - 1) < 0.15   # 10 images drawn as often as 90
    assert abs((labels[pos] == 1).mean() - 1 / 3) < 0.03                      # class shares unchanged


@pytest.mark.slow
def test_holdout_source_run_tests_on_that_source(two_roots, tmp_path, capsys):
    a, b = two_roots
    out = tmp_path / "run"
    rc = train_tiny(a, out, "--data_dir", str(a), str(b), "--holdout_source", "site_b", "--balance_sources",
                    "--val_frac", "0.25", "--no_report")
    assert rc == 0
    rep = json.loads((out / "test_results" / "classification_report.json").read_text())
    assert rep["n_images"] == 24 and list(rep["by_source"]) == ["site_b"]
    assert rep["by_source"]["site_b"]["classes"] == {"COVID": 12, "Normal": 12}
    assert "source site_b: acc" in capsys.readouterr().out
    rc = train_tiny(a, tmp_path / "run2", "--data_dir", str(a), str(b), "--holdout_source", "hospital_x")
    assert rc == 2
    assert_one_line_error(capsys, "--holdout_source 'hospital_x'", "site_a, site_b", log_lines_ok=True)
