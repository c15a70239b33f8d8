"""The model's input: resizing to the network's size, the [0, 1] 3-channel tensor it takes, the input
contract check, and the one rule that turns the lung-probability map into a mask.

Input contract of the network: (B, 3, S, S) float32 RGB in [0, 1], S = the checkpoint's img_size
(decoding a file to the 8-bit grey array that comes first: cxrkit.core.decode).
  2. resize to S x S (area interpolation when shrinking),
  3. scale to [0, 1] and replicate to 3 channels (`to_model_input_np` for the inference backends,
     numpy in / numpy out; `to_model_input` for training and evaluation, torch tensors on any device;
     both compute the same float32 values).
Masks: resized like the image, then thresholded at one half (so mask and image stay aligned).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from .config import LUNG_THRESHOLD
from .decode import read_gray

if TYPE_CHECKING:  # annotations only
    import torch

# No module-level `import torch`: torch-free on import (tests/core/test_layers.py enforces it).


def resize_gray(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[:2] == (size, size):
        return mask
    # resample exactly like the image (area / linear) and threshold at one half: nearest neighbour
    # picks one source pixel per output pixel, off its centre, which shifts the mask against the
    # image by up to half a source pixel (0.3-0.5 output px on average)
    return (resize_gray((mask > 0).astype(np.uint8) * 255, size) >= 128).astype(np.uint8)


def lung_mask(seg_prob: np.ndarray, size: tuple | None = None) -> np.ndarray:
    """The predicted lungs as a bool (H, W) array: the lung-probability map (model input size) resized
    bilinearly to size = (H, W) when given, then > LUNG_THRESHOLD. The one rule for every mask, Dice,
    outline and lung area computed from a prediction."""
    if size is not None:
        h, w = int(size[0]), int(size[1])
        seg_prob = cv2.resize(np.asarray(seg_prob, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return seg_prob > LUNG_THRESHOLD


def load_for_model(path, size: int) -> np.ndarray:
    """Decode + resize: the uint8 (S, S) array that the cache stores and inference feeds."""
    return resize_gray(read_gray(path), size)


def to_model_input_np(batch_u8: np.ndarray) -> np.ndarray:
    """(B, S, S) uint8 numpy -> (B, 3, S, S) float32 RGB in [0, 1] numpy (what the inference
    backends take); the same values as `to_model_input` (float32 x / 255, correctly rounded)."""
    a = np.asarray(batch_u8)
    if a.dtype != np.uint8 or a.ndim != 3:
        raise ValueError(f"expected a (B, S, S) uint8 batch, got {tuple(a.shape)} {a.dtype}")
    x = a.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.broadcast_to(x[:, None], (a.shape[0], 3, *a.shape[1:])))


def to_model_input(batch_u8) -> torch.Tensor:
    """(B, S, S) uint8 (numpy or tensor, any device) -> (B, 3, S, S) float32 RGB in [0, 1] tensor on
    the input's device (training / evaluation; inference uses `to_model_input_np`)."""
    import torch  # lazily: see the note at the imports
    t = torch.as_tensor(batch_u8)
    if t.dtype != torch.uint8 or t.ndim != 3:
        raise ValueError(f"expected a (B, S, S) uint8 batch, got {tuple(t.shape)} {t.dtype}")
    return (t.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def check_input(x, img_size: int) -> None:
    """Enforce the network's input contract with a clear message; numpy arrays or torch tensors.
    Both inference backends call it on every batch (cheap: one min and one max), like
    torchxrayvision's models; the training loop does not (its inputs come from to_model_input)."""
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (img_size, img_size):
        raise ValueError(f"model input must be (B, 3, {img_size}, {img_size}); got {tuple(x.shape)}")
    if not str(x.dtype).endswith("float32"):
        raise ValueError(f"model input must be float32, got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"model input must be in [0, 1] (got [{lo:.3g}, {hi:.3g}]): divide 8-bit images by 255")
