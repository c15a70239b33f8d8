"""Training behind model_arch.py: single process or torchrun/DDP (I/O on rank 0 only). train() is
prepare / init_model / resume / make_engine / run_epochs (end_of_epoch after each) / finish; the
steps and the state they share are in cxrkit.training.engine.

Determinism: batch order and augmentation draw from (seed, epoch, rank) and the global torch RNG is
re-seeded at every epoch start, so a run resumed from `last_checkpoint.pth` continues exactly as
the uninterrupted run would have (bit-identical on CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import plots
from ..core.checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, make_checkpoint,
                               strip_for_release)
from ..core.config import ModelConfig, RunOptions, TrainConfig, make_config
from .data import CachedData, load_data
from .split import load_or_make_split
from ..core.device import amp_dtype_for, barrier, pick_device, setup_distributed
from .engine import (NO_VALIDATION, Engine, Progress, Session, make_engine, selection_score,
                     train_one_epoch, validate)
from ..core.errors import DataError
from .calibration import remove_prior_correction
from .finalize import finalize
from ..core.errors import UsageError
from ..core.io_utils import write_json_atomic
from ..core.model import build_model, check_img_size, count_gflops, count_parameters
from ..core.outdir import holds_output_dir

log = logging.getLogger("cxrkit")

BEST, LAST, SPLIT = "best_covid_model.pth", "last_checkpoint.pth", "split.json"


def model_config(cfg: TrainConfig, num_classes: int) -> ModelConfig:
    """The preset's config; cfg.pretrained (--pretrained/--no-pretrained) overrides the preset (lite0 only)."""
    mcfg = make_config(cfg.arch, num_classes=num_classes)
    if cfg.pretrained is not None:
        if mcfg.backbone != "lite0" and cfg.pretrained:
            raise UsageError(f"--pretrained: --arch {cfg.arch} has no pretrained encoder; use --arch lite0")
        mcfg.pretrained = bool(cfg.pretrained)
    mcfg.input_zscore = bool(cfg.input_zscore)
    if cfg.lung_focus != "off" and mcfg.backbone != "lite0":
        raise UsageError(f"--lung_focus: --arch {cfg.arch} has no second encoder; use --arch lite0")
    mcfg.lung_focus, mcfg.focus_margin, mcfg.focus_size = cfg.lung_focus, float(cfg.focus_margin), int(cfg.focus_size)
    check_img_size(mcfg, cfg.img_size)
    return mcfg


@holds_output_dir([f"model_checkpoints/{n}" for n in (BEST, LAST, "training_curves.png", "training_summary.json")]
                  + [f"test_results/{n}" for n in ("classification_report.json", "confusion_matrix_test.png",
                                                   "roc_curves_test.png", "reliability_test.png",
                                                   "oof_predictions.npz")],
                  if_absent=[SPLIT])  # lock + manifest of --output_dir (cxrkit.core.outdir)
def train(cfg: TrainConfig, opts: RunOptions) -> dict:
    """Train the recipe `cfg` as `opts` says (model_arch.py builds both from its flags); returns
    finalize's result ({} on ranks other than 0 and for an interrupted run)."""
    s = prepare(cfg, opts)
    model = init_model(s)
    progress, train_state = resume(s, model)
    engine = make_engine(s, model, train_state)
    if s.rank == 0:
        log_start(s, engine)
    last_epoch = run_epochs(s, engine, progress)
    return finish(s, last_epoch)


# --------------------------------------------------------------------------------------- prepare
def prepare(cfg: TrainConfig, opts: RunOptions) -> Session:
    """Process and device, the output folder's checks, the data, its split and the model config."""
    rank, world, local = setup_distributed()
    device = pick_device(opts.device, local)
    if world > 1 and device.type == "cpu":
        # N processes x default threads on the same cores oversubscribe badly (OpenMP spin-waits)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    amp_dtype = amp_dtype_for(device, opts.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    out = Path(opts.output_dir)
    check_output_dir(opts, out, rank)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else out / "cache"
    data = load_data(opts.data_dir, cfg.img_size, cache_dir, cfg.workers, rank, world, not opts.quiet,
                     cfg.source_rule)
    split = load_split(cfg, data, out / SPLIT, rank, world)
    mcfg = model_config(cfg, len(data.classes))
    cfg = dataclasses.replace(cfg, pretrained=mcfg.pretrained)
    return Session(cfg, opts, rank, world, device, amp_dtype, data, split, mcfg)


