"""summary.json of an inference run (build_summary), and its classification block, which cxrkit.inference.shard's
merge recomputes from the shards' CSV rows (classification_summary)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import ood, quality, shift_check
from ..core.config import DISCLAIMER, LUNG_THRESHOLD


def classification_summary(y_true, y_probs, names, flagged=None, gated=None, seen=None,
                           include_seen: bool = False) -> dict | None:
    """summary.json's "classification" (also cxrkit.inference.shard's merge): metrics, n_labelled and 95%
    intervals over the JUDGED labelled images (`gated`: a bool per image, not judged by the gate; those
    are left out and counted, with the all-images figures beside them for reference), and with `flagged`
    (a bool per image: any quality flag) the same figures over the unflagged images. None when no
    labelled image was judged. `seen`: a bool per image, one the model trained on (core.fingerprint): left
    out and counted too (n_in_training_left_out), unless include_seen."""
    from ..core.metrics import classification_metrics, confidence_intervals
    y_true, y_probs = np.asarray(y_true, np.int64), np.asarray(y_probs, np.float64)
    judged = ~np.asarray(gated, bool) if gated is not None else np.ones(len(y_true), bool)
    unseen = ~np.asarray(seen, bool) if seen is not None and not include_seen else np.ones(len(y_true), bool)
    n_seen_out = int((judged & ~unseen).sum())
    judged &= unseen
    if not judged.any():
        return None
    m = classification_metrics(y_true[judged], y_probs[judged], names)
    m["n_labelled"] = int(judged.sum())
    m.update(confidence_intervals(y_true[judged], y_probs[judged].argmax(1), len(names)))
    if n_seen_out:
        m["n_in_training_left_out"] = n_seen_out
    if not judged.all() and (~judged).sum() > n_seen_out:
        ma = classification_metrics(y_true, y_probs, names)
        m["n_not_judged_left_out"] = int((~judged).sum()) - n_seen_out
        m["including_not_judged"] = {"n": len(y_true), "accuracy": ma["accuracy"], "macro_f1": ma["macro_f1"],
                                     "note": "every labelled image, the not-judged ones scored by their model "
                                             "output (not a prediction): for reference only"}
    if flagged is not None:
        keep = ~np.asarray(flagged, bool)
        m["unflagged"] = {"n": int(keep.sum()), "note": "the same figures over images with no quality flag"}
        if keep.any():
            mu = classification_metrics(y_true[keep], y_probs[keep], names)
            m["unflagged"].update(accuracy=mu["accuracy"], macro_f1=mu["macro_f1"])
    return m


def classification_from_rows(rows, names, include_seen: bool = False) -> dict | None:
    """classification_summary of predictions.csv rows (a run's and a merge's: the CSV alone reproduces every
    figure): the labelled rows, their flags, and whether they are gated or were trained on."""
    from ..core.fingerprint import row_in_training
    labelled = [r for r in rows if r.get("true_class")]
    if not labelled:
        return None
    flags = [r.get("quality_flags") for r in labelled]
    return classification_summary([names.index(r["true_class"]) for r in labelled],
                                  [[float(r[f"prob_{c}"]) for c in names] for r in labelled], names,
                                  [bool(f) for f in flags], [ood.not_judged(f) for f in flags],
                                  [row_in_training(f) for f in flags], include_seen)


CSV_NOTES = {"prob_<class>": "calibrated class probabilities, model class order",
             "predicted_class/confidence": "the class and its probability; EMPTY for an image not judged (a gate "
                                           "flag in quality_flags: not_chest_xray, inverted, rotated, "
                                           "extreme_aspect, lateral_view)",
             "unjudged_model_class/unjudged_model_confidence": "a not-judged image's model output, NOT to be read "
                                                               "as a prediction (empty for judged images)",
             "StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID/ViewPosition/PatientAge":
                 "copied from a DICOM input's header (empty for other files), to key results back to PACS",
             "lung_area_fraction": f"fraction of model-input pixels with lung probability > {LUNG_THRESHOLD}",
             "true_class/correct": "from the folder name when it is a model class (correct: 1/0), else empty",
             "dice/iou": f"vs the ground-truth mask (masks/ folder) at {LUNG_THRESHOLD}, at the mask's own "
                         "resolution, when there is one",
             "quality_flags": "empty when all is well, else ';'-joined codes (see quality)",
             "ood_score": "out-of-distribution score (cxrkit.core.ood); above quality.ood.threshold the "
                          "image is not judged; empty when the model has no gate"}


def predicted_counts(rows, names) -> dict:
    """summary.json's predicted_counts (judged images only) and n_not_judged (a run's and a merge's)."""
    return {"predicted_counts": {c: int(sum(r["predicted_class"] == c for r in rows)) for c in names},
            "n_not_judged": int(sum(ood.not_judged(r.get("quality_flags")) for r in rows))}


