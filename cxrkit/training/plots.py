"""Figures, drawn with matplotlib's object API (no pyplot global state), written atomically."""
from __future__ import annotations

import numpy as np

from ..core.io_utils import atomic_path


def _save(fig, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def training_curves(history: list[dict], path) -> None:
    from matplotlib.figure import Figure
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.8))
    ax = fig.subplots(1, 3)
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train total")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val total")
    ax[0].plot(ep, [h["train_cls"] for h in history], "--", label="train cls")
    ax[0].plot(ep, [h["train_seg"] for h in history], ":", label="train seg")
    ax[0].set_title("loss"); ax[0].legend(fontsize=8)
    ax[1].plot(ep, [h["val_acc"] for h in history], label="val accuracy")
    ax[1].plot(ep, [h["val_macro_f1"] for h in history], label="val macro-F1")
    ax[1].set_title("classification"); ax[1].legend(fontsize=8)
    ax[2].plot(ep, [h["val_dice"] for h in history], label="val Dice")
    ax[2].plot(ep, [h["val_iou"] for h in history], label="val IoU")
    ax[2].set_title("segmentation"); ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xlabel("epoch"); a.grid(alpha=0.3)
    _save(fig, path)


def confusion_matrix_plot(cm, classes, path, title="Confusion matrix (test)") -> None:
    from matplotlib.figure import Figure
    cm = np.asarray(cm)
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def roc_curves_plot(y_true, probs, classes, path) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, roc_curve
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.subplots()
    for i, c in enumerate(classes):
        pos = np.asarray(y_true) == i
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate"); ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one-vs-rest (test)"); ax.legend(fontsize=8); ax.grid(alpha=0.3)
    _save(fig, path)


def reliability_plot(bins_before: dict, ece_before: float, bins_after: dict, ece_after: float,
                     temperature: float, path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for ax, bins, ece, name in ((axes[0], bins_before, ece_before, "uncalibrated"),
                                (axes[1], bins_after, ece_after, f"temperature T={temperature:.2f}")):
        e = np.asarray(bins["edges"]); mids = (e[:-1] + e[1:]) / 2
        cnt = np.asarray(bins["count"])
        acc = np.where(cnt > 0, bins["acc"], np.nan)
        ax.bar(mids, acc, width=e[1] - e[0], edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set_title(f"{name}: ECE {ece:.3f}"); ax.set_xlabel("confidence"); ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.legend(fontsize=8)
    _save(fig, path)
