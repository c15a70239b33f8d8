"""The Python API: two lines from an image to a typed answer.

    import cxrkit
    model = cxrkit.load()                      # the shipped ONNX model; or load("m.onnx" / "m.pth", device=...)
    result = model.predict("x.png")            # a Prediction; a list / folder gives a list of them

`predict` takes a file path (any format cxrkit.core.decode reads, DICOM by content too), a list of
them, a folder (searched like --data_dir: `masks` folders and cxrkit output folders are skipped), a
numpy array (H x W, or H x W x C with C = 1, 3 (RGB) or 4 (RGBA); any bit depth or float range, turned
into 8-bit grey by decode's own conversions) or a PIL image. The numbers are the CLI's: the same decode
(per_image.decode_item), the same model call (per_image.model_outputs: calibrated softmax(logits / T), the
gate's score and views) and the same flags (pipeline.image_flags), so a file's Prediction agrees with
its predictions.csv row to the CSV's 6 decimals.

ONNX models stay torch-free here (tests/inference/test_inference.py runs it in a fresh interpreter);
`explain` (Grad-CAM) needs torch and the PyTorch checkpoint. Research software: not for diagnosis.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import CHECKPOINT_PATH, ONNX_PATH, InferConfig
from ..core.decode import ImageReadError, array_to_gray
from ..core.errors import InferenceError
from ..core.model_input import lung_mask, resize_gray, to_model_input_np
from ..core.ood import is_gated
from ..core import quality
from ..core.shipped import resolve_default
from .inputs import InputItem, gather_inputs
from .per_image import Decoded, decode_item, image_flags, model_outputs

ARRAY_SOURCE = "<array>"
PIL_SOURCE = "<PIL image>"


@dataclass(repr=False)
class Prediction:
    """One image's answer. predicted_class and confidence are None when the image is not judged (a gate
    flag in flags, cxrkit.core.ood: not_chest_xray, inverted, rotated, extreme_aspect, lateral_view) or
    could not be decoded (error). probabilities: calibrated, model class order (for a not-judged image
    the model's output, not to be read as a prediction)."""
    source: str                              # the file, or "<array>" / "<PIL image>"
    predicted_class: str | None
    probabilities: dict
    confidence: float | None
    ood_score: float | None                  # None: the model carries no gate
    flags: tuple = ()                        # predictions.csv's quality_flags
    lung_mask: np.ndarray | None = None      # bool (H, W) at the input's own size
    lung_area_fraction: float | None = None  # of the model input (as predictions.csv)
    dicom: dict | None = None                # a DICOM input's UIDs, ViewPosition, PatientAge
    error: str | None = None                 # why a file of a list / folder was not decoded

    @property
    def judged(self) -> bool:
        return self.error is None and not is_gated(self.flags)

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction({self.source!r}, error={self.error!r})"
        head = (f"{self.predicted_class} {self.confidence:.3f}" if self.judged
                else "not judged (" + ", ".join(f for f in self.flags if is_gated([f])) + ")")
        probs = ", ".join(f"{k}: {v:.3f}" for k, v in self.probabilities.items())
        mask = "" if self.lung_mask is None else f", lung_mask {self.lung_mask.shape[1]}x{self.lung_mask.shape[0]}"
        ood = "" if self.ood_score is None else f", ood_score {self.ood_score:.3f}"
        return (f"Prediction({self.source!r}: {head}; {{{probs}}}, flags {list(self.flags)}{ood}, "
                f"lung area {self.lung_area_fraction:.3f}{mask})")


def _array_gray(a) -> np.ndarray:
    """A numpy array or PIL image -> (H, W) uint8 grey, by decode's own conversions (a colour array is
    read as RGB(A), as PIL, imageio and matplotlib give it)."""
    src = ARRAY_SOURCE
    if not isinstance(a, np.ndarray):  # a PIL image
        src = PIL_SOURCE
        if a.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            a = a.convert("RGBA" if "A" in a.mode or "transparency" in a.info else "RGB")
        elif a.mode == "LA":
            a = a.convert("L")
        a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., [2, 1, 0, 3][:a.shape[2]]]  # RGB(A) -> the BGR(A) order decode's OpenCV conversion takes
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise InferenceError(f"an image array must be H x W or H x W x C (C = 1, 3 or 4), got shape {a.shape}; "
                             f"pass a list of arrays for several images")
    if min(a.shape[:2]) < 8:
        raise ImageReadError(src, f"image too small ({a.shape})")
    return array_to_gray(src, a)


