"""Which inputs the model trained on: a 64-bit perceptual hash (DCT of a 32 x 32 thumbnail, the 8 x 8
lowest frequencies against their median) of each training image, stored with the model (checkpoint and
ONNX meta, `training_hashes`: base64 of the little-endian uint64 array), and matched at inference.

The hash is taken from the model-input image (cxrkit.core.model_input.resize_gray of the decoded file),
which training caches and inference computes in the same way, so the same file gives the same hash. A
match is a Hamming distance <= MAX_DISTANCE: a re-encoded training film still
matches; a different film of the same patient usually does not. A run counts the inputs that match
(flag in_training_set) and leaves them out of its metrics unless asked (a figure on the model's own
training images is not a test). Numpy and OpenCV only (the ONNX path imports it)."""
from __future__ import annotations

import base64

import cv2
import numpy as np

FLAG_IN_TRAINING = "in_training_set"
MAX_DISTANCE = 2  # JPEG q80 re-encodes of real films: <= 2 bits; 3 of 179,700 distinct pairs of real films are <= 2 (7 are <= 4)
_BITS = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def row_in_training(quality_flags: str) -> bool:
    """Whether a predictions.csv row's ';'-joined quality_flags hold in_training_set."""
    return FLAG_IN_TRAINING in str(quality_flags or "").split(";")


def image_hash(u8: np.ndarray) -> np.uint64:
    """The 64-bit perceptual hash of one 8-bit grey image (any size)."""
    small = cv2.resize(np.asarray(u8, np.uint8), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term left out of the median (it is the mean brightness)
    return np.uint64(np.sum(_BITS[bits], dtype=np.uint64))


def hashes(images) -> np.ndarray:
    return np.array([image_hash(im) for im in images], np.uint64)


def pack(h: np.ndarray) -> str:
    return base64.b64encode(np.asarray(h, "<u8").tobytes()).decode("ascii")


def unpack(s: str | None) -> np.ndarray | None:
    if not s:
        return None
    return np.frombuffer(base64.b64decode(s), "<u8").astype(np.uint64)


def in_training(query: np.ndarray, ref: np.ndarray | None, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """A bool per query hash: within max_distance bits of any reference hash."""
    q = np.atleast_1d(np.asarray(query, np.uint64))
    if ref is None or len(ref) == 0:
        return np.zeros(len(q), bool)
    x = q[:, None] ^ np.asarray(ref, np.uint64)[None, :]
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a popcount instruction per pair (15x the unpacking below)
        dist = np.bitwise_count(x)
    else:
        dist = np.unpackbits(x.view(np.uint8).reshape(len(q), len(ref), 8), axis=2).sum(2)
    return dist.min(1) <= max_distance
