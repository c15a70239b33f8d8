"""run_pipeline: decode threads -> model -> writer thread; CSV, summary.json, report."""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import LUNG_THRESHOLD
from ..errors import InferenceError, os_error
from ..io_utils import MAX_BATCH_SIZE, write_json_atomic
from .. import ood, quality
from ..outdir import claim_save_dir
from ..preprocess import (ImageReadError, lung_mask, read_gray_info, read_mask, resize_gray, resize_mask,
                          to_model_input_np)
from ..tta import MAX_TTA, tta_predict
from .gradcam import GradCamExplainer
from .inputs import InputItem, assign_output_stems
from .render import DISCLAIMER, _Writer, display_image, render_annotation, write_csv_atomic, write_npy, write_png

log = logging.getLogger("cxrkit")


# -------------------------------------------------------------------------------------- pipeline
@dataclass
class _Decoded:
    item: InputItem
    model_u8: np.ndarray | None = None
    display: np.ndarray | None = None
    orig_shape: tuple = ()
    gt_mask: np.ndarray | None = None
    error: str | None = None
    mask_error: str | None = None
    notes: tuple = ()              # what of the file was not used (later TIFF pages / DICOM frames)
    stats: dict | None = None      # cxrkit.quality.image_stats of model_u8
    flags: tuple = ()              # quality flag codes (set once the model has run)


