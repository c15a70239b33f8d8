"""The image sets of the real-use benchmark (scripts/benchmark_real_use.py), made from real X-rays into a
scratch folder at run time (never committed: they derive from the database's films).

  png256      the real films themselves (256 px, 8-bit PNG), linked
  png16       2048 x 2048, 16-bit PNG holding 12-bit data: what an archive or a DICOM export holds
  dicom       2500 x 3000 (columns x rows), 12-bit MONOCHROME2 DICOM with a window, uncompressed
  dicom_jpll  the same, JPEG Lossless (process 14, SV1), the usual compression of a PACS archive
  jpeg        2048 x 2048, 8-bit grey JPEG, quality 90

The full-size films are the real 256-px films upsampled (bicubic) with Gaussian noise of 6 grey levels
(12-bit) added, so their files compress like noisy detector data rather than like smooth upsampled
images (a noiseless upsampled film inflates several times faster and would flatter the decoder)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np

SETS = ("png256", "png16", "dicom", "dicom_jpll", "jpeg")
FULL = {"png16": (2048, 2048), "dicom": (3000, 2500), "dicom_jpll": (3000, 2500), "jpeg": (2048, 2048)}


def real_films(data_dir, n: int, seed: int = 0) -> list[Path]:
    from cxrkit.core.decode import list_images
    files = [p for p in list_images(data_dir) if "masks" not in p.parts]
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def _full(src: Path, shape, rng) -> np.ndarray:
    g = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).astype(np.float32) * (4095 / 255)
    return np.clip(big + rng.normal(0, 6, big.shape).astype(np.float32), 0, 4095).astype(np.uint16)


def _dicom_bytes(arr: np.ndarray, jpeg_lossless: bool) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEGLosslessSV1, ExplicitVRLittleEndian, generate_uid
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = JPEGLosslessSV1 if jpeg_lossless else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.PatientID = "DX", "PA", "BENCHMARK"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = 0, 1, 2048, 4096
    if jpeg_lossless:
        import imagecodecs  # libjpeg-turbo's lossless JPEG encoder (benchmark only: `pip install imagecodecs`)
        from pydicom.encaps import encapsulate
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=12)])
    else:
        ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_set(name: str, sources: list[Path], out: Path, seed: int = 0) -> Path:
    """The set `name` from `sources` in out/<name>/ (reused when complete); returns that folder."""
    folder = out / name
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, src in enumerate(sources):
        stem = f"{i:05d}_{src.stem}"  # unique even where a film is repeated (the memory check's 4x set)
        if name not in FULL:  # the real 256-px films (png256, png48, ...), linked
            dst = folder / f"{stem}.png"
            if not dst.exists():
                os.symlink(src.resolve(), dst)
            continue
        arr = _full(src, FULL[name], rng)
        if name == "png16":
            cv2.imwrite(str(folder / f"{stem}.png"), arr)
        elif name == "jpeg":
            cv2.imwrite(str(folder / f"{stem}.jpg"), (arr >> 4).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        else:  # DICOM, named like a PACS export (no extension)
            (folder / f"IM{i:06d}").write_bytes(_dicom_bytes(arr, name == "dicom_jpll"))
    done.write_text(f"{len(sources)}\n")
    return folder
