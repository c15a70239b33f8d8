"""Know when not to answer: the out-of-distribution gate's rules (numpy only, torch-free: the ONNX
inference path imports it). The score itself is computed inside the network (cxrkit.core.ood_head).

Flags (added to predictions.csv's quality_flags; see cxrkit.core.quality for the older ones):
  not_chest_xray  ood_score > threshold and no turned / inverted view of the image looks like a chest X-ray
  inverted        the image's grey-level inverse scores as a chest X-ray (<= threshold) and clearly
                  lower than the image itself (< VIEW_MARGIN x its score): reversed grey levels
  rotated         the same for the image turned by 90, 180 or 270 degrees
  extreme_aspect  the decoded image is longer than EXTREME_ASPECT:1 (a strip, not a film)
  lateral_view    not a frontal view: a DICOM ViewPosition that says lateral (LL, RL, LATERAL, ...), or, from
                  the pixels, a predicted lung map that is not two lungs side by side (two_lungs); the model
                  was trained on frontal films only

How the numbers were chosen (scripts/ood_eval.py re-measures them; docs/TRUST.md "Out-of-distribution gate"):
- ood_score: min over classes of the squared Mahalanobis distance of the spatial mean and standard
  deviation of the lite0 encoder's stride-16 block (2 x 112 features), shared Ledoit-Wolf covariance
  fitted on the training split, divided by the feature count (a training-like image scores ~1).
- threshold = THRESHOLD_MARGIN x the DEFAULT_PERCENTILE-th percentile of the validation split's
  scores: the margin keeps mildly shifted real X-rays (cropped, padded, JPEG-compressed) under it while
  every non-chest group measured lay at >= 1.5 x the 99th percentile.
- Views (inverse, turned 90 / 180 / 270) are scored only for images whose own score is above
  VIEW_HINT x threshold (about 4 % of real X-rays): inverse and 180 degrees below the threshold, all four
  above it, in one extra batch, so the gate stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

OOD_FORMAT = "cxrkit-ood-v1"
FLAG_NOT_CXR = "not_chest_xray"
FLAG_INVERTED = "inverted"
FLAG_ROTATED = "rotated"
FLAG_ASPECT = "extreme_aspect"
FLAG_LATERAL = "lateral_view"
OOD_FLAG_CODES = (FLAG_NOT_CXR, FLAG_INVERTED, FLAG_ROTATED, FLAG_ASPECT, FLAG_LATERAL)
OOD_FLAG_MEANING = {
    FLAG_NOT_CXR: "does not look like a frontal chest X-ray (ood_score over the model's threshold)",
    FLAG_INVERTED: "grey levels look reversed (its inverse scores as a chest X-ray): a MONOCHROME1 film saved "
                   "without its header?",
    FLAG_ROTATED: "the image looks turned by 90 or 180 degrees (a turned copy scores as a chest X-ray)",
    FLAG_ASPECT: "the image is a strip (longer side over 3 x the shorter), not a whole film",
    FLAG_LATERAL: "not a frontal view (its DICOM ViewPosition says lateral, or the predicted lungs are not two "
                  "lungs side by side): the model reads frontal films only",
}
OOD_REASON = {FLAG_NOT_CXR: "not a chest X-ray", FLAG_INVERTED: "inverted grey levels",
              FLAG_ROTATED: "rotated", FLAG_ASPECT: "extreme aspect ratio", FLAG_LATERAL: "lateral view"}
# DICOM ViewPosition values (upper-cased, spaces and '_' / '-' removed) that mean a lateral projection
LATERAL_VIEW_POSITIONS = frozenset({"LL", "RL", "LAT", "LATERAL", "LEFTLATERAL", "RIGHTLATERAL", "LLAT", "RLAT"})

DEFAULT_PERCENTILE = 99.0
THRESHOLD_MARGIN = 1.2
VIEW_HINT = 0.7      # views are scored above VIEW_HINT x threshold
VIEW_MARGIN = 0.8    # a view names the reason when it scores below VIEW_MARGIN x the image's own score
EXTREME_ASPECT = 3.0
MIN_VAL_IMAGES = 50  # fewer validation images: no threshold (like the temperature, cxrkit.training.evaluate)

# the views, as operations on (B, 3, S, S) float model inputs in [0, 1]
VIEWS = ("inverse", "rot90", "rot180", "rot270")


def not_judged(quality_flags: str) -> bool:
    """Whether a predictions.csv row's ';'-joined quality_flags hold a gate flag (the image is not judged)."""
    return any(f in OOD_FLAG_CODES for f in str(quality_flags or "").split(";"))


def make_view(x: np.ndarray, view: str) -> np.ndarray:
    if view == "inverse":
        return np.ascontiguousarray(np.float32(1.0) - x)
    k = {"rot90": 1, "rot180": 2, "rot270": 3}[view]
    return np.ascontiguousarray(np.rot90(x, k, axes=(2, 3)))


