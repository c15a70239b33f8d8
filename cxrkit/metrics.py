"""Evaluation metrics (numpy / scikit-learn, computed once per epoch on gathered arrays)."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score
    y_pred = probs.argmax(1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {"accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
           "macro_f1": float(f.mean()),
           "weighted_f1": float((f * s).sum() / max(s.sum(), 1)),
           "per_class": {}, "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}
    for i, c in enumerate(classes):
        auc = None
        pos = y_true == i
        if pos.any() and (~pos).any():
            auc = float(roc_auc_score(pos, probs[:, i]))
        out["per_class"][c] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i]), "roc_auc": auc}
    aucs = [v["roc_auc"] for v in out["per_class"].values() if v["roc_auc"] is not None]
    out["macro_roc_auc"] = float(np.mean(aucs)) if aucs else None
    return out


class SegAccumulator:
    """Dice / IoU per image at threshold 0.5 (images with a ground-truth mask only), mean BCE.

    Fed torch tensors on any device; keeps per-image sums on-device, moves to host once at the end.
    """

    def __init__(self):
        self.dice, self.iou, self.bce, self.n = [], [], [], 0

    def update(self, seg_logits, masks, has_mask):
        import torch
        import torch.nn.functional as F
        if has_mask.sum() == 0:  # noqa: a device sync is fine once per eval batch
            return
        lg, t = seg_logits[has_mask].float().flatten(1), masks[has_mask].float().flatten(1)
        pr = (lg > 0).float()
        inter, ps, ts = (pr * t).sum(1), pr.sum(1), t.sum(1)
        union = ps + ts - inter
        # both empty -> perfect agreement
        self.dice.append(torch.where(ps + ts > 0, 2 * inter / (ps + ts).clamp(min=1), torch.ones_like(ps)))
        self.iou.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(ps)))
        self.bce.append(F.binary_cross_entropy_with_logits(lg, t, reduction="none").mean(1))

    def compute(self) -> dict:
        import torch
        if not self.dice:
            return {"dice": None, "iou": None, "bce": None, "n_masks": 0}
        d, i, b = (torch.cat(v).cpu().numpy() for v in (self.dice, self.iou, self.bce))
        return {"dice": float(d.mean()), "iou": float(i.mean()), "bce": float(b.mean()), "n_masks": int(len(d))}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> tuple[float, dict]:
    """Top-label ECE with equal-width bins; also returns the per-bin table for a reliability plot."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y_true).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece, bins = 0.0, {"edges": edges.tolist(), "acc": [], "conf": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        n = int(sel.sum())
        acc = float(correct[sel].mean()) if n else 0.0
        cf = float(conf[sel].mean()) if n else 0.0
        bins["acc"].append(acc); bins["conf"].append(cf); bins["count"].append(n)
        ece += n / max(len(y_true), 1) * abs(acc - cf)
    return float(ece), bins


def nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1)).mean())
