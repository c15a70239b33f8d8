"""Batch inference: ONE pipeline, two backends (PyTorch checkpoint, ONNX Runtime model).

    backend = TorchBackend("model_checkpoints/best_covid_model.pth")        # or
    backend = OnnxBackend("models/covid_multitask.onnx")                   # + <model>.onnx.meta.json
    items = gather_inputs(data_dir="DIR", class_names=backend.class_names)
    summary = run_pipeline(backend, items, "out/preds", batch_size=16, tta=1)

A backend exposes class_names, img_size, temperature and
`forward(x) -> (seg_prob (B,1,S,S), cls_logits (B,C))` on float32 numpy arrays (x: (B,3,S,S) from
`cxrkit.preprocess.to_model_input_np`), which is what `cxrkit.tta.tta_predict` runs; so
preprocessing (cxrkit.preprocess), TTA, calibration (softmax(logits / T)), metrics and every output
file are shared by both backends. TorchBackend converts to / from torch on its device internally.

No torch on the ONNX path: this module imports neither torch nor MONAI (nor cxrkit.checkpoint /
cxrkit.model / cxrkit.export, which do) at module level. ONNX Runtime inference on a CPU (--tta 1,
no Grad-CAM) thus never loads them: importing torch alone costs ~1.5 s, nearly half of a whole
run over 48 images. TorchBackend, Grad-CAM and --tta > 1 (the warps) import torch when used.

Overlap: images are decoded by a thread pool ahead of the model (OpenCV / pydicom release the GIL
for the heavy parts), the model runs in the calling thread, and a writer thread draws and writes the
annotated PNGs / masks / Grad-CAM maps while the next batch is computed. The CSV and summary.json
are written at the end, atomically (tmp file + os.replace); so is every PNG / .npy.

Reliability: a run owns its save_dir (cxrkit.outdir: lock, manifest, --overwrite, per-process temp
names; outputs are never gathered as inputs), the ONNX meta must match its graph, and inputs the
model cannot judge get `quality_flags` (cxrkit.quality) or a plain skip reason (cxrkit.preprocess).

Research software: not for diagnosis.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# torch-free modules only (see the module docstring): not cxrkit.export, which imports torch
from .errors import CxrkitError, InferenceError
from .io_utils import (INPUT_NAME, OUTPUT_NAMES, binding_mismatches, meta_path_for, sha256_file, write_bytes_atomic,
                       write_json_atomic)
from . import quality
from .outdir import claim_save_dir, is_output_dir
from .preprocess import (IMAGE_EXTS, ImageReadError, list_images, mask_for_image, read_gray_info, read_mask,
                         resize_gray, resize_mask, to_model_input_np)
from .tta import MAX_TTA, tta_predict

log = logging.getLogger("cxrkit")

DISCLAIMER = "research use only - not for diagnosis"


# ------------------------------------------------------------------------------------- backends
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once); >= 1."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores, cur, complete = set(), {}, True
        with open("/proc/cpuinfo") as f:
            for line in list(f) + [""]:
                if not line.strip():
                    if "processor" in cur and cur["processor"] in allowed:
                        if "core id" not in cur:
                            complete = False
                        cores.add((cur.get("physical id"), cur.get("core id")))
                    cur = {}
                    continue
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "processor" and v.isdigit():
                    cur["processor"] = int(v)
                elif k in ("physical id", "core id"):
                    cur[k] = v
        if cores and complete:
            return len(cores)
    except OSError:  # pragma: no cover
        pass
    return max(1, len(allowed))


class TorchBackend:
    """A cxrkit checkpoint run by PyTorch (eval mode, no autograd); numpy in, numpy out."""

    name = "pytorch"

    def __init__(self, checkpoint, device=None):
        # cxrkit.checkpoint / cxrkit.device import torch and MONAI: imported here, not at module level
        # (start-up time of the CPU ONNX path)
        from .checkpoint import model_from_checkpoint
        from .device import pick_device
        self.checkpoint_path = Path(checkpoint)
        model, ck = model_from_checkpoint(checkpoint)  # FileNotFoundError / CheckpointError
        self.device = pick_device(device or "auto")
        self.model = model.to(self.device).eval()
        self.ck = ck
        self.class_names = list(ck["class_names"])
        self.img_size = int(ck["img_size"])
        self.temperature = float(ck.get("temperature", 1.0))
        self.lung_area_range = ck.get("lung_area_range")  # None: older checkpoint, quality's default applies
        self.calibration_problem = quality.calibration_problem(ck)

    def forward(self, x: np.ndarray):
        """(B,3,S,S) float32 numpy (a CPU tensor also works) -> (seg_prob (B,1,S,S), logits (B,C)) as
        float32 numpy; runs on self.device."""
        import torch
        from .model import predict
        with torch.no_grad():
            seg, logits = predict(self.model, torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True))
            return seg.cpu().numpy(), logits.cpu().numpy()

    def describe(self) -> dict:
        import torch
        d = {"backend": self.name, "device": str(self.device), "checkpoint": str(self.checkpoint_path),
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d


_PROVIDER_ALIASES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
                     "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                     "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider",
                     "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}


def resolve_providers(providers=None, use_cuda: bool = False, available=None) -> list[str]:
    """Requested providers (names or short aliases, comma lists allowed) that this onnxruntime has,
    CUDA first when use_cuda, CPU always last as the fallback; unavailable ones are dropped with a
    warning."""
    if available is None:
        import onnxruntime as ort
        available = ort.get_available_providers()
    req = []
    for p in providers or []:
        for part in str(p).split(","):
            part = part.strip()
            if part:
                req.append(_PROVIDER_ALIASES.get(part.lower(), part))
    if use_cuda:
        req = ["CUDAExecutionProvider"] + [p for p in req if p != "CUDAExecutionProvider"]
    out = []
    for p in req:
        if p in out:
            continue
        if p in available:
            out.append(p)
        else:
            hint = (" (install onnxruntime-gpu matching your CUDA/cuDNN instead of onnxruntime)"
                    if p == "CUDAExecutionProvider" else "")
            log.warning("%s is not available in this onnxruntime build (available: %s)%s: using CPU",
                        p, ", ".join(available), hint)
    out = [p for p in out if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    return out


_UNBOUND_WARNED: set[str] = set()  # ONNX files without a graph binding already warned about (once each)


class OnnxBackend:
    """An exported model run by ONNX Runtime; class names, size and temperature from the meta file."""

    name = "onnxruntime"

    def __init__(self, onnx_path, meta_path=None, providers=None, use_cuda: bool = False,
                 intra_op_threads: int | None = None):
        import onnxruntime as ort
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx_path} (make it with export_to_onnx.py "
                                    f"or pass --onnx_path)")
        if self.onnx_path.stat().st_size == 0:
            raise InferenceError(f"{self.onnx_path}: empty file (0 bytes), not an ONNX model (an interrupted copy or "
                                 f"download?); re-export with export_to_onnx.py")
        self.meta_path = Path(meta_path) if meta_path else meta_path_for(self.onnx_path)
        if not self.meta_path.is_file():
            raise InferenceError(f"ONNX meta file not found: {self.meta_path} (export_to_onnx.py writes it next to "
                                 f"the model; it holds the class names, image size and temperature. Re-export, or "
                                 f"pass --meta_path)")
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InferenceError(f"{self.meta_path}: not valid JSON ({e}); re-export with export_to_onnx.py") from None
        need = ("class_names", "img_size", "temperature")
        if not isinstance(meta, dict) or any(k not in meta for k in need):
            raise InferenceError(f"{self.meta_path}: not a cxrkit ONNX meta file (needs {', '.join(need)}); "
                                 f"re-export with export_to_onnx.py")
        self.meta = meta
        self.class_names = [str(c) for c in meta["class_names"]]
        self.img_size = int(meta["img_size"])
        self.temperature = float(meta["temperature"])
        if not self.temperature > 0:
            raise InferenceError(f"{self.meta_path}: temperature must be > 0, got {meta['temperature']}")
        self.lung_area_range = meta.get("lung_area_range")  # None: older export, quality's default applies
        self.calibration_problem = quality.calibration_problem(meta)
        self.providers = resolve_providers(providers, use_cuda)
        so = ort.SessionOptions()
        # a small CPU: one op at a time, each using every physical core; full graph optimisation
        self.intra_op_threads = int(intra_op_threads or physical_cores())
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            raise InferenceError(f"{self.onnx_path}: ONNX Runtime cannot load it ({type(e).__name__}: {msg})") from None
        self.active_providers = self.session.get_providers()
        if "CUDAExecutionProvider" in self.providers and "CUDAExecutionProvider" not in self.active_providers:
            log.warning("CUDA was requested but ONNX Runtime runs on %s", ", ".join(self.active_providers))
        self._check_model_matches_meta()

    def _check_model_matches_meta(self):
        ins, outs = self.session.get_inputs(), {o.name: o for o in self.session.get_outputs()}
        if len(ins) != 1 or ins[0].name != INPUT_NAME or any(n not in outs for n in OUTPUT_NAMES):
            raise InferenceError(f"{self.onnx_path}: not a cxrkit export (inputs {[i.name for i in ins]}, outputs "
                                 f"{list(outs)}; expected '{INPUT_NAME}' -> {list(OUTPUT_NAMES)})")
        shp = ins[0].shape
        if len(shp) != 4 or (isinstance(shp[1], int) and shp[1] != 3):
            raise InferenceError(f"{self.onnx_path}: input shape {shp}, expected (batch, 3, H, W)")
        for d in shp[2:]:
            if isinstance(d, int) and d != self.img_size:
                raise InferenceError(f"{self.meta_path} says img_size {self.img_size} but {self.onnx_path} takes "
                                     f"{shp[2]}x{shp[3]} images: the meta file belongs to another export; "
                                     f"re-export or pass the matching --meta_path")
        c = outs["classification"].shape
        if len(c) != 2 or (isinstance(c[1], int) and c[1] != len(self.class_names)):
            raise InferenceError(f"{self.meta_path} lists {len(self.class_names)} class names but {self.onnx_path} "
                                 f"outputs {c[1] if len(c) == 2 else c} classes: the meta file belongs to another "
                                 f"export; re-export or pass the matching --meta_path")
        self.static_batch = shp[0] if isinstance(shp[0], int) else None
        self._check_binding()

    def _check_binding(self):
        """The meta file must be the one written with this graph: its onnx_sha256 must be the file's, and
        the graph's own metadata_props (class names and order, size, temperature, lung-area range,
        meta_id; written by export since the binding was added) must agree with it. Older graphs
        without them are read with one warning (only the checksum can be checked)."""
        fix = ("use the meta file written with this model (re-export with export_to_onnx.py, or pass the matching "
               "--meta_path)")
        want = self.meta.get("onnx_sha256")
        if want and want != sha256_file(self.onnx_path):
            raise InferenceError(f"{self.meta_path} was written for another ONNX file (its onnx_sha256 is not "
                                 f"{self.onnx_path}'s): {fix}")
        props = dict(self.session.get_modelmeta().custom_metadata_map or {})
        if not any(k.startswith("cxrkit_") for k in props):
            key = str(self.onnx_path.resolve())
            if key not in _UNBOUND_WARNED:
                _UNBOUND_WARNED.add(key)
                log.warning("%s records no class names of its own (exported before cxrkit bound graph and meta): "
                            "class order and temperature come from %s unchecked%s; re-export to bind them",
                            self.onnx_path, self.meta_path, "" if want else ", and the meta has no onnx_sha256")
            return
        bad = binding_mismatches(props, self.meta)
        if bad:
            raise InferenceError(f"{self.meta_path} disagrees with {self.onnx_path} on {'; '.join(bad)}: {fix}")

    def forward(self, x: np.ndarray):
        """(B,3,S,S) float32 numpy -> (seg_prob (B,1,S,S), logits (B,C)) float32 numpy."""
        a = np.ascontiguousarray(x, dtype=np.float32)
        sb = self.static_batch
        if sb is None:
            seg, cls = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: a})
        else:  # a fixed-batch export: run in chunks of that size (last one zero-padded)
            segs, clss, n = [], [], a.shape[0]
            for s in range(0, n, sb):
                chunk = a[s:s + sb]
                k = chunk.shape[0]
                if k < sb:
                    chunk = np.concatenate([chunk, np.zeros((sb - k, *chunk.shape[1:]), np.float32)])
                sg, cl = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
                segs.append(sg[:k]); clss.append(cl[:k])
            seg, cls = np.concatenate(segs), np.concatenate(clss)
        return np.asarray(seg, np.float32), np.asarray(cls, np.float32)

    def describe(self) -> dict:
        import onnxruntime as ort
        return {"backend": self.name, "onnx_path": str(self.onnx_path), "meta_path": str(self.meta_path),
                "providers": self.active_providers, "intra_op_threads": self.intra_op_threads,
                "graph_optimization": "ORT_ENABLE_ALL", "onnxruntime": ort.__version__,
                "opset": self.meta.get("opset"), "dynamic_batch": self.static_batch is None}


# ------------------------------------------------------------------------------------- Grad-CAM
def _class_logits_module(net):
    """The multi-task net seen as a classifier (a module with one child `net` returning the logits):
    MONAI's GradCAM wants a module returning logits. The nn.Module subclass is defined here, not at
    module level, so that importing cxrkit.inference does not import torch (start-up time of the
    CPU ONNX path)."""
    import torch

    class _ClassLogits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).classification

    return _ClassLogits(net)


class GradCamExplainer:
    """Grad-CAM at the UNet bottleneck (the deepest encoder block) via monai.visualize.GradCAM.

    Two MONAI details are worked around here:
    * its default postprocessing (`default_normalizer`) maps (min, max) to (1, 0), i.e. it inverts
      the map; we take the raw map (identity postprocessing) and normalise for display ourselves;
    * with a per-sample class index tensor its class score is `logits[:, idx]`, a B x B block whose
      sum mixes the targets of the whole batch; so we call it once per distinct target class with an
      int index (samples are independent in eval mode, so grouping is exact).
    The model used here is a separate instance (rebuilt from the checkpoint), so the hooks MONAI
    registers never touch the inference model.
    """

    def __init__(self, checkpoint, device=None, model_and_ck=None):
        """checkpoint: a path; or pass model_and_ck=(model, ck) to explain an in-memory model (a deep
        copy is made, so MONAI's hooks never touch the caller's model)."""
        # torch / MONAI imported here, only when Grad-CAM is asked for (see the module docstring)
        import copy

        import torch
        from monai.visualize import GradCAM

        from .checkpoint import model_from_checkpoint
        if model_and_ck is not None:
            model, ck = copy.deepcopy(model_and_ck[0]).float(), model_and_ck[1]
        else:
            model, ck = model_from_checkpoint(checkpoint)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.class_names = list(ck["class_names"])
        self.img_size = int(ck["img_size"])
        self.ck = ck
        self.net = _class_logits_module(model.to(self.device)).eval()
        # dotted name of the bottleneck inside the wrapper, e.g.
        # net.unet.model.1.submodule.1.submodule.1.submodule.1.submodule
        self.layer = next(n for n, m in self.net.named_modules() if m is model.bottleneck)
        self.cam = GradCAM(nn_module=self.net, target_layers=self.layer, postprocessing=lambda m: m)

    def __call__(self, x, class_idx) -> np.ndarray:
        """Raw Grad-CAM maps (B, S, S) float32 >= 0 (ReLU of the gradient-weighted bottleneck
        activations, bilinearly upsampled to the input size) for one target class per sample.
        x: the model input (B,3,S,S) float32, numpy or torch."""
        import torch
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        idx = np.broadcast_to(np.asarray(class_idx, np.int64), (x.shape[0],))
        out = np.zeros((x.shape[0], x.shape[2], x.shape[3]), np.float32)
        with torch.enable_grad():
            for c in np.unique(idx):
                sel = np.flatnonzero(idx == c)
                m = self.cam(x[torch.as_tensor(sel, device=x.device)], class_idx=int(c))
                out[sel] = m.detach().float().cpu().numpy()[:, 0]
        self.net.zero_grad(set_to_none=True)
        return out


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class InputItem:
    path: Path
    rel: str                       # display / naming path (relative to the data folder when there is one)
    true_class: str | None = None  # a model class name, when the folder names it
    mask_path: Path | None = None  # ground-truth lung mask, when a masks/ folder has one
    out_stem: str = ""             # unique output file stem


def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", s.strip().lower())


def _is_mask_path(p: Path, root: Path) -> bool:
    try:
        parts = p.relative_to(root).parts[:-1]
    except ValueError:
        parts = p.parts[:-1]
    return any(x.lower() == "masks" for x in parts)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._()+-]+", "_", s).strip("._") or "image"


def assign_output_stems(items: list[InputItem]) -> None:
    """Unique (case-insensitively) file stems from the relative paths: 'COVID/images/a.png' ->
    'COVID__images__a', then '_2', '_3', ... on collision."""
    taken = set()
    for it in items:
        rel = Path(it.rel)
        parts = [*rel.parts[:-1], rel.stem]
        base = "__".join(_safe(p) for p in parts if p not in ("", ".", "..", "/"))[-150:] or "image"
        stem, k = base, 2
        while stem.lower() in taken:
            stem, k = f"{base}_{k}", k + 1
        taken.add(stem.lower())
        it.out_stem = stem


def _output_dir_filter(exclude):
    """skip_dir for list_images: the --save_dir (exclude) and any folder holding a cxrkit output
    manifest are outputs, never inputs; pruned folders are collected in skip.pruned."""
    ex = Path(exclude).resolve() if exclude else None

    def skip(d: Path) -> bool:
        hit = is_output_dir(d) or (ex is not None and d.resolve() == ex)
        if hit:
            skip.pruned.append(str(d))
        return hit
    skip.pruned = []
    skip.exclude = ex
    return skip


def gather_inputs(data_dir=None, images=None, class_names=(), num_samples: int = 0, seed: int = 0,
                  exclude=None) -> list[InputItem]:
    """The images to run on.

    data_dir: searched recursively (any folder of images); folders named `masks` are ground truth, not
      inputs. The true class is the nearest enclosing folder (the data folder itself included) whose
      name is a model class (case, '_', '-' and spaces ignored) - so the database layout
      <Class>/images/<name> + <Class>/masks/<name> gives labels and masks.
    images: explicit files (or folders, expanded recursively); a file's class is its folder's name,
      or the folder above an `images` folder.
    num_samples > 0 picks that many at random (numpy default_rng(seed)); 0 = all.
    exclude: the run's --save_dir; it and every folder holding a cxrkit output manifest are skipped
      (outputs are never read back as inputs). Symlinked sub-folders are followed (loops cut).
    """
    lookup = {_norm_name(c): c for c in class_names}
    skip = _output_dir_filter(exclude)
    if num_samples is None or num_samples < 0:
        raise InferenceError(f"--num_samples must be >= 0 (0 = all), got {num_samples}")
    items: list[InputItem] = []
    if images:
        for s in images:
            p = Path(s)
            if p.is_dir():
                found = [q for q in list_images(p, skip_dir=skip) if not _is_mask_path(q, p)]
                items += [_item(q, str(Path(p.name) / q.relative_to(p)), lookup, p) for q in found]
            elif skip.exclude is None or skip.exclude not in p.resolve().parents:
                items.append(_item(p, p.name, lookup, None))
            else:
                skip.pruned.append(str(p))
        if not items:
            raise InferenceError(f"--images: no images found in {', '.join(map(str, images))}")
        if all(not it.path.exists() for it in items):
            raise InferenceError(f"--images: none of the {len(items)} files exist (first: {items[0].path})")
    elif data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise InferenceError(f"--data_dir {root}: not a folder (point it at a folder of images, or the database "
                                 f"root <Class>/images/*.png)")
        items = [_item(p, str(p.relative_to(root)), lookup, root)
                 for p in list_images(root, skip_dir=skip) if not _is_mask_path(p, root)]
        if not items:
            raise InferenceError(f"--data_dir {root}: no images found (searched recursively for "
                                 f"{', '.join(sorted(IMAGE_EXTS))}; 'masks' folders are ground truth, not inputs"
                                 + (f"; cxrkit output folders are not inputs either: {skip.pruned[0]}"
                                    if skip.pruned else "") + ")")
    else:
        raise InferenceError("no inputs: give --data_dir DIR or --images FILE [FILE ...]")
    if skip.pruned:
        log.info("not read as inputs (outputs of cxrkit runs): %s", ", ".join(skip.pruned[:5])
                 + (f" and {len(skip.pruned) - 5} more" if len(skip.pruned) > 5 else ""))
    if 0 < num_samples < len(items):
        pick = np.sort(np.random.default_rng(seed).choice(len(items), num_samples, replace=False))
        log.info("picked %d of %d inputs at random (--num_samples %d, --seed %d; --num_samples 0 runs all)",
                 num_samples, len(items), num_samples, seed)
        items = [items[i] for i in pick]
    assign_output_stems(items)
    return items


def _root_names(root: Path) -> list[str]:
    """The data folder's own name (and its parent's when it is an `images` folder), nearest first."""
    r = root.resolve()
    return [r.name] + ([r.parent.name] if r.name.lower() == "images" else [])


def _item(p: Path, rel: str, lookup: dict, root: Path | None) -> InputItem:
    """root None: an explicit file, labelled by its folder (or the folder above `images`); else the
    nearest folder between the file and root (root included) named like a model class."""
    true = None
    if lookup:
        if root is None:
            q = p.resolve()
            cands = [q.parent.name] + ([q.parent.parent.name] if q.parent.name.lower() == "images" else [])
        else:
            cands = list(reversed(p.relative_to(root).parts[:-1])) + _root_names(root)
        true = next((lookup[_norm_name(c)] for c in cands if _norm_name(c) in lookup), None)
    return InputItem(path=p, rel=rel, true_class=true, mask_path=mask_for_image(p))


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


def display_image(gray: np.ndarray, height: int = 512) -> np.ndarray:
    """The X-ray at a fixed display height, aspect ratio kept (width clamped to [h/2, 2h])."""
    h, w = gray.shape[:2]
    dw = int(np.clip(round(w * height / h), height // 2, height * 2))
    interp = cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    return cv2.resize(gray, (dw, height), interpolation=interp)


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(cam, dtype=np.float32)


def render_annotation(display: np.ndarray, seg_prob: np.ndarray, class_names, probs, true_class=None,
                      cam=None, cam_label: str = "", title: str = "", notes=(), flags=()) -> np.ndarray:
    """One BGR uint8 panel: X-ray with the predicted lungs tinted + outlined | optional Grad-CAM
    overlay | text panel with the predicted class, true class and one bar per class probability.
    flags (cxrkit.quality codes): a red frame around the whole panel and a red note naming them."""
    flag_note = ("CHECK INPUT: " + "; ".join(flags)) if flags else None
    notes = [*notes, flag_note] if flag_note else list(notes)
    h, w = display.shape[:2]
    cap = 30
    base = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    lung = cv2.resize(seg_prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    xray = base.copy()
    tint = np.array([60, 200, 60], np.float32)
    xray[lung] = (0.65 * xray[lung] + 0.35 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(xray, contours, -1, (0, 230, 255), 2, cv2.LINE_AA)
    panels = [(xray, _fit(title, w - 12, 0.5) if title else "X-ray + predicted lungs")]
    if cam is not None:
        c = cv2.resize(normalise_cam(cam.astype(np.float32)), (w, h), interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(np.round(c * 255).astype(np.uint8), cv2.COLORMAP_JET)
        panels.append((cv2.addWeighted(base, 0.55, heat, 0.45, 0), _fit(f"Grad-CAM: {cam_label}", w - 12, 0.5)))
    cols = []
    for img, caption in panels:
        strip = np.full((cap, w, 3), 32, np.uint8)
        _text(strip, caption, (6, 20))
        cols.append(np.vstack([strip, img]))
    # text panel
    pw, ph = 380, h + cap
    panel = np.full((ph, pw, 3), 24, np.uint8)
    probs = np.asarray(probs, np.float64)
    pred = int(probs.argmax())
    y = 34
    _text(panel, _fit(f"Predicted: {class_names[pred]}", pw - 20, 0.7), (12, y), 0.7, (255, 255, 255), 2)
    y += 28
    _text(panel, f"confidence {probs[pred] * 100:.1f}%", (12, y), 0.55)
    y += 28
    if true_class is None:
        _text(panel, "True: unknown", (12, y), 0.55, (170, 170, 170))
    else:
        ok = true_class == class_names[pred]
        _text(panel, _fit(f"True: {true_class}", pw - 120, 0.55), (12, y), 0.55)
        _text(panel, "correct" if ok else "WRONG", (pw - 100, y), 0.55, (80, 220, 80) if ok else (60, 60, 255), 2)
    y += 18
    n = len(class_names)
    footer_h = 22 + 20 * len(notes)
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
    fy = ph - footer_h + 6
    for s in notes:
        _text(panel, _fit(s, pw - 20, 0.45), (12, fy + 10), 0.45, FLAG_BGR if s == flag_note else (200, 200, 200))
        fy += 20
    _text(panel, DISCLAIMER, (12, ph - 8), 0.42, (150, 150, 150))
    out = np.hstack(cols + [panel])
    if flags:
        cv2.rectangle(out, (0, 0), (out.shape[1] - 1, out.shape[0] - 1), FLAG_BGR, FLAG_FRAME_PX)
    return out


# --------------------------------------------------------------------------------------- writing
def write_png(path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    write_bytes_atomic(path, buf.tobytes())


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


# -------------------------------------------------------------------------------------- pipeline
@dataclass
class _Decoded:
    item: InputItem
    model_u8: np.ndarray | None = None
    display: np.ndarray | None = None
    orig_shape: tuple = ()
    gt_mask: np.ndarray | None = None
    error: str | None = None
    mask_error: str | None = None
    notes: tuple = ()              # what of the file was not used (later TIFF pages / DICOM frames)
    stats: dict | None = None      # cxrkit.quality.image_stats of model_u8
    flags: tuple = ()              # quality flag codes (set once the model has run)


def _decode(item: InputItem, size: int, display_h: int) -> _Decoded:
    try:
        g, notes = read_gray_info(item.path)
    except ImageReadError as e:
        return _Decoded(item, error=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad file never stops the run
        return _Decoded(item, error=f"{type(e).__name__}: {e}")
    d = _Decoded(item, model_u8=resize_gray(g, size), display=display_image(g, display_h), orig_shape=g.shape[:2])
    d.notes, d.stats = tuple(notes), quality.image_stats(d.model_u8)
    if item.mask_path is not None:
        try:
            d.gt_mask = read_mask(item.mask_path)  # native resolution: Dice is scored at the mask's own size
        except ImageReadError as e:
            d.mask_error = e.reason
    return d


def planned_outputs(items, save_masks=False, save_cams=False) -> list[str]:
    """The per-image files a run will write (relative to save_dir), for the manifest (cxrkit.outdir)."""
    out = []
    for it in items:
        out.append(f"annotated/{it.out_stem}.png")
        if save_masks:
            out.append(f"masks/{it.out_stem}_mask.png")
        if save_cams:
            out.append(f"cams/{it.out_stem}_cam.npy")
    return out


def csv_columns(class_names, save_masks=False, gradcam=False) -> list[str]:
    cols = ["image_path", "predicted_class", "confidence", *[f"prob_{c}" for c in class_names],
            "lung_area_fraction", "true_class", "correct", "quality_flags", "dice", "iou", "annotated_png"]
    if save_masks:
        cols.append("mask_png")
    if gradcam:
        cols += ["cam_class", "cam_file"]
    return cols


def run_pipeline(backend, items: list[InputItem], save_dir, *, batch_size: int = 16, tta: int = 1,
                 cam: GradCamExplainer | None = None, cam_class: str | None = None, save_cams: bool = False,
                 save_masks: bool = False, workers: int | None = None, progress: bool = True,
                 display_size: int = 512, extra_summary: dict | None = None, report: bool = True,
                 overwrite: bool = False) -> dict:
    """Run `backend` over `items`, write every output into save_dir; returns the summary dict.
    report: also thumbs/ and report.html (cxrkit.report).
    The run owns save_dir (cxrkit.outdir): refused while another process writes there, or when it
    holds an earlier run's outputs unless overwrite (which removes exactly those files first)."""
    from tqdm import tqdm
    from .metrics import binary_dice_iou, classification_metrics
    from .report import THUMB_DIR, confidence_intervals, model_info, thumb_relpath, write_report, write_thumbnail

    if batch_size < 1:
        raise InferenceError(f"--batch_size must be >= 1, got {batch_size}")
    if not 1 <= tta <= MAX_TTA:
        raise InferenceError(f"--tta must be between 1 and {MAX_TTA}, got {tta}")
    names, size, temp = list(backend.class_names), int(backend.img_size), float(backend.temperature)
    cam_idx = None
    if cam_class is not None:
        if cam_class not in names:
            raise InferenceError(f"--cam_class {cam_class!r} is not a model class; choose one of {names}")
        cam_idx = names.index(cam_class)
    if cam is not None and (cam.class_names != names or cam.img_size != size):
        raise InferenceError(f"the Grad-CAM checkpoint (classes {cam.class_names}, {cam.img_size}px) does not "
                             f"match the model (classes {names}, {size}px)")
    if save_cams and cam is None:
        raise InferenceError("--save_cams needs Grad-CAM (--gradcam)")
    if not items:
        raise InferenceError("no images to run on")
    save_dir = Path(save_dir)
    ann_dir, mask_dir, cam_dir = save_dir / "annotated", save_dir / "masks", save_dir / "cams"
    claim = claim_save_dir(save_dir, overwrite, tool=f"cxrkit inference ({backend.name})").acquire()  # lock
    try:
        for d in ([ann_dir] + ([mask_dir] if save_masks else []) + ([cam_dir] if save_cams else [])
                  + ([save_dir / THUMB_DIR] if report else [])):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        claim.release()
        raise InferenceError(f"--save_dir {save_dir}: cannot create it ({e})") from None
    if not items[0].out_stem:
        assign_output_stems(items)
    claim.plan(["predictions.csv", "summary.json", *planned_outputs(items, save_masks, save_cams)])
    area_rng = quality.resolve_lung_area_range(getattr(backend, "lung_area_range", None))
    calib_problem = getattr(backend, "calibration_problem", None)
    workers = int(workers or min(4, os.cpu_count() or 1))
    notes = ([f"probabilities calibrated (T={temp:.3g})"] if calib_problem is None
             else [f"probabilities NOT calibrated (T={temp:.3g})"]) + ([f"TTA: {tta} views"] if tta > 1 else [])

    def write_job(job):
        d, seg, probs, cam_map, cam_name = job
        stem = d.item.out_stem
        area = f"predicted lung area: {(seg > 0.5).mean() * 100:.1f}% of image"
        img = render_annotation(d.display, seg, names, probs, d.item.true_class, cam=cam_map, cam_label=cam_name,
                                title=d.item.rel, notes=[area] + notes, flags=d.flags)
        write_png(ann_dir / f"{stem}.png", img)
        if save_masks:
            full = cv2.resize(seg.astype(np.float32), (d.orig_shape[1], d.orig_shape[0]),
                              interpolation=cv2.INTER_LINEAR)
            write_png(mask_dir / f"{stem}_mask.png", ((full > 0.5) * 255).astype(np.uint8))
        if save_cams and cam_map is not None:
            write_npy(cam_dir / f"{stem}_cam.npy", cam_map.astype(np.float32))
        if report:
            write_thumbnail(save_dir / thumb_relpath(stem), d.display, seg)

    rows, skipped, mask_problems = [], [], []
    input_notes, flag_counts = [], {c: 0 for c in quality.FLAG_CODES}
    y_true, y_probs, dices, ious, dices_model = [], [], [], [], []
    model_seconds, n_done = 0.0, 0
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrkit-decode")
    writer = _Writer(write_job, maxsize=max(4, 2 * batch_size))
    writer.start()
    pending, it = deque(), iter(items)
    lookahead = 2 * batch_size + workers

    def fill():
        while len(pending) < lookahead:
            nxt = next(it, None)
            if nxt is None:
                return
            pending.append(pool.submit(_decode, nxt, size, display_size))

    ok = False
    try:
        with tqdm(total=len(items), desc=f"{backend.name} inference", unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            fill()
            while pending:
                batch = []
                while pending and len(batch) < batch_size:
                    d = pending.popleft().result()
                    fill()
                    if d.error is not None:
                        skipped.append({"path": str(d.item.path), "reason": d.error})
                        log.warning("skipped %s: %s", d.item.path, d.error)
                        bar.update(1)
                        continue
                    if d.mask_error is not None:
                        mask_problems.append({"path": str(d.item.mask_path), "reason": d.mask_error})
                    for n in d.notes:
                        input_notes.append({"path": str(d.item.path), "note": n})
                        log.warning("%s: %s", d.item.path, n)
                    batch.append(d)
                if not batch:
                    continue
                x = to_model_input_np(np.stack([d.model_u8 for d in batch]))
                tm = time.perf_counter()
                seg, probs = tta_predict(backend.forward, x, tta, temp)  # numpy in, numpy out
                seg = seg[:, 0]
                probs = probs.astype(np.float64)
                model_seconds += time.perf_counter() - tm
                pred = probs.argmax(1)
                cams = None
                if cam is not None:
                    cams = cam(x, pred if cam_idx is None else np.full(len(batch), cam_idx))
                for i, d in enumerate(batch):
                    lung = seg[i] > 0.5
                    tc = d.item.true_class
                    row = {"image_path": str(d.item.path), "predicted_class": names[pred[i]],
                           "confidence": f"{probs[i, pred[i]]:.6f}",
                           **{f"prob_{c}": f"{probs[i, j]:.6f}" for j, c in enumerate(names)},
                           "lung_area_fraction": f"{lung.mean():.6f}",
                           "true_class": tc or "", "correct": "" if tc is None else str(int(tc == names[pred[i]])),
                           "dice": "", "iou": "", "annotated_png": f"annotated/{d.item.out_stem}.png"}
                    d.flags = tuple(quality.image_flags(d.stats) + quality.lung_flags(float(lung.mean()), area_rng))
                    row["quality_flags"] = ";".join(d.flags)
                    for f in d.flags:
                        flag_counts[f] += 1
                    if tc is not None:
                        y_true.append(names.index(tc)); y_probs.append(probs[i])
                    if d.gt_mask is not None:
                        gh, gw = d.gt_mask.shape[:2]
                        lung_native = cv2.resize(seg[i].astype(np.float32), (gw, gh),
                                                 interpolation=cv2.INTER_LINEAR) > 0.5
                        dc, io_ = binary_dice_iou(lung_native, d.gt_mask)
                        dices.append(dc); ious.append(io_)
                        dices_model.append(binary_dice_iou(lung, resize_mask(d.gt_mask, size))[0])
                        row["dice"], row["iou"] = f"{dc:.6f}", f"{io_:.6f}"
                    if save_masks:
                        row["mask_png"] = f"masks/{d.item.out_stem}_mask.png"
                    cam_name = ""
                    if cams is not None:
                        cam_name = names[pred[i] if cam_idx is None else cam_idx]
                        row["cam_class"] = cam_name
                        row["cam_file"] = f"cams/{d.item.out_stem}_cam.npy" if save_cams else ""
                    rows.append(row)
                    writer.put((d, seg[i], probs[i], None if cams is None else cams[i], cam_name))
                n_done += len(batch)
                bar.update(len(batch))
        writer.close()
        ok = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if not ok and writer.is_alive():
            writer.q.put(None)
        if not ok:
            claim.release()  # the manifest stays "running": the next run needs --overwrite
    cols = csv_columns(names, save_masks, cam is not None)
    write_csv_atomic(save_dir / "predictions.csv", cols, rows)
    seconds = time.perf_counter() - t0
    summary = {
        "n_inputs": len(items), "n_processed": n_done, "n_skipped": len(skipped), "skipped": skipped,
        "backend": backend.name, "backend_info": backend.describe(),
        "class_names": names, "img_size": size,
        "calibrated": calib_problem is None, "temperature": temp,
        **({"calibration_problem": f"the model: {calib_problem}"} if calib_problem else {}),
        "calibration": "probabilities in predictions.csv = softmax(logits / temperature), averaged over TTA views",
        "tta": int(tta), "batch_size": int(batch_size), "decode_workers": workers,
        "throughput": {"seconds": seconds, "images_per_second": n_done / seconds if seconds > 0 else None,
                       "model_seconds": model_seconds,
                       "note": "seconds = wall clock of the whole pipeline (decode, model, overlays, files); "
                               "model_seconds = time in the backend incl. TTA"},
        "predicted_counts": {c: int(sum(r["predicted_class"] == c for r in rows)) for c in names},
        "csv_notes": {"prob_<class>": "calibrated class probabilities, model class order",
                      "confidence": "probability of predicted_class",
                      "lung_area_fraction": "fraction of model-input pixels with lung probability > 0.5",
                      "true_class/correct": "from the folder name when it is a model class (correct: 1/0), "
                                            "else empty",
                      "dice/iou": "vs the ground-truth mask (masks/ folder) at 0.5, at the mask's own "
                                  "resolution, when there is one",
                      "quality_flags": "empty when all is well, else ';'-joined codes (see quality)"},
        "quality": {"n_flagged": int(sum(bool(r["quality_flags"]) for r in rows)), "counts": flag_counts,
                    "meaning": quality.FLAG_MEANING, "thresholds": quality.thresholds(area_rng),
                    "lung_area_range": area_rng,
                    "note": "flagged images got an answer the model cannot back: check them by eye"},
        "notes": input_notes,
        "classification": None, "segmentation": None,
        "gradcam": None if cam is None else {
            "target": cam_class or "predicted class", "layer": cam.layer, "method": "monai.visualize.GradCAM",
            "maps_saved": bool(save_cams), "input": "the un-augmented image (also with --tta)",
            "map_format": "float32 .npy (S x S, model input size), raw ReLU'd Grad-CAM (not normalised); the "
                          "annotated PNG shows it min-max normalised per image"},
        "outputs": {"csv": "predictions.csv", "annotated": "annotated/",
                    "masks": "masks/ (0/255 PNG at the original image resolution)" if save_masks else None,
                    "cams": "cams/" if save_cams else None},
        "note": DISCLAIMER,
    }
    if mask_problems:
        summary["mask_problems"] = mask_problems
    if y_true:
        m = classification_metrics(np.asarray(y_true), np.asarray(y_probs), names)
        m["n_labelled"] = len(y_true)
        m.update(confidence_intervals(y_true, np.asarray(y_probs).argmax(1), len(names)))
        summary["classification"] = m
    if dices:
        summary["segmentation"] = {"mean_dice": float(np.mean(dices)), "mean_iou": float(np.mean(ious)),
                                   "n_masks": len(dices), "threshold": 0.5,
                                   "resolution": "each ground-truth mask's own size (lung probabilities resized "
                                                 "bilinearly to it, then thresholded)",
                                   "mean_dice_model_input": float(np.mean(dices_model)),
                                   "model_input_resolution": f"{size}x{size}"}
    if extra_summary:
        summary.update(extra_summary)
    summary["outputs"]["report"] = "report.html (thumbnails in thumbs/)" if report else None
    write_json_atomic(save_dir / "summary.json", summary)
    if report:
        write_report(save_dir, summary, rows, model=model_info(backend))
    claim.finish()  # manifest: every file this run wrote, status complete
    claim.release()
    return summary


# ------------------------------------------------------------------------------------------- CLI
def add_input_args(p):
    g = p.add_argument_group("inputs")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data_dir", default=None,
                     help="folder searched recursively for images; in the database layout <Class>/images/* the "
                          "folder names give the true class and <Class>/masks/* are ground truth (not inputs)")
    src.add_argument("--images", nargs="+", default=None, metavar="FILE",
                     help="explicit image files (or folders); a file's folder name gives its true class")
    g.add_argument("--num_samples", type=int, default=12, help="pick this many inputs at random (0 = all)")
    g.add_argument("--seed", type=int, default=42, help="random seed for --num_samples")
    return g


