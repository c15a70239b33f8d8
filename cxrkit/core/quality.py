"""Input-quality flags: mark inputs the model cannot judge instead of giving them a confident answer.

Torch-free (numpy only): the ONNX inference path imports it.

Codes written to predictions.csv's `quality_flags` column (`;`-joined, empty when all is well):
  uniform                  the image is (nearly) one grey level: there is nothing to judge
  low_contrast             its 1st..99th percentile grey range is far below any training image's
  lung_area_out_of_range   the predicted lung area lies outside the range seen in training
Non-finite pixels (NaN / inf in float TIFFs) are not flagged but skipped, with the reason
(cxrkit.core.decode.read_gray).

How the thresholds were chosen (scripts/quality_thresholds.py re-derives them): on the training data
(cxr4, 5,130 images, each resized to the 128 px model input), the smallest per-image grey-level
standard deviation is 11.0 and the 0.1th percentile of the p1..p99 range is 67 (its minimum: 54); the
flags fire at a fraction of those values (std < 2.8, range < 34 grey levels), so no training-like
image is flagged, while a blank, flat or washed-out frame is.
The lung-area range is per model: `finalize` (cxrkit.training.evaluate) stores the training split's ground-truth
lung-area distribution in the checkpoint (`lung_area_range`), export copies it into the ONNX meta and
graph, and both backends flag against the same numbers. Checkpoints without it use
DEFAULT_LUNG_AREA_RANGE (the same rule applied to all of cxr4's masks).
"""
from __future__ import annotations

import numpy as np

FLAG_UNIFORM = "uniform"
FLAG_LOW_CONTRAST = "low_contrast"
FLAG_LUNG_AREA = "lung_area_out_of_range"
FLAG_CODES = (FLAG_UNIFORM, FLAG_LOW_CONTRAST, FLAG_LUNG_AREA)
FLAG_MEANING = {
    FLAG_UNIFORM: "the image is (nearly) a single grey level",
    FLAG_LOW_CONTRAST: "grey-level range (1st..99th percentile) far below any training image's",
    FLAG_LUNG_AREA: "predicted lung area outside the range seen in training",
}

# measured on cxr4 at 128 px (scripts/quality_thresholds.py): min std 11.0, p0.1 of (p99 - p1) 67.4
TRAIN_MIN_STD = 11.0
TRAIN_P01_RANGE = 67.4
UNIFORM_STD_FRACTION = 0.25    # uniform:      std < 0.25 x 11.0 = 2.75 grey levels
LOW_CONTRAST_FRACTION = 0.5    # low_contrast: p99 - p1 < 0.5 x 67.4 = 33.7 grey levels
UNIFORM_STD = UNIFORM_STD_FRACTION * TRAIN_MIN_STD
LOW_CONTRAST_RANGE = LOW_CONTRAST_FRACTION * TRAIN_P01_RANGE

# lung-area range = [LOW x 0.5th percentile, HIGH x 99.5th percentile] of the training masks' area
# fractions: the 1% tails are dropped (a few masks are broken) and a margin is added for the model's
# own segmentation error
LUNG_AREA_PERCENTILES = (0.5, 99.5)
LUNG_AREA_MARGIN_LOW = 0.8
LUNG_AREA_MARGIN_HIGH = 1.2
# the same rule on all 5,130 cxr4 masks at 128 px; used for checkpoints / exports older than the
# `lung_area_range` key
# (p0.5 = 0.1085, p99.5 = 0.4757; min 0.046, max 0.556)
DEFAULT_LUNG_AREA_RANGE = {"low": 0.0868, "high": 0.5708,
                           "source": "default for models without lung_area_range (all cxr4 masks, cxrkit.core.quality)"}


def image_stats(u8: np.ndarray) -> dict:
    """Grey-level mean, std and 1st / 99th percentiles of a uint8 image, from its histogram (~0.1 ms at
    128 px: cheap enough for every inference input)."""
    h = np.bincount(np.asarray(u8, np.uint8).ravel(), minlength=256).astype(np.float64)
    n = h.sum()
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "p1": 0, "p99": 0}
    v = np.arange(256, dtype=np.float64)
    mean = float(h @ v) / n
    var = max(0.0, float(h @ (v * v)) / n - mean * mean)
    c = np.cumsum(h)
    return {"mean": mean, "std": var ** 0.5, "p1": int(np.searchsorted(c, 0.01 * n)),
            "p99": int(np.searchsorted(c, 0.99 * n))}


def image_flags(stats: dict) -> list[str]:
    """Flags of the image itself (before the model): uniform, else low_contrast."""
    if stats["std"] < UNIFORM_STD:
        return [FLAG_UNIFORM]
    if stats["p99"] - stats["p1"] < LOW_CONTRAST_RANGE:
        return [FLAG_LOW_CONTRAST]
    return []


def lung_area_range_from_fractions(fractions) -> dict | None:
    a = np.asarray(fractions, np.float64)
    if a.size == 0:
        return None
    lo, hi = np.percentile(a, LUNG_AREA_PERCENTILES)
    return {"low": round(float(lo) * LUNG_AREA_MARGIN_LOW, 4),
            "high": round(min(1.0, float(hi) * LUNG_AREA_MARGIN_HIGH), 4),
            "n_masks": int(a.size), "min_seen": round(float(a.min()), 4), "max_seen": round(float(a.max()), 4),
            "rule": f"[{LUNG_AREA_MARGIN_LOW} x p{LUNG_AREA_PERCENTILES[0]}, {LUNG_AREA_MARGIN_HIGH} x "
                    f"p{LUNG_AREA_PERCENTILES[1]}] of the training masks' lung-area fractions"}


def lung_area_range(masks, has_mask, indices, chunk: int = 512) -> dict | None:
    """The lung-area range of the training split (cached ground-truth masks, read in chunks from the
    memmap); None when no training image has a mask."""
    idx = np.asarray(indices)
    idx = np.sort(idx[np.asarray(has_mask)[idx]])
    fr = [np.asarray(masks[idx[s:s + chunk]]).mean(axis=(1, 2)) for s in range(0, len(idx), chunk)]
    return lung_area_range_from_fractions(np.concatenate(fr) if fr else [])


def resolve_lung_area_range(stored) -> dict:
    """The range a model carries (checkpoint / meta), else the documented default."""
    if isinstance(stored, dict) and "low" in stored and "high" in stored:
        return {**stored, "low": float(stored["low"]), "high": float(stored["high"]),
                "source": stored.get("source", "model (training split masks)")}
    return dict(DEFAULT_LUNG_AREA_RANGE)


def lung_flags(fraction: float, rng: dict) -> list[str]:
    return [FLAG_LUNG_AREA] if not rng["low"] <= fraction <= rng["high"] else []


def thresholds(rng: dict) -> dict:
    """What summary.json records about the flags' thresholds."""
    return {FLAG_UNIFORM: f"grey-level std < {UNIFORM_STD:.3g} (model input)",
            FLAG_LOW_CONTRAST: f"1st..99th percentile grey range < {LOW_CONTRAST_RANGE:.3g} (model input)",
            FLAG_LUNG_AREA: f"predicted lung area fraction outside [{rng['low']:.3g}, {rng['high']:.3g}] "
                            f"({rng.get('source', '')})"}
