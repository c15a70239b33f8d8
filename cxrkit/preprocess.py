"""Image decoding and the ONE preprocessing path used by training, evaluation and both inference
backends.

Input contract of the network: (B, 3, S, S) float32 RGB in [0, 1], S = the checkpoint's img_size.
How a file gets there:
  1. decode (PNG/JPEG/BMP/TIFF through OpenCV, DICOM through pydicom) to an 8-bit grayscale array;
     16-bit data is scaled by its inferred bit depth (12-bit data in a 16-bit PNG is not left dark),
     RGB/RGBA are converted to luminance (radiographs carry no colour; an RGB copy of a grayscale
     X-ray then gives exactly the prediction of the grayscale file),
  2. resize to S x S (area interpolation when shrinking),
  3. scale to [0, 1] and replicate to 3 channels (`to_model_input_np` for the inference backends,
     numpy in / numpy out; `to_model_input` for training and evaluation, torch tensors on any device;
     both compute the same float32 values).
Masks: any non-zero-ish pixel (> half of the mask's max) is lung; resized like the image, then
thresholded at one half (so mask and image stay aligned).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # annotations only
    import torch

# No module-level `import torch`: the CPU ONNX inference path imports this module and must start
# fast (importing torch costs ~1.5 s there); the torch helpers below import it when called.

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}

cv2.setNumThreads(1)  # decoding runs in worker threads/processes; avoid oversubscription


class ImageReadError(Exception):
    """A file that cannot be used as an image; str() is a one-line reason naming the file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any-depth array -> uint8, keeping the image's own scale."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        a = arr.astype(np.float32)
        hi = float(a.max(initial=0))
        # infer the bit depth actually used: 12-bit data (max <= 4095) is scaled by 4095, etc.
        depth = max(8, int(np.ceil(np.log2(hi + 1)))) if hi > 0 else 8
        return np.clip(np.round(a * (255.0 / (2 ** depth - 1))), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if a.size and a.min() >= 0 and a.max() <= 1.0:
            a = a * 255.0
        else:  # arbitrary float range: min-max
            lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
            a = (a - lo) / (hi - lo + 1e-12) * 255.0
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        # OpenCV decodes to BGR(A); alpha is dropped (X-rays are opaque)
        return cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3]), cv2.COLOR_BGR2GRAY)
    raise ValueError(f"unsupported array shape {arr.shape}")


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:  # pragma: no cover - pydicom is in requirements
        raise ImageReadError(path, f"DICOM needs pydicom ({e}); pip install pydicom")
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as e:
        raise ImageReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})")
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: first frame
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds)  # VOI LUT or window centre/width when present
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo + 1e-12)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        a = 1.0 - a  # MONOCHROME1: high values are dark
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def read_gray(path) -> np.ndarray:
    """Decode any supported file to a (H, W) uint8 grayscale array, or raise ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path)
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e})")
    if buf.size == 0:
        raise ImageReadError(path, "empty file")
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        try:  # a few TIFF flavours OpenCV refuses; Pillow is the fallback
            from PIL import Image
            with Image.open(path) as im:
                arr = np.asarray(im)
        except Exception:
            raise ImageReadError(path, "not a decodable image (corrupt or unsupported format)")
    if arr.size == 0 or min(arr.shape[:2]) < 8:
        raise ImageReadError(path, f"image too small ({arr.shape})")
    try:
        return _to_gray(_to_uint8(arr))
    except ValueError as e:
        raise ImageReadError(path, str(e))


def read_mask(path) -> np.ndarray:
    """Decode a lung mask to a (H, W) uint8 array of 0/1 (RGB, 16-bit, 0/1 or 0/255 all accepted)."""
    m = read_gray(path)
    hi = int(m.max(initial=0))
    return (m > hi // 2).astype(np.uint8) if hi > 0 else np.zeros_like(m)


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


def check_input(x: torch.Tensor, img_size: int) -> None:
    """Enforce the network's input contract with a clear message (not used in the training loop)."""
    import torch  # lazily: see the note at the imports
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (img_size, img_size):
        raise ValueError(f"model input must be (B, 3, {img_size}, {img_size}); got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"model input must be float32, got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"model input must be in [0, 1] (got [{lo:.3g}, {hi:.3g}]): divide 8-bit images by 255")


def list_images(root) -> list[Path]:
    """Every supported image under root, recursively, sorted (hidden files skipped)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS:
                out.append(Path(dirpath) / f)
    return out
