"""The run-level shift warning: does this folder, as a whole, look unlike the data the model was
trained on? A per-image gate cannot see it (films from another hospital are real frontal chest X-rays,
each only a little further from the training data), but a folder of them moves the distribution.

What is compared, per image (all computed by every run anyway): the gate's ood_score, the predicted
lung-area fraction, and the model input's grey-level mean and standard deviation. The model carries a
reference sample of these from in-source images, labelled by group (source and class), fitted with
scripts/fit_shift_reference.py and stored in its checkpoint and ONNX meta (key "shift_reference").

The test: the folder's median of each feature, standardised against the medians of simulated
in-source folders of the same size; statistic T = the largest of (ood_score: its one-sided z, since a
LOWER score is no warning) and |z| of the others. The simulated folders mix the reference groups in
random proportions (Dirichlet(1)), so a folder of one class or one source is not by itself "shifted".
p = the share of simulated folders with T at least the observed one (Monte Carlo). It fires at
p < alpha. Torch-free (the ONNX path runs it)."""
from __future__ import annotations

import numpy as np

FEATURES = ("ood_score", "lung_area_fraction", "grey_mean", "grey_std")
ONE_SIDED = ("ood_score",)
ALPHA = 0.01          # fires at p < alpha; false alarms on in-source folders: MODEL_CARD.md
MIN_IMAGES = 30       # fewer: not tested (a median of a handful of films says little)
N_NULL = 1000         # simulated folders
MAX_DRAW = 2000       # a larger folder is compared through a random 2,000 of its images
DRAW_CHUNK = 50       # simulated folders computed at a time (bounds the test's memory; same numbers)
FLAG_FOLDER_SHIFT = "folder_shift"  # on every row of a folder where the warning fires
FLAG_MEANING = {FLAG_FOLDER_SHIFT: "the folder as a whole differs from the training data (summary.json shift_check): "
                                   "the probabilities are not calibrated for it and accuracy is likely lower"}


def feature_row(ood_score, lung_area_fraction: float, stats: dict) -> list[float]:
    """One image's row, in FEATURES order: the gate score (NaN without a gate), the predicted lung-area
    fraction and quality.image_stats' grey mean and std of the model input. The one rule for the
    pipeline, the reference fit and the tests."""
    return [np.nan if ood_score is None else float(ood_score), float(lung_area_fraction),
            float(stats["mean"]), float(stats["std"])]


def mixed_draws(groups, n: int, n_draws: int, rng) -> np.ndarray:
    """(n_draws, n) row indices of simulated in-source folders: group shares ~ Dirichlet(1), then each
    image a random member of its group (with replacement). Vectorised: every index drawn at once."""
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    size = np.bincount(inverse, minlength=len(names))
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    cum = np.cumsum(rng.dirichlet(np.ones(len(names)), n_draws), axis=1)
    u = rng.random((n_draws, n))
    label = np.empty((n_draws, n), np.int64)
    for s in range(0, n_draws, DRAW_CHUNK):  # in chunks: the (draws, n, groups) comparison stays small
        label[s:s + DRAW_CHUNK] = np.minimum((u[s:s + DRAW_CHUNK, :, None] > cum[s:s + DRAW_CHUNK, None, :]).sum(-1),
                                             len(names) - 1)
    del u
    out = np.empty((n_draws, n), np.int64)
    for s in range(0, n_draws, DRAW_CHUNK):  # the same stream of numbers as one call, chunk by chunk
        lab = label[s:s + DRAW_CHUNK]
        out[s:s + DRAW_CHUNK] = order[start[lab] + (rng.random(lab.shape) * size[lab]).astype(np.int64)]
    return out


def make_reference(values: np.ndarray, groups, alpha: float = ALPHA) -> dict:
    """The dict stored with a model: per-image feature rows (N, len(FEATURES)) and their group names."""
    v = np.asarray(values, np.float64)
    if v.ndim != 2 or v.shape[1] != len(FEATURES) or len(groups) != len(v):
        raise ValueError(f"expected ({len(v)}, {len(FEATURES)}) values and one group per row")
    return {"features": list(FEATURES), "values": np.round(v, 5).tolist(), "groups": [str(g) for g in groups],
            "alpha": float(alpha), "min_images": MIN_IMAGES, "n_null": N_NULL}


def folder_check(values: np.ndarray, reference: dict, seed: int = 0) -> dict:
    """values: (n, len(FEATURES)) rows of this folder's images (ood_score NaN where the model has no
    gate). Returns the summary.json block: tested, fires, p_value, statistic, per-feature medians and z."""
    if list(reference.get("features", [])) != list(FEATURES):
        return {"tested": False, "reason": "the model's shift reference has other features: refit it"}
    x = np.asarray(values, np.float64).reshape(-1, len(FEATURES))
    n = len(x)
    if n < int(reference.get("min_images", MIN_IMAGES)):
        return {"tested": False, "reason": f"only {n} images (the test needs {reference.get('min_images', MIN_IMAGES)})"}
    rng = np.random.default_rng(seed)
    if n > MAX_DRAW:
        x, n = x[rng.choice(n, MAX_DRAW, replace=False)], MAX_DRAW
    ref, groups = np.asarray(reference["values"], np.float64), np.asarray(reference["groups"])
    use = ~np.all(np.isnan(x), axis=0) & ~np.all(np.isnan(ref), axis=0)  # no gate: ood_score left out
    idx, r = mixed_draws(groups, n, int(reference.get("n_null", N_NULL)), rng), ref[:, use]
    null = np.concatenate([np.median(r[idx[s:s + DRAW_CHUNK]], axis=1) for s in range(0, len(idx), DRAW_CHUNK)])
    mu, sd = null.mean(0), null.std(0) + 1e-9
    med = np.nanmedian(x[:, use], axis=0)
    feats = [f for f, u in zip(FEATURES, use) if u]
    z_obs, z_null = (med - mu) / sd, (null - mu) / sd
    sided = np.array([f in ONE_SIDED for f in feats])
    t = lambda z: np.where(sided, z, np.abs(z)).max(-1)  # noqa: E731
    stat = float(t(z_obs))
    p = float((1 + np.sum(t(z_null) >= stat)) / (1 + len(null)))
    alpha = float(reference.get("alpha", ALPHA))
    return {"tested": True, "fires": p < alpha, "p_value": p, "statistic": stat, "alpha": alpha, "n_images": n,
            "test": "max standardised median shift vs simulated in-source folders (Monte Carlo, random group mix)",
            "medians": dict(zip(feats, np.round(med, 5).tolist())),
            "reference_medians": dict(zip(feats, np.round(mu, 5).tolist())),
            "z": dict(zip(feats, np.round(z_obs, 3).tolist()))}


def warning_line(block: dict) -> str | None:
    """The one line a run prints (console, report header) when the test fires."""
    if not block or not block.get("fires"):
        return None
    worst = max(block["z"], key=lambda f: abs(block["z"][f]))
    return (f"WARNING: this folder differs from the data the model was trained on ({block['test']}: "
            f"statistic {block['statistic']:.1f}, p = {block['p_value']:.3g}; largest shift: {worst}, z = "
            f"{block['z'][worst]:+.1f}); expect lower accuracy than the figures in the model card, and treat the "
            f"probabilities as not calibrated for this folder")
