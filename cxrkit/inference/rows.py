"""One line of predictions.csv: its columns and their formatting, declared once (PredictionRow).

The pipeline fills a PredictionRow per image and keeps `to_csv()`'s dict (the CSV's exact text); the
summary, the report and the shard merge read those dicts, and metrics use the probabilities exactly as
the CSV holds them, so a merge of shard runs reproduces every figure of a single run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _f6(x) -> str:
    return "" if x is None else f"{float(x):.6f}"


@dataclass
class PredictionRow:
    image_path: str
    class_names: tuple
    probs: np.ndarray               # calibrated, model class order
    lung_area_fraction: float
    true_class: str | None = None   # from the folder name, when it is a model class
    quality_flags: tuple = ()
    ood_score: float | None = None  # None: the model has no gate
    dice: float | None = None       # vs a ground-truth mask, when there is one
    iou: float | None = None
    annotated_png: str = ""
    mask_png: str | None = None     # --save_masks
    cam_class: str | None = None    # Grad-CAM
    cam_file: str | None = None

    @staticmethod
    def columns(class_names, save_masks: bool = False, gradcam: bool = False) -> list[str]:
        cols = ["image_path", "predicted_class", "confidence", *[f"prob_{c}" for c in class_names],
                "lung_area_fraction", "true_class", "correct", "quality_flags", "ood_score", "dice", "iou",
                "annotated_png"]
        return cols + (["mask_png"] if save_masks else []) + (["cam_class", "cam_file"] if gradcam else [])

    @property
    def predicted_class(self) -> str:
        return self.class_names[int(np.asarray(self.probs).argmax())]

    def to_csv(self) -> dict[str, str]:
        """The row as predictions.csv writes it (6 decimals; empty where a value does not apply)."""
        pred = int(np.asarray(self.probs).argmax())
        tc = self.true_class
        row = {"image_path": self.image_path, "predicted_class": self.class_names[pred],
               "confidence": _f6(self.probs[pred]),
               **{f"prob_{c}": _f6(self.probs[j]) for j, c in enumerate(self.class_names)},
               "lung_area_fraction": _f6(self.lung_area_fraction),
               "true_class": tc or "", "correct": "" if tc is None else str(int(tc == self.class_names[pred])),
               "quality_flags": ";".join(self.quality_flags), "ood_score": _f6(self.ood_score),
               "dice": _f6(self.dice), "iou": _f6(self.iou), "annotated_png": self.annotated_png}
        if self.mask_png is not None:
            row["mask_png"] = self.mask_png
        if self.cam_class is not None:
            row["cam_class"], row["cam_file"] = self.cam_class, self.cam_file or ""
        return row
