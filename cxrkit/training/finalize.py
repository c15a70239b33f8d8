"""Post-training finishing of the best checkpoint: prior correction, temperature, the lung-area range
and the out-of-distribution gate, stored in it; then its test report (and, for fold runs, the
out-of-fold predictions)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .calibration import apply_prior_correction, fit_temperature
from .evaluate import evaluate_checkpoint, predict_split
from ..core.checkpoint import atomic_torch_save, model_from_checkpoint
from ..core.ood_head import fit_ood
from ..core.quality import lung_area_range  # stored in the checkpoint: inference flags predicted lung areas against it

log = logging.getLogger("cxrkit")


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


def finalize(best_path, data, tr_idx, va_idx, te_idx, res_dir, device, amp_dtype, prior_correction=True,
             oof=False) -> dict:
    """Prior-correct and temperature-calibrate the best checkpoint on validation, fit its
    out-of-distribution gate, store all three in it (atomically), then evaluate it on the test split.
    oof (k-fold runs): also write the held-out fold's predictions (plain, 4-view TTA, lungs only) for
    cxrkit.training.cv to pool."""
    model, ck = model_from_checkpoint(best_path, map_location="cpu")
    if prior_correction:
        apply_prior_correction(model, ck, data.labels[tr_idx])
    model.to(device)
    t = calibrate(model, data, va_idx, device, 64, amp_dtype)
    ck["temperature"] = t
    ck["lung_area_range"] = lung_area_range(data.masks, data.has_mask, tr_idx)
    # the out-of-distribution gate: statistics from the training images, threshold from validation
    # (cxrkit.core.ood_head; None, and no gate, with fewer than 50 validation images)
    ck["ood"] = fit_ood(model, data, tr_idx, va_idx, device)
    # which inputs a later run should not score as a test (cxrkit.core.fingerprint)
    from ..core.fingerprint import hashes, pack
    ck["training_hashes"] = pack(hashes(data.images[np.sort(np.asarray(tr_idx))]))
    atomic_torch_save(ck, best_path)
    if not (oof and len(te_idx)):
        return evaluate_checkpoint(model, ck, data, te_idx, res_dir, device, amp_dtype)
    from .cv import OOF_FILE, write_oof
    idx = np.sort(te_idx)
    r = predict_split(model, data, idx, device, 64, amp_dtype, native_dice=True)  # the test report's too
    rep = evaluate_checkpoint(model, ck, data, idx, res_dir, device, amp_dtype, result=r)
    tta = predict_split(model, data, idx, device, 64, amp_dtype, tta=4)["probs"]
    lungs = predict_split(model, data, idx, device, 64, amp_dtype, input_mask="lungs_only")["probs"]
    write_oof(Path(res_dir) / OOF_FILE, data, idx, r, tta, lungs)
    return rep
