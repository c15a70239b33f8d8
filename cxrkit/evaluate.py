"""Evaluation on a cached split: metrics, test report files, TTA comparison and the shortcut check."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import plots
from .calibration import apply_prior_correction, fit_temperature
from .checkpoint import atomic_torch_save, model_from_checkpoint
from .config import LUNG_THRESHOLD
from .data import CachedData, make_loader
from .io_utils import write_json_atomic
from .metrics import (SegAccumulator, classification_metrics, expected_calibration_error, native_resolution_dice, nll,
                      softmax)
from .model import predict
from .ood_head import fit_ood
from .preprocess import to_model_input
from .quality import lung_area_range  # stored in the checkpoint: inference flags predicted lung areas against it
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


def finalize(best_path, data, tr_idx, va_idx, te_idx, res_dir, device, amp_dtype, prior_correction=True,
             oof=False) -> dict:
    """Prior-correct and temperature-calibrate the best checkpoint on validation, fit its
    out-of-distribution gate, store all three in it (atomically), then evaluate it on the test split.
    oof (k-fold runs): also write the held-out fold's predictions (plain, 4-view TTA, lungs only) for
    cxrkit.cv to pool."""
    model, ck = model_from_checkpoint(best_path, map_location="cpu")
    if prior_correction:
        apply_prior_correction(model, ck, data.labels[tr_idx])
    model.to(device)
    t = calibrate(model, data, va_idx, device, 64, amp_dtype)
    ck["temperature"] = t
    ck["lung_area_range"] = lung_area_range(data.masks, data.has_mask, tr_idx)
    # the out-of-distribution gate: statistics from the training images, threshold from validation
    # (cxrkit.ood_head; None, and no gate, with fewer than 50 validation images)
    ck["ood"] = fit_ood(model, data, tr_idx, va_idx, device)
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


def evaluate_checkpoint(model, ck, data, te_idx, res_dir, device, amp_dtype=None, result: dict | None = None) -> dict:
    """The test report of te_idx; `result`: predict_split's output for te_idx (native_dice=True), when
    the caller already has it."""
    if len(te_idx) == 0:
        log.warning("test split is empty: no test report written")
        return {}
    r = result if result is not None else predict_split(model, data, te_idx, device, 64, amp_dtype, native_dice=True)
    rep = write_test_report(res_dir, ck["class_names"], r, ck.get("temperature", 1.0),
                            extra={"checkpoint_epoch": ck.get("epoch", -1) + 1})
    s = rep["segmentation"]
    sn = (rep.get("segmentation_native") or {}).get("dice")
    print(f"test | acc {rep['accuracy']:.4f} macro-F1 {rep['macro_f1']:.4f} Dice {s['dice'] or 0:.4f} "
          f"(at the masks' own size: {'n/a' if sn is None else f'{sn:.4f}'}) "
          f"IoU {s['iou'] or 0:.4f} | ECE {rep['calibration']['ece_before']:.4f} -> "
          f"{rep['calibration']['ece_after']:.4f} (T={ck.get('temperature', 1.0):.3f}) | report in {res_dir}",
          flush=True)
    return rep


def evaluate_from_args(args) -> None:
    """model_arch.py --evaluate: score a checkpoint on the test split of its split file (optionally
    after --calibrate), write test_results/ and test_report/, and the --shortcut_check / --tta_eval
    reports. args: model_arch.py's argparse Namespace."""
    import json

    from .data import load_data
    from .split import load_or_make_split
    from .device import amp_dtype_for, pick_device
    from .errors import DataError, UsageError
    from .tta import MAX_TTA
    try:
        tta_ns = [int(n) for n in args.tta_eval.split(",") if n.strip()]
    except ValueError:
        raise UsageError(f"--tta_eval {args.tta_eval!r}: give comma-separated view counts, e.g. 1,4,8") from None
    if any(not 1 <= n <= MAX_TTA for n in tta_ns):
        raise UsageError(f"--tta_eval {args.tta_eval!r}: each view count must be between 1 and {MAX_TTA}")
    device = pick_device(args.device)
    model, ck = model_from_checkpoint(args.evaluate)
    model.to(device)
    out = Path(args.output_dir)
    data = load_data(args.data_dir, ck["img_size"], Path(args.cache_dir or out / "cache"), args.workers, 0, 1,
                     not args.quiet)
    if data.classes != ck["class_names"]:
        raise DataError(f"{args.data_dir} has classes {data.classes} but {args.evaluate} was trained on "
                        f"{ck['class_names']}; point --data_dir at matching class folders")
    split_p = Path(args.split_file) if args.split_file else out / "split.json"
    if not split_p.is_file():
        log.warning("%s not found: making a new split with --seed %d (it only matches the training split "
                    "if the checkpoint was trained on this data with this seed)", split_p, args.seed)
    split = load_or_make_split(data, split_p, args.val_frac, args.test_frac, args.seed, args.dup_threshold)
    amp = amp_dtype_for(device, args.amp)
    res_dir = out / "test_results"
    if args.calibrate:
        finalize(args.evaluate, data, split["train"], split["val"], split["test"], res_dir, device, amp,
                 args.prior_correction)
        model, ck = model_from_checkpoint(args.evaluate)
        model.to(device)
    else:
        evaluate_checkpoint(model, ck, data, split["test"], res_dir, device, amp)
    if not args.no_report:
        # <output_dir>/test_report/report.html, beside test_results/
        write_split_report(args.evaluate, data, split["test"], out / "test_report", device,
                           progress=not args.quiet, extra_inputs={"split_file": str(split_p)})
    if (args.shortcut_check or tta_ns) and len(split["test"]) == 0:
        log.warning("the test split is empty: no shortcut check or TTA report")
        return
    if args.shortcut_check:
        r = shortcut_check(model, data, split["test"], ck["class_names"], device, res_dir / "shortcut_check.json",
                           amp_dtype=amp, ck=ck, val_idx=split["val"])
        print("shortcut check (test) accuracy | " + " | ".join(f"{k} {r[k]['accuracy']:.4f}"
                                                                for k in ("original", "lungs_only", "lungs_removed"))
              + f" | Grad-CAM mass in lungs {r['cam_mass_in_lungs']['mean']:.3f} (lung area "
                f"{r['cam_mass_in_lungs']['lung_area_share_mean']:.3f})")
    if tta_ns:
        rows = tta_report(model, data, split["test"], ck["class_names"], device, tta_ns, amp_dtype=amp)
        write_json_atomic(res_dir / "tta_report.json", {"device": str(device), "rows": rows})
        print(json.dumps(rows, indent=1))


