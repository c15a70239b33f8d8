#!/usr/bin/env python
"""Fit and measure the run-level shift warning (cxrkit.core.shift_check) of a model.

    python scripts/fit_shift_reference.py --roots ../shared/data/cxr4 ../shared/data/db_extra \
        --per_group 200 --out docs/shift_warning/shipped            # measure: false alarms, detection
    python scripts/fit_shift_reference.py ... --write               # and store the reference in the model

Groups = <root folder>/<class folder>. Measurement: each group's images are split in half; the
reference is fitted on one half and in-source folders of 50 / 200 / 1,000 images are drawn from the
other half (random group mix; drawn with replacement where a folder is larger than the half), the
false-alarm rate being the share of those folders on which the warning fires. Detection: the same
draws of 200 images, every image shifted (cxrkit.training.shifts, level 1.0 and 0.5). --write fits on
all images and stores the reference in the checkpoint (--checkpoint) and the ONNX meta (--onnx_path's
.meta.json), where both backends read it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core import quality, shift_check  # noqa: E402
from cxrkit.core.config import CHECKPOINT_PATH, ONNX_PATH  # noqa: E402
from cxrkit.core.decode import list_images, read_gray  # noqa: E402
from cxrkit.core.model_input import lung_mask, resize_gray, to_model_input_np  # noqa: E402
from cxrkit.training.shifts import apply_shift  # noqa: E402
from script_io import add_to_model, write_result  # noqa: E402

SHIFTS = ("gamma", "contrast", "blur", "sharpen", "noise", "jpeg", "downup", "border_text", "collimation", "clahe")


def sample(roots, per_group: int, seed: int):
    rng = np.random.default_rng(seed)
    paths, groups = [], []
    for root in map(Path, roots):
        for cls in sorted(d for d in root.iterdir() if d.is_dir()):
            files = [p for p in list_images(cls) if "masks" not in p.relative_to(cls).parts]
            pick = sorted(rng.permutation(len(files))[:per_group])
            paths += [files[i] for i in pick]
            groups += [f"{root.name}/{cls.name}"] * len(pick)
    return paths, np.array(groups)


def features(backend, images, batch: int = 64) -> np.ndarray:
    """The rows shift_check compares, computed exactly as the pipeline computes them."""
    rows = []
    for s in range(0, len(images), batch):
        u8 = np.stack([resize_gray(im, backend.img_size) for im in images[s:s + batch]])
        seg, _, score = backend.forward_ood(to_model_input_np(u8))
        rows += [shift_check.feature_row(None if score is None else score[i], lung_mask(seg[i, 0]).mean(),
                                         quality.image_stats(u8[i])) for i in range(len(u8))]
    return np.array(rows)


def rate(values, groups, reference, n: int, folders: int, rng) -> float:
    fired = [shift_check.folder_check(values[idx], reference, seed=int(rng.integers(1 << 30)))["fires"]
             for idx in shift_check.mixed_draws(groups, n, folders, rng)]
    return float(np.mean(fired))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", required=True)
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--checkpoint", default=str(ROOT / CHECKPOINT_PATH))
    p.add_argument("--per_group", type=int, default=200)
    p.add_argument("--folders", type=int, default=100, help="simulated folders per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="writes <out>.json and <out>.md (the measurement)")
    p.add_argument("--write", action="store_true", help="store the reference (fitted on all images) in the model")
    p.add_argument("--no_measure", action="store_true", help="with --write: skip the measurement")
    a = p.parse_args(argv)
    from cxrkit.inference.backends import OnnxBackend
    backend = OnnxBackend(a.onnx_path)
    paths, groups = sample(a.roots, a.per_group, a.seed)
    images = [read_gray(q) for q in paths]
    values = features(backend, images)
    if not a.no_measure:
        measure(a, backend, images, values, groups)
    if a.write:
        write_reference(shift_check.make_reference(values, groups), a.checkpoint, a.onnx_path)
    return 0


def measure(a, backend, images, values, groups) -> None:
    """False alarms on in-source folders and detection of shifted ones (half the images fit, half test)."""
    rng = np.random.default_rng(a.seed)
    half = np.zeros(len(groups), bool)
    for g in sorted(set(groups)):  # sorted: a set of strings iterates in a per-process order
        m = np.flatnonzero(groups == g)
        half[rng.permutation(m)[: len(m) // 2]] = True
    ref = shift_check.make_reference(values[half], groups[half])
    rep = {"model": a.onnx_path, "roots": a.roots, "per_group": a.per_group, "groups": sorted(set(groups)),
           "n_reference": int(half.sum()), "n_eval": int((~half).sum()), "folders_per_cell": a.folders,
           "false_alarm": {}, "detection_n200": {}}
    ev_v, ev_g = values[~half], groups[~half]
    for n in (50, 200, 1000):
        rep["false_alarm"][str(n)] = rate(ev_v, ev_g, ref, n, a.folders, rng)
    ev_imgs = [images[i] for i in np.flatnonzero(~half)]
    for name in SHIFTS:
        for lv in (1.0, 0.5):
            sv = features(backend, [apply_shift(im, name, lv, seed=i) for i, im in enumerate(ev_imgs)])
            rep["detection_n200"][f"{name}@{lv:g}"] = rate(sv, ev_g, ref, 200, a.folders // 2, rng)
    md = [f"Shift warning of `{Path(a.onnx_path).name}`: reference {rep['n_reference']} images, evaluation "
          f"{rep['n_eval']} (groups {', '.join(rep['groups'])}); {a.folders} simulated folders per cell", "",
          "| in-source folder size | false-alarm rate |", "|---|---|"]
    md += [f"| {n} | {r:.3f} |" for n, r in rep["false_alarm"].items()]
    md += ["", "| shift (every image, n = 200) | detection rate |", "|---|---|"]
    md += [f"| {k} | {r:.3f} |" for k, r in rep["detection_n200"].items()]
    print("\n".join(md))
    if a.out:
        write_result(a.out, rep, md)


def write_reference(ref: dict, checkpoint, onnx_path) -> None:
    """Store the reference in the checkpoint (atomically) and in the ONNX meta file beside the model."""
    add_to_model(checkpoint, onnx_path, {"shift_reference": ref}, {"shift_reference": ref})
    print(f"wrote the shift reference ({len(ref['values'])} images) into {checkpoint} and its ONNX meta")


if __name__ == "__main__":
    sys.exit(main())
