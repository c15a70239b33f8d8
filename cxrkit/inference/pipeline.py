"""run_pipeline: decode threads -> model -> writer thread; CSV, summary.json, report."""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.config import InferConfig
from ..core.errors import InferenceError, os_error
from ..core.io_utils import MAX_BATCH_SIZE, write_json_atomic
from ..core import fingerprint, ood, quality, shift_check
from ..core.ood import GateSpec
from ..core.outdir import claim_save_dir, job_identity
from ..core.model_input import lung_mask, resize_mask, to_model_input_np
from ..core.tta import MAX_TTA
from ..core.gradcam import GradCamExplainer
from .inputs import InputItem, assign_output_stems
from .per_image import Decoded, decode_item, image_flags, model_outputs
from .rows import PredictionRow
from .summary import build_summary
from .render import _Writer, render_annotation, write_csv_atomic, write_npy, write_png

log = logging.getLogger("cxrkit")


# -------------------------------------------------------------------------------------- decoding
DECODE_MODES = ("auto", "threads", "processes")
PROCESS_MIN_IMAGES = 64            # fewer: starting the worker processes is not repaid
PROCESS_MIN_FILE_BYTES = 1 << 20   # a 256-px PNG (~70 KB) decodes in about a millisecond: threads keep up


def decode_mode(opts, items) -> str:
    """Threads or processes for decoding. Processes where the model would otherwise wait: 64+ inputs
    whose files (the median of the first 16) are 1 MB or more, full-size films whose decoding holds
    Python's interpreter lock in parts (header parsing, pydicom) and takes longer than the model."""
    if opts.decode != "auto":
        return opts.decode
    if len(items) < PROCESS_MIN_IMAGES or opts.workers < 2:
        return "threads"
    sizes = []
    for it in items[:16]:
        try:
            sizes.append(it.path.stat().st_size)
        except OSError:
            pass
    return "processes" if sizes and float(np.median(sizes)) >= PROCESS_MIN_FILE_BYTES else "threads"


def _decode_pool(mode: str, workers: int):
    if mode == "threads":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrkit-decode")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # forkserver: workers start from a clean process that imported only the decoder, never from this one
    # (a fork of a process running ONNX Runtime, writer and decode threads can inherit a held lock)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["cxrkit.inference.per_image"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


# -------------------------------------------------------------------------------------- pipeline
def planned_outputs(items, save_masks=False, save_cams=False, report=False, annotate=True,
                    dicom_out=False) -> list[str]:
    """Every file a run will write (relative to save_dir), for the manifest (cxrkit.core.outdir).
    dicom_out: the dicom/ SEG and SR of every input that looks like DICOM before the run (a .dcm name or
    the DICM preamble, what the decoder goes by: cxrkit.inference.dicom_out.planned)."""
    from .report import REPORT_NAME
    from .thumbs import GALLERY_CAP, WORST_DICE_N, worst_dice_relpath
    from .thumbs import gallery_thumb_relpath, thumb_relpath
    out = ["predictions.csv", "summary.json"] + ([REPORT_NAME] if report else [])
    if report:  # the lowest-Dice tiles: as many as there are inputs with a lung mask, at most WORST_DICE_N
        out += [worst_dice_relpath(r) for r in range(min(WORST_DICE_N, sum(it.mask_path is not None for it in items)))]
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
    if dicom_out:
        from .dicom_out import planned
        out += planned(items)
    return out


@dataclass
class PipelineOptions:
    """How run_pipeline runs and what it writes; the defaults are config.InferConfig's.
    report: also thumbs/ and report.html (cxrkit.inference.report).
    annotate=False (bulk mode): no annotated PNGs (nor the display-size image they are drawn from);
    with report, thumbnails are made afterwards from the source files, for the images the gallery
    shows only (cxrkit.inference.report.write_gallery_thumbnails).
    overwrite: the run owns save_dir (cxrkit.core.outdir); an earlier run's outputs there are refused unless
    overwrite (which removes exactly those files first)."""
    batch_size: int = InferConfig.batch_size
    tta: int = InferConfig.tta
    cam: GradCamExplainer | None = None  # Grad-CAM (Backend.explainer); None: no maps
    cam_class: str | None = None  # the class Grad-CAM explains; None: the predicted class
    save_cams: bool = False
    save_masks: bool = False
    report: bool = True
    annotate: bool = True
    workers: int | None = None    # image decoders; None or 0: InferConfig.workers
    # "threads", "processes" or "auto" (decode_mode). Library callers get threads: worker processes re-import
    # the caller's __main__, which a script without an `if __name__ == "__main__":` guard cannot survive; the
    # CLIs pass InferConfig.decode ("auto")
    decode: str = "threads"
    progress: bool = True
    display_size: int = 512
    overwrite: bool = False
    ood_threshold: float | None = None  # None: the model's own gate threshold
    include_training_images: bool = False  # count inputs the model trained on in the metrics (core.fingerprint)
    dicom_out: bool = False       # dicom/: a SEG and an SR per DICOM input (cxrkit.inference.dicom_out; highdicom)
    extra_summary: dict | None = None   # merged into summary.json