def add_run_args(p):
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", type=int, default=16, help="images per model call")
    g.add_argument("--tta", type=int, default=1,
                   help=f"test-time augmentation views (1 = plain inference, at most {MAX_TTA})")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-decoding threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return g


def add_output_args(p, default_dir):
    g = p.add_argument_group("outputs")
    g.add_argument("--save_dir", default=default_dir,
                   help="annotated/ PNGs, predictions.csv, summary.json (and masks/, cams/)")
    g.add_argument("--save_masks", action="store_true", help="also write each predicted lung mask (PNG)")
    g.add_argument("--overwrite", action="store_true",
                   help="--save_dir holds an earlier run's outputs: remove exactly the files that run wrote (its "
                        "manifest), then write anew (without it such a folder is refused)")
    g.add_argument("--no_report", action="store_true",
                   help="no report.html (metrics, confusion matrix, thumbnail gallery) and no thumbs/")
    return g


def add_gradcam_args(p, onnx: bool):
    g = p.add_argument_group("Grad-CAM (explanations)")
    g.add_argument("--gradcam", action="store_true",
                   help="add a Grad-CAM heat-map panel (UNet bottleneck) to each annotated PNG"
                        + (" (needs --checkpoint: gradients come from the PyTorch model)" if onnx else ""))
    g.add_argument("--cam_class", default=None, metavar="NAME",
                   help="explain this class instead of the predicted one (implies --gradcam)")
    g.add_argument("--save_cams", action="store_true",
                   help="also write the raw Grad-CAM maps as float32 .npy (implies --gradcam)")
    if onnx:
        g.add_argument("--checkpoint", default=None,
                       help="PyTorch checkpoint used ONLY for Grad-CAM (an ONNX Runtime session gives no gradients); "
                            "use the checkpoint this ONNX model was exported from")
    return g