# ------------------------------------------------------- model_arch.py --evaluate: test_report/
def write_split_report(checkpoint, data, indices, save_dir, device=None, *, split_name: str = "test",
                       batch_size: int = 16, workers: int | None = None, progress: bool = True,
                       extra_inputs: dict | None = None) -> dict | None:
    """The inference pipeline (PyTorch backend) over one split of a cached data set, from its
    original image files: annotated/, thumbs/, predictions.csv, summary.json and report.html in
    save_dir, exactly as the inference CLIs write them. `data`: a cxrkit.data.CachedData; returns
    the summary, or None (with a warning) when the split is empty or its files are not reachable
    (a prebuilt cache folder given as --data_dir holds no image files)."""
    from .inference import InputItem, PipelineOptions, TorchBackend, assign_output_stems, run_pipeline
    from .preprocess import mask_for_image
    from .report import REPORT_NAME
    idx = [int(i) for i in np.asarray(indices).ravel()]
    if not idx:
        log.warning("the %s split is empty: no report", split_name)
        return None
    root = Path(data.root) if getattr(data, "root", "") else None
    items = []
    for i in idx:
        p = (root / data.paths[i]) if root is not None else Path(data.paths[i])
        items.append(InputItem(path=p, rel=str(data.paths[i]), true_class=data.classes[int(data.labels[i])],
                               mask_path=mask_for_image(p) if p.is_file() else None))
    if not any(it.path.is_file() for it in items):
        log.warning("no %s report: its image files are not under %s (a prebuilt cache folder holds none); "
                    "pass the data folder as --data_dir", split_name, root)
        return None
    assign_output_stems(items)
    backend = TorchBackend(checkpoint, None if device is None else str(device))
    # the folder belongs to this evaluation (like test_results/): a re-run replaces the last one's files
    inputs = {"split": split_name, "data_dir": str(root), "n_images": len(items), **(extra_inputs or {})}
    summary = run_pipeline(backend, items, save_dir, PipelineOptions(
        batch_size=batch_size, workers=workers, progress=progress, extra_summary={"inputs": inputs}, overwrite=True))
    print(f"{split_name} report: {Path(save_dir) / REPORT_NAME}", flush=True)
    return summary
