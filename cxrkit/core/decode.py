"""Image decoding: every supported file to an 8-bit grey array, and the folder walk that finds them.

  1. decode (PNG/JPEG/BMP/TIFF through OpenCV, DICOM through pydicom) to an 8-bit grayscale array,
     turned as its EXIF orientation tag says (what a viewer shows);
     16-bit data is scaled by its inferred bit depth (12-bit data in a 16-bit PNG is not left dark),
     RGB/RGBA are converted to luminance (radiographs carry no colour; an RGB copy of a grayscale
     X-ray then gives exactly the prediction of the grayscale file).
The next steps (resize, scale to [0, 1], 3 channels) are cxrkit.core.model_input's: together they are
the ONE preprocessing path used by training, evaluation and both inference backends.
Masks: any non-zero-ish pixel (> half of the mask's max) is lung.
"""
from __future__ import annotations

import contextlib

import errno
import os
from pathlib import Path

import cv2
import numpy as np

from .errors import DataError, ImageReadError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}
DICOM_MAGIC_OFFSET = 128  # a DICOM Part 10 file: a 128-byte preamble, then b"DICM" (whatever its name)
# the DICOM header fields predictions.csv carries for DICOM inputs (empty for other files)
DICOM_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ViewPosition", "PatientAge")

# Larger images are skipped, decided from the file header BEFORE decoding (a 40000x40000 PNG is under
# 1 MB on disk but 1.6 GB decoded); chest films are at most ~4300x4300 (18 MP)
MAX_PIXELS = 100_000_000
# what one decoded file may take before any conversion (the pixel limit alone lets a 16-bit RGBA PNG of
# 99 MP through at 800 MB, and its float conversions at several GB); a 3000 x 3000 16-bit X-ray is 18 MB
MAX_DECODED_BYTES = 512 * 2 ** 20

cv2.setNumThreads(1)  # decoding runs in worker threads/processes; avoid oversubscription


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any-depth array -> uint8, keeping the image's own scale."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 and arr.ndim == 2 and arr.size:
        # the rule below in one OpenCV pass (float32 scale, round half to even, saturate: the same bytes)
        depth = max(8, int(arr.max()).bit_length())
        return cv2.convertScaleAbs(arr, alpha=255.0 / (2 ** depth - 1))
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


def _too_large_reason(w: int, h: int, bytes_per_pixel: int = 1) -> str | None:
    if w * h > MAX_PIXELS:
        return f"image is {w}x{h} px, over the {MAX_PIXELS // 1_000_000} MP limit"
    if w * h * bytes_per_pixel > MAX_DECODED_BYTES:
        return (f"image is {w}x{h} px at {bytes_per_pixel} bytes per pixel: {w * h * bytes_per_pixel / 2 ** 20:.0f} MB "
                f"decoded, over the {MAX_DECODED_BYTES // 2 ** 20} MB decode budget; save it as 8-bit grey or smaller")
    return None


class ByteBudget:
    """Bytes that decoding threads of one process may hold at once: hold(n) waits until n more fit (a
    request over the whole budget waits until nothing else is held). Files over MAX_DECODED_BYTES are
    refused before this, so together the threads decode at most one budget's worth at a time."""

    def __init__(self, total: int):
        import threading
        self.total, self.used, self._cv = int(total), 0, threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        n = max(0, min(int(n), self.total))
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        try:
            yield
        finally:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


DECODE_BUDGET = ByteBudget(MAX_DECODED_BYTES)


def decoded_bytes_per_pixel(buf) -> int:
    """Bytes per pixel of the decoded array, from the header: exact for PNG (bit depth, colour type), the
    format's usual case otherwise (JPEG 3, BMP 4; TIFF and unknown 2: a 16-bit grey film)."""
    b = memoryview(np.ascontiguousarray(buf[:32], dtype=np.uint8)).cast("B")
    if bytes(b[:8]) == b"\x89PNG\r\n\x1a\n" and len(b) >= 26:
        depth, colour = int(b[24]), int(b[25])
        channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(colour, 4)  # palette expands to BGR, grey+alpha to BGRA
        return channels * (2 if depth == 16 else 1)
    if bytes(b[:2]) == b"\xff\xd8":
        return 3
    if bytes(b[:2]) == b"BM":
        return 4
    return 2