class Model:
    """A loaded model: predict(x) -> Prediction(s); explain(x) -> Grad-CAM map(s). Built by load()."""

    def __init__(self, backend, checkpoint=None, ood_threshold: float | None = None):
        self.backend = backend
        self.checkpoint = checkpoint  # Grad-CAM's gradients for an ONNX model (None: the shipped .pth if any)
        try:
            self.gate = backend.meta.resolve_gate(ood_threshold)  # None: the model has no gate
        except ValueError as e:
            raise InferenceError(str(e)) from None
        self.area_rng = quality.resolve_lung_area_range(backend.lung_area_range)
        from ..core.fingerprint import unpack
        self.train_hashes = unpack(backend.meta.training_hashes)  # flags in_training_set, as the CLI does
        self._cam = None

    @property
    def class_names(self) -> list[str]:
        return list(self.backend.class_names)

    @property
    def img_size(self) -> int:
        return int(self.backend.img_size)

    def __repr__(self) -> str:
        return f"cxrkit.Model({self.backend.name}: {self.backend.model_file}, classes {self.class_names})"

    # ------------------------------------------------------------------------------------ inputs
    def _inputs(self, x) -> tuple[list, bool]:
        """(a list of decoded-or-to-decode entries, single): entries are Decoded (arrays) or InputItem."""
        if isinstance(x, (list, tuple)):
            out = []
            for e in x:
                out += self._inputs(e)[0]
            return out, False
        if isinstance(x, (str, Path)):
            p = Path(x)
            if p.is_dir():
                return gather_inputs(data_dir=p), False
            return [InputItem(path=p, rel=p.name)], True
        if isinstance(x, np.ndarray) or hasattr(x, "getbands"):  # numpy or PIL
            g = _array_gray(x)
            src = ARRAY_SOURCE if isinstance(x, np.ndarray) else PIL_SOURCE
            d = Decoded(InputItem(path=Path(src), rel=src), model_u8=resize_gray(g, self.img_size),
                         orig_shape=g.shape[:2])
            d.stats = quality.image_stats(d.model_u8)
            return [d], True
        raise InferenceError(f"predict takes a path, a folder, a list, a numpy array or a PIL image; got "
                             f"{type(x).__name__}")

    def _decoded(self, entries) -> list[Decoded]:
        return [e if isinstance(e, Decoded) else decode_item(e, self.img_size, 0) for e in entries]

    # ----------------------------------------------------------------------------------- predict
    def predict(self, x, batch_size: int = InferConfig.batch_size, tta: int = 1):
        """One Prediction per image: a single Prediction for one file, array or PIL image (an undecodable
        file raises ImageReadError), a list for a list or a folder (an undecodable file there gets a
        Prediction with .error, like the CLI's skip). tta: test-time augmentation views (> 1 needs torch)."""
        entries, single = self._inputs(x)
        out = []
        for s in range(0, len(entries), max(1, int(batch_size))):
            out += self._predict_batch(self._decoded(entries[s:s + max(1, int(batch_size))]), tta)
        if single:
            if out[0].error is not None:
                raise ImageReadError(out[0].source, out[0].error)
            return out[0]
        return out

    def _predict_batch(self, ds: list[Decoded], tta: int) -> list[Prediction]:
        ok = [d for d in ds if d.error is None]
        res = {}
        if ok:
            x = to_model_input_np(np.stack([d.model_u8 for d in ok]))
            seg, probs, scores, views = model_outputs(self.backend, x, tta, float(self.backend.temperature), self.gate)
            for i, d in enumerate(ok):
                score = None if scores is None else float(scores[i])
                flags = image_flags(d, seg[i], self.area_rng, self.gate, score, views[i], self.train_hashes)
                pred = int(probs[i].argmax())
                judged = not is_gated(flags)
                res[id(d)] = Prediction(
                    str(d.item.path), self.class_names[pred] if judged else None,
                    {c: float(probs[i][j]) for j, c in enumerate(self.class_names)},
                    float(probs[i][pred]) if judged else None, score, flags,
                    lung_mask(seg[i], d.orig_shape), float(lung_mask(seg[i]).mean()), d.dicom)
        return [res.get(id(d)) or Prediction(str(d.item.path), None, {}, None, None, error=d.error) for d in ds]

    # ----------------------------------------------------------------------------------- explain
    def _explainer(self):
        if self._cam is not None:
            return self._cam
        if self.backend.name == "pytorch":
            cam = self.backend.explainer()
        else:
            ck = self.checkpoint
            if ck is None:
                try:
                    ck = resolve_default(CHECKPOINT_PATH, CHECKPOINT_PATH, "checkpoint=")
                except FileNotFoundError:
                    raise InferenceError(f"explain needs the PyTorch checkpoint (.pth) the model was exported from "
                                         f"(ONNX Runtime gives no gradients): cxrkit.load('model.pth') or "
                                         f"cxrkit.load(checkpoint='model.pth'); {CHECKPOINT_PATH} was not found"
                                         ) from None
            try:
                cam = self.backend.explainer(ck)
            except ImportError as e:
                raise InferenceError(f"explain (Grad-CAM) needs torch and MONAI ({e}); install them") from None
        self._cam = cam
        return cam

    def explain(self, x, target: str | None = None):
        """Grad-CAM map(s) of x at the input's own size (float32 >= 0, raw as cams/*.npy, then resized
        bilinearly): of `target` (a class name), else of the model's arg-max class. One map for one
        image, a list for a list or folder (None for a file that was not decoded)."""
        import cv2
        if target is not None and target not in self.class_names:
            raise InferenceError(f"target {target!r} is not a model class; choose one of {self.class_names}")
        cam = self._explainer()
        entries, single = self._inputs(x)
        ds = self._decoded(entries)
        ok = [d for d in ds if d.error is None]
        maps = {}
        if ok:
            xb = to_model_input_np(np.stack([d.model_u8 for d in ok]))
            if target is None:
                _, probs, _, _ = model_outputs(self.backend, xb, 1, float(self.backend.temperature), None)
                idx = probs.argmax(1)
            else:
                idx = np.full(len(ok), self.class_names.index(target))
            raw = np.asarray(cam(xb, idx), np.float32)
            for d, m in zip(ok, raw):
                h, w = d.orig_shape
                maps[id(d)] = cv2.resize(m, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        out = [maps.get(id(d)) for d in ds]
        if single:
            if ds[0].error is not None:
                raise ImageReadError(ds[0].item.path, ds[0].error)
            return out[0]
        return out


_BACKENDS = {"onnx": "onnx", "onnxruntime": "onnx", "ort": "onnx", "torch": "torch", "pytorch": "torch",
             "pth": "torch"}


def load(path=None, backend: str | None = None, device: str | None = None, checkpoint=None,
         ood_threshold: float | None = None, threads: int | None = None, precision: str = "auto") -> Model:
    """A Model from an .onnx (ONNX Runtime, <path>.meta.json beside it) or a .pth checkpoint (PyTorch).
    path None: the shipped ONNX model (or, with backend="torch", the shipped checkpoint), found in the
    working directory, the source checkout or the installed package (cxrkit.core.shipped).
    backend: "onnx" or "torch" (None: from the file's extension). device: "cpu", "cuda", "cuda:N" or
    "auto" (ONNX: "cuda" puts CUDAExecutionProvider first). checkpoint: for an ONNX model, the .pth
    that explain() takes its gradients from. threads: ONNX Runtime intra-op threads. precision (ONNX):
    "auto", "fp32" or "bf16" (cxrkit.inference.backends.choose_precision)."""
    kind = _BACKENDS.get(str(backend).lower()) if backend is not None else None
    if backend is not None and kind is None:
        raise InferenceError(f"backend {backend!r}: use 'onnx' or 'torch'")
    if path is None:
        default = CHECKPOINT_PATH if kind == "torch" else ONNX_PATH
        path = resolve_default(default, default, "cxrkit.load(path):")
    path = Path(path)
    if kind is None:
        kind = "torch" if path.suffix.lower() in (".pth", ".pt") else "onnx"
    if kind == "torch":
        from .backends import TorchBackend
        return Model(TorchBackend(path, device), checkpoint=path, ood_threshold=ood_threshold)
    from .backends import OnnxBackend
    use_cuda = str(device or "cpu").lower().startswith("cuda")
    return Model(OnnxBackend(path, use_cuda=use_cuda, intra_op_threads=threads, precision=precision),
                 checkpoint=checkpoint,
                 ood_threshold=ood_threshold)
