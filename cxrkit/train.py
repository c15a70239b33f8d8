"""Training engine behind model_arch.py: single process or torchrun/DDP (I/O on rank 0 only).

Determinism: batch order and augmentation draw from (seed, epoch, rank) and the global torch RNG is
re-seeded at every epoch start, so a run resumed from `last_checkpoint.pth` continues exactly as
the uninterrupted run would have (bit-identical on CPU).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import plots
from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, make_checkpoint, strip_for_release
from .config import ModelConfig, TrainConfig, make_config
from .data import augment, load_data, load_or_make_split, make_loader
from .device import amp_dtype_for, barrier, pick_device, setup_distributed
from .errors import DataError
from .evaluate import finalize, predict_split
from .io_utils import UsageError, write_json_atomic
from .losses import MultiTaskLoss, inverse_frequency_weights, validation_loss
from .metrics import classification_metrics
from .model import build_model, check_img_size, count_gflops, count_parameters
from .outdir import holds_output_dir
from .preprocess import to_model_input

log = logging.getLogger("cxrkit")

BEST, LAST = "best_covid_model.pth", "last_checkpoint.pth"


def lr_lambda_factory(warmup_steps: int, total_steps: int):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


AUG_KEYS = ("aug_rotate_deg", "aug_scale", "aug_shift", "aug_brightness", "aug_contrast", "outside_lung_aug",
            "outside_lung_fill", "outside_lung_margin")


def model_config_from_args(args, num_classes: int) -> ModelConfig:
    """The preset's config; --pretrained/--no-pretrained overrides the preset (lite0 only)."""
    cfg = make_config(args.arch, num_classes=num_classes)
    pre = getattr(args, "pretrained", None)
    if pre is not None:
        if cfg.backbone != "lite0" and pre:
            raise UsageError(f"--pretrained: --arch {args.arch} has no pretrained encoder; use --arch lite0")
        cfg.pretrained = bool(pre)
    check_img_size(cfg, args.img_size)
    return cfg


def param_groups(model, lr: float, encoder_lr_mult: float) -> list[dict]:
    """One group at lr; with a pretrained encoder (model.encoder) and encoder_lr_mult != 1, the
    encoder gets lr * encoder_lr_mult so fine-tuning does not wash out its ImageNet features while the
    new decoder and heads learn at full speed."""
    enc = getattr(model, "encoder", None)
    if enc is None or encoder_lr_mult == 1.0:
        return [{"params": list(model.parameters())}]
    enc_ids = {id(p) for p in enc.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) in enc_ids], "lr": lr * encoder_lr_mult},
            {"params": [p for p in model.parameters() if id(p) not in enc_ids], "lr": lr}]


# the validation columns of a run with nothing held out (--folds K --fold all)
NO_VALIDATION = {"val_loss": float("nan"), "val_acc": float("nan"), "val_macro_f1": float("nan"),
                 "val_dice": float("nan"), "val_iou": float("nan"), "val_dice_native": None}


def selection_score(row: dict) -> float:
    """Best-epoch criterion on validation: macro-F1 + Dice (classification and segmentation equally)."""
    return row["val_macro_f1"] + row["val_dice"]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Exponential moving average of weights and float buffers (BN statistics), with the usual warm-up so early
    epochs are not dominated by the random initialisation: d = min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    ep, mp = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ep, mp, 1 - d)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        if eb.is_floating_point():
            eb.lerp_(mb, 1 - d)
        else:
            eb.copy_(mb)