def _tiff_header(b: memoryview) -> tuple[int, int, int] | None:
    """(width, height, pages) of a classic TIFF from its first IFD and the IFD chain; None if unsure."""
    bo = {b"II": "<", b"MM": ">"}.get(bytes(b[:2]))
    if bo is None or len(b) < 8:
        return None
    u16 = lambda o: int.from_bytes(b[o:o + 2], "little" if bo == "<" else "big")  # noqa: E731
    u32 = lambda o: int.from_bytes(b[o:o + 4], "little" if bo == "<" else "big")  # noqa: E731
    if u16(2) != 42:
        return None  # BigTIFF or not a TIFF
    off, pages, seen, w, h = u32(4), 0, set(), None, None
    while 0 < off and off + 2 <= len(b) and off not in seen and pages < 10000:
        seen.add(off)
        n = u16(off)
        if pages == 0:
            for e in range(n):
                eo = off + 2 + 12 * e
                if eo + 12 > len(b):
                    break
                tag, typ = u16(eo), u16(eo + 2)
                val = u16(eo + 8) if typ == 3 else u32(eo + 8)
                if tag == 256:
                    w = val
                elif tag == 257:
                    h = val
        pages += 1
        nxt = off + 2 + 12 * n
        off = u32(nxt) if nxt + 4 <= len(b) else 0
    return (w, h, pages) if w and h else None