def _decode(item: InputItem, size: int, display_h: int) -> _Decoded:
    try:
        g, notes = read_gray_info(item.path)
    except ImageReadError as e:
        return _Decoded(item, error=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad file never stops the run
        return _Decoded(item, error=f"{type(e).__name__}: {e}")
    d = _Decoded(item, model_u8=resize_gray(g, size), display=display_image(g, display_h) if display_h else None,
                 orig_shape=g.shape[:2])
    d.notes, d.stats = tuple(notes), quality.image_stats(d.model_u8)
    if item.mask_path is not None:
        try:
            d.gt_mask = read_mask(item.mask_path)  # native resolution: Dice is scored at the mask's own size
        except ImageReadError as e:
            d.mask_error = e.reason
        if d.gt_mask is not None and not d.gt_mask.any():  # Dice would be 0 whatever the model does
            d.gt_mask, d.mask_error = None, "empty mask (no lung pixels): Dice / IoU not scored for this image"
    return d


def planned_outputs(items, save_masks=False, save_cams=False, report=False, annotate=True) -> list[str]:
    """Every file a run will write (relative to save_dir), for the manifest (cxrkit.outdir)."""
    from ..report import GALLERY_CAP, REPORT_NAME, gallery_thumb_relpath, thumb_relpath
    out = ["predictions.csv", "summary.json"] + ([REPORT_NAME] if report else [])
    if report and not annotate:  # bulk mode: thumbnails only for the gallery's rows (write_gallery_thumbnails)
        out += [gallery_thumb_relpath(r) for r in range(min(len(items), GALLERY_CAP))]
    for it in items:
        if annotate:
            out.append(f"annotated/{it.out_stem}.png")
        if save_masks:
            out.append(f"masks/{it.out_stem}_mask.png")
        if save_cams:
            out.append(f"cams/{it.out_stem}_cam.npy")
        if report:
            out.append(thumb_relpath(it.out_stem))
    return out


def csv_columns(class_names, save_masks=False, gradcam=False) -> list[str]:
    cols = ["image_path", "predicted_class", "confidence", *[f"prob_{c}" for c in class_names],
            "lung_area_fraction", "true_class", "correct", "quality_flags", "ood_score", "dice", "iou",
            "annotated_png"]
    if save_masks:
        cols.append("mask_png")
    if gradcam:
        cols += ["cam_class", "cam_file"]
    return cols


def check_options(names, batch_size, tta, cam_class, workers: int | None = None) -> int | None:
    """The run options, checked once (run_cli calls it before scanning the inputs, run_pipeline for
    library callers); returns the Grad-CAM class index (None: the predicted class)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InferenceError(f"--batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size} (larger "
                             f"batches only cost memory: images are decoded ahead of the model)")
    if not 1 <= tta <= MAX_TTA:
        raise InferenceError(f"--tta must be between 1 and {MAX_TTA}, got {tta}")
    if cam_class is not None and cam_class not in names:
        raise InferenceError(f"--cam_class {cam_class!r} is not a model class; choose one of {names}")
    if workers is not None and workers < 0:
        raise InferenceError(f"--workers must be >= 0 (image-decoding threads; 0 = one per core, at most 4), "
                             f"got {workers}")
    return None if cam_class is None else names.index(cam_class)


def _check_options(names, size, items, batch_size, tta, cam, cam_class, save_cams, workers) -> int | None:
    cam_idx = check_options(names, batch_size, tta, cam_class, workers)
    if cam is not None and (cam.class_names != names or cam.img_size != size):
        raise InferenceError(f"the Grad-CAM checkpoint (classes {cam.class_names}, {cam.img_size}px) does not "
                             f"match the model (classes {names}, {size}px)")
    if save_cams and cam is None:
        raise InferenceError("--save_cams needs Grad-CAM (--gradcam)")
    if not items:
        raise InferenceError("no images to run on")
    return cam_idx


class _Tally:
    """Per-image results: the CSV rows, quality-flag counts, and what the metrics need."""

    def __init__(self, names, size, area_rng, annotate=True, gate=None):
        self.names, self.size, self.area_rng, self.annotate, self.gate = names, size, area_rng, annotate, gate
        self.rows, self.y_true, self.y_probs, self.y_flagged = [], [], [], []
        self.dices, self.ious, self.dices_model = [], [], []
        self.flag_counts = {c: 0 for c in quality.FLAG_CODES + ood.OOD_FLAG_CODES}

    def add(self, d, seg, probs, save_masks, cam_name, save_cams, ood_score=None, view_scores=None) -> dict:
        from ..metrics import binary_dice_iou
        names, pred = self.names, int(probs.argmax())
        lung = lung_mask(seg)
        tc = d.item.true_class
        row = {"image_path": str(d.item.path), "predicted_class": names[pred], "confidence": f"{probs[pred]:.6f}",
               **{f"prob_{c}": f"{probs[j]:.6f}" for j, c in enumerate(names)},
               "lung_area_fraction": f"{lung.mean():.6f}",
               "true_class": tc or "", "correct": "" if tc is None else str(int(tc == names[pred])),
               "dice": "", "iou": "", "annotated_png": f"annotated/{d.item.out_stem}.png" if self.annotate else ""}
        gate_flags = ([] if self.gate is None or ood_score is None
                      else ood.decide(float(ood_score), self.gate["threshold"], view_scores or {}))
        d.flags = tuple(quality.image_flags(d.stats) + quality.lung_flags(float(lung.mean()), self.area_rng)
                        + gate_flags + ood.aspect_flags(d.orig_shape))
        row["quality_flags"] = ";".join(d.flags)
        row["ood_score"] = "" if ood_score is None else f"{float(ood_score):.6f}"
        for f in d.flags:
            self.flag_counts[f] += 1
        if tc is not None:
            self.y_true.append(names.index(tc))
            # metrics use the probabilities exactly as predictions.csv holds them, so the CSV alone (e.g. a
            # merge of shard runs, cxrkit.shard) reproduces every metric of this run
            self.y_probs.append(np.array([float(row[f"prob_{c}"]) for c in names]))
            self.y_flagged.append(bool(d.flags))
        if d.gt_mask is not None:  # Dice at the mask's own resolution (and, labelled, at the model input)
            gh, gw = d.gt_mask.shape[:2]
            lung_native = lung_mask(seg, (gh, gw))
            dc, io_ = binary_dice_iou(lung_native, d.gt_mask)
            self.dices.append(dc)
            self.ious.append(io_)
            self.dices_model.append(binary_dice_iou(lung, resize_mask(d.gt_mask, self.size))[0])
            row["dice"], row["iou"] = f"{dc:.6f}", f"{io_:.6f}"
        if save_masks:
            row["mask_png"] = f"masks/{d.item.out_stem}_mask.png"
        if cam_name:
            row["cam_class"] = cam_name
            row["cam_file"] = f"cams/{d.item.out_stem}_cam.npy" if save_cams else ""
        self.rows.append(row)
        return row


def classification_summary(y_true, y_probs, names, flagged=None) -> dict:
    """summary.json's "classification": metrics, n_labelled and 95% intervals, and with `flagged` (a bool
    per image: any quality flag) the same figures over the unflagged images (also cxrkit.shard's merge)."""
    from ..metrics import classification_metrics, confidence_intervals
    y_true, y_probs = np.asarray(y_true, np.int64), np.asarray(y_probs, np.float64)
    m = classification_metrics(y_true, y_probs, names)
    m["n_labelled"] = len(y_true)
    m.update(confidence_intervals(y_true, y_probs.argmax(1), len(names)))
    if flagged is not None:
        keep = ~np.asarray(flagged, bool)
        m["unflagged"] = {"n": int(keep.sum()), "note": "the same figures over images with no quality flag"}
        if keep.any():
            mu = classification_metrics(y_true[keep], y_probs[keep], names)
            m["unflagged"].update(accuracy=mu["accuracy"], macro_f1=mu["macro_f1"])
    return m


def _summary(backend, items, n_done, skipped, mask_problems, input_notes, tally: _Tally, seconds, model_seconds, *,
             tta, batch_size, workers, cam, cam_class, save_masks, save_cams, calib_problem) -> dict:
    """summary.json: counts, skips, throughput, quality flags, and metrics where ground truth exists."""
    names, size, temp, rows = tally.names, tally.size, float(backend.temperature), tally.rows
    summary = {
        "n_inputs": len(items), "n_processed": n_done, "n_skipped": len(skipped), "skipped": skipped,
        "backend": backend.name, "backend_info": backend.describe(),
        "class_names": names, "img_size": size,
        "calibrated": calib_problem is None, "temperature": temp,
        **({"calibration_problem": f"the model: {calib_problem}"} if calib_problem else {}),
        "calibration": "probabilities in predictions.csv = softmax(logits / temperature), averaged over TTA views",
        "tta": int(tta), "batch_size": int(batch_size), "decode_workers": workers,
        "throughput": {"seconds": seconds, "images_per_second": n_done / seconds if seconds > 0 else None,
                       "model_seconds": model_seconds,
                       "note": "seconds = wall clock of the whole pipeline (decode, model, overlays, files); "
                               "model_seconds = time in the backend incl. TTA"},
        "predicted_counts": {c: int(sum(r["predicted_class"] == c for r in rows)) for c in names},
        "csv_notes": {"prob_<class>": "calibrated class probabilities, model class order",
                      "confidence": "probability of predicted_class",
                      "lung_area_fraction": f"fraction of model-input pixels with lung probability > {LUNG_THRESHOLD}",
                      "true_class/correct": "from the folder name when it is a model class (correct: 1/0), "
                                            "else empty",
                      "dice/iou": f"vs the ground-truth mask (masks/ folder) at {LUNG_THRESHOLD}, at the mask's own "
                                  "resolution, when there is one",
                      "quality_flags": "empty when all is well, else ';'-joined codes (see quality)",
                      "ood_score": "out-of-distribution score (cxrkit.ood); above quality.ood.threshold the "
                                   "image is not judged; empty when the model has no gate"},
        "quality": {"n_flagged": int(sum(bool(r["quality_flags"]) for r in rows)), "counts": tally.flag_counts,
                    "n_not_judged": int(sum(ood.not_judged(r["quality_flags"]) for r in rows)),
                    "meaning": {**quality.FLAG_MEANING, **ood.OOD_FLAG_MEANING},
                    "thresholds": {**quality.thresholds(tally.area_rng),
                                   ood.FLAG_ASPECT: f"longer side > {ood.EXTREME_ASPECT:g} x shorter (decoded image)",
                                   **({ood.FLAG_NOT_CXR: f"ood_score > {tally.gate['threshold']:.4g} "
                                                         f"({tally.gate.get('source')})"} if tally.gate else {})},
                    "lung_area_range": tally.area_rng,
                    "ood": tally.gate or {"note": "the model carries no out-of-distribution gate: not_chest_xray, "
                                                  "inverted and rotated are not checked"},
                    "note": "flagged images got an answer the model cannot back: check them by eye; not judged "
                            "= not_chest_xray, inverted, rotated or extreme_aspect (probabilities kept in the CSV)"},
        "notes": input_notes,
        "classification": None, "segmentation": None,
        "gradcam": None if cam is None else {
            "target": cam_class or "predicted class", "layer": cam.layer, "method": "monai.visualize.GradCAM",
            "checkpoint_mismatch": cam.mismatch,
            "maps_saved": bool(save_cams), "input": "the un-augmented image (also with --tta)",
            "map_format": "float32 .npy (S x S, model input size), raw ReLU'd Grad-CAM (not normalised); the "
                          "annotated PNG shows it min-max normalised per image"},
        "outputs": {"csv": "predictions.csv", "annotated": "annotated/" if tally.annotate else None,
                    "masks": "masks/ (0/255 PNG at the original image resolution)" if save_masks else None,
                    "cams": "cams/" if save_cams else None},
        "note": DISCLAIMER,
    }
    if mask_problems:
        summary["mask_problems"] = mask_problems
    if tally.y_true:
        summary["classification"] = classification_summary(tally.y_true, tally.y_probs, names, tally.y_flagged)
    if tally.dices:
        summary["segmentation"] = {"mean_dice": float(np.mean(tally.dices)), "mean_iou": float(np.mean(tally.ious)),
                                   "n_masks": len(tally.dices), "threshold": LUNG_THRESHOLD,
                                   "resolution": "each ground-truth mask's own size (lung probabilities resized "
                                                 "bilinearly to it, then thresholded)",
                                   "mean_dice_model_input": float(np.mean(tally.dices_model)),
                                   "model_input_resolution": f"{size}x{size}"}
    return summary


def run_pipeline(backend, items: list[InputItem], save_dir, *, batch_size: int = 16, tta: int = 1,
                 cam: GradCamExplainer | None = None, cam_class: str | None = None, save_cams: bool = False,
                 save_masks: bool = False, workers: int | None = None, progress: bool = True,
                 display_size: int = 512, extra_summary: dict | None = None, report: bool = True,
                 overwrite: bool = False, annotate: bool = True, ood_threshold: float | None = None) -> dict:
    """Run `backend` over `items`, write every output into save_dir; returns the summary dict.
    report: also thumbs/ and report.html (cxrkit.report).
    annotate=False (bulk mode): no annotated PNGs (nor the display-size image they are drawn from);
    with report, thumbnails are made afterwards from the source files, for the images the gallery
    shows only (cxrkit.report.write_gallery_thumbnails).
    The run owns save_dir (cxrkit.outdir): refused while another process writes there, or when it
    holds an earlier run's outputs unless overwrite (which removes exactly those files first)."""
    from tqdm import tqdm
    from ..report import (THUMB_DIR, model_info, thumb_relpath, write_gallery_thumbnails, write_report,
                          write_thumbnail)

    names, size, temp = list(backend.class_names), int(backend.img_size), float(backend.temperature)
    cam_idx = _check_options(names, size, items, batch_size, tta, cam, cam_class, save_cams, workers)
    save_dir = Path(save_dir)
    ann_dir, mask_dir, cam_dir = save_dir / "annotated", save_dir / "masks", save_dir / "cams"
    if not items[0].out_stem:
        assign_output_stems(items)
    claim = claim_save_dir(save_dir, overwrite, tool=f"cxrkit inference ({backend.name})")
    claim.plan(planned_outputs(items, save_masks, save_cams, report, annotate))
    try:
        gate = ood.resolve(backend.ood, ood_threshold)  # None: the model carries no gate
    except ValueError as e:
        raise InferenceError(str(e)) from None
    claim.acquire()  # lock; earlier outputs refused or (overwrite) removed; manifest "running"
    for d in (([ann_dir] if annotate else []) + ([mask_dir] if save_masks else [])
              + ([cam_dir] if save_cams else []) + ([save_dir / THUMB_DIR] if report else [])):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            claim.release()
            raise os_error(e, d, "create the folder") from None
    area_rng = quality.resolve_lung_area_range(backend.lung_area_range)
    calib_problem = backend.calibration_problem
    workers = int(workers or min(4, os.cpu_count() or 1))
    notes = ([f"probabilities calibrated (T={temp:.3g})"] if calib_problem is None
             else [f"probabilities NOT calibrated (T={temp:.3g})"]) + ([f"TTA: {tta} views"] if tta > 1 else [])

    def write_job(job):
        d, seg, probs, cam_map, cam_name = job
        stem = d.item.out_stem
        if annotate:
            area = f"predicted lung area: {lung_mask(seg).mean() * 100:.1f}% of image"
            img = render_annotation(d.display, seg, names, probs, d.item.true_class, cam=cam_map,
                                    cam_label=cam_name, title=d.item.rel, notes=[area] + notes, flags=d.flags)
            write_png(ann_dir / f"{stem}.png", img)
        if save_masks:
            write_png(mask_dir / f"{stem}_mask.png", (lung_mask(seg, d.orig_shape) * 255).astype(np.uint8))
        if save_cams and cam_map is not None:
            write_npy(cam_dir / f"{stem}_cam.npy", cam_map.astype(np.float32))
        if report and annotate:
            write_thumbnail(save_dir / thumb_relpath(stem), d.display, seg)

    tally = _Tally(names, size, area_rng, annotate, gate)
    per_image_files = annotate or save_masks or save_cams
    display_h = display_size if annotate else 0
    skipped, mask_problems, input_notes = [], [], []
    model_seconds, n_done = 0.0, 0
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrkit-decode")
    writer = _Writer(write_job, maxsize=max(4, 2 * batch_size))
    writer.start()
    pending, it = deque(), iter(items)
    lookahead = 2 * batch_size + workers

    def fill():
        while len(pending) < lookahead:
            nxt = next(it, None)
            if nxt is None:
                return
            pending.append(pool.submit(_decode, nxt, size, display_h))

    ok = False
    try:
        with tqdm(total=len(items), desc=f"{backend.name} inference", unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            fill()
            while pending:
                batch = []
                while pending and len(batch) < batch_size:
                    d = pending.popleft().result()
                    fill()
                    if d.error is not None:
                        skipped.append({"path": str(d.item.path), "reason": d.error})
                        log.warning("skipped %s: %s", d.item.path, d.error)
                        bar.update(1)
                        continue
                    if d.mask_error is not None:
                        mask_problems.append({"path": str(d.item.mask_path), "reason": d.mask_error})
                    for n in d.notes:
                        input_notes.append({"path": str(d.item.path), "note": n})
                        log.warning("%s: %s", d.item.path, n)
                    batch.append(d)
                if not batch:
                    continue
                x = to_model_input_np(np.stack([d.model_u8 for d in batch]))
                tm = time.perf_counter()
                first_ood = []

                def fwd(xx):  # the identity view (TTA's first) also gives the OOD score
                    sg, lg, sc = backend.forward_ood(xx)
                    if not first_ood:
                        first_ood.append(sc)
                    return sg, lg

                seg, probs = tta_predict(fwd, x, tta, temp)  # numpy in, numpy out
                scores = first_ood[0] if first_ood and first_ood[0] is not None and gate else None
                views = ([{}] * len(batch) if scores is None else
                         ood.score_views(lambda xv: backend.forward_ood(xv)[2], x, scores, gate["threshold"]))
                seg = seg[:, 0]
                probs = probs.astype(np.float64)
                model_seconds += time.perf_counter() - tm
                pred = probs.argmax(1)
                cams = None
                if cam is not None:
                    cams = cam(x, pred if cam_idx is None else np.full(len(batch), cam_idx))
                for i, d in enumerate(batch):
                    cam_name = "" if cams is None else names[pred[i] if cam_idx is None else cam_idx]
                    tally.add(d, seg[i], probs[i], save_masks, cam_name, save_cams,  # sets d.flags
                              None if scores is None else scores[i], views[i])
                    if per_image_files:
                        writer.put((d, seg[i], probs[i], None if cams is None else cams[i], cam_name))
                n_done += len(batch)
                bar.update(len(batch))
        writer.close()
        ok = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if not ok and writer.is_alive():
            writer.q.put(None)
        if not ok:
            claim.release()  # the manifest stays "running": the next run needs --overwrite
    try:
        cols = csv_columns(names, save_masks, cam is not None)
        write_csv_atomic(save_dir / "predictions.csv", cols, tally.rows)
        seconds = time.perf_counter() - t0
        summary = _summary(backend, items, n_done, skipped, mask_problems, input_notes, tally, seconds,
                           model_seconds, tta=tta, batch_size=batch_size, workers=workers, cam=cam,
                           cam_class=cam_class, save_masks=save_masks, save_cams=save_cams,
                           calib_problem=calib_problem)
        if extra_summary:
            summary.update(extra_summary)
        summary["outputs"]["report"] = "report.html (thumbnails in thumbs/)" if report else None
        write_json_atomic(save_dir / "summary.json", summary)
        if report:
            if not annotate:
                write_gallery_thumbnails(save_dir, tally.rows)
            write_report(save_dir, summary, tally.rows, model=model_info(backend))
        claim.finish()  # manifest: every file this run wrote, with size and SHA-256, status complete
    finally:
        claim.release()
    return summary
