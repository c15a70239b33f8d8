"""SYNTHETIC chest-X-ray-like images with lung masks, in the COVID-19 Radiography Database layout.

Not real radiographs: a body silhouette, two lung fields, ribs and a spine, plus a class-specific
pattern inside the lungs (COVID: many small peripheral lower-zone patches in both lungs; Lung_Opacity:
one large dense consolidation in one lung; Normal: none; Viral Pneumonia: a diffuse haze over both lungs with
streaks), strong enough that `make demo`'s short training run tells the classes apart. They exist so that a fresh clone can run the whole
flow (train, evaluate, export, infer) in minutes with no data download, and so tests can make
fixtures. The files reproduce the real database's quirks on purpose: 299x299 images with 256x256
masks, some RGB files, names with spaces and parentheses.

    python -m cxrkit synth --out demo_data --per_class 40
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..core.config import DEFAULT_CLASSES

IMG, MASK = 299, 256


def _lungs(rng, size):
    """Two lung ellipses (centre, axes, angle) in a size x size frame."""
    s = size / 256.0
    cy = 128 + rng.uniform(-6, 6)
    out = []
    for side in (-1, 1):
        cx = 128 + side * (52 + rng.uniform(-5, 5))
        ax = (34 + rng.uniform(-4, 4), 78 + rng.uniform(-6, 6))
        ang = side * (8 + rng.uniform(-3, 3))
        out.append(((cx * s, cy * s), (ax[0] * s, ax[1] * s), ang))
    return out


def make_one(label: str, rng: np.random.Generator, size: int = IMG) -> tuple[np.ndarray, list]:
    img = np.zeros((size, size), np.float32)
    s = size / 256.0
    # body and mediastinum
    cv2.ellipse(img, (int(128 * s), int(140 * s)), (int(110 * s), int(125 * s)), 0, 0, 360, 0.55, -1)
    lungs = _lungs(rng, size)
    lung_mask = np.zeros((size, size), np.uint8)
    for (c, ax, ang) in lungs:
        cv2.ellipse(img, (int(c[0]), int(c[1])), (int(ax[0]), int(ax[1])), ang, 0, 360, 0.18, -1)
        cv2.ellipse(lung_mask, (int(c[0]), int(c[1])), (int(ax[0]), int(ax[1])), ang, 0, 360, 1, -1)
    # ribs: faint bright arcs over the lungs
    for k in range(8):
        y = (60 + 20 * k + rng.uniform(-2, 2)) * s
        for side in (-1, 1):
            cv2.ellipse(img, (int((128 + side * 20) * s), int(y)), (int(70 * s), int(14 * s)), 0,
                        200 if side < 0 else -20, 340 if side < 0 else 160, 0.32, max(1, int(3 * s)))
    # spine and heart
    cv2.rectangle(img, (int(120 * s), int(20 * s)), (int(136 * s), int(250 * s)), 0.62, -1)
    cv2.ellipse(img, (int(140 * s), int(165 * s)), (int(34 * s), int(30 * s)), 0, 0, 360, 0.5, -1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    patt = np.zeros_like(img)
    # The class patterns lie inside the lungs only (the outside-lung augmentation of training cannot
    # remove them) and are strong enough to survive 64 px: what `make demo`'s short run learns.
    if label == "COVID":  # many small peripheral, lower-zone hazy patches in BOTH lungs
        for (c, ax, _) in lungs:
            for _ in range(5):
                px = c[0] + np.sign(c[0] - size / 2) * ax[0] * rng.uniform(0.3, 0.75)
                py = c[1] + ax[1] * rng.uniform(-0.1, 0.7)
                r = rng.uniform(7, 11) * s
                patt += 0.35 * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * r * r))
    elif label == "Lung_Opacity":  # one large dense lobar consolidation, in ONE lung only
        c, ax, _ = lungs[rng.integers(2)]
        px, py = c[0] + rng.uniform(-0.15, 0.15) * ax[0], c[1] + rng.uniform(-0.3, 0.3) * ax[1]
        r = rng.uniform(26, 32) * s
        patt += 0.6 * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * r * r))
    elif label == "Viral Pneumonia":  # diffuse interstitial haze over both whole lungs, with streaks
        patt += 0.2
        for _ in range(14):
            c, ax, _ = lungs[rng.integers(2)]
            a = rng.uniform(0, np.pi)
            x0, y0 = c[0] - np.sign(c[0] - size / 2) * ax[0] * 0.5, c[1] + rng.uniform(-0.3, 0.3) * ax[1]
            x1, y1 = x0 + np.cos(a) * 30 * s, y0 + np.sin(a) * 30 * s
            cv2.line(patt, (int(x0), int(y0)), (int(x1), int(y1)), 0.36, max(1, int(2 * s)))
        patt = cv2.GaussianBlur(patt, (0, 0), 2 * s)
    img += patt * lung_mask
    img = cv2.GaussianBlur(img, (0, 0), 1.2 * s)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05) + rng.normal(0, 0.025, img.shape)
    img = np.clip(img * 255, 0, 255).astype(np.uint8)
    # patient positioning differs from film to film; without it same-class thumbnails correlate above
    # the near-duplicate threshold and the split puts whole classes on one side
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-5, 5), rng.uniform(0.92, 1.08))
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * size
    img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return img, cv2.warpAffine(lung_mask, m, (size, size), flags=cv2.INTER_NEAREST)


def generate(out_dir, per_class: int = 40, seed: int = 0, classes=DEFAULT_CLASSES, quirks: bool = True) -> Path:
    """Write per_class images (+ masks) for each class; returns out_dir."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for label in classes:
        (out / label / "images").mkdir(parents=True, exist_ok=True)
        (out / label / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, mask = make_one(label, rng)
            # database naming: "COVID-1.png", "Viral Pneumonia-1.png"; some "Normal (3).png" style
            name = f"{label} ({i + 1}).png" if quirks and i % 5 == 4 else f"{label}-{i + 1}.png"
            m = cv2.resize(mask * 255, (MASK, MASK), interpolation=cv2.INTER_NEAREST)  # masks 256, images 299
            if quirks and i % 7 == 3:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)     # some RGB images
            if quirks and i % 6 == 2:
                m = cv2.cvtColor(m, cv2.COLOR_GRAY2BGR)         # some RGB masks
            cv2.imwrite(str(out / label / "images" / name), img)
            cv2.imwrite(str(out / label / "masks" / name), m)
    (out / "README.txt").write_text("SYNTHETIC data made by cxrkit.training.synthetic: not real radiographs, for demos "
                                    "and tests only.\n")
    return out