def check_output_dir(opts: RunOptions, out: Path, rank: int) -> None:
    """Creates <out>/model_checkpoints (rank 0); refuses an output folder inside the data, and an
    existing best checkpoint unless --overwrite, or --resume with a last checkpoint to continue."""
    ck_dir = out / "model_checkpoints"
    if rank == 0:
        ck_dir.mkdir(parents=True, exist_ok=True)
    for d in [opts.data_dir] if isinstance(opts.data_dir, (str, Path)) else opts.data_dir:
        dd = Path(d).resolve()
        if out.resolve() == dd or dd in out.resolve().parents:
            raise DataError(f"--output_dir {out} is inside --data_dir {d}: its cache/ and model_checkpoints/ "
                            f"would be read as class folders; choose an output folder outside the data")
    if not opts.overwrite and (ck_dir / BEST).is_file() and not resumable(opts, ck_dir):
        if not opts.resume:
            raise CheckpointError(f"{ck_dir / BEST} already exists (an earlier run or the shipped model): pass "
                                  f"--resume to continue that run, --overwrite to replace it, or another --output_dir")
        raise CheckpointError(  # --resume would be a fresh start, and would write over it
            f"{ck_dir / BEST} exists but there is no {LAST} to continue from (the shipped model, or a run's best "
            f"kept alone): pass --overwrite to replace it, or another --output_dir")


def load_split(cfg: TrainConfig, data: CachedData, split_path: Path, rank: int, world: int) -> dict:
    """The run's split (k-fold: its fold), made by rank 0 and read by the others; an empty train (or,
    except for --fold all, validation) side is refused."""
    fold = None
    if cfg.folds:
        from .cv import parse_fold
        try:
            fold = parse_fold(str(cfg.fold), cfg.folds)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif cfg.fold:
        raise UsageError(f"--fold {cfg.fold} needs --folds K (the number of folds)")
    fold_kw = dict(folds=cfg.folds, fold=fold, fold_seed=cfg.fold_seed)
    if rank == 0:
        split = load_or_make_split(data, split_path, cfg.val_frac, cfg.test_frac, cfg.seed, cfg.dup_threshold,
                                   **fold_kw)
    barrier(world)
    if rank != 0:
        split = load_or_make_split(data, split_path, **fold_kw)
    if cfg.holdout_source:
        from .sources import holdout
        split = holdout(split, data.sources, cfg.holdout_source)
    for k, v in (("train", split["train"]), ("validation", split["val"])):
        if len(v) == 0 and not (k == "validation" and fold == "all"):
            raise DataError(f"the {k} split is empty ({len(data.paths)} images): add images or change the fractions")
    return split


def init_model(s: Session) -> torch.nn.Module:
    """The network with its starting weights: seeded init, ImageNet encoder, or --init_from's."""
    torch.manual_seed(s.cfg.seed)  # weight init follows --seed (same init on every rank, every run)
    # ImageNet weights only for a fresh start: a resumed run and --init_from overwrite every weight anyway.
    # "--resume" before the first checkpoint exists is a fresh start (a queued or cluster job passes it
    # every time), so it gets the same starting weights as one without the flag
    fresh = not resumable(s.opts, s.ck_dir)
    model = build_model(s.model_cfg, load_pretrained=fresh and not s.cfg.init_from)
    if s.cfg.init_from and fresh:
        init_from_checkpoint(model, s.model_cfg, s.classes, s.cfg.init_from)
        if s.rank == 0:
            log.info("initialised weights from %s (fresh optimizer and schedule)", s.cfg.init_from)
    return model


# ---------------------------------------------------------------------------------------- resume
def resumable(opts: RunOptions, ck_dir: Path) -> bool:
    """--resume was given and there is a last checkpoint in ck_dir to continue from (otherwise --resume is a
    fresh start)."""
    return bool(opts.resume) and (ck_dir / LAST).is_file()


