"""Scanner-like shifts of real images, for robustness curves and for testing the run-level shift
warning: what another hospital's detector, processing or export does to a film. Each shift takes an
8-bit grey image (any size) and a severity level in [0, 1] (0 = unchanged) and returns an 8-bit grey
image; `rng` makes the random ones (noise, text) reproducible.

Used by scripts/robustness.py (accuracy and calibration under each shift, with intervals)."""
from __future__ import annotations

import cv2
import numpy as np


def _gamma(img, level, rng):          # exposure / detector response curve: gamma up to 2.2 (darker mid-tones)
    g = 1 + 1.2 * level
    return np.clip(255 * (img / 255.0) ** g, 0, 255).astype(np.uint8)


def _contrast(img, level, rng):       # a flatter film: contrast down to 40% about the mean
    m = float(img.mean())
    return np.clip(m + (img.astype(np.float32) - m) * (1 - 0.6 * level), 0, 255).astype(np.uint8)


def _blur(img, level, rng):           # softer detector / downstream smoothing: Gaussian sigma up to 1% of the side
    s = 0.01 * max(img.shape) * level
    return img if s <= 0 else cv2.GaussianBlur(img, (0, 0), s)


def _sharpen(img, level, rng):        # edge-enhancement processing (unsharp mask, amount up to 2)
    blur = cv2.GaussianBlur(img, (0, 0), 0.005 * max(img.shape) + 0.5)
    return np.clip(img + 2.0 * level * (img.astype(np.float32) - blur), 0, 255).astype(np.uint8)


def _noise(img, level, rng):          # quantum noise: Gaussian, sd up to 20 grey levels
    return np.clip(img + rng.normal(0, 20 * level, img.shape), 0, 255).astype(np.uint8)


def _jpeg(img, level, rng):           # lossy export: JPEG quality 95 -> 10
    q = int(round(95 - 85 * level))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def _downup(img, level, rng):         # a low-resolution source: down to 1/4 of the side, then back up
    h, w = img.shape
    f = 1 - 0.75 * level
    small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _border_text(img, level, rng):    # a black border and burned-in text (site labels, markers)
    out = img.copy()
    h, w = out.shape
    b = int(round(0.08 * level * min(h, w)))
    if b:
        out[:b], out[-b:], out[:, :b], out[:, -b:] = 0, 0, 0, 0
    for _ in range(int(round(4 * level))):
        org = (int(rng.uniform(0.05, 0.6) * w), int(rng.uniform(0.08, 0.95) * h))
        cv2.putText(out, "L  AP PORTABLE"[: int(rng.integers(3, 14))], org, cv2.FONT_HERSHEY_SIMPLEX,
                    0.0025 * w, 255, max(1, w // 200), cv2.LINE_AA)
    return out


def _collimation(img, level, rng):    # a tighter crop (collimation), up to 20% off each side, resized back
    h, w = img.shape
    c = int(round(0.2 * level * min(h, w)))
    return img if c == 0 else cv2.resize(img[c:h - c, c:w - c], (w, h), interpolation=cv2.INTER_LINEAR)


def _clahe(img, level, rng):          # contrast-limited equalisation (one training source's processing)
    if level <= 0:
        return img
    return cv2.createCLAHE(clipLimit=1 + 3 * level, tileGridSize=(8, 8)).apply(img)


SHIFTS = {"gamma": _gamma, "contrast": _contrast, "blur": _blur, "sharpen": _sharpen, "noise": _noise,
          "jpeg": _jpeg, "downup": _downup, "border_text": _border_text, "collimation": _collimation,
          "clahe": _clahe}


def apply_shift(img: np.ndarray, name: str, level: float, seed: int = 0) -> np.ndarray:
    """SHIFTS[name] at `level` (0..1) on an 8-bit grey image; seeded per call (reproducible)."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose one of {sorted(SHIFTS)}")
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"expected an 8-bit grey image, got {img.shape} {img.dtype}")
    return SHIFTS[name](img, float(level), np.random.default_rng(seed))
