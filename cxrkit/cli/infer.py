"""The shared argparse groups, parser and body of the two inference CLIs."""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..core import shift_check
from ..core.config import InferConfig
from ..core.errors import InferenceError
from ..core.io_utils import HelpFormatter
from ..inference.report import model_info
from ..inference.shard import parse_shard, select_shard, write_empty_shard
from ..core.tta import MAX_TTA
from ..inference.backends import CAM_NEEDS_CHECKPOINT, Backend
from ..inference.inputs import gather_inputs
from ..inference.pipeline import PipelineOptions, check_options, run_pipeline
from ..inference.rows import PredictionRow
from ..inference.summary import in_training_line
from .common import fail, run_command

log = logging.getLogger("cxrkit")
D = InferConfig()


# ------------------------------------------------------------------------------------------- CLI
def add_input_args(p):
    g = p.add_argument_group("inputs")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data_dir", default=None,
                     help="folder searched recursively for images; in the database layout <Class>/images/* the "
                          "folder names give the true class and <Class>/masks/* are ground truth (not inputs)")
    src.add_argument("--images", nargs="+", default=None, metavar="FILE",
                     help="explicit image files (or folders); a file's folder name gives its true class")
    g.add_argument("--num_samples", type=int, default=D.num_samples,
                   help="pick this many inputs at random (default 0 = all)")
    g.add_argument("--seed", type=int, default=D.seed, help="random seed for --num_samples")
    g.add_argument("--shard", default=None, metavar="K/N",
                   help="run only shard K of N (0 <= K < N): the inputs whose relative path hashes to K, the same "
                        "files whatever the machine or listing order; `cxrkit-merge` combines the N folders "
                        "(cxrkit.inference.shard)")
    return g


def add_run_args(p):
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", type=int, default=D.batch_size, help="images per model call")
    g.add_argument("--tta", type=int, default=D.tta,
                   help=f"test-time augmentation views (1 = plain inference, at most {MAX_TTA})")
    g.add_argument("--workers", type=int, default=D.workers, help="image decoders (threads or processes)")
    g.add_argument("--decode", default=D.decode, choices=["auto", "threads", "processes"],
                   help="where images are decoded: worker processes (no shared interpreter lock; auto takes them "
                        "for 64+ inputs whose files are 1 MB or more, i.e. full-size films) or threads")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar (none is drawn either where stderr is not a terminal: a job log, a pipe)")
    g.add_argument("--ood_threshold", type=float, default=None, metavar="SCORE",
                   help="out-of-distribution threshold: ood_score above it is flagged not_chest_xray (default: the "
                        "one stored with the model, 1.2 x the 99th percentile of its validation scores)")
    g.add_argument("--include_training_images", action="store_true",
                   help="count inputs the model was trained on (flag in_training_set, matched by perceptual hash) in "
                        "the metrics; by default they are left out and counted: a figure on them is not a test")
    return g


def add_output_args(p, default_dir):
    g = p.add_argument_group("outputs")
    g.add_argument("--save_dir", default=default_dir,
                   help="annotated/ PNGs, predictions.csv, summary.json (and masks/, cams/)")
    g.add_argument("--outputs", default="annotated,report", metavar="LIST",
                   help="what to write besides predictions.csv and summary.json: a comma list of annotated, "
                        "masks, report; `csv` alone = CSV and summary only (bulk mode: no drawing at all; with "
                        "report, thumbnails only for the images the report shows)")
    g.add_argument("--save_masks", action="store_true", help="also write each predicted lung mask (PNG)")
    g.add_argument("--overwrite", action="store_true",
                   help="--save_dir holds an earlier run's outputs: remove exactly the files that run wrote (its "
                        "manifest), then write anew (without it such a folder is refused)")
    g.add_argument("--no_report", action="store_true",
                   help="no report.html (metrics, confusion matrix, thumbnail gallery) and no thumbs/")
    g.add_argument("--dicom_out", action="store_true",
                   help="for every DICOM input, write dicom/<name>_seg.dcm (DICOM SEG of the predicted lungs at the "
                        "source's size) and dicom/<name>_sr.dcm (Structured Report: class or not judged, "
                        "probabilities, flags, model), both referencing the source image; research output, not for "
                        "a clinical system's decisions (needs pip install 'cxrkit[dicom-out]')")
    return g