def resume(s: Session, model: torch.nn.Module) -> tuple[Progress, dict | None]:
    """--resume: the raw weights and progress of <output_dir>/model_checkpoints/last_checkpoint.pth
    (its optimizer state etc. are returned for make_engine); a fresh start without one."""
    last_p = s.ck_dir / LAST
    if not resumable(s.opts, s.ck_dir):
        if s.opts.resume:
            log.warning("--resume: no %s yet, starting from scratch", last_p)
        return Progress(), None
    ck = load_checkpoint(last_p)
    if ck["model_config"] != s.model_cfg.to_dict() or ck["class_names"] != s.classes or ck["img_size"] != s.cfg.img_size:
        raise CheckpointError(f"{last_p}: made with another configuration (arch/classes/img_size); "
                              f"use a new --output_dir or the original flags")
    rec, now = ck.get("recipe") or {}, dataclasses.asdict(s.cfg)
    changed = [k for k in ("teacher", "distill_alpha", "distill_temperature") if k in rec and rec[k] != now[k]]
    if changed:  # a run must not switch its teacher halfway (or drop it) and still be recorded as one recipe
        raise CheckpointError(f"{last_p}: made with " + ", ".join(f"--{k} {rec[k]}" for k in changed)
                              + "; resume with the same distillation flags, or use a new --output_dir")
    model.load_state_dict(ck.get("train_state_dict", ck["state_dict"]))
    progress = Progress(ck["epoch"] + 1, ck["history"], ck["best_score"], ck["bad_epochs"])
    if s.rank == 0:
        log.info("resuming from %s at epoch %d", last_p, progress.start_epoch + 1)
    return progress, ck


def log_start(s: Session, e: Engine) -> None:
    cfg, sp = s.cfg, s.split
    log.info("%s | %d classes %s | train %d val %d test %d | %s params %.2fM, %.2f GFLOP/img @%dpx | "
             "device %s%s amp=%s", cfg.arch, len(s.classes), s.classes, len(sp["train"]), len(sp["val"]),
             len(sp["test"]), cfg.arch, count_parameters(e.model) / 1e6,
             count_gflops(build_model(s.model_cfg), cfg.img_size), cfg.img_size, s.device,
             f" x{s.world}" if s.world > 1 else "", s.amp_dtype)
    from .sources import describe
    log.info("sources: %s%s", describe(s.data.sources, s.data.labels, s.classes),
             f" | held out for the test: {cfg.holdout_source}" if cfg.holdout_source else "")


# ------------------------------------------------------------------------------------ epoch loop
def run_epochs(s: Session, e: Engine, progress: Progress) -> int:
    """Train from progress.start_epoch to num_epochs or a stop (early stopping, --max_minutes, the
    tests' interruption), decided on rank 0 and broadcast; returns the last epoch run (0-based)."""
    from tqdm import tqdm
    cfg = s.cfg
    progress.t_start = time.perf_counter()
    epoch = progress.start_epoch - 1
    for epoch in range(progress.start_epoch, cfg.num_epochs):
        t0 = time.perf_counter()
        e.loader.sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 100003 + epoch * 101 + s.rank)  # dropout etc., resume-exact
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + s.rank)
        bar = tqdm(e.loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=s.rank != 0 or s.opts.quiet,
                   leave=False)
        tr, n_seen = train_one_epoch(s, e, bar, gen)
        train_time = time.perf_counter() - t0
        # --- validation and checkpointing on rank 0; the stop decision is broadcast ---------------
        stop = torch.zeros(1, device=s.device)
        if s.rank == 0:
            val = validate(s, e) if len(s.split["val"]) else NO_VALIDATION
            row = {"epoch": epoch + 1, "train_loss": tr[0], "train_seg": tr[1], "train_cls": tr[2], **val,
                   "lr": e.sched.get_last_lr()[0], "train_images_per_s": n_seen / train_time,
                   "epoch_seconds": time.perf_counter() - t0}
            stop[0] = float(end_of_epoch(s, e, progress, row))
        if s.world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            break
    return epoch


# ---------------------------------------------------------------------------------- end of epoch
def end_of_epoch(s: Session, e: Engine, progress: Progress, row: dict) -> bool:
    """Rank 0 after each epoch: record the row, write the checkpoints, curves and summary, print the
    epoch's line; returns whether to stop."""
    improved = progress.record(row, s.keep_last)
    save_checkpoints(s, e, progress, row, improved)
    plots.training_curves(progress.history, s.ck_dir / "training_curves.png")
    write_json_atomic(s.ck_dir / "training_summary.json", _summary(s, progress))
    print_epoch(s, row, improved)
    return should_stop(s, progress, row["epoch"])