def model_block(backend, n_inputs: int, n_processed: int, skipped: list) -> dict:
    """The head of every summary.json, a run's or an empty shard's: counts and the model."""
    problem = backend.calibration_problem
    return {"n_inputs": n_inputs, "n_processed": n_processed, "n_skipped": len(skipped), "skipped": skipped,
            "backend": backend.name, "backend_info": backend.describe(),
            "class_names": list(backend.class_names), "img_size": int(backend.img_size),
            "calibrated": problem is None, "temperature": float(backend.temperature),
            **({"calibration_problem": f"the model: {problem}"} if problem else {})}


def empty_shard_summary(backend, extra: dict) -> dict:
    """summary.json of a shard that got no inputs (the merge accepts it)."""
    return {**model_block(backend, 0, 0, []), "empty_shard": True, "note": DISCLAIMER, **extra}


def build_summary(backend, items, tally, opts, seconds: float) -> dict:
    """summary.json: counts, skips, throughput, quality flags, and metrics where ground truth exists.
    tally: the run's pipeline._Tally; opts: its PipelineOptions (workers resolved)."""
    rows, n_done = tally.rows, tally.n_done
    summary = {
        **model_block(backend, len(items), n_done, tally.skipped),
        "calibration": "probabilities in predictions.csv = softmax(logits / temperature), averaged over TTA views",
        "tta": int(opts.tta), "batch_size": int(opts.batch_size), "decode_workers": opts.workers, "decode": opts.decode,
        "throughput": {"seconds": seconds, "images_per_second": n_done / seconds if seconds > 0 else None,
                       "model_seconds": tally.model_seconds, "stage_seconds": tally.stage_seconds(),
                       "note": "seconds = wall clock of the whole pipeline (decode, model, overlays, files); "
                               "model_seconds = time in the backend incl. TTA; stage_seconds = time summed over "
                               "the threads doing each stage (decode: file to 8-bit grey; preprocess: resize, "
                               "display image, statistics; write: overlays, thumbnails, masks, DICOM SEG), which "
                               "overlap, so they do not add up to seconds"},
        **predicted_counts(rows, tally.names),
        "csv_notes": CSV_NOTES, "quality": _quality(tally), "shift_check": tally.shift_block, "notes": tally.input_notes,
        "classification": None, "segmentation": None, "gradcam": _gradcam(opts),
        "outputs": {"csv": "predictions.csv", "annotated": "annotated/" if tally.annotate else None,
                    "masks": "masks/ (0/255 PNG at the original image resolution)" if opts.save_masks else None,
                    "cams": "cams/" if opts.save_cams else None},
        "note": DISCLAIMER,
    }
    if tally.mask_problems:
        summary["mask_problems"] = tally.mask_problems
    summary["classification"] = classification_from_rows(rows, tally.names, tally.include_training_images)
    summary["provenance"] = provenance(backend.model_file)
    summary["in_training_set"] = in_training_block(rows, tally.train_hashes is not None, tally.include_training_images)
    if tally.dices:
        summary["segmentation"] = _segmentation(tally)
    if opts.extra_summary:
        summary.update(opts.extra_summary)
    summary["outputs"]["report"] = "report.html (thumbnails in thumbs/)" if opts.report else None
    return summary


