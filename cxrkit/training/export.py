"""ONNX export of a cxrkit checkpoint, with a side-car `<model>.onnx.meta.json` and a parity check.

Graph contract (what `OnnxBackend` and any other runtime feed / read):
    input  `image`          (B, 3, H, W) float32 RGB in [0, 1]  (grayscale replicated to 3 channels;
                            mean/std normalisation is INSIDE the graph)
    output `segmentation`   (B, 1, H, W) lung probabilities (sigmoid already applied)
    output `classification` (B, C) raw logits; calibrated probabilities = softmax(logits / temperature)
                            with the temperature stored in the meta file.
The graph's own metadata_props bind it to its meta file: cxrkit_meta_id (a random id, also in the
meta), cxrkit_class_names (JSON, model order), cxrkit_img_size, cxrkit_temperature and
cxrkit_lung_area_range; OnnxBackend refuses a meta file that disagrees (cxrkit.core.model_meta.ModelMeta.graph_binding).

Exporter choice (torch 2.13): the TorchScript-based exporter (`dynamo=False`) is tried first. It
still works and honours opset 17, but torch marks it deprecated (DeprecationWarning "The feature
will be removed"), so when it is missing or fails, the torch.export-based exporter (`dynamo=True`)
is used instead; that one implements opset >= 18 only (its down-conversion to 17 fails for this
graph), so it exports at max(opset, 18). The meta file records which exporter ran and the opset the
file really has.
"""
from __future__ import annotations

import datetime as _dt
import logging
import uuid
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# the graph's names, meta_path_for and sha256_file live in the torch-free io_utils (the ONNX inference
# path imports them without torch); re-exported here for existing `from cxrkit.training.export import ...` callers
from ..core.config import LUNG_THRESHOLD, ExportConfig
from ..core.device import pick_device
from ..core.io_utils import (INPUT_NAME, OOD_OUTPUT, OUTPUT_NAMES, meta_path_for, sha256_file,
                             write_json_atomic)  # noqa: F401
from ..core.errors import UsageError
from ..core.io_utils import atomic_path
from ..core.model import check_img_size, predict
from ..core.model_meta import ModelMeta

log = logging.getLogger("cxrkit")

META_FORMAT = "cxrkit-onnx-meta-v1"
# parity tolerances (ONNX Runtime CPU vs PyTorch CPU, same random inputs)
CLASS_PROB_TOL = 1e-4   # max abs diff of class probabilities (raw and temperature-calibrated)
SEG_PROB_TOL = 1e-3     # max abs diff of lung probabilities


OOD_SCORE_TOL = 1e-4    # max abs diff of the out-of-distribution score


class ExportWrapper(nn.Module):
    """image -> (sigmoid segmentation probabilities, classification logits[, ood_score when the model
    carries an OOD head])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.with_ood = getattr(model, "ood_head", None) is not None

    def forward(self, image: torch.Tensor):
        return predict(self.model, image, with_ood=True) if self.with_ood else predict(self.model, image)


def _output_names(wrapper) -> list[str]:
    return list(OUTPUT_NAMES) + ([OOD_OUTPUT] if wrapper.with_ood else [])


def _export_torchscript(wrapper, dummy, path, opset, dynamic_batch):
    axes = {n: {0: "batch"} for n in (INPUT_NAME, *_output_names(wrapper))} if dynamic_batch else None
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in torch >= 2.9 (see the module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT_NAME], output_names=_output_names(wrapper),
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False)
    return opset


def _export_dynamo(wrapper, dummy, path, opset, dynamic_batch):
    opset = max(opset, 18)
    shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT_NAME], output_names=_output_names(wrapper),
                          opset_version=opset, dynamic_shapes=shapes, dynamo=True, external_data=False,
                          verbose=False)
    return opset


def _bind_graph(onnx_file, props: dict) -> None:
    """Write the meta binding (class names, size, temperature, lung-area range, meta_id) into the
    graph's own metadata_props, so a meta file from another export is refused at load time."""
    import onnx
    proto = onnx.load(str(onnx_file), load_external_data=False)
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for k, v in keep + sorted(props.items()):
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(onnx_file))


