"""The training steps behind cxrkit.training.train, and the state they share: Session (what a run settles
once), Engine (the network and what trains it), Progress (where the run stands); one epoch of
training, validation, the weight EMA, the learning-rate schedule and the parameter groups.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.config import ModelConfig, RunOptions, TrainConfig
from .data import CachedData, augment, make_loader
from .evaluate import predict_split
from .losses import MultiTaskLoss, inverse_frequency_weights, validation_loss
from .mixstyle import StyleMix
from ..core.metrics import classification_metrics
from ..core.model_input import to_model_input


def lr_lambda_factory(warmup_steps: int, total_steps: int):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def param_groups(model, lr: float, encoder_lr_mult: float) -> list[dict]:
    """One group at lr; with a separately built encoder (model.encoder_parameters(), model.MultiTaskNet)
    and encoder_lr_mult != 1, the encoder gets lr * encoder_lr_mult so fine-tuning does not wash out its
    ImageNet features while the new decoder and heads learn at full speed."""
    enc_ids = {id(p) for p in model.encoder_parameters()}
    if not enc_ids or encoder_lr_mult == 1.0:
        return [{"params": list(model.parameters())}]
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


# ---------------------------------------------------------------------------------- run state
@dataclass
class Session:
    """What cxrkit.training.train.prepare settles once: the recipe (its `pretrained` resolved to the model's, so the
    checkpoint's recipe says what was used), the run options, process and device, data and split."""
    cfg: TrainConfig
    opts: RunOptions
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    data: CachedData
    split: dict
    model_cfg: ModelConfig

    @property
    def ck_dir(self) -> Path:
        return Path(self.opts.output_dir) / "model_checkpoints"

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def keep_last(self) -> bool:
        """k-fold runs keep the last epoch: their held-out fold is monitored, never used to select."""
        return bool(self.cfg.folds)


@dataclass
class Engine:
    """The network and what trains it. The EMA weights are what is validated, checkpointed as
    "state_dict" and shipped; the raw weights (train_state_dict) and optimizer state only serve --resume."""
    model: torch.nn.Module
    ema: torch.nn.Module | None
    ddp_model: torch.nn.Module  # model, or its DistributedDataParallel wrapper
    class_w: torch.Tensor
    criterion: MultiTaskLoss
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    mem_fmt: torch.memory_format
    style_mix: StyleMix | None  # --mixstyle's hooks on the trained (not the EMA) model
    teacher: torch.nn.Module | None  # --teacher, in eval mode on the device (its prior correction removed)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.model


@dataclass
class Progress:
    """Where the run stands: restored by --resume, advanced at the end of every epoch."""
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best_score: float = -1e9
    bad_epochs: int = 0
    t_start: float = 0.0  # perf_counter() when this session's training began

    def record(self, row: dict, keep_last: bool) -> bool:
        """Append the epoch's row; True when it is the new best (k-fold: always, the last epoch is kept)."""
        self.history.append(row)
        score = row["epoch"] - 1 if keep_last else selection_score(row)
        if score > self.best_score:
            self.best_score, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False


def make_engine(s: Session, model: torch.nn.Module, train_state: dict | None) -> Engine:
    """Model on its device and memory format, EMA copy, DDP wrapper, loss, optimizer, schedule, scaler
    (their state restored from train_state when resuming) and the training loader."""
    cfg = s.cfg
    model.to(s.device)
    mem_fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=mem_fmt)
    ema = None
    if cfg.ema_decay > 0:
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        if train_state is not None and "train_state_dict" in train_state:
            ema.load_state_dict(train_state["state_dict"])
    ddp_model = model
    if s.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    tr_idx = s.split["train"]
    class_w = inverse_frequency_weights(s.data.labels[tr_idx], len(s.classes)).to(s.device)
    criterion = MultiTaskLoss(class_w, cfg.seg_weight, cfg.cls_weight, cfg.distill_alpha if cfg.teacher else 0.0,
                              cfg.distill_temperature).to(s.device)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.encoder_lr_mult), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    per_rank = -(-len(tr_idx) // s.world)
    steps_per_epoch = max(1, per_rank // cfg.batch_size)  # drop_last: BN needs >1 sample per batch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda_factory(cfg.warmup_epochs * steps_per_epoch, cfg.num_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    if train_state is not None:
        opt.load_state_dict(train_state["optimizer"])
        sched.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])
    loader = make_loader(s.data, tr_idx, cfg.batch_size, True, cfg.seed, s.rank, s.world, cfg.workers,
                         s.device.type == "cuda", drop_last=per_rank >= cfg.batch_size,
                         balance_sources=cfg.balance_sources)
    style_mix = StyleMix(model, cfg.mixstyle, cfg.mixstyle_alpha) if cfg.mixstyle > 0 else None
    teacher = load_teacher(cfg.teacher, s.classes, cfg.img_size, s.device, mem_fmt) if cfg.teacher else None
    return Engine(model, ema, ddp_model, class_w, criterion, opt, sched, scaler, loader, mem_fmt, style_mix, teacher)