# ------------------------------------------------------------------------------------- training
def train_one_epoch(ddp_model, model, ema, batches, criterion, opt, sched, scaler, aug_cfg, gen, device, amp_dtype,
                    mem_fmt, grad_clip, ema_decay, world) -> tuple[list, int]:
    """One pass over `batches` (augmented on `device`); returns the epoch's mean (total, seg, cls)
    training loss over all ranks and the number of images seen. Losses are summed on the device:
    no .item() per step."""
    ddp_model.train()
    sums = torch.zeros(3, device=device)
    n_seen = 0
    for imgs, masks, has_mask, y in batches:
        x = to_model_input(imgs.to(device, non_blocking=True))
        m = masks.to(device, non_blocking=True).unsqueeze(1).float()
        hm, y = has_mask.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, m = augment(x, m, aug_cfg, gen, hm)
        x = x.contiguous(memory_format=mem_fmt)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = ddp_model(x)
        parts = criterion(out.segmentation, out.classification, m, hm, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(parts.total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema_update(ema, model, ema_decay, sched.last_epoch)
        sums += torch.stack([parts.total.detach(), parts.seg.detach(), parts.cls.detach()]) * len(y)
        n_seen += len(y)
    if world > 1:
        tot = torch.tensor([n_seen], device=device, dtype=torch.float32)
        dist.all_reduce(sums)
        dist.all_reduce(tot)
        n_seen = int(tot.item())
    return (sums / max(n_seen, 1)).tolist(), n_seen


def validate(eval_model, data, va_idx, classes, class_w, device, batch_size, amp_dtype, seg_weight,
             cls_weight) -> dict:
    """The validation columns of the epoch's history row (accuracy, macro-F1, Dice at the model input
    and at the masks' own size, the validation loss of losses.validation_loss)."""
    r = predict_split(eval_model, data, va_idx, device, batch_size, amp_dtype, native_dice=True)
    cm = classification_metrics(r["labels"], r["probs"], classes)
    dice = r["seg"]["dice"] or 0.0
    return {"val_loss": validation_loss(r, class_w, seg_weight, cls_weight), "val_acc": cm["accuracy"],
            "val_macro_f1": cm["macro_f1"], "val_dice": dice, "val_iou": r["seg"]["iou"] or 0.0,
            "val_dice_native": (r.get("seg_native") or {}).get("dice")}


@holds_output_dir([f"model_checkpoints/{n}" for n in (BEST, LAST, "training_curves.png", "training_summary.json")]
                  + [f"test_results/{n}" for n in ("classification_report.json", "confusion_matrix_test.png",
                                                   "roc_curves_test.png", "reliability_test.png",
                                                   "oof_predictions.npz")],
                  if_absent=["split.json"])  # lock + manifest of --output_dir (cxrkit.outdir)
def train(args) -> dict:
    """args: the argparse Namespace of model_arch.py (plain attributes, never pickled)."""
    rank, world, local = setup_distributed()
    device = pick_device(args.device, local)
    if world > 1 and device.type == "cpu":
        # N processes x default threads on the same cores oversubscribe badly (OpenMP spin-waits)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    amp_dtype = amp_dtype_for(device, args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    out = Path(args.output_dir)
    ck_dir, res_dir = out / "model_checkpoints", out / "test_results"
    if rank == 0:
        ck_dir.mkdir(parents=True, exist_ok=True)
    dd = Path(args.data_dir).resolve()
    if out.resolve() == dd or dd in out.resolve().parents:
        raise DataError(f"--output_dir {out} is inside --data_dir {args.data_dir}: its cache/ and model_checkpoints/ "
                        f"would be read as class folders; choose an output folder outside the data")
    if not args.resume and not getattr(args, "overwrite", False) and (ck_dir / BEST).is_file():
        raise CheckpointError(f"{ck_dir / BEST} already exists (an earlier run or the shipped model): pass --resume "
                              f"to continue that run, --overwrite to replace it, or another --output_dir")
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    data = load_data(args.data_dir, args.img_size, cache_dir, args.workers, rank, world, not args.quiet)
    classes = data.classes
    split_path = out / "split.json"
    fold = None
    if args.folds:
        from .cv import parse_fold
        try:
            fold = parse_fold(str(args.fold), args.folds)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.fold:
        raise UsageError(f"--fold {args.fold} needs --folds K (the number of folds)")
    fold_kw = dict(folds=args.folds, fold=fold, fold_seed=args.fold_seed)
    if rank == 0:
        split = load_or_make_split(data, split_path, args.val_frac, args.test_frac, args.seed, args.dup_threshold,
                                   **fold_kw)
    barrier(world)
    if rank != 0:
        split = load_or_make_split(data, split_path, **fold_kw)
    tr_idx, va_idx, te_idx = split["train"], split["val"], split["test"]
    # k-fold runs keep the last epoch: their held-out fold is monitored, never used to select
    keep_last = bool(args.folds)
    for k, v in (("train", tr_idx), ("validation", va_idx)):
        if len(v) == 0 and not (k == "validation" and fold == "all"):
            raise DataError(f"the {k} split is empty ({len(data.paths)} images): add images or change the fractions")

    cfg = model_config_from_args(args, len(classes))
    torch.manual_seed(args.seed)  # weight init follows --seed (same init on every rank, every run)
    # ImageNet weights only for a fresh start: --resume and --init_from overwrite every weight anyway
    model = build_model(cfg, load_pretrained=not args.resume and not getattr(args, "init_from", None))
    if getattr(args, "init_from", None) and not args.resume:
        init_from_checkpoint(model, cfg, classes, args.init_from)
        if rank == 0:
            log.info("initialised weights from %s (fresh optimizer and schedule)", args.init_from)
    recipe = {k: getattr(args, k) for k in ("arch", "img_size", "batch_size", "lr", "weight_decay", "num_epochs",
                                            "seed", "seg_weight", "cls_weight", "patience", "warmup_epochs",
                                            "ema_decay", "init_from", "encoder_lr_mult", "outside_lung_aug",
                                            "outside_lung_fill", "outside_lung_margin", "channels_last",
                                            "folds", "fold", "fold_seed")}
    recipe["pretrained"] = cfg.pretrained
    # --- resume -------------------------------------------------------------------------------
    start_epoch, history, best_score, bad_epochs, train_state = 0, [], -1e9, 0, None
    last_p = ck_dir / LAST
    if args.resume:
        if not last_p.is_file():
            log.warning("--resume: no %s yet, starting from scratch", last_p)
        else:
            ck = load_checkpoint(last_p)
            if ck["model_config"] != cfg.to_dict() or ck["class_names"] != classes or ck["img_size"] != args.img_size:
                raise CheckpointError(f"{last_p}: made with another configuration (arch/classes/img_size); "
                                      f"use a new --output_dir or the original flags")
            model.load_state_dict(ck.get("train_state_dict", ck["state_dict"]))
            train_state = ck
            start_epoch = ck["epoch"] + 1
            history, best_score, bad_epochs = ck["history"], ck["best_score"], ck["bad_epochs"]
            if rank == 0:
                log.info("resuming from %s at epoch %d", last_p, start_epoch + 1)
    model.to(device)
    mem_fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=mem_fmt)
    # EMA weights are what is validated, checkpointed as "state_dict" and shipped; the raw weights
    # (train_state_dict) and optimizer state only serve --resume
    ema = None
    if args.ema_decay > 0:
        import copy
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        if train_state is not None and "train_state_dict" in train_state:
            ema.load_state_dict(train_state["state_dict"])
    eval_model = ema if ema is not None else model
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    class_w = inverse_frequency_weights(data.labels[tr_idx], len(classes)).to(device)
    criterion = MultiTaskLoss(class_w, args.seg_weight, args.cls_weight).to(device)
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.encoder_lr_mult), lr=args.lr,
                            weight_decay=args.weight_decay)
    per_rank = -(-len(tr_idx) // world)
    steps_per_epoch = max(1, per_rank // args.batch_size)  # drop_last: BN needs >1 sample per batch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda_factory(args.warmup_epochs * steps_per_epoch, args.num_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if train_state is not None:
        opt.load_state_dict(train_state["optimizer"])
        sched.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])

    pin = device.type == "cuda"
    drop_last = per_rank >= args.batch_size
    train_loader = make_loader(data, tr_idx, args.batch_size, True, args.seed, rank, world, args.workers, pin,
                               drop_last=drop_last)
    aug_cfg = TrainConfig(**{k: getattr(args, k) for k in AUG_KEYS})
    if rank == 0:
        log.info("%s | %d classes %s | train %d val %d test %d | %s params %.2fM, %.2f GFLOP/img @%dpx | "
                 "device %s%s amp=%s", args.arch, len(classes), classes, len(tr_idx), len(va_idx), len(te_idx),
                 args.arch, count_parameters(model) / 1e6, count_gflops(build_model(cfg), args.img_size),
                 args.img_size, device, f" x{world}" if world > 1 else "", amp_dtype)
    from tqdm import tqdm
    t_train0 = time.perf_counter()
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.num_epochs):
        t0 = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed * 100003 + epoch * 101 + rank)  # dropout etc., resume-exact
        gen = torch.Generator().manual_seed(args.seed * 7919 + epoch * 31 + rank)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=rank != 0 or args.quiet,
                   leave=False)
        tr, n_seen = train_one_epoch(ddp_model, model, ema, bar, criterion, opt, sched, scaler, aug_cfg, gen,
                                     device, amp_dtype, mem_fmt, args.grad_clip, args.ema_decay, world)
        train_time = time.perf_counter() - t0
        # --- validation and checkpointing on rank 0; the stop decision is broadcast ---------------
        stop = torch.zeros(1, device=device)
        if rank == 0:
            val = validate(eval_model, data, va_idx, classes, class_w, device, max(args.batch_size, 32), amp_dtype,
                           args.seg_weight, args.cls_weight) if len(va_idx) else NO_VALIDATION
            row = {"epoch": epoch + 1, "train_loss": tr[0], "train_seg": tr[1], "train_cls": tr[2], **val,
                   "lr": sched.get_last_lr()[0], "train_images_per_s": n_seen / train_time,
                   "epoch_seconds": time.perf_counter() - t0}
            history.append(row)
            score = epoch if keep_last else selection_score(row)
            improved = score > best_score
            if improved:
                best_score, bad_epochs = score, 0
            else:
                bad_epochs += 1
            meta = dict(epoch=epoch, metrics=row, history=history, best_score=best_score, bad_epochs=bad_epochs,
                        recipe=recipe, split_file=str(split_path.name))
            ck = make_checkpoint(eval_model, cfg, classes, args.img_size, **meta, optimizer=opt.state_dict(),
                                 scheduler=sched.state_dict(), scaler=scaler.state_dict())
            if ema is not None:
                ck["train_state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if improved:
                atomic_torch_save(strip_for_release(ck), ck_dir / BEST)
            atomic_torch_save(ck, ck_dir / LAST)  # last is written after best: resume never skips a best
            plots.training_curves(history, ck_dir / "training_curves.png")
            write_json_atomic(ck_dir / "training_summary.json", _summary(args, cfg, classes, history, best_score, split,
                                                                  time.perf_counter() - t_train0, world, device,
                                                                  keep_last))
            vtxt = (f"| {'held-out' if keep_last else 'val'} loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} "
                    f"F1 {row['val_macro_f1']:.4f} Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f} "
                    if len(va_idx) else "| no validation (fold all) ")
            print(f"epoch {epoch + 1:3d}/{args.num_epochs} | loss {tr[0]:.4f} (seg {tr[1]:.4f} cls {tr[2]:.4f}) "
                  f"{vtxt}| {row['train_images_per_s']:.1f} img/s "
                  f"{row['epoch_seconds']:.1f}s{' *' if improved else ''}", flush=True)
            if args.patience and bad_epochs >= args.patience and not keep_last:
                print(f"early stopping: no validation improvement in {args.patience} epochs", flush=True)
                stop[0] = 1
            if max_seconds and time.perf_counter() - t_train0 > max_seconds and epoch + 1 < args.num_epochs:
                print(f"--max_minutes {args.max_minutes} reached after epoch {epoch + 1}; "
                      f"continue later with --resume", flush=True)
                stop[0] = 1
            if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch:
                stop[0] = 1  # testing hook: simulates an interruption after a completed epoch
        if world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            break
    barrier(world)
    result = {}
    interrupted = bool(args.stop_after_epoch) and epoch + 1 < args.num_epochs
    if rank == 0 and not interrupted and (ck_dir / BEST).is_file():
        result = finalize(ck_dir / BEST, data, tr_idx, va_idx, te_idx, res_dir, device, amp_dtype,
                          args.prior_correction, oof=keep_last)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _summary(args, cfg: ModelConfig, classes, history, best_score, split, seconds, world, device,
             keep_last=False) -> dict:
    best = (history[-1] if keep_last else max(history, key=selection_score)) if history else {}
    return {"arch": args.arch, "model_config": cfg.to_dict(), "classes": classes, "img_size": args.img_size,
            "epochs_run": len(history), "best_epoch": best.get("epoch"), "best_val": best,
            "best_score": best_score, "train_seconds_this_session": seconds,
            "split_sizes": {k: int(len(v)) for k, v in split.items()}, "world_size": world,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "history": history}


@torch.no_grad()
def init_from_checkpoint(model, cfg: ModelConfig, classes, path) -> None:
    """Fine-tuning start: weights of a checkpoint with the same config and classes. A prior
    correction baked into its classifier bias is removed first (it is re-applied after training)."""
    ck = load_checkpoint(path)
    if ck["model_config"] != cfg.to_dict() or ck["class_names"] != list(classes):
        raise CheckpointError(f"--init_from {path}: made for arch {ck['model_config'].get('preset')} with classes "
                              f"{ck['class_names']}; pass the matching --arch and data")
    model.load_state_dict(ck["state_dict"])
    pc = ck.get("prior_correction")
    if pc:
        last = model.cls_head.mlp[-1]
        last.bias -= torch.tensor(pc["logit_offset"], dtype=last.bias.dtype)
