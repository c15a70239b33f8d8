#!/usr/bin/env python
"""Detection table of the out-of-distribution gate (cxrkit.core.ood) on sets built from what is reachable
here, run through the same code the inference pipeline uses (backend.forward_ood -> ood.score_views ->
ood.decide, plus ood.aspect_flags on the decoded size).

  python scripts/ood_eval.py [--onnx_path models/covid_multitask.onnx] [--data_dir ../shared/data/cxr4]
  python scripts/ood_eval.py --refit model_checkpoints/best_covid_model.pth   # refit ck["ood"] first
                                                                              # (then re-export the ONNX)
Sets:
  real X-rays: the split's test images (the threshold came from its validation images), as they are
    and mildly shifted (gamma 0.6 / 1.6, 10 % crop, 10 % black border, JPEG quality 30, blur, noise)
  non-chest: pydicom's bundled test files (CT, MR, US, NM, RT dose, secondary captures; duplicates
    removed), scikit-image and matplotlib sample pictures, random crops of them, the LFW faces in
    scikit-image, zoomed quadrants of test X-rays (one lung or shoulder only)
  transforms of test X-rays: inverted grey levels, turned 90 / 180 / 270 degrees, a 4:1 strip
Prints one row per set: n, the fraction flagged by any gate flag, and the fraction named as expected.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrkit.core import ood  # noqa: E402
from cxrkit.core.decode import read_gray_info  # noqa: E402
from cxrkit.core.model_input import resize_gray, to_model_input_np


def _dedup(arrs):
    seen, out = set(), []
    for a in arrs:
        h = hashlib.md5(resize_gray(a, 32).tobytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(a)
    return out


def dicom_images() -> list[np.ndarray]:
    import warnings

    from pydicom.data import get_testdata_files
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in get_testdata_files():
            if f.endswith(".dcm"):
                try:
                    g = read_gray_info(f)[0]
                except Exception:  # noqa: BLE001 - many test files are deliberately broken
                    continue
                if g.ndim == 2 and min(g.shape) >= 8:
                    out.append(g)
    return _dedup(out)


def picture_files() -> list[str]:
    import matplotlib
    files = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "sample_data", "*.[pj][np]g")))
    try:
        from skimage import data as skd
        d = os.path.dirname(skd.__file__)
        files += sorted(glob.glob(d + "/*.png") + glob.glob(d + "/*.jpg"))
    except ImportError:
        pass
    return files


def pictures() -> list[np.ndarray]:
    return [read_gray_info(f)[0] for f in picture_files()]


def random_crops(imgs, per=4, seed=0):
    rng, out = np.random.default_rng(seed), []
    for a in imgs:
        h, w = a.shape
        for _ in range(per):
            s = rng.uniform(0.4, 0.8)
            ch, cw = int(h * s), int(w * s)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(a[y:y + ch, x:x + cw])
    return out


def faces():
    try:
        from skimage import data as skd
    except ImportError:
        return []
    return list((np.load(os.path.join(os.path.dirname(skd.__file__), "lfw_subset.npy")) * 255).astype(np.uint8))


def xray_transforms(xrays: list[np.ndarray], seed=0) -> dict:
    """{name: (images, expected flag)} from native-resolution X-rays."""
    rng = np.random.default_rng(seed)
    t = {
        "inverted": ([255 - a for a in xrays], ood.FLAG_INVERTED),
        "turned 90": ([np.rot90(a, 1) for a in xrays], ood.FLAG_ROTATED),
        "turned 180": ([np.rot90(a, 2) for a in xrays], ood.FLAG_ROTATED),
        "turned 270": ([np.rot90(a, 3) for a in xrays], ood.FLAG_ROTATED),
        "strip 4:1": ([a[a.shape[0] // 2 - a.shape[0] // 8: a.shape[0] // 2 + a.shape[0] // 8] for a in xrays],
                      ood.FLAG_ASPECT),
        "quadrant zoom": ([a[:a.shape[0] // 2, :a.shape[1] // 2] if i % 2 else a[a.shape[0] // 2:, a.shape[1] // 2:]
                           for i, a in enumerate(xrays)], None),
    }
    shifted = {
        "gamma 0.6": [np.clip(255 * (a / 255.0) ** 0.6, 0, 255).astype(np.uint8) for a in xrays],
        "gamma 1.6": [np.clip(255 * (a / 255.0) ** 1.6, 0, 255).astype(np.uint8) for a in xrays],
        "crop 10 %": [a[a.shape[0] // 20:-(a.shape[0] // 20), a.shape[1] // 20:-(a.shape[1] // 20)] for a in xrays],
        "black border 10 %": [cv2.copyMakeBorder(a, a.shape[0] // 20, a.shape[0] // 20, a.shape[1] // 20,
                                                 a.shape[1] // 20, cv2.BORDER_CONSTANT, value=0) for a in xrays],
        "JPEG q30": [cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 30])[1], 0) for a in xrays],
        "blur sigma 1.5 px": [cv2.GaussianBlur(a, (0, 0), 1.5) for a in xrays],
        "noise sigma 8": [np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8) for a in xrays],
    }
    return t, shifted


def gate_flags(backend, gate: ood.GateSpec, imgs: list[np.ndarray], batch=32) -> tuple[list[list[str]], np.ndarray]:
    """Gate flags and scores of native-resolution grey images, as the pipeline decides them."""
    size, flags, scores = int(backend.img_size), [], []
    for s in range(0, len(imgs), batch):
        chunk = imgs[s:s + batch]
        x = to_model_input_np(np.stack([resize_gray(a, size) for a in chunk]))
        sc = backend.forward_ood(x)[2]
        views = gate.score_views(lambda xv: backend.forward_ood(xv)[2], x, sc)
        for a, v, w in zip(chunk, sc, views):
            flags.append(gate.decide(v, w) + ood.aspect_flags(a.shape))
        scores.append(sc)
    return flags, np.concatenate(scores)


def refit(checkpoint, data_dir, split_file, cache_dir):
    import torch

    from cxrkit.core.checkpoint import atomic_torch_save, model_from_checkpoint
    from cxrkit.training.data import load_data
    from cxrkit.training.split import load_or_make_split
    from cxrkit.core.ood_head import fit_ood
    model, ck = model_from_checkpoint(checkpoint)
    data = load_data(data_dir, ck["img_size"], cache_dir, 2, 0, 1, False)
    split = load_or_make_split(data, split_file)
    ck["ood"] = fit_ood(model, data, split["train"], split["val"], torch.device("cpu"))
    atomic_torch_save(ck, checkpoint)
    print(f"refitted {checkpoint}: threshold {ck['ood']['threshold']:.4f}; now re-export the ONNX model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx_path", default=str(REPO / "models" / "covid_multitask.onnx"))
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint (PyTorch backend) instead of ONNX")
    p.add_argument("--refit", metavar="CHECKPOINT", default=None, help="first refit this checkpoint's gate")
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "cxr4"))
    p.add_argument("--split_file", default=str(REPO / "model_checkpoints" / "split.json"))
    p.add_argument("--cache_dir", default=str(REPO / "cache"))
    p.add_argument("--n_xrays", type=int, default=0, help="test X-rays used (0: all)")
    p.add_argument("--ood_threshold", type=float, default=None)
    args = p.parse_args(argv)
    if args.refit:
        refit(args.refit, args.data_dir, args.split_file, args.cache_dir)
    from cxrkit.training.data import load_data
    from cxrkit.training.split import load_or_make_split
    from cxrkit.inference import OnnxBackend, TorchBackend
    backend = TorchBackend(args.checkpoint, "cpu") if args.checkpoint else OnnxBackend(args.onnx_path)
    gate = backend.meta.resolve_gate(args.ood_threshold)
    if gate is None:
        print("the model carries no out-of-distribution gate")
        return 1
    data = load_data(args.data_dir, backend.img_size, args.cache_dir, 2, 0, 1, False)
    split = load_or_make_split(data, args.split_file)
    test = split["test"][:args.n_xrays or None]
    xrays = [read_gray_info(Path(data.root) / data.paths[i])[0] for i in test]
    transforms, shifted = xray_transforms(xrays)
    pics = pictures()
    rows = [("real X-rays (test split)", xrays, None, "real"),
            *[(f"real, {k}", v, None, "real") for k, v in shifted.items()],
            ("pydicom test files (CT, MR, US, ...)", dicom_images(), ood.FLAG_NOT_CXR, "ood"),
            ("sample pictures (skimage, matplotlib)", pics, ood.FLAG_NOT_CXR, "ood"),
            ("random crops of the pictures", random_crops(pics), ood.FLAG_NOT_CXR, "ood"),
            ("faces (LFW subset, skimage)", faces(), ood.FLAG_NOT_CXR, "ood"),
            *[(f"X-ray {k}", v, want, "ood") for k, (v, want) in transforms.items()]]
    print(f"gate: threshold {gate.threshold:.4f} ({gate.rule or gate.source}); backend {backend.name}")
    print(f"| set | n | flagged (any gate flag) | named as expected | median ood_score |")
    print("|---|---|---|---|---|")
    for name, imgs, want, kind in rows:
        if not imgs:
            print(f"| {name} | 0 | - | - | - |")
            continue
        flags, sc = gate_flags(backend, gate, imgs)
        flagged = np.mean([bool(f) for f in flags])
        named = "-" if want is None else f"{np.mean([want in f for f in flags]):.3f}"
        print(f"| {name} | {len(imgs)} | {flagged:.3f} | {named} | {np.median(sc):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
