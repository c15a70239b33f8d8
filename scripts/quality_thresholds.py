#!/usr/bin/env python
"""Where the input-quality thresholds in cxrkit/quality.py come from: the training data's own
distribution of grey-level spread (std), contrast (1st..99th percentile range) and ground-truth lung
area, measured on the model input (every image resized to --img_size, as inference sees it).

  python scripts/quality_thresholds.py --data_dir ../shared/data/cxr4 --img_size 128

Prints the distribution and the thresholds the rule in cxrkit/quality.py gives:
  uniform       std < UNIFORM_STD_FRACTION x the smallest std seen in training
  low_contrast  p99 - p1 < LOW_CONTRAST_FRACTION x the 0.1th percentile of that range in training
  lung area     outside [LUNG_AREA_MARGIN_LOW x p0.5, LUNG_AREA_MARGIN_HIGH x p99.5] of the training
                masks' lung-area fractions (the per-checkpoint range; this is the default for older
                checkpoints)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cxrkit.core import quality  # noqa: E402
from cxrkit.core.decode import list_images, read_gray, read_mask  # noqa: E402
from cxrkit.core.model_input import resize_gray, resize_mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="../shared/data/cxr4")
    p.add_argument("--img_size", type=int, default=128)
    a = p.parse_args(argv)
    root = Path(a.data_dir)
    stds, ranges, areas = [], [], []
    for img in list_images(root):
        if "masks" in img.relative_to(root).parts:
            continue
        u8 = resize_gray(read_gray(img), a.img_size)
        s = quality.image_stats(u8)
        stds.append(s["std"]); ranges.append(s["p99"] - s["p1"])
        m = img.parent.parent / "masks" / img.name
        if m.is_file():
            areas.append(float(resize_mask(read_mask(m), a.img_size).mean()))
    stds, ranges, areas = map(np.asarray, (stds, ranges, areas))
    q = [0, 0.1, 0.5, 1, 5, 50, 95, 99, 99.5, 99.9, 100]
    print(f"{len(stds)} images, {len(areas)} masks, model input {a.img_size}px")
    for name, v in (("std", stds), ("p99-p1", ranges), ("lung area", areas)):
        print(f"{name:10s} " + " ".join(f"p{k}={np.percentile(v, k):.4g}" for k in q))
    rng = quality.lung_area_range_from_fractions(areas)
    u = quality.UNIFORM_STD_FRACTION
    print(f"uniform: std < {u} x {stds.min():.3g} = {u * stds.min():.3g}")
    print(f"low_contrast: p99 - p1 < {quality.LOW_CONTRAST_FRACTION} x {np.percentile(ranges, 0.1):.3g} = "
          f"{quality.LOW_CONTRAST_FRACTION * np.percentile(ranges, 0.1):.3g}")
    print(f"lung area range: {rng}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
