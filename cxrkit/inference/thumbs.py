"""Thumbnails for report.html's gallery: the X-ray small with its predicted lung outline, written by
the pipeline per image, or afterwards for a report made from the CSV alone (bulk mode, a merge)."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from ..core.io_utils import write_bytes_atomic
from ..core.model_input import lung_mask

log = logging.getLogger("cxrkit")

THUMB_DIR = "thumbs"
THUMB_HEIGHT = 160
GALLERY_CAP = 300   # report.html shows at most this many images
WORST_DICE_N = 12   # report.html's "lowest Dice" tiles (true and predicted lung outlines)
WORST_DICE_DIR = "lowest_dice"
TRUE_BGR, PRED_BGR = (80, 220, 80), (0, 230, 255)  # outline colours: ground truth green, prediction yellow


def is_error(row: dict) -> bool:
    return str(row.get("correct", "")) == "0"


def gallery_order(rows: list[dict]) -> list[dict]:
    """Misclassified first, then everything else; each group by ascending confidence (stable)."""
    return sorted(rows, key=lambda r: (0 if is_error(r) else 1, float(r.get("confidence") or 0.0)))


def gallery_thumb_relpath(rank: int) -> str:
    """The thumbnail of the gallery's rank-th row in a report made from the CSV alone (no annotated
    PNG names it): write_gallery_thumbnails writes it, the pipeline plans it for the manifest."""
    return thumb_relpath(f"g{rank:05d}")


def thumb_relpath(stem: str) -> str:
    """The thumbnail of the image whose outputs are named `stem`, relative to save_dir."""
    return f"{THUMB_DIR}/{stem}.jpg"


def worst_dice_relpath(rank: int) -> str:
    return f"{WORST_DICE_DIR}/{rank:02d}.jpg"


def make_dice_tile(gray: np.ndarray, seg_prob: np.ndarray, gt_mask: np.ndarray, height: int = 2 * THUMB_HEIGHT):
    """A BGR tile: the X-ray with the ground-truth lung outline (green) and the predicted one (yellow)."""
    h, w = gray.shape[:2]
    tw = max(1, int(round(w * height / h)))
    small = cv2.resize(gray, (tw, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_LINEAR)
    bgr = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    truth = cv2.resize(gt_mask.astype(np.uint8), (tw, height), interpolation=cv2.INTER_NEAREST)
    for m, colour in ((truth, TRUE_BGR), (lung_mask(seg_prob, (height, tw)).astype(np.uint8), PRED_BGR)):
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, colour, 2, cv2.LINE_AA)
    return bgr


def make_thumbnail(gray: np.ndarray, seg_prob: np.ndarray, height: int = THUMB_HEIGHT) -> np.ndarray:
    """A small BGR uint8 image: the X-ray at `height` px (aspect ratio kept) with the predicted lung
    outline (model_input.lung_mask) drawn."""
    h, w = gray.shape[:2]
    tw = max(1, int(round(w * height / h)))
    interp = cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    small = cv2.resize(gray, (tw, height), interpolation=interp)
    bgr = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR) if small.ndim == 2 else small
    lung = lung_mask(seg_prob, (height, tw))
    contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(bgr, contours, -1, (0, 230, 255), 1, cv2.LINE_AA)
    return bgr


def write_jpeg(path, img: np.ndarray, quality: int) -> None:
    """A BGR / grey image as a JPEG, written atomically (tmp file + os.replace)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"JPEG encoding failed for {path}")
    write_bytes_atomic(path, buf.tobytes())


def write_thumbnail(path, gray: np.ndarray, seg_prob: np.ndarray, height: int = THUMB_HEIGHT,
                    quality: int = 82) -> None:
    """make_thumbnail as a JPEG, written atomically."""
    write_jpeg(path, make_thumbnail(gray, seg_prob, height), quality)


def gallery_thumb_relpaths(rows: list[dict], cap: int | None = None) -> list[str]:
    """The thumbnails write_gallery_thumbnails writes for rows (relative to save_dir, gallery order), so
    that a writer can put them in its manifest before writing them."""
    cap = GALLERY_CAP if cap is None else cap
    out = []
    for rank, row in enumerate(gallery_order(rows)[:max(0, int(cap))]):
        stem = Path(str(row.get("annotated_png") or "")).stem
        out.append(thumb_relpath(stem) if stem else gallery_thumb_relpath(rank))
    return out


def write_gallery_thumbnails(save_dir, rows: list[dict], cap: int | None = None, thumb_dirs=()) -> int:
    """A report from the CSV alone (bulk mode, or a merge of shard runs): thumbnails for the rows
    the gallery shows (gallery_order, the first `cap`) and no others. Each is copied from the first
    folder in thumb_dirs whose thumbs/ holds one for the row's annotated_png, else made from the
    source file (`image_path`; no lung outline: the CSV has no mask). Sets row["thumb"] (relative to
    save_dir; not a CSV column) on every row that got one; an unreadable source leaves the gallery's
    "no image" placeholder. Returns the number written."""
    import shutil

    from ..core.decode import read_gray
    cap = GALLERY_CAP if cap is None else cap
    save_dir, n = Path(save_dir), 0
    for row, rel in zip(gallery_order(rows), gallery_thumb_relpaths(rows, cap)):
        stem = Path(str(row.get("annotated_png") or "")).stem
        dst = save_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = next((Path(d) / thumb_relpath(stem) for d in thumb_dirs
                    if stem and (Path(d) / thumb_relpath(stem)).is_file()), None)
        try:
            if src is not None:
                shutil.copyfile(src, dst)
            else:
                g = read_gray(row["image_path"])
                write_thumbnail(dst, g, np.zeros(g.shape[:2], np.float32))
        except Exception as e:  # noqa: BLE001 - a thumbnail never fails the report
            log.warning("no thumbnail for %s: %s", row.get("image_path"), e)
            continue
        row["thumb"], n = rel, n + 1
    return n
