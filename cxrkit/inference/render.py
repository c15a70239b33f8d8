"""The annotated PNG (OpenCV drawing) and the atomic writers of the writer thread."""
from __future__ import annotations

import csv
import io
import logging
import queue
import threading

import cv2
import numpy as np

from ..core.errors import InferenceError
from ..core.config import DISCLAIMER
from ..core.io_utils import write_bytes_atomic
from ..core.model_input import lung_mask


log = logging.getLogger("cxrkit")




# ------------------------------------------------------------------------------------- rendering
_FONT = cv2.FONT_HERSHEY_SIMPLEX
FLAG_BGR, FLAG_FRAME_PX = (0, 0, 255), 6  # the frame that marks a quality-flagged input's annotated PNG


def _ascii(s: str) -> str:
    return str(s).encode("ascii", "replace").decode("ascii")


def _text(img, s, org, scale=0.5, color=(235, 235, 235), thick=1):
    cv2.putText(img, _ascii(s), (int(org[0]), int(org[1])), _FONT, scale, color, thick, cv2.LINE_AA)


def _fit(s: str, width_px: int, scale: float) -> str:
    s = _ascii(s)
    while len(s) > 4 and cv2.getTextSize(s, _FONT, scale, 1)[0][0] > width_px:
        s = "..." + s[4:]
    return s


MIN_DISPLAY_H = 320  # room in the text panel for four classes' bars and three notes


