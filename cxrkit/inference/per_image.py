"""The per-image steps that run_pipeline and the Python API (cxrkit.inference.api) share, so both give
the same numbers: decoding a file inside one guard (decode_item), the model on a batch (model_outputs)
and the flags of one image (image_flags)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core import fingerprint, ood, quality
from ..core.decode import ImageReadError, read_gray_info, read_mask
from ..core.model_input import lung_mask, resize_gray
from ..core.ood import GateSpec
from ..core.tta import tta_predict
from .inputs import InputItem
from .render import display_image


@dataclass
class Decoded:
    item: InputItem
    model_u8: np.ndarray | None = None
    display: np.ndarray | None = None
    orig_shape: tuple = ()
    gt_mask: np.ndarray | None = None
    error: str | None = None
    mask_error: str | None = None
    notes: tuple = ()              # what of the file was not used (later TIFF pages / DICOM frames)
    stats: dict | None = None      # cxrkit.core.quality.image_stats of model_u8
    flags: tuple = ()              # quality flag codes (set once the model has run)
    dicom: dict | None = None      # a DICOM input's header fields (cxrkit.core.decode.DICOM_TAGS)
    seconds: tuple = (0.0, 0.0)    # time spent decoding the file, and preprocessing it (summary stage_seconds)


def decode_item(item: InputItem, size: int, display_h: int) -> Decoded:
    """Every step from the file's bytes to the model input (decode, colour, frames, resize, display image,
    image statistics) runs inside one guard: any exception is this file's skip reason, never the run's end."""
    tags: dict = {}
    try:
        t0 = time.perf_counter()
        g, notes = read_gray_info(item.path, tags)
        t1 = time.perf_counter()
        if g.ndim != 2 or g.dtype != np.uint8:
            raise ImageReadError(item.path, f"decoded to an unsupported array {tuple(g.shape)} {g.dtype}")
        d = Decoded(item, model_u8=resize_gray(g, size),
                     display=display_image(g, display_h) if display_h else None, orig_shape=g.shape[:2])
        d.notes, d.stats, d.dicom = tuple(notes), quality.image_stats(d.model_u8), tags or None
        d.seconds = (t1 - t0, time.perf_counter() - t1)
    except ImageReadError as e:
        return Decoded(item, error=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad file never stops the run
        return Decoded(item, error=_one_line(f"{type(e).__name__}: {e}"))
    if item.mask_path is not None:
        try:
            d.gt_mask = read_mask(item.mask_path)  # native resolution: Dice is scored at the mask's own size
        except ImageReadError as e:
            d.mask_error = e.reason
        except Exception as e:  # noqa: BLE001 - an unusable mask is noted, never the run's end
            d.mask_error = _one_line(f"{type(e).__name__}: {e}")
        if d.gt_mask is not None and not d.gt_mask.any():  # Dice would be 0 whatever the model does
            d.gt_mask, d.mask_error = None, "empty mask (no lung pixels): Dice / IoU not scored for this image"
    return d


def _one_line(text: str, limit: int = 300) -> str:
    """An exception's text as one short line (OpenCV's asserts span several)."""
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[:limit - 3] + "..."


def model_outputs(backend, x: np.ndarray, tta: int, temperature: float, gate: GateSpec | None):
    """The model on one batch x (B,3,S,S): (lung probabilities (B,S,S), calibrated class probabilities
    (B,C) float64, the gate's scores (B,) or None when there is no gate, each image's view scores).
    The one place inference runs a model: run_pipeline and cxrkit.inference.api both call it."""
    seg, probs, scores = tta_predict(backend.forward_ood, x, tta, temperature, with_ood=True)  # numpy in and out
    # the identity view's score; None: no gate, or a graph without the score
    scores = scores if gate is not None else None
    views = [{}] * len(x) if scores is None else gate.score_views(lambda xv: backend.forward_ood(xv)[2], x, scores)
    return seg[:, 0], probs.astype(np.float64), scores, views


def image_flags(d: Decoded, seg: np.ndarray, area_rng: dict, gate: GateSpec | None, ood_score=None,
                view_scores=None, train_hashes: np.ndarray | None = None) -> tuple:
    """Every flag of one decoded image given its lung-probability map (S,S) and gate score: quality
    (image, lung area), the gate's (not judged), aspect and the view (a DICOM lateral ViewPosition, or
    predicted lungs that are not two side by side: cxrkit.core.ood.view_flags). The one rule for run_pipeline and cxrkit.inference.api."""
    gate_flags = [] if gate is None or ood_score is None else gate.decide(ood_score, view_scores)
    lungs = lung_mask(seg)
    # the pixel view check where the model's gate switched it on, and nothing else set the image aside
    pixel_view = gate is not None and gate.view_check == "two_lungs" and not gate_flags
    view = ood.view_flags((d.dicom or {}).get("ViewPosition"), lungs if pixel_view else None)
    seen = ([fingerprint.FLAG_IN_TRAINING] if train_hashes is not None
            and fingerprint.in_training(fingerprint.image_hash(d.model_u8), train_hashes)[0] else [])
    return tuple(quality.image_flags(d.stats) + quality.lung_flags(float(lungs.mean()), area_rng)
                 + gate_flags + ood.aspect_flags(d.orig_shape) + view + seen)