def add_gradcam_args(p, onnx: bool):
    g = p.add_argument_group("Grad-CAM (explanations)")
    g.add_argument("--gradcam", action="store_true",
                   help="add a Grad-CAM heat-map panel to each annotated PNG (from the network's bottleneck: the "
                        "lite0 encoder's deepest block; the UNet bottleneck for the seed presets)"
                        + (" (needs --checkpoint: gradients come from the PyTorch model)" if onnx else ""))
    g.add_argument("--cam_class", default=None, metavar="NAME",
                   help="explain this class instead of the predicted one (implies --gradcam)")
    g.add_argument("--save_cams", action="store_true",
                   help="also write the raw Grad-CAM maps as float32 .npy (implies --gradcam)")
    if onnx:
        g.add_argument("--checkpoint", default=None,
                       help="PyTorch checkpoint used ONLY for Grad-CAM (an ONNX Runtime session gives no gradients); "
                            "it must be the checkpoint this ONNX model was exported from (the meta file records "
                            "its SHA-256)")
        g.add_argument("--cam_checkpoint_mismatch_ok", action="store_true",
                       help="explain with a --checkpoint other than the one the model was exported from anyway "
                            "(the maps then need not explain these predictions; summary.json and report.html say so)")
    return g


def inference_parser(description: str, add_model_args: Callable, default_save_dir: str,
                     onnx: bool) -> argparse.ArgumentParser:
    """One inference CLI's parser: its own "model" group (add_model_args(group)), then the shared
    inputs, outputs, run and Grad-CAM groups."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_args(p.add_argument_group("model"))
    add_input_args(p)
    add_output_args(p, default_save_dir)
    add_run_args(p)
    add_gradcam_args(p, onnx=onnx)
    return p


OUTPUT_KINDS = ("annotated", "masks", "report")


def parse_outputs(spec: str, save_masks=False, no_report=False) -> dict:
    """--outputs (plus --save_masks / --no_report) -> {"annotate", "save_masks", "report"}."""
    parts = {p.strip().lower() for p in str(spec).split(",") if p.strip()}
    bad = parts - set(OUTPUT_KINDS) - {"csv"}
    if bad or not parts:
        raise InferenceError(f"--outputs {spec!r}: use a comma list of {', '.join(OUTPUT_KINDS)}, or csv (CSV and "
                             f"summary only)")
    return {"annotate": "annotated" in parts, "save_masks": "masks" in parts or bool(save_masks),
            "report": "report" in parts and not no_report}


def _model_identity(backend) -> dict:
    from ..core.io_utils import model_sha256
    return {**model_info(backend), "sha256": model_sha256(backend.model_file)}


def _shard_options(args, outs: dict, gradcam: bool) -> dict:
    """The options that change a shard's rows or files: they must agree across the shards of one run."""
    return {"ood_threshold": args.ood_threshold, "tta": args.tta, "outputs": dict(outs), "gradcam": gradcam,
            "include_training_images": bool(args.include_training_images), "dicom_out": bool(args.dicom_out),
            "cam_class": args.cam_class, "save_cams": bool(args.save_cams)}


def run_cli(args, make_backend: Callable[[], Backend], cam_checkpoint=None, cam_mismatch_ok: bool = False) -> int:
    """Shared body of the two inference commands; returns the exit code (common.run_command).
    cam_checkpoint: the PyTorch checkpoint Grad-CAM takes its gradients from (ONNX: --checkpoint);
    cam_mismatch_ok: the ONNX CLI's --cam_checkpoint_mismatch_ok (Backend.explainer)."""
    return run_command(lambda: _run(args, make_backend, cam_checkpoint, cam_mismatch_ok))