def _parity(onnx_file, wrapper_cpu, img_size, batches, temperature) -> dict:
    """ONNX Runtime (CPU) vs PyTorch (CPU, eval) on fixed random inputs."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    res = {}
    for b in batches:
        x = torch.rand(b, 3, img_size, img_size, generator=gen)
        with torch.no_grad():
            seg_t, lg_t, *ood_t = wrapper_cpu(x)
        seg_o, lg_o, *ood_o = sess.run(_output_names(wrapper_cpu), {INPUT_NAME: x.numpy()})
        lg_t = lg_t.numpy().astype(np.float64)
        lg_o = np.asarray(lg_o, np.float64)
        from ..core.metrics import softmax
        res[str(b)] = {
            "max_abs_diff_seg_prob": float(np.abs(np.asarray(seg_o) - seg_t.numpy()).max()),
            "max_abs_diff_logits": float(np.abs(lg_o - lg_t).max()),
            "max_abs_diff_class_prob": float(np.abs(softmax(lg_o) - softmax(lg_t)).max()),
            "max_abs_diff_class_prob_calibrated": float(np.abs(softmax(lg_o, temperature)
                                                               - softmax(lg_t, temperature)).max()),
            "same_argmax": bool((lg_o.argmax(1) == lg_t.argmax(1)).all()),
        }
        if ood_t:
            res[str(b)]["max_abs_diff_ood_score"] = float(np.abs(np.asarray(ood_o[0], np.float64)
                                                                 - ood_t[0].numpy().astype(np.float64)).max())
    return res


def export_to_onnx(checkpoint_path, onnx_path, img_size=None, opset: int = ExportConfig.opset,
                   dynamic_batch: bool = True, device=None, exporter: str = ExportConfig.exporter,
                   overwrite: bool = False) -> dict:
    """Export a checkpoint to ONNX, validate it, write `<onnx_path>.meta.json`; returns the meta dict.

    img_size None = the checkpoint's training size. exporter: "auto" (TorchScript first, then
    dynamo), "torchscript" or "dynamo". An existing onnx_path or meta file is refused (UsageError)
    unless overwrite. Raises FileNotFoundError (missing checkpoint), ValueError
    (bad size / options) or RuntimeError (exporter failure or parity outside tolerance); in those
    cases nothing is left at onnx_path or its meta path.
    """
    onnx_path = Path(onnx_path)
    src = _validate(checkpoint_path, onnx_path, img_size, opset, exporter, overwrite)
    exported = _export(src, onnx_path, int(opset), exporter, dynamic_batch, device)
    return _write_meta(src, exported, onnx_path, int(opset), dynamic_batch)


@dataclass
class _Source:
    """The checkpoint to export, loaded and checked (_validate)."""
    path: Path
    ck: dict
    model: nn.Module
    size: int                     # the export size
    trained_size: int
    meta: ModelMeta               # what the meta file and (its binding) the graph's metadata_props hold


@dataclass
class _Exported:
    """What the export and its checks found (_export)."""
    used: str                     # the exporter that worked: "torchscript" or "dynamo"
    errors: list                  # the exporters that failed before it
    opset: int | None             # the opset the file really has
    in_shape: list                # the graph's input shape
    parity: dict                  # _parity's figures per batch size
    with_ood: bool                # the graph has the ood_score output


def _validate(checkpoint_path, onnx_path: Path, img_size, opset, exporter, overwrite) -> _Source:
    """The options and the checkpoint, checked before anything is written."""
    from ..core.checkpoint import load_checkpoint, model_from_checkpoint  # imports MONAI: kept out
    meta_p = meta_path_for(onnx_path)
    if not overwrite and (onnx_path.is_file() or meta_p.is_file()):
        which = " and ".join(str(q) for q in (onnx_path, meta_p) if q.is_file())
        raise UsageError(f"{which} already exist(s): pass --overwrite to replace the model and its meta file, or "
                         f"choose another --onnx_path")
    checkpoint_path = Path(checkpoint_path)
    ck = load_checkpoint(checkpoint_path)  # FileNotFoundError / CheckpointError, one line, names the path
    model, ck = model_from_checkpoint(ck, where=str(checkpoint_path))
    trained_size = int(ck["img_size"])
    size = trained_size if img_size in (None, 0) else int(img_size)
    check_img_size(model.cfg, size)  # a multiple of model.output_stride (UsageError, a ValueError)
    if Path(onnx_path).is_dir():
        raise ValueError(f"--onnx_path {onnx_path} is a folder: give a file name, e.g. {Path(onnx_path) / 'model.onnx'}")
    if not 13 <= int(opset) <= 21:
        raise ValueError(f"--opset {opset}: use an ONNX opset between 13 and 21 (17 is the tested default)")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    if size != trained_size:
        log.warning("exporting at %dpx although the model was trained at %dpx: accuracy may drop", size, trained_size)
    meta = ModelMeta.from_checkpoint(ck, str(checkpoint_path))  # inference would refuse the model otherwise
    meta = dataclasses.replace(meta, img_size=size, meta_id=uuid.uuid4().hex,
                               normalization=meta.normalization or {"mean": list(model.cfg.mean),
                                                                    "std": list(model.cfg.std)})
    return _Source(checkpoint_path, ck, model, size, trained_size, meta)


def _export(src: _Source, onnx_path: Path, opset: int, exporter: str, dynamic_batch: bool, device) -> _Exported:
    """The graph, bound to its meta, checked and compared with PyTorch; atomic: the temp file replaces
    onnx_path only when every check passes, else it is removed."""
    dev = pick_device(device, auto="cpu")
    wrapper = ExportWrapper(src.model).eval().to(dev)
    dummy = torch.rand(2 if dynamic_batch else 1, 3, src.size, src.size, device=dev)
    with atomic_path(onnx_path) as tmp:
        used, errors = _run_exporters(wrapper, dummy, tmp, opset, exporter, dynamic_batch)
        _bind_graph(tmp, src.meta.graph_binding())
        real_opset, in_shape = _check_graph(tmp, wrapper)
        parity = _check_parity(tmp, wrapper.to("cpu"), src.size, dynamic_batch, src.meta.temperature)
    return _Exported(used, errors, real_opset, in_shape, parity, wrapper.with_ood)


def _run_exporters(wrapper, dummy, path, opset: int, exporter: str, dynamic_batch: bool) -> tuple[str, list]:
    """The first exporter of `exporter`'s order that works; returns its name and the others' errors."""
    order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
    errors = []
    for name in order:
        try:
            fn = _export_torchscript if name == "torchscript" else _export_dynamo
            fn(wrapper, dummy, path, opset, dynamic_batch)
            if name == "torchscript":
                log.info("exported with the TorchScript exporter (dynamo=False; deprecated since torch 2.9 "
                         "but working in %s); --exporter dynamo uses the torch.export one (opset >= 18)",
                         torch.__version__)
            return name, errors
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all if none works
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            log.warning("ONNX exporter %s failed (%s)%s", name, errors[-1],
                        "; trying the next one" if name != order[-1] else "")
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))


def _check_graph(path, wrapper) -> tuple[int | None, list]:
    """onnx's full check, and the graph's input / output names; returns its opset and input shape."""
    import onnx
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    real_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    in_shape = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    out_names = [o.name for o in proto.graph.output]
    if proto.graph.input[0].name != INPUT_NAME or out_names != _output_names(wrapper):
        raise RuntimeError(f"exported graph has input {proto.graph.input[0].name} / outputs {out_names}, "
                           f"expected {INPUT_NAME} / {_output_names(wrapper)}")
    return real_opset, in_shape


def _check_parity(path, wrapper_cpu, size: int, dynamic_batch: bool, temperature: float) -> dict:
    """_parity's figures; RuntimeError when any is outside its tolerance."""
    parity = _parity(path, wrapper_cpu, size, [1, 4] if dynamic_batch else [1], temperature)
    worst_cls = max(max(v["max_abs_diff_class_prob"], v["max_abs_diff_class_prob_calibrated"])
                    for v in parity.values())
    worst_seg = max(v["max_abs_diff_seg_prob"] for v in parity.values())
    worst_ood = max(v.get("max_abs_diff_ood_score", 0.0) for v in parity.values())
    passed = worst_cls <= CLASS_PROB_TOL and worst_seg <= SEG_PROB_TOL and worst_ood <= OOD_SCORE_TOL
    if not passed:
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: max class-probability diff {worst_cls:.3g} "
                           f"(tolerance {CLASS_PROB_TOL}), max segmentation diff {worst_seg:.3g} "
                           f"(tolerance {SEG_PROB_TOL}), max ood_score diff {worst_ood:.3g} (tolerance "
                           f"{OOD_SCORE_TOL}); the model was not written")
    return parity


