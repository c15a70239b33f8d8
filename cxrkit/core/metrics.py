"""Evaluation metrics (numpy / scikit-learn, computed once per epoch on gathered arrays), and the 95%
confidence intervals summary.json and the report show for accuracy and macro-F1."""
from __future__ import annotations

import math

import numpy as np

# confidence intervals (confidence_intervals): bootstrap resamples and seed, normal 97.5% quantile
CI_RESAMPLES = 1000
CI_SEED = 0
_Z95 = 1.959963984540054  # standard normal 97.5% quantile


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    _, start, counts = np.unique(xs, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0           # average 1-based rank of each tie group
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def roc_auc(pos: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC via the Mann-Whitney U statistic (equals sklearn's roc_auc_score)."""
    pos = np.asarray(pos, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    r = _average_ranks(np.asarray(scores, np.float64))
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 of (..., C, C) confusion matrices (rows true, columns predicted): 2 tp / (true_n +
    pred_n), 0 where undefined (scikit-learn's zero_division=0)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    den = cm.sum(-1) + cm.sum(-2)
    return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)


def macro_f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of (..., C, C) confusion matrices, averaged over the classes present in the true or
    predicted labels (as scikit-learn); batched, so the report's bootstrap uses it too."""
    cm = np.asarray(cm, np.float64)
    present = (cm.sum(-1) + cm.sum(-2)) > 0
    return (f1_from_confusion(cm) * present).sum(-1) / np.maximum(present.sum(-1), 1)


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for the default z)."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k <= 0 else lo), (1.0 if k >= n else hi)  # exact ends (no 0.9999999999999999)


def bootstrap_macro_f1(y_true, y_pred, n_classes: int, n_resamples: int = CI_RESAMPLES, seed: int = CI_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of macro-F1: `n_resamples` resamples (with replacement) of the
    labelled images, numpy default_rng(seed), so the same run gives the same interval."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    n, c = len(y_true), int(n_classes)
    if n == 0:
        return 0.0, 1.0
    code = y_true * c + y_pred
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples, np.float64)
    chunk = max(1, min(n_resamples, 2_000_000 // n))  # bounded memory on big runs
    for s in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - s)
        idx = rng.integers(0, n, size=(b, n))
        flat = (np.arange(b)[:, None] * (c * c) + code[idx]).ravel()
        cms = np.bincount(flat, minlength=b * c * c).reshape(b, c, c)
        stats[s:s + b] = macro_f1_from_confusion(cms)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def confidence_intervals(y_true, y_pred, n_classes: int, n_resamples: int = CI_RESAMPLES,
                         seed: int = CI_SEED) -> dict:
    """95% intervals for summary.json's "classification": accuracy (Wilson) and macro-F1 (bootstrap)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    k, n = int((y_true == y_pred).sum()), len(y_true)
    return {"accuracy_ci95": list(wilson_interval(k, n)),
            "macro_f1_ci95": list(bootstrap_macro_f1(y_true, y_pred, n_classes, n_resamples, seed)),
            "ci_method": {"accuracy": "Wilson score interval, 95%",
                          "macro_f1": f"percentile bootstrap, 95%, {n_resamples} resamples of the labelled "
                                      f"images (numpy default_rng seed {seed})"}}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support/ROC-AUC, confusion matrix.

    Plain numpy (no scikit-learn): this also runs at the end of every inference run, where importing
    scikit-learn would cost the CPU ONNX path ~0.7 s of start-up. Zero division gives 0, as
    sklearn's zero_division=0; tests check agreement with scikit-learn."""
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    c = len(classes)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    cm = np.bincount(y_true * c + y_pred, minlength=c * c).reshape(c, c)
    tp, pred_n, true_n = np.diag(cm).astype(np.float64), cm.sum(0), cm.sum(1)
    p = np.divide(tp, pred_n, out=np.zeros(c), where=pred_n > 0)
    r = np.divide(tp, true_n, out=np.zeros(c), where=true_n > 0)
    f = f1_from_confusion(cm)
    out = {"accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
           "macro_f1": float(macro_f1_from_confusion(cm)),
           "weighted_f1": float((f * true_n).sum() / max(true_n.sum(), 1)),
           "per_class": {}, "confusion_matrix": cm.tolist()}
    for i, name in enumerate(classes):
        pos = y_true == i
        auc = roc_auc(pos, probs[:, i]) if pos.any() and (~pos).any() else None
        tn = int(cm.sum() - true_n[i] - pred_n[i] + cm[i, i])
        neg, pred_neg = int(cm.sum() - true_n[i]), int(cm.sum() - pred_n[i])
        out["per_class"][name] = {
            "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
            "support": int(true_n[i]), "roc_auc": auc,
            # one-vs-rest screening figures with Wilson 95% intervals: sensitivity = recall, PPV = precision
            "specificity": tn / neg if neg else 0.0, "npv": tn / pred_neg if pred_neg else 0.0,
            "recall_ci95": list(wilson_interval(int(cm[i, i]), int(true_n[i]))),
            "specificity_ci95": list(wilson_interval(tn, neg)),
            "precision_ci95": list(wilson_interval(int(cm[i, i]), int(pred_n[i]))),
            "npv_ci95": list(wilson_interval(tn, pred_neg))}
    aucs = [v["roc_auc"] for v in out["per_class"].values() if v["roc_auc"] is not None]
    out["macro_roc_auc"] = float(np.mean(aucs)) if aucs else None
    return out


def binary_dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks of one image (numpy); both empty counts as perfect agreement."""
    p, t = pred.astype(bool), gt.astype(bool)
    inter, ps, ts = np.logical_and(p, t).sum(), p.sum(), t.sum()
    union = ps + ts - inter
    dice = 2.0 * inter / (ps + ts) if ps + ts > 0 else 1.0
    iou = inter / union if union > 0 else 1.0
    return float(dice), float(iou)


def native_resolution_dice(seg_probs: np.ndarray, gt_masks: list) -> dict:
    """Mean Dice / IoU with each predicted lung-probability map (model input size) resized bilinearly
    to its ground-truth mask's own size, then thresholded (preprocess.lung_mask). gt_masks: (H, W) 0/1 arrays."""
    from .model_input import lung_mask
    d, i = [], []
    for p, g in zip(seg_probs, gt_masks):
        up = lung_mask(p, g.shape[:2])
        dc, io = binary_dice_iou(up, g)
        d.append(dc); i.append(io)
    if not d:
        return {"dice": None, "iou": None, "n_masks": 0}
    return {"dice": float(np.mean(d)), "iou": float(np.mean(i)), "n_masks": len(d)}


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

    def per_image(self):
        """Dice of each masked image, in the order fed (numpy)."""
        import torch
        return torch.cat(self.dice).cpu().numpy() if self.dice else np.zeros(0)

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