def check_options(names, opts: PipelineOptions) -> int | None:
    """The run options, checked once (run_cli calls it before scanning the inputs, run_pipeline for
    library callers); returns the Grad-CAM class index (None: the predicted class)."""
    batch_size, tta, cam_class, workers = opts.batch_size, opts.tta, opts.cam_class, opts.workers
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InferenceError(f"--batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size} (larger "
                             f"batches only cost memory: images are decoded ahead of the model)")
    if not 1 <= tta <= MAX_TTA:
        raise InferenceError(f"--tta must be between 1 and {MAX_TTA}, got {tta}")
    if cam_class is not None and cam_class not in names:
        raise InferenceError(f"--cam_class {cam_class!r} is not a model class; choose one of {names}")
    if workers is not None and workers < 0:
        raise InferenceError(f"--workers must be >= 0 (image decoders; 0 = one per core, at most 4), "
                             f"got {workers}")
    if opts.decode not in DECODE_MODES:
        raise InferenceError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {opts.decode!r}")
    return None if cam_class is None else names.index(cam_class)


def _check_run(names, size, items, opts: PipelineOptions) -> int | None:
    cam_idx = check_options(names, opts)
    cam = opts.cam
    if cam is not None and (cam.class_names != names or cam.img_size != size):
        raise InferenceError(f"the Grad-CAM checkpoint (classes {cam.class_names}, {cam.img_size}px) does not "
                             f"match the model (classes {names}, {size}px)")
    if opts.save_cams and cam is None:
        raise InferenceError("--save_cams needs Grad-CAM (--gradcam)")
    if not items:
        raise InferenceError("no images to run on")
    return cam_idx