def _jpeg_size(b: memoryview) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i + 9 < n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = int.from_bytes(b[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(b[i + 7:i + 9], "big"), int.from_bytes(b[i + 5:i + 7], "big")
        i += 2 + seg
    return None


def header_info(buf) -> tuple[int | None, int | None, int]:
    """(width, height, pages) read from a PNG / JPEG / BMP / TIFF file's header bytes, without
    decoding the pixels; (None, None, 1) when the format is not recognised (then decoding decides)."""
    b = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    try:
        if bytes(b[:8]) == b"\x89PNG\r\n\x1a\n" and bytes(b[12:16]) == b"IHDR":
            return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big"), 1
        if bytes(b[:2]) == b"\xff\xd8":
            wh = _jpeg_size(b)
            return (wh[0], wh[1], 1) if wh else (None, None, 1)
        if bytes(b[:2]) == b"BM" and len(b) >= 26:
            return (abs(int.from_bytes(b[18:22], "little", signed=True)),
                    abs(int.from_bytes(b[22:26], "little", signed=True)), 1)
        t = _tiff_header(b)
        if t:
            return t
    except (IndexError, ValueError):
        pass
    return None, None, 1


def exif_orientation(buf) -> int:
    """The EXIF orientation tag (1..8) of an encoded JPEG / PNG / TIFF / WebP, 1 when there is none.
    Only the header is parsed (Pillow opens lazily); a file without EXIF costs a byte search."""
    b = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    head = bytes(b[:65536])
    if not (head[:2] in (b"II", b"MM") or b"Exif" in head or b"eXIf" in head):
        return 1
    try:
        import io
        from PIL import Image
        with Image.open(io.BytesIO(b)) as im:
            o = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block never stops decoding
        return 1
    return o if 1 <= o <= 8 else 1


def apply_exif_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn / mirror a decoded (H, W[, C]) array the way a viewer shows it for EXIF tag 1..8
    (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise)."""
    o = int(orientation)
    if o == 2:
        arr = arr[:, ::-1]
    elif o == 3:
        arr = arr[::-1, ::-1]
    elif o == 4:
        arr = arr[::-1]
    elif o == 5:
        arr = arr.swapaxes(0, 1)
    elif o == 6:
        arr = np.rot90(arr, -1)
    elif o == 7:
        arr = np.rot90(arr, 2).swapaxes(0, 1)
    elif o == 8:
        arr = np.rot90(arr, 1)
    return np.ascontiguousarray(arr)


def array_to_gray(path, arr: np.ndarray) -> np.ndarray:
    """A decoded array (H x W, or H x W x C in OpenCV's BGR(A) order, any bit depth) -> 8-bit grey, by
    the rules every file follows (finite values, inferred bit depth, luminance); `path` names it in errors."""
    _check_finite(path, arr)
    try:
        return _to_gray(_to_uint8(arr))
    except ValueError as e:
        raise ImageReadError(path, str(e))


def _check_finite(path, a: np.ndarray) -> None:
    if a.dtype.kind in "fc":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise ImageReadError(path, f"{bad} of {a.size} pixel values are not finite (NaN or inf): the image "
                                       f"cannot be judged")


def is_dicom_bytes(buf) -> bool:
    """Whether encoded bytes start like a DICOM Part 10 file (b"DICM" after the 128-byte preamble)."""
    b = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    return len(b) >= DICOM_MAGIC_OFFSET + 4 and bytes(b[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4]) == b"DICM"


def is_dicom(path) -> bool:
    """Whether the file is DICOM by its content (the preamble), not its name: PACS exports are named
    like IM000001. False for anything unreadable."""
    try:
        if not os.path.isfile(path):  # a FIFO or device would block or never end
            return False
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return len(head) == DICOM_MAGIC_OFFSET + 4 and head[DICOM_MAGIC_OFFSET:] == b"DICM"


def _dicom_tags(ds) -> dict:
    """DICOM_TAGS of a dataset as strings ("" when absent); nothing else of the header is kept."""
    out = {}
    for k in DICOM_TAGS:
        v = getattr(ds, k, None)
        out[k] = "" if v is None else str(v).strip()
    return out


def _read_dicom(path: Path, notes: list | None = None, tags: dict | None = None) -> np.ndarray:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is in requirements
        raise ImageReadError(path, f"DICOM needs pydicom ({e}); pip install pydicom")
    try:
        ds = pydicom.dcmread(str(path))
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        too_large = _too_large_reason(cols, rows)  # from the header, before the pixel data is decoded
        if too_large:
            raise ImageReadError(path, too_large)
        if tags is not None:
            tags.update(_dicom_tags(ds))
        fast = _lossless_jpeg_frame(ds)
        arr = ds.pixel_array if fast is None else fast
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames > 1 and (fast is not None or arr.ndim == (4 if spp > 1 else 3)):
        arr = arr if fast is not None else arr[0]  # multi-frame (grey or colour): first frame
        if notes is not None:
            notes.append(f"multi-frame DICOM ({int(getattr(ds, 'NumberOfFrames', 0) or 0)} frames): only the "
                         f"first frame was used")
    mono1 = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"  # high values are dark
    if arr.ndim == 2 and arr.dtype.kind in "iu":
        out = _dicom_gray_by_lut(arr, ds, mono1)
        if out is not None:
            return out
    return _dicom_gray(path, arr, ds, mono1)


LOSSLESS_JPEG = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # JPEG Lossless, process 14 (SV1)


def _lossless_jpeg_frame(ds) -> np.ndarray | None:
    """The first frame of a grey JPEG Lossless DICOM decoded by libjpeg-turbo (imagecodecs, the [fast]
    extra): 44 ms against GDCM's 195 ms on a 2500 x 3000 film (docs/SPEED.md), and lossless, so the same stored
    values. None where it does not apply (imagecodecs absent, another transfer syntax, colour, signed
    pixels, an unexpected shape): pydicom decodes the file (through GDCM) as before."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if (ts not in LOSSLESS_JPEG or int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1
            or int(getattr(ds, "PixelRepresentation", 0) or 0) != 0):
        return None
    try:
        import imagecodecs
        from pydicom.encaps import generate_frames
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(getattr(ds, "NumberOfFrames", 1) or 1)))
        a = imagecodecs.jpeg8_decode(frame)
    except Exception:  # noqa: BLE001 - not installed, or a stream it refuses: pydicom's decoders decide
        return None
    want = np.uint16 if int(getattr(ds, "BitsAllocated", 16)) == 16 else np.uint8
    if a.shape != (int(ds.Rows), int(ds.Columns)) or a.dtype != want:
        return None
    return a


