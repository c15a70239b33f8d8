"""One line of predictions.csv: its columns and their formatting, declared once (PredictionRow).

The pipeline fills a PredictionRow per image and keeps `to_csv()`'s dict (the CSV's exact text); the
summary, the report and the shard merge read those dicts, and metrics use the probabilities exactly as
the CSV holds them, so a merge of shard runs reproduces every figure of a single run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.decode import DICOM_TAGS
from ..core.ood import is_gated

# a gated image's model output (cxrkit.core.ood: not judged) goes here, never under predicted_class / confidence
UNJUDGED_COLUMNS = ("unjudged_model_class", "unjudged_model_confidence")


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
    dicom: dict | None = None       # DICOM_TAGS of a DICOM input (None: not DICOM)

    @staticmethod
    def columns(class_names, save_masks: bool = False, gradcam: bool = False) -> list[str]:
        cols = ["image_path", "predicted_class", "confidence", *[f"prob_{c}" for c in class_names],
                "lung_area_fraction", "true_class", "correct", "quality_flags", "ood_score", *UNJUDGED_COLUMNS,
                "dice", "iou", "annotated_png", *DICOM_TAGS]
        return cols + (["mask_png"] if save_masks else []) + (["cam_class", "cam_file"] if gradcam else [])

    @property
    def judged(self) -> bool:
        """False when a gate flag (cxrkit.core.ood) sets the image aside: no class is given for it."""
        return not is_gated(self.quality_flags)

    @property
    def model_class(self) -> str:
        """The model's arg-max class, judged or not (read only through predicted_class)."""
        return self.class_names[int(np.asarray(self.probs).argmax())]

    @property
    def predicted_class(self) -> str | None:
        return self.model_class if self.judged else None

    def to_csv(self) -> dict[str, str]:
        """The row as predictions.csv writes it (6 decimals; empty where a value does not apply). A gated
        image gets no predicted_class, confidence nor correct: the model's output goes to the
        unjudged_model_* columns (empty for judged images)."""
        pred = int(np.asarray(self.probs).argmax())
        tc, judged = self.true_class, self.judged
        cls, conf = self.class_names[pred], _f6(self.probs[pred])
        dicom = self.dicom or {}
        row = {"image_path": self.image_path, "predicted_class": cls if judged else "",
               "confidence": conf if judged else "",
               **{f"prob_{c}": _f6(self.probs[j]) for j, c in enumerate(self.class_names)},
               "lung_area_fraction": _f6(self.lung_area_fraction),
               "true_class": tc or "", "correct": "" if tc is None or not judged else str(int(tc == cls)),
               "quality_flags": ";".join(self.quality_flags), "ood_score": _f6(self.ood_score),
               "unjudged_model_class": "" if judged else cls, "unjudged_model_confidence": "" if judged else conf,
               "dice": _f6(self.dice), "iou": _f6(self.iou), "annotated_png": self.annotated_png,
               **{k: str(dicom.get(k) or "") for k in DICOM_TAGS}}
        if self.mask_png is not None:
            row["mask_png"] = self.mask_png
        if self.cam_class is not None:
            row["cam_class"], row["cam_file"] = self.cam_class, self.cam_file or ""
        return row
