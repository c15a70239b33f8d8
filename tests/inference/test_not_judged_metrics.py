"""A not-judged image (gated) counts nowhere as a class: the run's metrics leave it out and count it."""
import numpy as np

from cxrkit.inference.summary import classification_summary

NAMES = ["COVID", "Normal"]


def test_metrics_leave_out_not_judged_images_and_count_them():
    y = [0, 1, 1, 0]
    p = [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.05, 0.95]]  # the last (wrong) one is not judged
    m = classification_summary(y, p, NAMES, flagged=[False, False, False, True], gated=[False, False, False, True])
    assert m["accuracy"] == 1.0 and m["n_labelled"] == 3 and m["n_not_judged_left_out"] == 1
    assert m["including_not_judged"]["n"] == 4 and m["including_not_judged"]["accuracy"] == 0.75
    assert np.asarray(m["confusion_matrix"]).sum() == 3
    assert classification_summary(y, p, NAMES, gated=[True] * 4) is None  # nothing judged: no metrics
    full = classification_summary(y, p, NAMES, gated=[False] * 4)
    assert full["accuracy"] == 0.75 and "n_not_judged_left_out" not in full


def test_per_class_screening_figures_with_intervals():
    """Sensitivity, specificity, PPV and NPV one-vs-rest, each with a Wilson 95% interval."""
    from cxrkit.core.metrics import classification_metrics, wilson_interval
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([[.9, .1], [.4, .6], [.2, .8], [.3, .7]]), NAMES)
    c = m["per_class"]["COVID"]   # TP 1, FN 1, FP 0, TN 2
    assert (c["recall"], c["specificity"], c["precision"], c["npv"]) == (0.5, 1.0, 1.0, 2 / 3)
    assert c["npv_ci95"] == list(wilson_interval(2, 3)) and c["recall_ci95"] == list(wilson_interval(1, 2))