def is_gated(flags) -> bool:
    """Whether any of these flag codes is a gate flag (the image is not judged)."""
    return any(f in OOD_FLAG_CODES for f in flags)


def view_position_flags(view_position) -> list[str]:
    """[lateral_view] when a DICOM ViewPosition names a lateral projection; [] otherwise (or absent)."""
    v = "".join(ch for ch in str(view_position or "").upper() if ch.isalnum())
    return [FLAG_LATERAL] if v in LATERAL_VIEW_POSITIONS else []


# two_lungs: a frontal chest film shows two lungs, one each side of the midline. Measured by
# scripts/lateral_proxy.py with the shipped model on 900 real frontal films (cxr4, db_extra): every one
# had two lung components of >= 1% of the image on opposite sides, the smaller >= 0.25 x the larger.
# A lateral film shows one lung field; its proxy (one side of a frontal film, stretched square, spine at
# the edge) fails the rule in about 98% of cases. (The rule reads the predicted map, so it is only as
# good as the segmentation on such a film; real lateral films were not available to measure.)
MIN_LUNG_COMPONENT = 0.01
MIN_LUNG_RATIO = 0.25


def two_lungs(lung: np.ndarray) -> bool:
    """Whether a binary lung mask (H, W) shows two lungs side by side (see the constants above)."""
    import cv2
    m = np.ascontiguousarray(lung, dtype=np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(m, connectivity=8)
    comps = sorted(((int(stats[i, cv2.CC_STAT_AREA]), float(centroids[i][0])) for i in range(1, n)), reverse=True)
    big = [c for c in comps if c[0] >= MIN_LUNG_COMPONENT * m.size]
    if len(big) < 2:
        return False
    (a1, x1), (a2, x2) = big[:2]
    mid = m.shape[1] / 2
    return (x1 - mid) * (x2 - mid) < 0 and a2 >= MIN_LUNG_RATIO * a1


# the pixel view check is switched on for a model only where its own segmentation passes it on at least
# this share of its validation images (a model that segments poorly would call every film lateral)
VIEW_CHECK_MIN_PASS = 0.98


def view_check_fields(passed) -> dict:
    """The gate's view-check fields from the validation images' two_lungs results."""
    rate = float(np.mean(passed)) if len(passed) else 0.0
    return {"view_check": "two_lungs" if rate >= VIEW_CHECK_MIN_PASS else None, "val_two_lungs_fraction": rate}


def view_flags(view_position, lung: np.ndarray | None = None) -> list[str]:
    """[lateral_view] when the DICOM ViewPosition names a lateral projection, or the predicted binary lung
    mask (when given) is not two lungs side by side; [] otherwise."""
    if view_position_flags(view_position) or (lung is not None and not two_lungs(lung)):
        return [FLAG_LATERAL]
    return []


def aspect_flags(shape) -> list[str]:
    h, w = int(shape[0]), int(shape[1])
    return [FLAG_ASPECT] if max(h, w) > EXTREME_ASPECT * max(1, min(h, w)) else []


def views_needed(score: float, threshold: float) -> tuple[str, ...]:
    """Which views an image with this score needs (none for most real X-rays)."""
    if not np.isfinite(score) or score <= VIEW_HINT * threshold:
        return ()
    return VIEWS if score > threshold else ("inverse", "rot180")


def decide(score: float, threshold: float, view_scores: dict) -> list[str]:
    """The OOD flag of one image from its own score and its views' scores ({} when none were run)."""
    best = None
    for v, s in view_scores.items():
        if s <= threshold and s < VIEW_MARGIN * score and (best is None or s < view_scores[best]):
            best = v
    if best is not None:
        return [FLAG_INVERTED if best == "inverse" else FLAG_ROTATED]
    return [FLAG_NOT_CXR] if score > threshold else []


def score_views(score_fn, x: np.ndarray, scores: np.ndarray, threshold: float) -> list[dict]:
    """{view: score} per image: each image's needed views, scored by
    score_fn((N, 3, S, S) float32) -> (N,) scores in calls of at most len(x) views: an engine first given
    a batch larger than the run's allocates anew (OpenVINO: 88 MB for 32 views of 16 films, met late in
    a long run, so peak memory grew with the number of films)."""
    jobs = [(i, v) for i in range(len(x)) for v in views_needed(float(scores[i]), threshold)]
    out = [{} for _ in range(len(x))]
    if not jobs:
        return out
    xv = np.stack([make_view(x[i:i + 1], v)[0] for i, v in jobs])
    sv = np.concatenate([np.asarray(score_fn(xv[s:s + len(x)]), np.float64).reshape(-1)
                         for s in range(0, len(xv), len(x))])
    for (i, v), s in zip(jobs, sv):
        out[i][v] = float(s)
    return out


def view_scores_np(score_fn, x: np.ndarray) -> dict:
    """All four views' scores of a batch (fitting records them; the pipeline uses score_views)."""
    return {v: np.asarray(score_fn(make_view(x, v)), np.float64) for v in VIEWS}


def threshold_from_scores(val_scores, percentile: float = DEFAULT_PERCENTILE, margin: float = THRESHOLD_MARGIN,
                          own_views: dict | None = None) -> dict:
    """The threshold entry of ck["ood"] from the validation scores (and what fitting measured)."""
    s = np.asarray(val_scores, np.float64)
    p = float(np.percentile(s, percentile))
    th = margin * p
    out = {"threshold": th, "percentile": percentile, "margin": margin, "n_val": int(s.size),
           "val_score_quantiles": {q: float(np.percentile(s, float(q))) for q in ("50", "90", "99", "99.5")},
           "val_flagged_fraction": float((s > th).mean()),
           "rule": f"threshold = {margin} x p{percentile:g} of the validation split's ood_score",
           "score": "min over classes of the squared Mahalanobis distance of pooled features / feature count",
           "view_hint": VIEW_HINT, "view_margin": VIEW_MARGIN}
    if own_views:
        # how many validation X-rays a view would wrongly name (should be ~0)
        wrong = 0
        for i in range(s.size):
            vs = {v: float(own_views[v][i]) for v in views_needed(float(s[i]), th) if v in own_views}
            wrong += decide(float(s[i]), th, vs) in ([FLAG_INVERTED], [FLAG_ROTATED])
        out["val_view_flagged_fraction"] = wrong / max(1, s.size)
    return out


@dataclass(frozen=True)
class GateSpec:
    """The out-of-distribution gate a model carries (ck["ood"], the ONNX meta's "ood", summary.json's
    quality.ood): the one reader of its keys. Fields in on-disk order; None = absent (omitted by to_dict).
    fit_ood writes format .. n_train, threshold_from_scores threshold .. val_view_flagged_fraction,
    resolve adds stored_threshold and source."""
    format: str | None = None
    layers: list | None = None
    pool: str | None = None
    class_means: object = None              # tensor (checkpoint only; public() drops it)
    whitening: object = None                # tensor (checkpoint only; public() drops it)
    feature_dim: int | None = None
    n_train: int | None = None
    threshold: float | None = None          # ood_score above it: not judged
    percentile: float | None = None
    margin: float | None = None
    n_val: int | None = None
    val_score_quantiles: dict | None = None
    val_flagged_fraction: float | None = None
    rule: str | None = None
    score: str | None = None
    view_hint: float | None = None
    view_margin: float | None = None
    val_view_flagged_fraction: float | None = None
    view_check: str | None = None           # "two_lungs": the pixel view check is on (view_check_fields)
    val_two_lungs_fraction: float | None = None
    stored_threshold: float | None = None   # the model's own threshold, under an --ood_threshold override
    source: str | None = None               # "model" or "--ood_threshold ..." (resolved gates only)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for the round trip

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSpec | None":
        """None for a model without a gate (no dict, or an empty one)."""
        if not d:
            return None
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        """The on-disk dict (same keys, same order as written)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def public(self) -> "GateSpec":
        """Without its tensors (what the ONNX meta and summary.json carry)."""
        return replace(self, class_means=None, whitening=None)

    def resolve(self, threshold_override: float | None = None) -> "GateSpec | None":
        """The gate a run uses, with an --ood_threshold override; None: no gate (no stored threshold and
        no override). An empty GateSpec() stands for a model without a gate."""
        if threshold_override is not None:
            if not threshold_override > 0:
                raise ValueError(f"--ood_threshold must be > 0, got {threshold_override}")
            if self.threshold is None:
                return GateSpec(threshold=float(threshold_override),
                                source="--ood_threshold (the model has no stored gate)")
            return replace(self.public(), threshold=float(threshold_override),
                           stored_threshold=float(self.threshold), source="--ood_threshold")
        if self.threshold is None:
            return None
        return replace(self.public(), threshold=float(self.threshold), source="model")

    def decide(self, score: float, view_scores: dict | None = None) -> list[str]:
        """The gate's flag of one image ([] when it passes): not_chest_xray above the threshold, unless
        a view (inverse, turned) scores as a chest X-ray, which names the reason instead."""
        return decide(float(score), self.threshold, view_scores or {})

    def score_views(self, score_fn, x: np.ndarray, scores: np.ndarray) -> list[dict]:
        """{view: score} per image of the views this gate needs (see score_views)."""
        return score_views(score_fn, x, scores, self.threshold)
