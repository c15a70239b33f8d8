"""--dicom_out: for every DICOM input, a DICOM SEG of the predicted lungs and a DICOM Structured Report
of the result, in <save_dir>/dicom/, both referencing the source image (research output: not for a
clinical system's decisions).

  dicom/<out_stem>_seg.dcm  Segmentation (BINARY, one segment "Lungs") at the source image's own size:
                            cxrkit.core.model_input.lung_mask(seg, (Rows, Columns)), the mask --save_masks
                            writes; the algorithm identification names cxrkit, its version and the model
                            (file name, SHA-256, meta_id).
  dicom/<out_stem>_sr.dcm   Comprehensive 3D SR, a TID 1500 measurement report: one measurement group
                            (the source image, the algorithm, the predicted class or "Not judged", the
                            calibrated probability of each class, the lung-area fraction) and a
                            "Qualitative Evaluations" container of text items (result in words, quality
                            flags, model identity and cxrkit.core.config.DISCLAIMER).

Both are new instances in new series (highdicom.UID()) of the SOURCE study; patient and study attributes
are what highdicom copies from the source dataset. The source is read again here, header only
(pydicom.dcmread(path, stop_before_pixels=True)): the decoder is left as it is. Type 2 patient / study
attributes highdicom reads but the source lacks are set EMPTY on that in-memory copy (never a value).

The SEG is written in the pipeline's writer thread (it needs the lung-probability map); the SR once every
row is final (after the run-level folder_shift flag), from the row predictions.csv holds. Any failure of
one file is counted and logged (summary.json "dicom_out"), never the run's end. highdicom is an optional
dependency (`pip install 'cxrkit[dicom-out]'`) imported only here, lazily; it does not import torch.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from ..core.decode import is_dicom

log = logging.getLogger("cxrkit")

DICOM_DIR = "dicom"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9901, 9902  # arbitrary, high: out of a modality's usual range
SCHEME = "99CXRKIT"  # private coding scheme (the "99" prefix) of the concepts DICOM has no code for
# Type 2 attributes highdicom reads from the source (Segmentation / SR constructors): empty when absent
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def seg_relpath(stem: str) -> str:
    return f"{DICOM_DIR}/{stem}_seg.dcm"


def sr_relpath(stem: str) -> str:
    return f"{DICOM_DIR}/{stem}_sr.dcm"


def looks_dicom(path) -> bool:
    """What the decoder reads as DICOM (a .dcm name, or the DICM preamble: cxrkit.core.decode.read_gray_info),
    known before the run: the inputs whose dicom/ files a run plans."""
    return Path(path).suffix.lower() == ".dcm" or is_dicom(path)


def planned(items) -> list[str]:
    """The dicom/ files a run may write: both files of every input that looks like DICOM (one that then
    fails to decode, or to write, is planned but absent: the manifest's finish lists only what exists)."""
    return [rel for it in items if looks_dicom(it.path) for rel in (seg_relpath(it.out_stem), sr_relpath(it.out_stem))]


def require_highdicom():
    """highdicom, or ModuleNotFoundError (cxrkit.cli.common maps it to `pip install 'cxrkit[dicom-out]'`)."""
    import highdicom
    return highdicom


def _one_line(e: BaseException, limit: int = 300) -> str:
    t = " ".join(f"{type(e).__name__}: {e}".split())
    return t if len(t) <= limit else t[:limit - 3] + "..."


class _Refused(Exception):
    """A source this writer cannot reference (its message is the reason summary.json gives)."""


def source_dataset(path):
    """The source's header (no pixels), checked for the UIDs a reference needs; missing Type 2 patient /
    study attributes set empty on this copy (highdicom reads them)."""
    import pydicom
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    missing = [k for k in _REQUIRED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise _Refused(f"the source has no {', '.join(missing)}: a DICOM object cannot reference it")
    for k in _TYPE2:
        if k not in ds:
            setattr(ds, k, "")
    return ds


class DicomWriter:
    """One run's dicom/ outputs and their tally (summary.json "dicom_out")."""

    def __init__(self, backend, save_dir):
        from .. import __version__
        from ..core.io_utils import model_sha256
        self.hd = require_highdicom()
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name every copied module
        self.dir = Path(save_dir) / DICOM_DIR
        self.names = list(backend.class_names)
        mf = Path(backend.model_file)
        self.model = {"file": mf.name, "sha256": model_sha256(mf), "meta_id": backend.meta.meta_id or "",
                      "img_size": int(backend.img_size), "backend": backend.name}
        self.version = __version__
        self.pending: list[tuple] = []    # (item, row) of each decoded DICOM input: its SR, once rows are final
        self.seg_ok: set[str] = set()     # out_stems whose SEG was written
        self.sr_ok: set[str] = set()
        self.not_dicom = 0
        self.failed: list[dict] = []      # {"path", "output": "seg" | "sr", "reason"}

    # ------------------------------------------------------------------------------------ identity
    def model_text(self) -> str:
        m = self.model
        return (f"cxrkit {self.version}; model {m['file']} (SHA-256 {m['sha256']}"
                + (f", meta_id {m['meta_id']}" if m["meta_id"] else "") + f"; {m['img_size']} px; {m['backend']})")

    def _parameters(self) -> dict:
        m = self.model
        return {"model_file": m["file"], "model_sha256": m["sha256"], **({"meta_id": m["meta_id"]} if m["meta_id"]
                                                                          else {}),
                "img_size": str(m["img_size"])}

    def _fail(self, path, output: str, e: BaseException) -> None:
        reason = str(e) if isinstance(e, _Refused) else _one_line(e)
        self.failed.append({"path": str(path), "output": output, "reason": reason})
        log.warning("--dicom_out: %s not written for %s: %s", output.upper(), path, reason)

    def _save(self, ds, rel_name: str) -> None:
        from ..core.io_utils import write_bytes_atomic
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        write_bytes_atomic(self.dir / rel_name, buf.getvalue())

    # ------------------------------------------------------------------------------------------ SEG
    def write_seg(self, item, seg_prob: np.ndarray) -> None:
        """The predicted lungs of one decoded DICOM input as a SEG (the writer thread); never raises."""
        try:
            self._write_seg(item, seg_prob)
            self.seg_ok.add(item.out_stem)
        except Exception as e:  # noqa: BLE001 - one file's failure is counted, never the run's end
            self._fail(item.path, "seg", e)

    def _write_seg(self, item, seg_prob) -> None:
        from pydicom.sr.codedict import codes
        from ..core.model_input import lung_mask
        hd = self.hd
        src = source_dataset(item.path)
        rows, cols = int(src.get("Rows", 0) or 0), int(src.get("Columns", 0) or 0)
        if rows < 1 or cols < 1:
            raise _Refused("the source has no Rows / Columns")
        mask = lung_mask(seg_prob, (rows, cols))  # the --save_masks mask: the source's own size
        alg = hd.AlgorithmIdentificationSequence(name="cxrkit", family=codes.DCM.ArtificialIntelligence,
                                                 version=self.version, source=self.model["file"],
                                                 parameters=self._parameters())
        desc = hd.seg.SegmentDescription(segment_number=1, segment_label="Lungs",
                                         segmented_property_category=codes.SCT.AnatomicalStructure,
                                         segmented_property_type=codes.SCT.Lung,
                                         algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                         algorithm_identification=alg)
        seg = hd.seg.Segmentation(
            source_images=[src], pixel_array=mask[None], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cxrkit (research software)",
            manufacturer_model_name=self.model["file"][:64], software_versions=self.version,
            device_serial_number=(self.model["meta_id"] or self.model["sha256"])[:64], omit_empty_frames=False,
            content_label="LUNGS", content_description="cxrkit predicted lungs; research use only")
        if int(src.get("NumberOfFrames", 1) or 1) > 1:  # the decoder judged the first frame only
            for fg in seg.PerFrameFunctionalGroupsSequence:
                for der in fg.get("DerivationImageSequence", []):
                    for s in der.get("SourceImageSequence", []):
                        s.ReferencedFrameNumber = 1
        seg.SeriesDescription = "cxrkit lungs (research use only)"
        self._save(seg, f"{item.out_stem}_seg.dcm")

    # ------------------------------------------------------------------------------------------- SR
    def add_row(self, item, row: dict) -> None:
        """A decoded DICOM input's predictions.csv row (the same dict: the run-level flags land in it)."""
        self.pending.append((item, row))

    def write_reports(self) -> None:
        """The SR of every decoded DICOM input, from its final row (after the folder_shift check)."""
        for item, row in self.pending:
            try:
                self._write_sr(item, row)
                self.sr_ok.add(item.out_stem)
            except Exception as e:  # noqa: BLE001 - counted, never the run's end
                self._fail(item.path, "sr", e)

    def result_text(self, row: dict) -> str:
        """The result in words: the class and its probability, or why no class was given."""
        from ..core.ood import OOD_REASON
        flags = [f for f in str(row.get("quality_flags") or "").split(";") if f]
        if not row.get("predicted_class"):
            why = [OOD_REASON.get(f, f) for f in flags if f in OOD_REASON] or ["gated"]
            return (f"Not judged ({', '.join(why)}): no class given; the probabilities are the model's output, "
                    f"not a prediction")
        return f"Predicted class: {row['predicted_class']} (calibrated probability {float(row['confidence']):.4f})"

    def _write_sr(self, item, row: dict) -> None:
        from pydicom.sr.codedict import codes
        from pydicom.sr.coding import Code
        from ..core.config import DISCLAIMER
        hd = self.hd
        sr = hd.sr
        src = source_dataset(item.path)
        alg = sr.AlgorithmIdentification(name="cxrkit", version=self.version,
                                         parameters=[f"{k}={v}" for k, v in self._parameters().items()])
        device = sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(self.model["sha256"]), name="cxrkit", manufacturer_name="cxrkit (research software)",
            model_name=self.model["file"][:64])
        context = sr.ObservationContext(observer_device_context=sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))
        judged = bool(row.get("predicted_class"))
        value = (Code(f"CLS{self.names.index(row['predicted_class'])}", SCHEME, row["predicted_class"][:64])
                 if judged else Code("NOTJUDGED", SCHEME, "Not judged"))
        evaluations = [sr.QualitativeEvaluation(Code("PREDCLASS", SCHEME, "Predicted class"), value)]
        measurements = [sr.Measurement(name=Code(f"PROB{j}", SCHEME, f"Probability of {c}"[:64]),
                                       value=float(row[f"prob_{c}"]), unit=codes.UCUM.NoUnits)
                        for j, c in enumerate(self.names)]
        measurements.append(sr.Measurement(name=Code("LUNGAREA", SCHEME, "Predicted lung area fraction"),
                                           value=float(row["lung_area_fraction"]), unit=codes.UCUM.NoUnits))
        group = sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(uid=hd.UID(), identifier="cxrkit classification"),
            algorithm_id=alg, measurements=measurements, qualitative_evaluations=evaluations,
            source_images=[sr.SourceImageForMeasurementGroup.from_source_image(src)])
        report = sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ChestImaging,
                                      imaging_measurements=[group])
        flags = str(row.get("quality_flags") or "")
        probs = ", ".join(f"{c} {float(row[f'prob_{c}']):.4f}" for c in self.names)
        texts = [("RESULT", "cxrkit result", self.result_text(row)),
                 ("PROBS", "Calibrated class probabilities", probs),
                 ("QFLAGS", "Quality flags", flags.replace(";", ", ") if flags else "none"),
                 ("MODEL", "Model", self.model_text()),
                 ("DISCLAIMER", "Disclaimer", DISCLAIMER)]
        box = sr.ContainerContentItem(name=Code("C0034375", "UMLS", "Qualitative Evaluations"),
                                      relationship_type=sr.RelationshipTypeValues.CONTAINS)
        box.ContentSequence = sr.ContentSequence([
            sr.TextContentItem(name=Code(code, SCHEME, meaning), value=text,
                               relationship_type=sr.RelationshipTypeValues.CONTAINS)
            for code, meaning, text in texts])
        root = report[0]
        root.ContentSequence.append(box)  # TID 1500 row 10: CONTAINS CONTAINER Qualitative Evaluations (TEXT)
        doc = sr.Comprehensive3DSR(evidence=[src], content=root, series_instance_uid=hd.UID(),
                                   series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                   manufacturer="cxrkit (research software)")
        doc.SeriesDescription = "cxrkit result (research use only)"
        self._save(doc, f"{item.out_stem}_sr.dcm")

    # ------------------------------------------------------------------------------------- summary
    def block(self) -> dict:
        """summary.json's "dicom_out"."""
        both = self.seg_ok & self.sr_ok
        return {"folder": f"{DICOM_DIR}/", "written": len(both), "seg_written": len(self.seg_ok),
                "sr_written": len(self.sr_ok), "skipped_not_dicom": self.not_dicom,
                "n_failed": len({f["path"] for f in self.failed}), "failed": self.failed,
                "model": dict(self.model),
                "note": "per DICOM input: <out_stem>_seg.dcm (DICOM SEG of the predicted lungs at the source's size) "
                        "and <out_stem>_sr.dcm (Comprehensive 3D SR, TID 1500: class or not judged, probabilities, "
                        "flags, model), both referencing the source instance; written = inputs with both files; "
                        "inputs that could not be decoded are in 'skipped'. Research output, not for a clinical "
                        "system's decisions"}


def _device_uid(sha256: str) -> str:
    """A stable UID for the observer device: the same model file, the same UID (2.25 + hash of its SHA-256)."""
    from pydicom.uid import generate_uid
    return str(generate_uid(prefix=None, entropy_srcs=["cxrkit", sha256]))
