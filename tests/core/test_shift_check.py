"""The run-level shift warning's test (cxrkit.core.shift_check), on generated feature rows."""
import numpy as np
import pytest

from cxrkit.core.shift_check import FEATURES, folder_check, make_reference, warning_line


def rows(rng, n, ood=1.0, area=0.30, mean=120.0, std=60.0):
    return np.column_stack([rng.normal(ood, 0.2, n), rng.normal(area, 0.05, n), rng.normal(mean, 15, n),
                            rng.normal(std, 8, n)])


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    # two groups whose ood scores differ: a folder of either group alone is in-source, not a shift
    return make_reference(np.vstack([rows(rng, 300, ood=0.9), rows(rng, 300, ood=1.1)]), ["a"] * 300 + ["b"] * 300)


def test_in_source_folders_rarely_fire(reference):
    rng = np.random.default_rng(1)
    fired = [folder_check(rows(rng, 200, ood=rng.choice([0.9, 1.0, 1.1])), reference, seed=k)["fires"]
             for k in range(20)]
    assert np.mean(fired) <= 0.1


@pytest.mark.parametrize("shift", [dict(ood=1.4), dict(mean=150.0), dict(std=45.0), dict(area=0.2)])
def test_a_shifted_folder_fires_and_names_the_feature(reference, shift):
    block = folder_check(rows(np.random.default_rng(2), 200, **shift), reference)
    assert block["tested"] and block["fires"] and block["p_value"] < block["alpha"]
    feature = {"ood": "ood_score", "mean": "grey_mean", "std": "grey_std", "area": "lung_area_fraction"}[next(iter(shift))]
    assert max(block["z"], key=lambda f: abs(block["z"][f])) == feature
    line = warning_line(block)
    assert line.startswith("WARNING: this folder differs from the data the model was trained on") and feature in line


def test_a_lower_ood_score_is_no_warning(reference):
    assert not folder_check(rows(np.random.default_rng(3), 200, ood=0.6), reference)["fires"]


def test_small_folders_and_foreign_references_are_not_tested(reference):
    assert folder_check(rows(np.random.default_rng(4), 10), reference) == {
        "tested": False, "reason": "only 10 images (the test needs 30)"}
    assert not folder_check(rows(np.random.default_rng(4), 100), dict(reference, features=["x"]))["tested"]
    assert warning_line({"tested": False}) is None


def test_a_model_without_a_gate_is_tested_on_the_other_features(reference):
    x = rows(np.random.default_rng(5), 100, mean=160.0)
    x[:, 0] = np.nan
    block = folder_check(x, reference)
    assert block["fires"] and "ood_score" not in block["z"]


def test_make_reference_checks_its_shape():
    with pytest.raises(ValueError):
        make_reference(np.zeros((5, len(FEATURES) - 1)), ["a"] * 5)
