"""Helpers shared by the test folders (import as `from tests.helpers import ...`).

  train_tiny             the tiny in-process training run (arch tiny, 1 epoch, batch 8, no workers)
  read_predictions       predictions.csv as a list of dicts (optionally with its header, or keyed by file name)
  assert_one_line_error  a CLI's stderr is ONE line `error: ...` (no traceback), naming what it must name
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the real chest X-ray database (<Class>/images, <Class>/masks): CXR_DATA_DIR, else ../shared/data/cxr4
CXR_DATA = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data" / "cxr4"))
NO_DATA_REASON = (f"real chest X-ray data not found at {CXR_DATA} (expected ../shared/data/cxr4 next to the "
                  f"repository; set CXR_DATA_DIR to its folder)")


def train_tiny(data, out, *extra, img_size: int = 32, epochs: int = 1, batch_size: int = 8,
               device: str | None = "cpu") -> int:
    """`cxrkit-train` in-process on data -> out with the tiny preset; returns its exit code. Later flags in
    `extra` override the defaults (argparse keeps the last value)."""
    from cxrkit.cli import train
    args = ["--data_dir", str(data), "--output_dir", str(out), "--arch", "tiny", "--img_size", str(img_size),
            "--num_epochs", str(epochs), "--batch_size", str(batch_size), "--workers", "0", "--quiet"]
    if device is not None:
        args += ["--device", device]
    return train.main([*args, *extra])


def read_predictions(path, header: bool = False, by_name: bool = False):
    """Rows of a predictions.csv (path to the file or to its run folder) as dicts of strings.
    header=True: (fieldnames, rows); by_name=True: {file name of image_path: row}."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if by_name:
        rows = {Path(r["image_path"]).name: r for r in rows}
    return (reader.fieldnames, rows) if header else rows


def assert_one_line_error(err, *needles: str, log_lines_ok: bool = False) -> str:
    """`err` is stderr text or pytest's capsys (read and cleared). It must be exactly one line starting with
    `error: ` holding every needle, and no traceback. log_lines_ok=True first drops log records ("INFO ...",
    "WARNING ..." lines, which pytest may or may not let through); by default nothing else may be printed.
    Returns the line."""
    if not isinstance(err, str):
        err = err.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if log_lines_ok:
        lines = [ln for ln in lines if not ln.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


# ------------------------------------------------------- small shared pieces of the reliability findings
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]

# a process that claims an output folder and holds it until its stdin closes (F1, R1)
HOLD_LOCK = """
import sys
from cxrkit.core.outdir import claim_save_dir
claim = claim_save_dir(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def real_images(cxr_eval_dir, n):
    """The first n real images of the cxr_eval_dir fixture (the corrupt one left out)."""
    return [p for p in sorted(Path(cxr_eval_dir).glob("*/images/*.png")) if "corrupt" not in p.name][:n]


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (tiny on disk): the size must be refused before decoding."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1) * 4)) + chunk(b"IEND", b""))
    return path


def make_unreadable(monkeypatch, part: str):
    """Folders whose path contains `part` raise PermissionError when listed (root ignores chmod)."""
    import os
    real = os.scandir

    def scandir(path="."):
        if part in str(path).replace("\\", "/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)  # os.walk lists folders through it


def read_manifest(out) -> dict:
    """The outputs manifest a cxrkit run keeps in its output folder."""
    import json
    return json.loads((Path(out) / ".cxrkit_outputs.json").read_text())


def make_dicom(path, pixels, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               sop_class=None, **tags):
    """A DICOM file (any name: the reader goes by content) holding `pixels`, with a fresh SOP instance
    UID and the extra `tags` (e.g. StudyInstanceUID, ViewPosition, PatientAge); returns the dataset."""
    import pydicom.uid as uids
    from pydicom.dataset import Dataset, FileMetaDataset
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or uids.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.set_pixel_data(pixels, photometric_interpretation=photometric,
                      **({"bits_stored": bits_stored} if bits_stored else {}))
    ds.save_as(path, enforce_file_format=True)
    return ds
