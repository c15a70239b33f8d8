#!/usr/bin/env python
"""Robustness curves under scanner-like shifts (cxrkit.training.shifts) of real, labelled X-rays:
accuracy (Wilson 95% interval), macro-F1 over the classes present, per-class recall, ECE of the
calibrated probabilities, and the share the out-of-distribution gate sets aside, per shift and level.

    python scripts/robustness.py --data_dir ../shared/data/db_extra --per_class 300 \
        --out docs/robustness/shipped_db_extra

--onnx_path (default: the shipped model) or --checkpoint (a .pth, PyTorch backend). Only images the
model never trained on give an honest figure: for the shipped model that is db_extra (its members
trained on all of cxr4). Prints a markdown table and writes <out>.json and <out>.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core.config import ONNX_PATH  # noqa: E402
from cxrkit.core.decode import list_images, read_gray  # noqa: E402
from cxrkit.core.metrics import classification_metrics, expected_calibration_error, softmax, wilson_interval  # noqa: E402
from cxrkit.core.model_input import resize_gray, to_model_input_np  # noqa: E402
from cxrkit.training.shifts import SHIFTS, apply_shift  # noqa: E402
from script_io import write_result  # noqa: E402


def labelled_images(data_dir, class_names, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for c in class_names:
        folder = Path(data_dir) / c
        if not folder.is_dir():
            continue
        files = [p for p in list_images(folder) if "masks" not in p.parts]
        pick = rng.permutation(len(files))[:per_class] if per_class else range(len(files))
        paths += [files[i] for i in sorted(pick)]
        labels += [class_names.index(c)] * len(pick)
    return paths, np.array(labels)


def predict(backend, images, size: int, batch: int = 64):
    """Calibrated probabilities and gate scores of 8-bit grey images (any size)."""
    probs, scores = [], []
    for s in range(0, len(images), batch):
        x = to_model_input_np(np.stack([resize_gray(im, size) for im in images[s:s + batch]]))
        _, logits, score = backend.forward_ood(x)
        probs.append(softmax(logits, backend.temperature))
        scores.append(np.full(len(x), np.nan) if score is None else np.asarray(score, np.float64))
    return np.concatenate(probs), np.concatenate(scores)


def figures(labels, probs, scores, threshold, class_names) -> dict:
    present = sorted(set(labels.tolist()))
    pred = probs.argmax(1)
    k, n = int((pred == labels).sum()), len(labels)
    m = classification_metrics(labels, probs, class_names)
    ece, _ = expected_calibration_error(labels, probs)
    recall = {class_names[c]: float((pred[labels == c] == c).mean()) for c in present}
    f1 = float(np.mean([m["per_class"][class_names[c]]["f1"] for c in present]))
    return {"n": n, "accuracy": k / n, "accuracy_ci95": list(wilson_interval(k, n)), "macro_f1_present": f1,
            "recall": recall, "ece": float(ece), "mean_confidence": float(probs.max(1).mean()),
            "gated": None if threshold is None else float(np.mean(scores > threshold)),
            "predicted": {c: int((pred == j).sum()) for j, c in enumerate(class_names)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--checkpoint", default=None, help="a .pth instead of --onnx_path (PyTorch backend)")
    p.add_argument("--per_class", type=int, default=300, help="images per class folder (0 = all)")
    p.add_argument("--levels", default="0.5,1.0")
    p.add_argument("--shifts", default=",".join(SHIFTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    a = p.parse_args(argv)
    from cxrkit.inference.backends import OnnxBackend, TorchBackend
    backend = TorchBackend(a.checkpoint, "cpu") if a.checkpoint else OnnxBackend(a.onnx_path)
    names, size = list(backend.class_names), backend.img_size
    # the threshold a run uses; None: the model has no gate
    threshold = backend.meta.resolve_gate(None).threshold if backend.meta.gate is not None else None
    paths, labels = labelled_images(a.data_dir, names, a.per_class, a.seed)
    originals = [read_gray(q) for q in paths]
    rows = {"none": figures(labels, *predict(backend, originals, size), threshold, names)}
    for name in a.shifts.split(","):
        for lv in (float(v) for v in a.levels.split(",")):
            shifted = [apply_shift(im, name, lv, seed=a.seed + i) for i, im in enumerate(originals)]
            rows[f"{name}@{lv:g}"] = figures(labels, *predict(backend, shifted, size), threshold, names)
    rep = {"model": str(a.checkpoint or a.onnx_path), "data_dir": str(a.data_dir), "per_class": a.per_class,
           "seed": a.seed, "class_names": names, "gate_threshold": threshold, "rows": rows,
           "note": "images decoded at their stored size (256 px here), shifted, then resized to the model's input"}
    lines = [f"Model `{Path(rep['model']).name}` on `{a.data_dir}` ({len(labels)} images; "
             f"{', '.join(f'{names[c]} {int((labels == c).sum())}' for c in sorted(set(labels.tolist())))})", "",
             "| shift | accuracy [95% CI] | " + " | ".join(f"recall {names[c]}" for c in sorted(set(labels.tolist())))
             + " | ECE | mean conf. | gated |", "|---|---|" + "---|" * (len(set(labels.tolist())) + 3)]
    for k, r in rows.items():
        lo, hi = r["accuracy_ci95"]
        lines.append(f"| {k} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     + " | ".join(f"{v:.3f}" for v in r["recall"].values())
                     + f" | {r['ece']:.3f} | {r['mean_confidence']:.3f} | "
                     + ("-" if r["gated"] is None else f"{r['gated']:.3f}") + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_result(a.out, rep, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