def user_errors() -> tuple:
    """Exception types that mean 'fix your command' (exit 2, one line)."""
    return (CxrkitError, FileNotFoundError)


def run_cli(args, make_backend, cam_checkpoint=None, cam_device=None) -> int:
    """Shared body of the two inference scripts; returns the exit code (2 = user error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    gradcam = bool(args.gradcam or args.cam_class or args.save_cams)
    try:
        if args.data_dir is None and not args.images:
            raise InferenceError("no inputs: give --data_dir DIR or --images FILE [FILE ...]")
        if not 1 <= args.tta <= MAX_TTA:
            raise InferenceError(f"--tta must be between 1 and {MAX_TTA}, got {args.tta}")
        if args.batch_size < 1:
            raise InferenceError(f"--batch_size must be >= 1, got {args.batch_size}")
        if gradcam and cam_checkpoint is None:
            raise InferenceError("--gradcam with the ONNX backend needs --checkpoint (the PyTorch checkpoint the "
                                 "model was exported from): ONNX Runtime gives no gradients")
        backend = make_backend()
        if args.cam_class is not None and args.cam_class not in backend.class_names:
            raise InferenceError(f"--cam_class {args.cam_class!r} is not a model class; choose one of "
                                 f"{backend.class_names}")
        if getattr(backend, "calibration_problem", None):
            log.warning("%s: %s", getattr(backend, "checkpoint_path", None) or getattr(backend, "onnx_path", "model"),
                        backend.calibration_problem)
        items = gather_inputs(args.data_dir, args.images, backend.class_names, args.num_samples, args.seed,
                              exclude=args.save_dir)
        cam = None
        if gradcam:
            dev = cam_device() if callable(cam_device) else cam_device
            # the PyTorch backend's checkpoint is already in memory; the ONNX one needs --checkpoint
            cam = GradCamExplainer(backend.ck if isinstance(backend, TorchBackend) else cam_checkpoint, dev)
            src = getattr(backend, "meta", {}).get("source_checkpoint", {}).get("sha256")
            if src and Path(cam_checkpoint).is_file() and sha256_file(cam_checkpoint) != src:
                log.warning("Grad-CAM uses %s, which is not the checkpoint this ONNX model was exported from "
                            "(SHA-256 differs): maps may not explain these predictions", cam_checkpoint)
        summary = run_pipeline(backend, items, args.save_dir, batch_size=args.batch_size, tta=args.tta, cam=cam,
                               cam_class=args.cam_class, save_cams=args.save_cams, save_masks=args.save_masks,
                               report=not args.no_report, workers=args.workers, progress=not args.quiet,
                               overwrite=getattr(args, "overwrite", False),
                               extra_summary={"inputs": {"data_dir": args.data_dir, "images": args.images,
                                                         "num_samples": args.num_samples, "seed": args.seed}})
    except Exception as e:  # noqa: BLE001 - user errors become one line, anything else a traceback
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if summary["n_processed"] == 0:
        print(f"error: none of the {summary['n_inputs']} inputs could be decoded (reasons in "
              f"{Path(args.save_dir) / 'summary.json'})", file=sys.stderr)
        return 2
    thr = summary["throughput"]
    line = (f"{summary['backend']}: {summary['n_processed']} images ({summary['n_skipped']} skipped) in "
            f"{thr['seconds']:.1f} s ({thr['images_per_second']:.1f} img/s)")
    if summary["classification"]:
        c = summary["classification"]
        line += f" | accuracy {c['accuracy']:.3f} macro-F1 {c['macro_f1']:.3f} (n={c['n_labelled']})"
    if summary["segmentation"]:
        s = summary["segmentation"]
        line += f" | Dice {s['mean_dice']:.3f} IoU {s['mean_iou']:.3f}"
    q = summary.get("quality") or {}
    if q.get("n_flagged"):
        line += f" | {q['n_flagged']} flagged (quality_flags: " + ", ".join(
            f"{k} {v}" for k, v in q["counts"].items() if v) + ")"
    print(line + f" | outputs in {args.save_dir}")
    return 0

