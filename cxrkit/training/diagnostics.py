"""Studies of a trained model on a cached split: the shortcut check (lungs only / lungs removed), where
Grad-CAM looks, and the TTA comparison (model_arch.py --evaluate --shortcut_check / --tta_eval)."""
from __future__ import annotations

import numpy as np
import torch

from .data import CachedData
from .evaluate import predict_split
from ..core.gradcam import GradCamExplainer
from ..core.io_utils import write_json_atomic
from ..core.metrics import classification_metrics
from ..core.model_input import to_model_input


def shortcut_check(model, data, test_idx, classes, device, out_path, batch_size=64, amp_dtype=None,
                   ck: dict | None = None, val_idx=None) -> dict:
    """Classify the test split as is, with only the lungs kept, and with the lungs blacked out; with
    `ck` also the mean share of each image's Grad-CAM mass that lies inside its lung mask. With
    val_idx the same figures for the validation split go under "validation" (model selection reads
    those, never the test split's)."""
    res = _shortcut_figures(model, data, test_idx, classes, device, batch_size, amp_dtype, ck)
    if val_idx is not None and len(val_idx):
        res["validation"] = _shortcut_figures(model, data, val_idx, classes, device, batch_size, amp_dtype, ck)
    write_json_atomic(out_path, res)
    return res


def _shortcut_figures(model, data, idx, classes, device, batch_size, amp_dtype, ck) -> dict:
    res = {}
    for name, mode in (("original", None), ("lungs_only", "lungs_only"), ("lungs_removed", "lungs_removed")):
        r = predict_split(model, data, idx, device, batch_size, amp_dtype, input_mask=mode)
        m = classification_metrics(r["labels"], r["probs"], classes)
        res[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "confusion_matrix": m["confusion_matrix"]}
        if mode is None:
            res[name]["dice"] = r["seg"]["dice"]
    n_gt = int(data.has_mask[idx].sum())
    res["classes"] = list(classes)
    res["n_images"] = int(len(idx))
    res["mask_source"] = f"ground truth for {n_gt} images, predicted for {len(idx) - n_gt}"
    res["chance_accuracy_majority_class"] = float(np.bincount(data.labels[idx]).max() / len(idx))
    if ck is not None:
        res["cam_mass_in_lungs"] = cam_mass_in_lungs(model, ck, data, idx, device, batch_size)
    return res


def cam_mass_in_lungs(model, ck, data: CachedData, idx, device, batch_size=64) -> dict:
    """Where does the classifier look? For each image with a ground-truth lung mask: the share of its
    Grad-CAM map (predicted class, at model.bottleneck) that falls inside the mask. The lung fields'
    own share of the image is reported beside it: a model that looked everywhere alike would score that."""
    cam = GradCamExplainer(None, device=device, model_and_ck=(model, ck))
    idx = np.asarray(idx)[data.has_mask[np.asarray(idx)]]
    shares, areas = [], []
    for s in range(0, len(idx), batch_size):
        b = np.sort(idx[s:s + batch_size])
        x = to_model_input(torch.from_numpy(np.asarray(data.images[b])).to(device))
        with torch.no_grad():
            pred = cam.net(x).argmax(1).cpu().numpy()
        maps = cam(x, pred)
        m = np.asarray(data.masks[b], np.float32)
        tot = maps.sum(axis=(1, 2))
        ok = tot > 0
        shares.append(((maps * m).sum(axis=(1, 2))[ok] / tot[ok]))
        areas.append(m.mean(axis=(1, 2)))
    sh = np.concatenate(shares) if shares else np.zeros(0)
    return {"mean": float(sh.mean()) if sh.size else None, "n_images": int(sh.size),
            "lung_area_share_mean": float(np.concatenate(areas).mean()) if areas else None,
            "layer": cam.layer}


def tta_report(model, data, test_idx, classes, device, ns=(1, 4, 8), batch_size=32,
               amp_dtype=None) -> dict:
    rows = {}
    for n in ns:
        r = predict_split(model, data, test_idx, device, batch_size, amp_dtype, tta=n)
        m = classification_metrics(r["labels"], r["probs"], classes)
        rows[str(n)] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "dice": r["seg"]["dice"],
                        "ms_per_image": 1000 * r["seconds"] / len(test_idx)}
    return rows