def _io_meta(src: _Source, ex: _Exported, dynamic_batch: bool) -> tuple[dict, dict]:
    """The meta file's "input" and "outputs"."""
    size, batch = src.size, "batch" if dynamic_batch else 1
    inp = {
        "name": INPUT_NAME, "shape": [batch, 3, size, size], "dtype": "float32",
        "range": [0.0, 1.0], "layout": "NCHW", "channels": "RGB; grayscale X-rays replicated to 3 channels",
        "preprocessing": f"cxrkit.core.decode: decode to 8-bit grayscale (16-bit scaled by bit depth, DICOM "
                         f"MONOCHROME1 inverted, VOI LUT applied, RGB(A) to luminance) -> resize to "
                         f"{size}x{size} (area when shrinking) -> / 255 -> replicate to 3 channels; "
                         f"mean/std normalisation is inside the graph, do not apply it again",
        "graph_input_shape": ex.in_shape,
    }
    outputs = {
        "segmentation": {"shape": [batch, 1, size, size], "dtype": "float32",
                         "meaning": f"lung probability per pixel (sigmoid applied); lung = prob > {LUNG_THRESHOLD}"},
        "classification": {"shape": [batch, len(src.meta.class_names)], "dtype": "float32",
                           "meaning": "raw logits in class_names order; probabilities = "
                                      "softmax(logits / temperature)"},
        **({OOD_OUTPUT: {"shape": [batch], "dtype": "float32",
                         "meaning": "out-of-distribution score (cxrkit.core.ood); over ood.threshold: not judged"}}
           if ex.with_ood else {}),
    }
    return inp, outputs