def display_image(gray: np.ndarray, height: int = 512) -> np.ndarray:
    """The X-ray at the display height, aspect ratio kept (width clamped to [h/2, 2h]): `height` for a film
    at least that tall, else its own height but at least MIN_DISPLAY_H (a 256-px film is drawn at 320 px,
    not blown up to 512: 2.5x fewer pixels to draw and compress, the cost of the default mode's PNGs)."""
    h, w = gray.shape[:2]
    height = int(min(height, max(h, MIN_DISPLAY_H)))
    dw = int(np.clip(round(w * height / h), height // 2, height * 2))
    interp = cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    return cv2.resize(gray, (dw, height), interpolation=interp)


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(cam, dtype=np.float32)


CAPTION_H, TEXT_PANEL_W = 30, 380
TINT_BGR = np.array([60.0, 200.0, 60.0])


def render_annotation(display: np.ndarray, seg_prob: np.ndarray, class_names, probs, true_class=None,
                      cam=None, cam_label: str = "", title: str = "", notes=(), flags=()) -> np.ndarray:
    """One BGR uint8 panel: X-ray with the predicted lungs tinted + outlined | optional Grad-CAM
    overlay | text panel with the predicted class, true class and one bar per class probability.
    flags (cxrkit.core.quality codes): a red frame around the whole panel and a red note naming them;
    a gate flag (cxrkit.core.ood) makes the headline say why the image was not judged."""
    from ..core.ood import OOD_REASON
    reasons = [OOD_REASON[f] for f in flags if f in OOD_REASON]
    others = [f for f in flags if f not in OOD_REASON]
    flag_note = "; ".join(([f"NOT JUDGED: {', '.join(reasons)}"] if reasons else [])
                          + ([f"CHECK INPUT: {'; '.join(others)}"] if others else [])) or None
    notes = [*notes, flag_note] if flag_note else list(notes)
    cols = _image_columns(display, seg_prob, cam, cam_label, title)
    panel = np.full((display.shape[0] + CAPTION_H, TEXT_PANEL_W, 3), 24, np.uint8)
    probs = np.asarray(probs, np.float64)
    y = _headline(panel, class_names, probs, true_class, reasons)
    _bars(panel, class_names, probs, y, footer_h=22 + 20 * len(notes))
    _footer(panel, notes, flag_note)
    out = np.hstack(cols + [panel])
    if flags:
        cv2.rectangle(out, (0, 0), (out.shape[1] - 1, out.shape[0] - 1), FLAG_BGR, FLAG_FRAME_PX)
    return out


def _image_columns(display, seg_prob, cam, cam_label: str, title: str) -> list[np.ndarray]:
    """The X-ray with the predicted lungs tinted and outlined, and the Grad-CAM overlay, each under a caption."""
    h, w = display.shape[:2]
    base = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    lung = lung_mask(seg_prob, (h, w))
    xray = base.copy()
    # the lungs tinted green (65% X-ray, 35% tint), in two whole-image OpenCV passes: a masked numpy blend
    # in float64 was half of an annotated PNG's cost
    tinted = cv2.add(cv2.multiply(base, (0.65, 0.65, 0.65, 0.0)), tuple(0.35 * TINT_BGR) + (0.0,))
    cv2.copyTo(tinted, lung.astype(np.uint8), xray)
    contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(xray, contours, -1, (0, 230, 255), 2, cv2.LINE_AA)
    panels = [(xray, _fit(title, w - 12, 0.5) if title else "X-ray + predicted lungs")]
    if cam is not None:
        c = cv2.resize(normalise_cam(cam.astype(np.float32)), (w, h), interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(np.round(c * 255).astype(np.uint8), cv2.COLORMAP_JET)
        panels.append((cv2.addWeighted(base, 0.55, heat, 0.45, 0), _fit(f"Grad-CAM: {cam_label}", w - 12, 0.5)))
    cols = []
    for img, caption in panels:
        strip = np.full((CAPTION_H, w, 3), 32, np.uint8)
        _text(strip, caption, (6, 20))
        cols.append(np.vstack([strip, img]))
    return cols


def _headline(panel, class_names, probs, true_class, reasons) -> int:
    """Predicted class and confidence (or, for a gated image, why it was not judged, the model's output
    below it as not to be read), then the true class; returns the y where the bars start."""
    pw, pred, y = panel.shape[1], int(probs.argmax()), 34
    if reasons:
        _text(panel, _fit(f"NOT JUDGED: {', '.join(reasons)}", pw - 20, 0.6), (12, y), 0.6, FLAG_BGR, 2)
        y += 28
        _text(panel, _fit(f"(model output {class_names[pred]} {probs[pred] * 100:.1f}%, not to be read)",
                          pw - 20, 0.5), (12, y), 0.5, (170, 170, 170))
    else:
        _text(panel, _fit(f"Predicted: {class_names[pred]}", pw - 20, 0.7), (12, y), 0.7, (255, 255, 255), 2)
        y += 28
        _text(panel, f"confidence {probs[pred] * 100:.1f}%", (12, y), 0.55)
    y += 28
    if true_class is None:
        _text(panel, "True: unknown", (12, y), 0.55, (170, 170, 170))
    elif reasons:  # not judged: nothing to be right or wrong about
        _text(panel, _fit(f"True: {true_class}", pw - 20, 0.55), (12, y), 0.55)
    else:
        ok = true_class == class_names[pred]
        _text(panel, _fit(f"True: {true_class}", pw - 120, 0.55), (12, y), 0.55)
        _text(panel, "correct" if ok else "WRONG", (pw - 100, y), 0.55, (80, 220, 80) if ok else (60, 60, 255), 2)
    return y + 18


def _bars(panel, class_names, probs, y: int, footer_h: int) -> None:
    """One bar per class probability, as many as fit above the footer."""
    ph, pw = panel.shape[:2]
    n, pred = len(class_names), int(probs.argmax())
    step = int(np.clip((ph - y - footer_h - 10) / max(n, 1), 22, 46))
    bar_w = pw - 90
    for j, cname in enumerate(class_names):
        if y + step > ph - footer_h:
            _text(panel, f"... {n - j} more classes (see CSV)", (12, y + 14), 0.45, (170, 170, 170))
            break
        small = step < 34
        _text(panel, _fit(cname, bar_w, 0.5), (12, y + 14), 0.5, (255, 255, 255) if j == pred else (210, 210, 210))
        by = y + (4 if small else 20)
        bx = 12 if not small else 150
        bw = bar_w if not small else pw - 210
        cv2.rectangle(panel, (bx, by), (bx + bw, by + 10), (90, 90, 90), 1)
        fill = int(round(bw * float(np.clip(probs[j], 0, 1))))
        if fill > 0:
            cv2.rectangle(panel, (bx, by), (bx + fill, by + 10), (0, 170, 255) if j == pred else (190, 190, 190), -1)
        _text(panel, f"{probs[j] * 100:5.1f}%", (bx + bw + 8, by + 10), 0.45)
        y += step


def _footer(panel, notes, flag_note) -> None:
    ph, pw = panel.shape[:2]
    fy = ph - (22 + 20 * len(notes)) + 6
    for s in notes:
        _text(panel, _fit(s, pw - 20, 0.45), (12, fy + 10), 0.45, FLAG_BGR if s == flag_note else (200, 200, 200))
        fy += 20
    _text(panel, DISCLAIMER, (12, ph - 8), 0.42, (150, 150, 150))


# --------------------------------------------------------------------------------------- writing
def _png_chunk(kind: bytes, data: bytes, crc32) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + (crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")


def encode_png(img: np.ndarray) -> bytes:
    """An 8-bit grey (H, W) or BGR (H, W, 3) image as PNG bytes. With ISA-L (`isal`) the rows are
    Up-filtered in numpy and deflated by ISA-L at level 2: about 3x OpenCV's encoder and a third smaller
    here (docs/SPEED.md), which is most of what an annotated PNG costs; without it, OpenCV's encoder."""
    try:
        from isal import isal_zlib
    except ImportError:
        isal_zlib = None
    if isal_zlib is None or img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise OSError("PNG encoding failed")
        return buf.tobytes()
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else 3
    rows = (np.ascontiguousarray(img) if c == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).reshape(h, w * c)
    f = np.empty((h, w * c + 1), np.uint8)
    f[:, 0] = 2  # filter "Up": each row minus the row above (uint8 arithmetic wraps, as PNG's does)
    f[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=f[1:, 1:])
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0 if c == 1 else 2, 0, 0, 0])
    crc = isal_zlib.crc32
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr, crc)
            + _png_chunk(b"IDAT", isal_zlib.compress(memoryview(f).cast("B"), 2), crc) + _png_chunk(b"IEND", b"", crc))


def write_png(path, img: np.ndarray) -> None:
    try:
        data = encode_png(img)
    except OSError:
        raise OSError(f"PNG encoding failed for {path}") from None
    write_bytes_atomic(path, data)


def write_npy(path, arr: np.ndarray) -> None:
    bio = io.BytesIO()
    np.save(bio, arr)
    write_bytes_atomic(path, bio.getvalue())


def write_csv_atomic(path, fieldnames, rows) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


class _Writer(threading.Thread):
    """Runs `fn(job)` for queued jobs in the background; the first error is kept and re-raised by
    the main thread (later jobs are drained, not run, so the producer never blocks forever)."""

    def __init__(self, fn, maxsize: int):
        super().__init__(daemon=True, name="cxrkit-writer")
        self.fn, self.q, self.error = fn, queue.Queue(maxsize=maxsize), None

    def run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self.fn(job)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def check(self):
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError):
                raise InferenceError(f"cannot write outputs: {e}") from e
            raise e

    def put(self, job):
        self.check()
        self.q.put(job)

    def close(self):
        self.q.put(None)
        self.join()
        self.check()