class _Tally:
    """Per-image results: the CSV rows, quality-flag counts, what the metrics need, and the run's
    skips, notes and counts."""

    def __init__(self, names, size, area_rng, gate, opts: PipelineOptions):
        self.names, self.size, self.area_rng, self.gate = names, size, area_rng, gate
        self.annotate, self.save_masks, self.save_cams = opts.annotate, opts.save_masks, opts.save_cams
        self.rows, self.train_hashes = [], None  # the CSV rows (the metrics come from them); training hashes
        self.include_training_images = opts.include_training_images
        self.dices, self.ious, self.dices_model = [], [], []
        self.worst_dice = []  # (dice, n, image_path, tile): the WORST_DICE_N lowest, for the report
        self.report = opts.report
        self.flag_counts = {c: 0 for c in quality.FLAG_CODES + ood.OOD_FLAG_CODES + (shift_check.FLAG_FOLDER_SHIFT,
                                                                                        fingerprint.FLAG_IN_TRAINING)}
        self.shift_rows, self.shift_block = [], None  # shift_check's features per image; its verdict
        self.skipped, self.mask_problems, self.input_notes = [], [], []
        self.n_done, self.model_seconds = 0, 0.0
        self.decode_seconds = self.preprocess_seconds = self.write_seconds = 0.0

    def stage_seconds(self) -> dict:
        return {"decode": self.decode_seconds, "preprocess": self.preprocess_seconds, "model": self.model_seconds,
                "write": self.write_seconds}

    def add_decoded(self, d: Decoded) -> bool:
        """Records d's skip reason, mask problem and notes; False when d was not decoded."""
        self.decode_seconds += d.seconds[0]
        self.preprocess_seconds += d.seconds[1]
        if d.error is not None:
            self.skipped.append({"path": str(d.item.path), "reason": d.error})
            log.warning("skipped %s: %s", d.item.path, d.error)
            return False
        if d.mask_error is not None:
            self.mask_problems.append({"path": str(d.item.mask_path), "reason": d.mask_error})
        for n in d.notes:
            self.input_notes.append({"path": str(d.item.path), "note": n})
            log.warning("%s: %s", d.item.path, n)
        return True

    def add(self, d, seg, probs, cam_name, ood_score=None, view_scores=None) -> dict:
        from ..core.metrics import binary_dice_iou
        lung, tc, stem = lung_mask(seg), d.item.true_class, d.item.out_stem
        d.flags = image_flags(d, seg, self.area_rng, self.gate, ood_score, view_scores, self.train_hashes)
        r = PredictionRow(str(d.item.path), self.names, probs, float(lung.mean()), tc, d.flags, ood_score,
                          annotated_png=f"annotated/{stem}.png" if self.annotate else "",
                          mask_png=f"masks/{stem}_mask.png" if self.save_masks else None, cam_class=cam_name or None,
                          cam_file=f"cams/{stem}_cam.npy" if cam_name and self.save_cams else None, dicom=d.dicom)
        for f in d.flags:
            self.flag_counts[f] += 1
        self.shift_rows.append(shift_check.feature_row(ood_score, lung.mean(), d.stats))
        if d.gt_mask is not None:  # Dice at the mask's own resolution (and, labelled, at the model input)
            r.dice, r.iou = binary_dice_iou(lung_mask(seg, d.gt_mask.shape[:2]), d.gt_mask)
            self.dices.append(r.dice)
            self.ious.append(r.iou)
            self.dices_model.append(binary_dice_iou(lung, resize_mask(d.gt_mask, self.size))[0])
            if self.report:
                self._keep_if_worst(d, seg, r.dice)
        row = r.to_csv()  # the metrics read these rows, exactly as predictions.csv holds them
        self.rows.append(row)
        return row

    def _keep_if_worst(self, d, seg, dice: float) -> None:
        """Keep the tile of one of the WORST_DICE_N lowest Dice so far (bounded memory: a dozen small tiles)."""
        from .thumbs import WORST_DICE_N, make_dice_tile
        w = self.worst_dice
        if len(w) >= WORST_DICE_N and dice >= w[-1][0]:
            return
        tile = make_dice_tile(d.display if d.display is not None else d.model_u8, seg, d.gt_mask)
        w.append((dice, len(self.rows), str(d.item.path), tile))
        w.sort(key=lambda t: (t[0], t[1]))
        del w[WORST_DICE_N:]

    def write_worst_dice(self, save_dir: Path) -> list[dict]:
        """The kept tiles as lowest_dice/NN.jpg, lowest Dice first; their entries for summary.json."""
        from .thumbs import worst_dice_relpath, write_jpeg
        out = []
        for rank, (dice, _, path, tile) in enumerate(self.worst_dice):
            rel = worst_dice_relpath(rank)
            (save_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            write_jpeg(save_dir / rel, tile, 85)
            out.append({"image_path": path, "dice": float(dice), "tile": rel})
        return out


@dataclass
class _Run:
    """One run's fixed state (_prepare) and its tally."""
    backend: object
    save_dir: Path
    opts: PipelineOptions         # workers resolved
    names: list
    size: int
    temp: float
    cam_idx: int | None           # the Grad-CAM class; None: the predicted class
    gate: GateSpec | None         # None: the model carries no out-of-distribution gate
    claim: object                 # cxrkit.core.outdir's claim on save_dir
    tally: _Tally
    notes: list                   # the overlay's notes (calibration, TTA)
    dicom: object = None          # --dicom_out: the run's cxrkit.inference.dicom_out.DicomWriter


def run_pipeline(backend, items: list[InputItem], save_dir, opts: PipelineOptions | None = None) -> dict:
    """Run `backend` over `items`, write every output into save_dir; returns the summary dict.
    opts: PipelineOptions (None: the defaults). The run owns save_dir (cxrkit.core.outdir): refused while
    another process writes there, or when it holds an earlier run's outputs unless opts.overwrite."""
    run = _prepare(backend, items, Path(save_dir), opts or PipelineOptions())
    t0 = time.perf_counter()
    _batch_loop(run, items)
    return _finish(run, items, t0)


def _tally(names, size, area_rng, gate, opts, backend) -> "_Tally":
    t = _Tally(names, size, area_rng, gate, opts)
    t.train_hashes = fingerprint.unpack(backend.meta.training_hashes)
    return t


def _prepare(backend, items: list[InputItem], save_dir: Path, opts: PipelineOptions) -> _Run:
    """Options checked, output stems, save_dir claimed (locked, manifest "running") and its folders made."""
    from .thumbs import THUMB_DIR
    names, size, temp = list(backend.class_names), int(backend.img_size), float(backend.temperature)
    cam_idx = _check_run(names, size, items, opts)
    if not items[0].out_stem:
        assign_output_stems(items)
    dicom = None
    if opts.dicom_out:  # highdicom imported (or its one-line error) before the folder is claimed
        from .dicom_out import DicomWriter
        dicom = DicomWriter(backend, save_dir)
    planned = planned_outputs(items, opts.save_masks, opts.save_cams, opts.report, opts.annotate, opts.dicom_out)
    job = job_identity(backend.model_file, [i.path for i in items], planned, opts.extra_summary)
    claim = claim_save_dir(save_dir, opts.overwrite, tool=f"cxrkit inference ({backend.name})", job=job)
    claim.plan(planned)
    try:
        gate = backend.meta.resolve_gate(opts.ood_threshold)  # None: the model carries no gate
    except ValueError as e:
        raise InferenceError(str(e)) from None
    claim.acquire()  # lock; earlier outputs refused or (overwrite) removed; manifest "running"
    for d in (([save_dir / "annotated"] if opts.annotate else []) + ([save_dir / "masks"] if opts.save_masks else [])
              + ([save_dir / "cams"] if opts.save_cams else []) + ([save_dir / THUMB_DIR] if opts.report else [])
              + ([dicom.dir] if dicom is not None else [])):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            claim.release()
            raise os_error(e, d, "create the folder") from None
    area_rng = quality.resolve_lung_area_range(backend.lung_area_range)
    opts = replace(opts, workers=int(opts.workers or InferConfig.workers))
    opts = replace(opts, decode=decode_mode(opts, items))  # resolved: summary.json says which ran
    notes = ([f"probabilities calibrated (T={temp:.3g})"] if backend.calibration_problem is None
             else [f"probabilities NOT calibrated (T={temp:.3g})"])
    notes += [f"TTA: {opts.tta} views"] if opts.tta > 1 else []
    return _Run(backend, save_dir, opts, names, size, temp, cam_idx, gate, claim,
                _tally(names, size, area_rng, gate, opts, backend), notes, dicom)


def _write_job(run: _Run):
    """The writer thread's job: one image's annotated PNG, mask, Grad-CAM map, thumbnail and DICOM SEG."""
    from .thumbs import thumb_relpath, write_thumbnail
    opts, save_dir = run.opts, run.save_dir

    def write_job(job):
        t0 = time.perf_counter()
        _write_one(job)
        run.tally.write_seconds += time.perf_counter() - t0  # the one writer thread

    def _write_one(job):
        d, seg, probs, cam_map, cam_name = job
        stem = d.item.out_stem
        if opts.annotate:
            area = f"predicted lung area: {lung_mask(seg).mean() * 100:.1f}% of image"
            img = render_annotation(d.display, seg, run.names, probs, d.item.true_class, cam=cam_map,
                                    cam_label=cam_name, title=d.item.rel, notes=[area] + run.notes, flags=d.flags)
            write_png(save_dir / "annotated" / f"{stem}.png", img)
        if opts.save_masks:
            write_png(save_dir / "masks" / f"{stem}_mask.png", (lung_mask(seg, d.orig_shape) * 255).astype(np.uint8))
        if opts.save_cams and cam_map is not None:
            write_npy(save_dir / "cams" / f"{stem}_cam.npy", cam_map.astype(np.float32))
        if opts.report and opts.annotate:
            write_thumbnail(save_dir / thumb_relpath(stem), d.display, seg)
        if run.dicom is not None and d.dicom:
            run.dicom.write_seg(d.item, seg)  # never raises: a failure is counted in summary.json
    return write_job


def _decoded_batches(run: _Run, items, pool, bar):
    """Batches of decoded images, decoded ahead by the pool; what did not decode is tallied and skipped."""
    opts, tally = run.opts, run.tally
    display_h = opts.display_size if opts.annotate else 0
    pending, it = deque(), iter(items)
    lookahead = 2 * opts.batch_size + opts.workers

    def fill():
        while len(pending) < lookahead:
            nxt = next(it, None)
            if nxt is None:
                return
            pending.append((pool.submit(decode_item, nxt, run.size, display_h), nxt))  # the item names a dead worker

    fill()
    while pending:
        batch = []
        while pending and len(batch) < opts.batch_size:
            fut, item = pending.popleft()
            try:
                d = fut.result()
            except BrokenExecutor:
                raise InferenceError("a decoding worker process died (out of memory, or a decoder crashed) near "
                                     f"{item.path}; rerun with --decode threads or fewer --workers") from None
            fill()
            if not tally.add_decoded(d):
                bar.update(1)
                continue
            batch.append(d)
        if batch:
            yield batch


def _predict_batch(run: _Run, batch: list[Decoded]) -> list[tuple]:
    """The model on one batch (TTA, the gate's score, Grad-CAM); every image's row goes to the tally;
    returns the writer's jobs."""
    backend, opts, gate, cam_idx = run.backend, run.opts, run.gate, run.cam_idx
    x = to_model_input_np(np.stack([d.model_u8 for d in batch]))
    tm = time.perf_counter()
    seg, probs, scores, views = model_outputs(backend, x, opts.tta, run.temp, gate)
    run.tally.model_seconds += time.perf_counter() - tm
    pred = probs.argmax(1)
    cams = None
    if opts.cam is not None:
        cams = opts.cam(x, pred if cam_idx is None else np.full(len(batch), cam_idx))
    jobs = []
    for i, d in enumerate(batch):
        cam_name = "" if cams is None else run.names[pred[i] if cam_idx is None else cam_idx]
        row = run.tally.add(d, seg[i], probs[i], cam_name,  # sets d.flags
                            None if scores is None else scores[i], views[i])
        if run.dicom is not None:  # its SR is written once the rows are final (_finish)
            if d.dicom:
                run.dicom.add_row(d.item, row)
            else:
                run.dicom.not_dicom += 1
        jobs.append((d, seg[i], probs[i], None if cams is None else cams[i], cam_name))
    return jobs


class _NoBar:
    """The progress bar where none is drawn."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        pass


def _progress_bar(run: _Run, total: int):
    """tqdm's bar on a terminal; none with --quiet or where stderr is not a terminal (a cluster job's log, a
    script's pipe), where a bar is only carriage returns, and importing tqdm (it reads its package metadata) is
    40 ms of start-up (docs/SPEED.md)."""
    import sys
    if not (run.opts.progress and getattr(sys.stderr, "isatty", lambda: False)()):  # None under pythonw
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=f"{run.backend.name} inference", unit="img", dynamic_ncols=True)


def _batch_loop(run: _Run, items) -> None:
    """Decode threads -> model -> writer thread over every item. On failure the claim is released
    (the manifest stays "running": the next run needs --overwrite)."""
    opts = run.opts
    per_image_files = opts.annotate or opts.save_masks or opts.save_cams or opts.dicom_out
    pool = _decode_pool(opts.decode, opts.workers)
    writer = _Writer(_write_job(run), maxsize=max(4, 2 * opts.batch_size))
    writer.start()
    ok = False
    try:
        with _progress_bar(run, len(items)) as bar:
            for batch in _decoded_batches(run, items, pool, bar):
                for job in _predict_batch(run, batch):
                    if per_image_files:
                        writer.put(job)
                run.tally.n_done += len(batch)
                bar.update(len(batch))
        writer.close()
        ok = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if not ok and writer.is_alive():
            writer.q.put(None)
        if not ok:
            run.claim.release()


def _folder_shift(backend, tally: _Tally) -> None:
    """The run-level shift warning (core.shift_check): when it fires, every row says so (folder_shift)."""
    ref = backend.meta.shift_reference
    if ref is None:
        tally.shift_block = {"tested": False, "reason": "the model carries no shift reference"}
        return
    tally.shift_block = shift_check.folder_check(np.array(tally.shift_rows).reshape(-1, len(shift_check.FEATURES)), ref)
    if tally.shift_block.get("fires"):
        for row in tally.rows:
            row["quality_flags"] = ";".join(filter(None, [row["quality_flags"], shift_check.FLAG_FOLDER_SHIFT]))
        tally.flag_counts[shift_check.FLAG_FOLDER_SHIFT] = len(tally.rows)


def _finish(run: _Run, items, t0: float) -> dict:
    """predictions.csv, summary.json, the report, and the manifest (every file this run wrote, with
    size and SHA-256, status complete); returns the summary."""
    from .report import model_info, write_report
    from .thumbs import write_gallery_thumbnails
    opts, tally, save_dir = run.opts, run.tally, run.save_dir
    try:
        _folder_shift(run.backend, tally)
        if run.dicom is not None:  # the SRs, from the final rows (folder_shift included)
            run.dicom.write_reports()
        cols = PredictionRow.columns(run.names, opts.save_masks, opts.cam is not None)
        write_csv_atomic(save_dir / "predictions.csv", cols, tally.rows)
        worst = tally.write_worst_dice(save_dir) if opts.report else []
        summary = build_summary(run.backend, items, tally, opts, time.perf_counter() - t0)
        if worst:
            summary["segmentation"]["lowest_dice"] = worst
        if run.dicom is not None:
            summary["dicom_out"] = run.dicom.block()
            summary["outputs"]["dicom"] = "dicom/ (a DICOM SEG and SR per DICOM input)"
        write_json_atomic(save_dir / "summary.json", summary)
        if opts.report:
            if not opts.annotate:
                write_gallery_thumbnails(save_dir, tally.rows)
            write_report(save_dir, summary, tally.rows, model=model_info(run.backend))
        run.claim.finish()
    finally:
        run.claim.release()
    return summary