def _write_meta(src: _Source, ex: _Exported, onnx_path: Path, opset: int, dynamic_batch: bool) -> dict:
    """`<onnx_path>.meta.json`: what the graph holds, where it came from, and its parity; returns it."""
    import onnx
    import onnxruntime
    ck = src.ck
    inp, outputs = _io_meta(src, ex, dynamic_batch)
    model = src.meta.to_onnx_meta()
    meta = {
        "format": META_FORMAT,
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "meta_id": model.pop("meta_id"),
        "graph_metadata": "the graph's metadata_props repeat meta_id, class_names, img_size, temperature and "
                          "lung_area_range; a meta file that disagrees with them is refused",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **model,
        "input": inp,
        "outputs": outputs,
        "opset": ex.opset,
        "opset_requested": opset,
        "exporter": "torch.onnx TorchScript (dynamo=False)" if ex.used == "torchscript"
                    else "torch.onnx torch.export (dynamo=True)",
        "dynamic_batch": bool(dynamic_batch),
        "source_checkpoint": {"file": src.path.name, "sha256": sha256_file(src.path),
                              "epoch": int(ck.get("epoch", -1)) + 1, "metrics": ck.get("metrics")},
        "parity": {"reference": "PyTorch eval on CPU vs ONNX Runtime CPUExecutionProvider, uniform random inputs "
                                "(torch seed 0)",
                   "tolerances": {"class_prob_max_abs_diff": CLASS_PROB_TOL, "seg_prob_max_abs_diff": SEG_PROB_TOL,
                                  **({"ood_score_max_abs_diff": OOD_SCORE_TOL} if ex.with_ood else {})},
                   "batches": ex.parity, "passed": True},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "note": "research software; not for diagnosis",
    }
    if ex.errors:
        meta["exporter_fallback_reasons"] = ex.errors
    write_json_atomic(meta_path_for(onnx_path), meta)
    return meta