def provenance(model_file) -> dict:
    """Who made these outputs: cxrkit's version, the model file and its SHA-256, the command line, the date."""
    import datetime
    import sys
    from .. import __version__
    from ..core.io_utils import model_sha256
    try:
        sha = model_sha256(model_file)
    except OSError:
        sha = None
    return {"cxrkit_version": __version__, "model_file": str(model_file), "model_sha256": sha,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def in_training_block(rows, checked: bool, included: bool) -> dict:
    """summary.json's in_training_set: how many inputs the model trained on (a run's and a merge's)."""
    from ..core.fingerprint import row_in_training
    n = int(sum(row_in_training(r.get("quality_flags")) for r in rows))
    return {"checked": checked, "n": n, "of": len(rows), "in_metrics": bool(included),
            "note": ("inputs whose perceptual hash matches one of the model's training images (flag in_training_set); "
                     + ("counted in the metrics (--include_training_images)" if included else
                        "left out of the metrics: a figure on training images is not a test"))
            if checked else "the model carries no training-image hashes: not checked"}


def in_training_line(block: dict | None) -> str | None:
    """The console's and the report's sentence; None when no input matched."""
    if not block or not block.get("n"):
        return None
    return (f"{block['n']} of {block['of']} inputs were in the model's training set ("
            + ("counted in the metrics)" if block.get("in_metrics") else
               "left out of the metrics; --include_training_images counts them)"))


def _quality(tally) -> dict:
    rows, gate = tally.rows, tally.gate  # gate: the resolved GateSpec, None: no gate
    return {"n_flagged": int(sum(bool(r["quality_flags"]) for r in rows)), "counts": tally.flag_counts,
            "n_not_judged": int(sum(ood.not_judged(r["quality_flags"]) for r in rows)),
            "meaning": {**quality.FLAG_MEANING, **ood.OOD_FLAG_MEANING, **shift_check.FLAG_MEANING},
            "thresholds": {**quality.thresholds(tally.area_rng),
                           ood.FLAG_ASPECT: f"longer side > {ood.EXTREME_ASPECT:g} x shorter (decoded image)",
                           **({ood.FLAG_NOT_CXR: f"ood_score > {gate.threshold:.4g} ({gate.source})"}
                              if gate is not None else {})},
            "lung_area_range": tally.area_rng,
            "ood": gate.to_dict() if gate is not None else {
                "note": "the model carries no out-of-distribution gate: not_chest_xray, inverted and rotated "
                        "are not checked"},
            "note": "flagged images got an answer the model cannot back: check them by eye; not judged "
                    "= not_chest_xray, inverted, rotated, extreme_aspect or lateral_view: no "
                    "predicted_class nor confidence, not in predicted_counts (the model's output: the "
                    "unjudged_model_* columns)"}


def _gradcam(opts) -> dict | None:
    cam = opts.cam
    return None if cam is None else {
        "target": opts.cam_class or "predicted class", "layer": cam.layer, "method": "monai.visualize.GradCAM",
        "checkpoint_mismatch": cam.mismatch,
        "maps_saved": bool(opts.save_cams), "input": "the un-augmented image (also with --tta)",
        "map_format": "float32 .npy (S x S, model input size), raw ReLU'd Grad-CAM (not normalised); the "
                      "annotated PNG shows it min-max normalised per image"}


def _segmentation(tally) -> dict:
    return {"mean_dice": float(np.mean(tally.dices)), "mean_iou": float(np.mean(tally.ious)),
            "n_masks": len(tally.dices), "threshold": LUNG_THRESHOLD,
            "resolution": "each ground-truth mask's own size (lung probabilities resized bilinearly to it, then "
                          "thresholded)",
            "mean_dice_model_input": float(np.mean(tally.dices_model)),
            "model_input_resolution": f"{tally.size}x{tally.size}"}