def load_teacher(path, classes, img_size: int, device, mem_fmt) -> torch.nn.Module:
    """--teacher: a checkpoint of the same classes and input size (any architecture, an ensemble too), frozen;
    its prior correction is removed, since the student is corrected by its own training prior after training."""
    from ..core.checkpoint import CheckpointError, model_from_checkpoint
    from .calibration import remove_prior_correction
    teacher, ck = model_from_checkpoint(path)
    if ck["class_names"] != list(classes) or ck["img_size"] != img_size:
        raise CheckpointError(f"--teacher {path}: made for classes {ck['class_names']} at {ck['img_size']} px, this run "
                              f"trains {list(classes)} at {img_size} px; pass a teacher trained on the same classes "
                              f"and --img_size")
    remove_prior_correction(teacher, ck)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).to(memory_format=mem_fmt).eval()


# ------------------------------------------------------------------------------------- training
def train_one_epoch(s: Session, e: Engine, batches, gen: torch.Generator) -> tuple[list, int]:
    """One pass over `batches` (augmented on the device); returns the epoch's mean (total, seg, cls)
    training loss over all ranks and the number of images seen. Losses are summed on the device:
    no .item() per step."""
    device, cfg = s.device, s.cfg
    e.ddp_model.train()
    sums = torch.zeros(3, device=device)
    n_seen = 0
    for imgs, masks, has_mask, y in batches:
        x = to_model_input(imgs.to(device, non_blocking=True))
        m = masks.to(device, non_blocking=True).unsqueeze(1).float()
        hm, y = has_mask.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, m = augment(x, m, cfg, gen, hm)
        x = x.contiguous(memory_format=e.mem_fmt)
        if e.style_mix is not None:
            e.style_mix.next_batch(len(y), gen)
        with torch.autocast(device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            out = e.ddp_model(x)
            with torch.no_grad():  # the teacher sees the student's augmented batch (consistent teaching)
                t_logits = e.teacher(x).classification if e.teacher is not None else None
        parts = e.criterion(out.segmentation, out.classification, m, hm, y, t_logits)
        e.opt.zero_grad(set_to_none=True)
        e.scaler.scale(parts.total).backward()
        e.scaler.unscale_(e.opt)
        torch.nn.utils.clip_grad_norm_(e.model.parameters(), cfg.grad_clip)
        e.scaler.step(e.opt)
        e.scaler.update()
        e.sched.step()
        if e.ema is not None:
            ema_update(e.ema, e.model, cfg.ema_decay, e.sched.last_epoch)
        sums += torch.stack([parts.total.detach(), parts.seg.detach(), parts.cls.detach()]) * len(y)
        n_seen += len(y)
    if s.world > 1:
        tot = torch.tensor([n_seen], device=device, dtype=torch.float32)
        dist.all_reduce(sums)
        dist.all_reduce(tot)
        n_seen = int(tot.item())
    return (sums / max(n_seen, 1)).tolist(), n_seen


def validate(s: Session, e: Engine) -> dict:
    """The validation columns of the epoch's history row (accuracy, macro-F1, Dice at the model input
    and at the masks' own size, the validation loss of losses.validation_loss)."""
    r = predict_split(e.eval_model, s.data, s.split["val"], s.device, max(s.cfg.batch_size, 32), s.amp_dtype,
                      native_dice=True)
    cm = classification_metrics(r["labels"], r["probs"], s.classes)
    dice = r["seg"]["dice"] or 0.0
    return {"val_loss": validation_loss(r, e.class_w, s.cfg.seg_weight, s.cfg.cls_weight), "val_acc": cm["accuracy"],
            "val_macro_f1": cm["macro_f1"], "val_dice": dice, "val_iou": r["seg"]["iou"] or 0.0,
            "val_dice_native": (r.get("seg_native") or {}).get("dice")}
