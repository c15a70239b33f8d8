"""Evaluation on a cached split: metrics, test report files, TTA comparison and the shortcut check."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import plots
from .calibration import fit_temperature
from .data import CachedData, make_loader
from .io_utils import write_json_atomic
from .metrics import (SegAccumulator, classification_metrics, expected_calibration_error, native_resolution_dice, nll,
                      softmax)
from .model import predict
from .preprocess import to_model_input
from .tta import tta_predict


log = logging.getLogger("cxrkit")


@torch.no_grad()
def predict_split(model, data: CachedData, indices, device, batch_size=64, amp_dtype=None, tta=1,
                  input_mask: str | None = None, workers=0, native_dice: bool = False) -> dict:
    """Run the model over cached images. Returns logits-space results:
    {"labels", "probs" (uncalibrated softmax, TTA-averaged), "logits" (tta=1 only), "seg": {...},
     "seconds"}. input_mask: None, "lungs_only" (zero outside the lung mask) or "lungs_removed";
    the ground-truth mask is used where there is one, else the model's own predicted mask.
    native_dice: also score Dice / IoU at each mask file's own resolution ("seg_native"), when the data
    folder is reachable (a carried cache folder has no mask files)."""
    model.eval()
    loader = make_loader(data, indices, batch_size, shuffle=False, workers=workers)
    seg_acc, labels, probs, logits_all, seg_maps = SegAccumulator(), [], [], [], []
    t0 = time.perf_counter()
    for imgs, masks, has_mask, y in loader:
        x = to_model_input(imgs.to(device, non_blocking=True))
        m = masks.to(device).unsqueeze(1).float()
        hm = has_mask.to(device)

        def fwd(xx):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return predict(model, xx)

        if input_mask is not None:
            pred_mask = (fwd(x)[0] > 0.5).float()
            lung = torch.where(hm.view(-1, 1, 1, 1), m, pred_mask)
            x = x * lung if input_mask == "lungs_only" else x * (1 - lung)
        if tta == 1:
            seg_p, lg = fwd(x)
            logits_all.append(lg.cpu())
            p = torch.softmax(lg, 1)
        else:
            seg_p, p = tta_predict(fwd, x, tta)
        seg_logit = torch.logit(seg_p.clamp(1e-6, 1 - 1e-6))
        seg_acc.update(seg_logit, m, hm)
        if native_dice:
            seg_maps.append(seg_p[:, 0].float().cpu().numpy())
        probs.append(p.cpu()); labels.append(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"labels": torch.cat(labels).numpy(), "probs": torch.cat(probs).numpy(),
           "seg": seg_acc.compute(), "seconds": time.perf_counter() - t0}
    if logits_all:
        out["logits"] = torch.cat(logits_all).numpy()
    if native_dice:
        gts = data.native_masks(indices)
        if gts is not None:
            maps = np.concatenate(seg_maps)
            keep = [k for k, g in enumerate(gts) if g is not None]
            out["seg_native"] = native_resolution_dice(maps[keep], [gts[k] for k in keep])
    return out


MIN_CALIBRATION_IMAGES = 50  # below this a fitted temperature is mostly noise (often a clamp value)


def calibrate(model, data, val_idx, device, batch_size=64, amp_dtype=None) -> float:
    if len(val_idx) < MIN_CALIBRATION_IMAGES:
        log.warning("only %d validation images: too few to fit a temperature, left at T = 1 (uncalibrated)",
                    len(val_idx))
        return 1.0
    if len(val_idx) < 200:
        log.warning("temperature fitted on only %d validation images: treat the calibration as rough", len(val_idx))
    r = predict_split(model, data, val_idx, device, batch_size, amp_dtype)
    return fit_temperature(r["logits"], r["labels"])


def write_test_report(out_dir, classes, result: dict, temperature: float = 1.0, extra: dict | None = None) -> dict:
    """classification_report.json, confusion_matrix_test.png, roc_curves_test.png,
    reliability_test.png (ECE before / after temperature scaling)."""
    out_dir = Path(out_dir)
    y = result["labels"]
    raw = softmax(result["logits"]) if "logits" in result else result["probs"]
    cal = softmax(result["logits"], temperature) if "logits" in result else raw
    rep = classification_metrics(y, cal, classes)
    ece_b, bins_b = expected_calibration_error(y, raw)
    ece_a, bins_a = expected_calibration_error(y, cal)
    rep["segmentation"] = dict(result["seg"], resolution="model input")
    if result.get("seg_native"):
        rep["segmentation_native"] = dict(result["seg_native"], resolution="each mask file's own size")
    rep["calibration"] = {"temperature": temperature, "ece_before": ece_b, "ece_after": ece_a,
                          "nll_before": nll(y, raw), "nll_after": nll(y, cal), "n_bins": 15}
    rep["n_images"] = int(len(y))
    rep["classes"] = list(classes)
    if extra:
        rep.update(extra)
    write_json_atomic(out_dir / "classification_report.json", rep)
    plots.confusion_matrix_plot(rep["confusion_matrix"], classes, out_dir / "confusion_matrix_test.png")
    plots.roc_curves_plot(y, cal, classes, out_dir / "roc_curves_test.png")
    plots.reliability_plot(bins_b, ece_b, bins_a, ece_a, temperature, out_dir / "reliability_test.png")
    return rep


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
    from .inference import GradCamExplainer
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
