"""Evaluation on a cached split: predictions of a split (the per-epoch validation and every report
below use predict_split) and the test report files."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import plots
from ..core.config import LUNG_THRESHOLD
from .data import CachedData, make_loader
from ..core.io_utils import write_json_atomic
from ..core.metrics import (SegAccumulator, classification_metrics, expected_calibration_error,
                            native_resolution_dice, nll, softmax)
from ..core.model import predict
from ..core.model_input import to_model_input
from ..core.model_meta import ModelMeta
from ..core.tta import tta_predict


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
    seg_acc, labels, probs, logits_all, seg_maps, hms = SegAccumulator(), [], [], [], [], []
    t0 = time.perf_counter()
    for imgs, masks, has_mask, y in loader:
        x = to_model_input(imgs.to(device, non_blocking=True))
        m = masks.to(device).unsqueeze(1).float()
        hm = has_mask.to(device)

        def fwd(xx):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return predict(model, xx)

        if input_mask is not None:
            pred_mask = (fwd(x)[0] > LUNG_THRESHOLD).float()
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
        probs.append(p.cpu()); labels.append(y); hms.append(has_mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"labels": torch.cat(labels).numpy(), "probs": torch.cat(probs).numpy(),
           "seg": seg_acc.compute(), "seconds": time.perf_counter() - t0}
    dice = np.full(len(out["labels"]), np.nan)  # per image, NaN where there is no mask
    dice[torch.cat(hms).numpy().astype(bool)] = seg_acc.per_image()
    out["dice_per_image"] = dice
    if logits_all:
        out["logits"] = torch.cat(logits_all).numpy()
    if native_dice:
        gts = data.native_masks(indices)
        if gts is not None:
            maps = np.concatenate(seg_maps)
            keep = [k for k, g in enumerate(gts) if g is not None]
            out["seg_native"] = native_resolution_dice(maps[keep], [gts[k] for k in keep])
    return out


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


def evaluate_checkpoint(model, ck, data, te_idx, res_dir, device, amp_dtype=None, result: dict | None = None) -> dict:
    """The test report of te_idx; `result`: predict_split's output for te_idx (native_dice=True), when
    the caller already has it."""
    if len(te_idx) == 0:
        log.warning("test split is empty: no test report written")
        return {}
    r = result if result is not None else predict_split(model, data, te_idx, device, 64, amp_dtype, native_dice=True)
    t = ModelMeta.from_checkpoint(ck).temperature
    extra = {"checkpoint_epoch": ck.get("epoch", -1) + 1}
    if len(set(data.sources)) > 1:  # the loader returns te_idx's images in sorted order
        from .sources import by_source
        extra["by_source"] = by_source(data.sources, np.sort(te_idx), r["labels"], r["probs"].argmax(1),
                                       ck["class_names"])
    rep = write_test_report(res_dir, ck["class_names"], r, t, extra=extra)
    s = rep["segmentation"]
    sn = (rep.get("segmentation_native") or {}).get("dice")
    print(f"test | acc {rep['accuracy']:.4f} macro-F1 {rep['macro_f1']:.4f} Dice {s['dice'] or 0:.4f} "
          f"(at the masks' own size: {'n/a' if sn is None else f'{sn:.4f}'}) "
          f"IoU {s['iou'] or 0:.4f} | ECE {rep['calibration']['ece_before']:.4f} -> "
          f"{rep['calibration']['ece_after']:.4f} (T={t:.3f}) | report in {res_dir}",
          flush=True)
    for name, b in rep.get("by_source", {}).items():
        lo, hi = b["accuracy_ci95"]
        print(f"test | source {name}: acc {b['accuracy']:.4f} [{lo:.3f}, {hi:.3f}] on {b['images']} images", flush=True)
    return rep