def save_checkpoints(s: Session, e: Engine, progress: Progress, row: dict, improved: bool) -> None:
    """last_checkpoint.pth (everything --resume needs) and, when improved, best_covid_model.pth (the
    release part). The recipe is the whole TrainConfig."""
    meta = dict(epoch=row["epoch"] - 1, metrics=row, history=progress.history, best_score=progress.best_score,
                bad_epochs=progress.bad_epochs, recipe=dataclasses.asdict(s.cfg), split_file=SPLIT)
    ck = make_checkpoint(e.eval_model, s.model_cfg, s.classes, s.cfg.img_size, **meta, optimizer=e.opt.state_dict(),
                         scheduler=e.sched.state_dict(), scaler=e.scaler.state_dict())
    if e.ema is not None:
        ck["train_state_dict"] = {k: v.detach().cpu() for k, v in e.model.state_dict().items()}
    if improved:
        atomic_torch_save(strip_for_release(ck), s.ck_dir / BEST)
    atomic_torch_save(ck, s.ck_dir / LAST)  # last is written after best: resume never skips a best


def print_epoch(s: Session, row: dict, improved: bool) -> None:
    vtxt = (f"| {'held-out' if s.keep_last else 'val'} loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} "
            f"F1 {row['val_macro_f1']:.4f} Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f} "
            if len(s.split["val"]) else "| no validation (fold all) ")
    print(f"epoch {row['epoch']:3d}/{s.cfg.num_epochs} | loss {row['train_loss']:.4f} (seg {row['train_seg']:.4f} "
          f"cls {row['train_cls']:.4f}) {vtxt}| {row['train_images_per_s']:.1f} img/s "
          f"{row['epoch_seconds']:.1f}s{' *' if improved else ''}", flush=True)


def should_stop(s: Session, progress: Progress, done: int) -> bool:
    """After `done` epochs: early stopping (not k-fold), --max_minutes, or the tests' --stop_after_epoch."""
    cfg, opts = s.cfg, s.opts
    stop = False
    if cfg.patience and progress.bad_epochs >= cfg.patience and not s.keep_last:
        print(f"early stopping: no validation improvement in {cfg.patience} epochs", flush=True)
        stop = True
    max_seconds = opts.max_minutes * 60 if opts.max_minutes else None
    if max_seconds and time.perf_counter() - progress.t_start > max_seconds and done < cfg.num_epochs:
        print(f"--max_minutes {opts.max_minutes} reached after epoch {done}; "
              f"continue later with --resume", flush=True)
        stop = True
    if opts.stop_after_epoch and done >= opts.stop_after_epoch:
        stop = True  # testing hook: simulates an interruption after a completed epoch
    return stop


def _summary(s: Session, progress: Progress) -> dict:
    history = progress.history
    best = (history[-1] if s.keep_last else max(history, key=selection_score)) if history else {}
    return {"arch": s.cfg.arch, "model_config": s.model_cfg.to_dict(), "classes": s.classes,
            "img_size": s.cfg.img_size, "epochs_run": len(history), "best_epoch": best.get("epoch"),
            "best_val": best, "best_score": progress.best_score,
            "train_seconds_this_session": time.perf_counter() - progress.t_start,
            "split_sizes": {k: int(len(v)) for k, v in s.split.items()}, "world_size": s.world,
            "device": str(s.device) + (f" ({torch.cuda.get_device_name(s.device)})" if s.device.type == "cuda" else ""),
            "history": history}


def finish(s: Session, last_epoch: int) -> dict:
    """Rank 0, unless interrupted: prior correction, calibration and the test report (evaluate.finalize;
    k-fold: the out-of-fold predictions too); then the process group ends."""
    barrier(s.world)
    result = {}
    interrupted = bool(s.opts.stop_after_epoch) and last_epoch + 1 < s.cfg.num_epochs
    if s.rank == 0 and not interrupted and (s.ck_dir / BEST).is_file():
        sp = s.split
        result = finalize(s.ck_dir / BEST, s.data, sp["train"], sp["val"], sp["test"],
                          Path(s.opts.output_dir) / "test_results", s.device, s.amp_dtype, s.cfg.prior_correction,
                          oof=s.keep_last)
    if s.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


@torch.no_grad()
def init_from_checkpoint(model, cfg: ModelConfig, classes, path) -> None:
    """Fine-tuning start: weights of a checkpoint with the same config and classes. A prior
    correction baked into its classifier bias is removed first (it is re-applied after training)."""
    ck = load_checkpoint(path)
    if ck["model_config"] != cfg.to_dict() or ck["class_names"] != list(classes):
        raise CheckpointError(f"--init_from {path}: made for arch {ck['model_config'].get('preset')} with classes "
                              f"{ck['class_names']}; pass the matching --arch and data")
    model.load_state_dict(ck["state_dict"])
    remove_prior_correction(model, ck)
