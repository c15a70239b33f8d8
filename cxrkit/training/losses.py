"""Multi-task loss: seg_weight * (soft Dice + BCE) + cls_weight * class-weighted cross-entropy.

Samples without a mask contribute nothing to the segmentation term (has_mask selects them).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    total: torch.Tensor
    seg: torch.Tensor
    cls: torch.Tensor


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = N / (C * n_c): every class carries the same total weight (the per-sample weight averages 1
    over the training set); a class absent from training gets weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss (B,), computed in float32."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return 1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


def seg_loss(logits, target, has_mask) -> torch.Tensor:
    """Mean over masked samples of Dice + BCE; 0 (still in the graph) when the batch has no mask."""
    w = has_mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten(1).mean(1)
    per = dice_loss(logits, target) + bce
    return (per * w).sum() / w.sum().clamp(min=1.0)


def distill_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the class probabilities at temperature T, averaged over the batch
    (Hinton et al. 2015: the T^2 keeps the gradients' scale as T changes)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                    log_target=True, reduction="batchmean") * t * t


class MultiTaskLoss(torch.nn.Module):
    """distill_alpha: with teacher logits, that share of the classification term is distill_loss (the rest
    the labels' cross-entropy)."""

    def __init__(self, class_weights: torch.Tensor | None, seg_weight: float = 1.0, cls_weight: float = 2.0,
                 distill_alpha: float = 0.0, distill_temperature: float = 1.0):
        super().__init__()
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)
        self.seg_weight, self.cls_weight = seg_weight, cls_weight
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature

    def forward(self, seg_logits, cls_logits, masks, has_mask, labels, teacher_logits=None) -> LossParts:
        s = seg_loss(seg_logits, masks, has_mask)
        c = F.cross_entropy(cls_logits.float(), labels, weight=self.class_weights)
        if teacher_logits is not None:
            a = self.distill_alpha
            c = (1 - a) * c + a * distill_loss(cls_logits, teacher_logits, self.distill_temperature)
        return LossParts(self.seg_weight * s + self.cls_weight * c, s, c)


def validation_loss(result: dict, class_weights: torch.Tensor, seg_weight: float, cls_weight: float) -> float:
    """The training objective's analogue on evaluate.predict_split's output: seg_weight x (BCE +
    (1 - hard Dice at 0.5)) + cls_weight x class-weighted CE of the logits (float, host side)."""
    ce = F.cross_entropy(torch.from_numpy(result["logits"]), torch.from_numpy(result["labels"]),
                         weight=class_weights.detach().cpu())
    dice = result["seg"]["dice"] or 0.0
    return seg_weight * ((result["seg"]["bce"] or 0.0) + (1 - dice)) + cls_weight * float(ce)