def _dicom_gray(path, arr: np.ndarray, ds, mono1: bool) -> np.ndarray:
    """Stored pixels -> 8-bit grey: modality LUT (rescale), VOI LUT or window, then the image's own
    range to 0..255 (inverted for MONOCHROME1). THE rule; _dicom_gray_by_lut computes the same per value."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds)  # VOI LUT or window centre/width when present
    a = np.asarray(arr, dtype=np.float32)
    _check_finite(path, a)
    if a.ndim == 3:
        a = a.mean(axis=2)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ImageReadError(path, f"unsupported DICOM pixel array shape {tuple(np.shape(arr))}")
    return _range_to_u8(a, float(a.min()), float(a.max()), mono1)


def _range_to_u8(a: np.ndarray, lo: float, hi: float, mono1: bool) -> np.ndarray:
    a = (a - lo) / (hi - lo + 1e-12)
    if mono1:
        a = 1.0 - a
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


LUT_MAX_SPAN = 1 << 17  # integer pixel values spanning more than this take the per-pixel path


def _dicom_gray_by_lut(arr: np.ndarray, ds, mono1: bool) -> np.ndarray | None:
    """_dicom_gray for one frame of integer pixels, computed once per stored VALUE (a table over the
    image's value range) instead of once per pixel: the same float operations on the same values, so
    the same bytes, in a fraction of the time and memory (a 2500 x 3000 film: one table lookup instead
    of six float64 passes). None where the shortcut does not hold (a wide value range, or a table that
    is not monotone, whose extremes need not lie at the extreme stored values)."""
    lo_raw, hi_raw = int(arr.min()), int(arr.max())
    if hi_raw - lo_raw + 1 > LUT_MAX_SPAN:
        return None
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    values = np.arange(lo_raw, hi_raw + 1, dtype=np.int64 if arr.dtype.kind == "i" else np.uint32)
    t = np.asarray(apply_voi_lut(apply_modality_lut(values, ds), ds), dtype=np.float32)
    if t.ndim != 1 or not np.isfinite(t).all():
        return None
    d = np.diff(t)
    if not ((d >= 0).all() or (d <= 0).all()):
        return None  # extremes of the image need not be at its extreme stored values
    lut = _range_to_u8(t, float(min(t[0], t[-1])), float(max(t[0], t[-1])), mono1)
    if 0 <= lo_raw and hi_raw < LUT_MAX_SPAN:  # index by the stored value itself (no shifted copy of the image)
        return np.concatenate([np.zeros(lo_raw, np.uint8), lut])[arr]
    return lut[arr.astype(np.int32) - lo_raw]


def missing_reason(path) -> str:
    """Why a path that does not exist as a file cannot be read: a symlink loop (a link that points back to
    itself), a broken symlink, or no such file."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link points back to itself): not read"
        if path.is_symlink():
            try:
                target = f" {os.readlink(path)}"
            except OSError:
                target = ""
            return f"broken symlink (its target{target} does not exist): not read"
    except ValueError:  # a NUL in the name
        pass
    return "file not found"


def read_gray(path) -> np.ndarray:
    """Decode any supported file to a (H, W) uint8 grayscale array, or raise ImageReadError."""
    return read_gray_info(path)[0]


def read_gray_info(path, tags: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """read_gray, plus notes on what was not used (a multi-page TIFF's later pages, a multi-frame
    DICOM's later frames). Raises ImageReadError for a file over MAX_PIXELS (from its header, before
    decoding) and for non-finite pixel values. DICOM is recognised by its .dcm name or by its content
    (the DICM preamble); tags: a dict that, for a DICOM file, gets its DICOM_TAGS (cleared otherwise)."""
    path = Path(path)
    notes: list[str] = []
    if not path.is_file():  # before any read: opening a FIFO would block, a device never end
        raise ImageReadError(path, missing_reason(path) if not path.exists() else
                             "not a regular file (a FIFO, device or folder with an image name): not read")
    if tags is not None:
        tags.clear()
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path, notes, tags), notes
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e})")
    if buf.size == 0:
        raise ImageReadError(path, "empty file")
    if is_dicom_bytes(buf[:DICOM_MAGIC_OFFSET + 4]):  # DICOM by content: PACS exports carry no extension
        return _read_dicom(path, notes, tags), notes
    w, h, pages = header_info(buf)
    if w is not None and h is not None:
        too_large = _too_large_reason(w, h, decoded_bytes_per_pixel(buf))
        if too_large:
            raise ImageReadError(path, too_large)
    if pages > 1:
        notes.append(f"multi-page TIFF ({pages} pages): only the first page was used")
    est = w * h * decoded_bytes_per_pixel(buf) if w is not None and h is not None else 0
    with DECODE_BUDGET.hold(est):  # decode threads together stay within MAX_DECODED_BYTES (+ conversions)
        return _decode_raster(path, buf), notes