def _run(args, make_backend, cam_checkpoint, cam_mismatch_ok) -> int:
    gradcam = bool(args.gradcam or args.cam_class or args.save_cams)
    if args.data_dir is None and not args.images:
        raise InferenceError("no inputs: give --data_dir DIR or --images FILE [FILE ...]")
    if gradcam and cam_checkpoint is None:
        raise InferenceError(CAM_NEEDS_CHECKPOINT)
    outs = parse_outputs(args.outputs, args.save_masks, args.no_report)
    shard = parse_shard(args.shard) if args.shard else None
    if args.dicom_out:  # the optional dependency, before any work: one line naming the extra when absent
        from ..inference.dicom_out import require_highdicom
        require_highdicom()
    backend = make_backend()
    opts = PipelineOptions(batch_size=args.batch_size, tta=args.tta, cam_class=args.cam_class,
                           save_cams=args.save_cams, save_masks=outs["save_masks"], report=outs["report"],
                           annotate=outs["annotate"], workers=args.workers, decode=args.decode,
                           progress=not args.quiet,
                           overwrite=args.overwrite, ood_threshold=args.ood_threshold,
                           include_training_images=args.include_training_images, dicom_out=args.dicom_out)
    check_options(backend.class_names, opts)
    if backend.calibration_problem:
        log.warning("%s: %s", backend.model_file, backend.calibration_problem)
    items = gather_inputs(args.data_dir, args.images, backend.class_names, args.num_samples, args.seed,
                          exclude=args.save_dir)
    extra = {"inputs": {"data_dir": args.data_dir, "images": args.images, "num_samples": args.num_samples,
                        "seed": args.seed}}
    if shard is not None:  # this run's share, and what cxrkit.inference.shard.merge needs to rebuild the single run
        items, extra["shard"] = select_shard(items, *shard, model=_model_identity(backend),
                                             options=_shard_options(args, outs, gradcam))
        if not items:
            write_empty_shard(args.save_dir, backend, PredictionRow.columns(backend.class_names, outs["save_masks"], gradcam),
                              dict(extra, tta=args.tta), args.overwrite)
            print(f"shard {args.shard}: no inputs ({extra['shard']['n_inputs_all']} in the whole run); wrote an "
                  f"empty predictions.csv for the merge | outputs in {args.save_dir}")
            return 0
    cam = backend.explainer(cam_checkpoint, cam_mismatch_ok) if gradcam else None
    summary = run_pipeline(backend, items, args.save_dir, replace(opts, cam=cam, extra_summary=extra))
    if summary["n_processed"] == 0 and shard is not None:  # a complete shard folder: exit 0, so that a
        # scheduler's afterok dependency starts the merge, which counts these files as skipped
        log.warning("shard %s: none of its %d inputs could be decoded (reasons in %s); the folder is complete and "
                    "the merge counts them as skipped", args.shard, summary["n_inputs"],
                    Path(args.save_dir) / "summary.json")
    elif summary["n_processed"] == 0:
        return fail(f"none of the {summary['n_inputs']} inputs could be decoded (reasons in "
                    f"{Path(args.save_dir) / 'summary.json'})")
    thr = summary["throughput"]
    bi = summary.get("backend_info") or {}
    how = f" ({bi['precision'].upper()}, {bi['engine']})" if bi.get("precision") else ""
    line = (f"{summary['backend']}{how}: {summary['n_processed']} images ({summary['n_skipped']} skipped) in "
            f"{thr['seconds']:.1f} s ({thr['images_per_second']:.1f} img/s)")
    if summary["classification"]:
        c = summary["classification"]
        line += f" | accuracy {c['accuracy']:.3f} macro-F1 {c['macro_f1']:.3f} (n={c['n_labelled']}" + (
            f"; {c['n_not_judged_left_out']} not judged left out)" if c.get("n_not_judged_left_out") else ")")
    if summary["segmentation"]:
        s = summary["segmentation"]
        line += f" | Dice {s['mean_dice']:.3f} IoU {s['mean_iou']:.3f}"
    q = summary.get("quality") or {}
    if q.get("n_flagged"):
        line += f" | {q['n_flagged']} flagged (quality_flags: " + ", ".join(
            f"{k} {v}" for k, v in q["counts"].items() if v) + ")"
    print(line + f" | outputs in {args.save_dir}")
    seen = in_training_line(summary.get("in_training_set"))
    if seen:
        print(seen)
    if summary["n_processed"] == 1:
        print(one_image_line(Path(args.save_dir) / "predictions.csv"))
    warning = shift_check.warning_line(summary.get("shift_check"))
    if warning:  # the last line a user sees
        print(warning)
    return 0


def one_image_line(csv_path) -> str:
    """A one-image run's answer in words: the class and confidence, or why it was not judged; its flags."""
    import csv
    from ..core.ood import OOD_REASON
    with open(csv_path, newline="", encoding="utf-8") as f:
        r = next(csv.DictReader(f))
    flags = [x for x in (r.get("quality_flags") or "").split(";") if x]
    why = [OOD_REASON[x] for x in flags if x in OOD_REASON]
    head = (f"NOT JUDGED ({', '.join(why)}): no class given" if why
            else f"{r['predicted_class']} (confidence {float(r['confidence']):.3f})")
    return f"{r['image_path']}: {head}" + (f" | flags: {', '.join(flags)}" if flags else " | no flags")