FAST_INFLATE_MIN_BYTES = 1 << 20  # smaller PNGs (a 256-px film is ~70 KB) gain nothing from the detour


def _png_chunks(b):
    """(IHDR data, the IDAT data joined) of a PNG (bytes or a memoryview: then the IDAT chunks are joined
    straight from the file's buffer, one copy, or none for a single chunk); None when it is unusual
    (truncated, split IDATs)."""
    ihdr, idat, i, n, ended = None, [], 8, len(b), False
    while i + 12 <= n:
        ln = int.from_bytes(b[i:i + 4], "big")
        kind, end = bytes(b[i + 4:i + 8]), i + 12 + ln
        if end > n:
            return None
        if kind == b"IHDR":
            ihdr = bytes(b[i + 8:i + 8 + ln])
        elif kind == b"IDAT":
            if ended:
                return None
            idat.append(b[i + 8:i + 8 + ln])
        elif idat:
            ended = True
        i = end
        if kind == b"IEND":
            break
    return (ihdr, idat[0] if len(idat) == 1 else b"".join(idat)) if ihdr and idat else None


def _png_grey_fast(buf: np.ndarray) -> np.ndarray | None:
    """A large grey PNG (8 or 16 bits, not interlaced) decoded with ISA-L's inflate (the `isal` package,
    2-3x zlib's speed) and its rows unfiltered in numpy, where every row uses the None, Sub or Up filter
    (libpng's adaptive filter chose Sub for every row of the benchmark's 12-bit films). The same pixels
    as OpenCV's decoder (a test checks each filter), in about half its time (27 against 57 ms on a
    2048 x 2048 16-bit film): inflating is most of a 16-bit film's decode. None where it does not apply (no isal,
    a small, colour, interlaced or unusual file, an Average or Paeth row): the file is decoded by OpenCV as
    before."""
    if buf.size < FAST_INFLATE_MIN_BYTES or bytes(buf[:8]) != b"\x89PNG\r\n\x1a\n":
        return None
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    parts = _png_chunks(memoryview(buf))
    if parts is None or len(parts[0]) != 13:
        return None
    ihdr, idat = parts
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, colour, interlace = ihdr[8], ihdr[9], ihdr[12]
    if colour != 0 or depth not in (8, 16) or interlace != 0 or w < 1 or h < 1:
        return None
    bpp, stride = depth // 8, w * (depth // 8)
    want = h * (stride + 1)
    try:  # never more than the header's size (+1 to see an over-long stream): a lying header cannot blow it up
        raw = isal_zlib.decompressobj().decompress(idat, want + 1)
    except Exception:  # noqa: BLE001 - a damaged stream: OpenCV's decode gives the file's own error
        return None
    if len(raw) != want:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride + 1)
    kinds = rows[:, 0]
    if int(kinds.max(initial=0)) > 2:
        return None  # Average / Paeth rows are sequential within a row: OpenCV's C loop does them
    # Sub rows: each byte plus the reconstructed byte bpp to its left, a running sum per byte lane
    sub = kinds == 1
    if sub.all():  # libpng's usual choice for films: one cumsum straight from the inflated rows, a 16-bit
        # file's big-endian byte pairs summed straight into native order (no second pass to swap them)
        out = np.empty((h, stride), np.uint8)
        lanes = out.reshape(h, w, bpp)
        native = depth == 16
        np.cumsum(rows[:, 1:].reshape(h, w, bpp), axis=1, dtype=np.uint8, out=lanes[:, :, ::-1] if native else lanes)
    else:
        out, native = rows[:, 1:].copy(), False
        if sub.any():
            out[sub] = np.cumsum(out[sub].reshape(-1, w, bpp), axis=1, dtype=np.uint8).reshape(-1, stride)
    up = kinds == 2
    if up.any():  # each byte plus the reconstructed byte above: a running sum down each run of Up rows
        starts = np.flatnonzero(up & ~np.concatenate([[False], up[:-1]]))
        for s0 in starts:
            s1 = s0 + int(np.argmin(up[s0:])) if not up[s0:].all() else h
            top = out[s0 - 1] if s0 > 0 else np.zeros(stride, np.uint8)
            out[s0:s1] = np.cumsum(np.vstack([top[None], out[s0:s1]]), axis=0, dtype=np.uint8)[1:]
    if depth == 8:
        return out
    return out.view(np.uint16) if native else out.view(np.uint16).byteswap(inplace=True)  # PNG is big-endian


def _decode_raster(path: Path, buf: np.ndarray) -> np.ndarray:
    """An encoded PNG / JPEG / BMP / TIFF (header already checked) -> 8-bit grey, EXIF orientation applied."""
    try:
        # IMREAD_UNCHANGED keeps 16-bit data but does not apply EXIF orientation: done below, so the
        # model sees what a viewer shows (a phone photo of a film stored sideways with tag 6)
        arr = _png_grey_fast(buf)
        if arr is None:
            arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:  # OpenCV's own limits / asserts: its text is no reason a user can act on
        arr = None
    orientation = exif_orientation(buf) if arr is not None else 1  # Pillow's fallback applies it below
    if arr is None:
        try:  # a few TIFF flavours OpenCV refuses; Pillow is the fallback
            from PIL import Image
            with Image.open(path) as im:  # lazy: the size is known before the pixels are decoded
                too_large = _too_large_reason(*im.size)
                if too_large:
                    raise ImageReadError(path, too_large)
                from PIL import ImageOps
                arr = np.asarray(ImageOps.exif_transpose(im))
        except ImageReadError:
            raise
        except Exception:
            raise ImageReadError(path, "not a decodable image (corrupt or unsupported format)")
    if arr.size == 0 or min(arr.shape[:2]) < 8:
        raise ImageReadError(path, f"image too small ({arr.shape})")
    too_large = _too_large_reason(arr.shape[1], arr.shape[0])  # a format whose header was not read
    if too_large:
        raise ImageReadError(path, too_large)
    if orientation != 1:
        arr = apply_exif_orientation(arr, orientation)
    return array_to_gray(path, arr)


def read_mask(path) -> np.ndarray:
    """Decode a lung mask to a (H, W) uint8 array of 0/1 (RGB, 16-bit, 0/1 or 0/255 all accepted)."""
    m = read_gray(path)
    hi = int(m.max(initial=0))
    return (m > hi // 2).astype(np.uint8) if hi > 0 else np.zeros_like(m)


MASK_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def find_mask(mask_dir, image_name: str) -> Path | None:
    """The lung mask of `image_name` in mask_dir: the same file name, else the same stem with another
    image extension (the database's masks are PNGs beside JPEG/PNG images); None if there is none."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        return None
    p = mask_dir / image_name
    if p.is_file():
        return p
    stem = Path(image_name).stem
    for ext in MASK_EXTS:
        q = mask_dir / (stem + ext)
        if q.is_file():
            return q
    return None


def mask_for_image(image) -> Path | None:
    """<...>/images/<name> -> <...>/masks/<name>; <C>/<name> -> <C>/masks/<name> (see find_mask)."""
    image = Path(image)
    base = image.parent.parent if image.parent.name.lower() == "images" else image.parent
    return find_mask(base / "masks", image.name)


def list_images(root, skip_dir=None) -> list[Path]:
    """Every supported image under root, recursively, sorted (hidden files skipped): a file with an
    image extension, or any other file that is DICOM by content (is_dicom: PACS exports like IM000001). Symlinked
    sub-folders are followed; a folder reached twice (a symlink loop, or two links to one folder) is
    searched once. skip_dir(Path) -> True prunes a folder (and what is below it). A folder that cannot
    be read raises DataError (its images would otherwise be left out without a word)."""
    root = Path(root)
    out, seen = [], set()

    def unreadable(e: OSError):
        if isinstance(e, FileNotFoundError):  # gone (or never there): nothing in it to leave out
            return
        raise DataError(f"cannot read folder {e.filename or root} ({e.strerror or e}): its images would be left "
                        f"out; fix its permissions or move it out of the data folder") from None

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or (skip_dir is not None and skip_dir(Path(dirpath))):
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            if p.suffix.lower() in IMAGE_EXTS or is_dicom(p):
                out.append(p)
    return out
