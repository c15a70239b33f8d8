"""A backend: the PyTorch checkpoint or the ONNX Runtime model, numpy in, numpy out (the `Backend`
contract below)."""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ..core.errors import InferenceError
from ..core.io_utils import (INPUT_NAME, OOD_OUTPUT, OUTPUT_NAMES, meta_path_for, model_sha256, onnx_metadata_props,
                             sha256_file)
from ..core.model_meta import ModelMeta
from ..core.model_input import check_input
from ..core.metrics import softmax as softmax_np
from ..core.gradcam import GradCamExplainer


log = logging.getLogger("cxrkit")


# ------------------------------------------------------------------------------------- contract
CAM_NEEDS_CHECKPOINT = ("--gradcam with the ONNX backend needs --checkpoint (the PyTorch checkpoint the model was "
                        "exported from): ONNX Runtime gives no gradients")


@runtime_checkable
class Backend(Protocol):
    """What run_pipeline, the report and the CLIs use of a backend, and all they use of it
    (TorchBackend and OnnxBackend implement it; nothing probes a backend for other attributes)."""

    name: str                         # "pytorch" or "onnxruntime" (summary.json "backend")
    model_file: Path                  # the checkpoint or ONNX file it runs
    meta: ModelMeta                   # what the model carries: classes, size, temperature, gate, config
    # shorthands of meta's fields (_MetaView)
    preset: str | None                # the model's preset (ModelConfig.preset), None when not recorded
    class_names: list[str]            # model class order
    img_size: int                     # S of the (B, 3, S, S) input
    temperature: float                # calibration: probabilities = softmax(logits / temperature)
    calibration_problem: str | None   # why the temperature is not a fitted one (None: calibrated)
    lung_area_range: dict | None      # training lung-area percentiles (None: quality's default)
    ood: dict | None                  # the out-of-distribution gate stored with the model (None: no gate)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,S,S) float32 -> (lung probabilities (B,1,S,S), class logits (B,C)), float32 numpy."""

    def forward_ood(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """forward() plus the out-of-distribution score (B,) float32 (None when the model has no gate)."""

    def describe(self) -> dict:
        """Runtime details for summary.json "backend_info" (device or providers, versions)."""

    def explainer(self, checkpoint=None, mismatch_ok: bool = False) -> GradCamExplainer:
        """Grad-CAM for this model's predictions; `checkpoint`: the PyTorch checkpoint to take the
        gradients from where the backend has none of its own (ONNX: --checkpoint). A checkpoint that is
        not the model's own is refused unless mismatch_ok; the explainer's .mismatch says why (or None)."""


# ------------------------------------------------------------------------------------- backends
class _MetaView:
    """The Backend shorthands, each read from self.meta (the one ModelMeta)."""
    meta: ModelMeta

    @property
    def preset(self) -> str | None:
        return self.meta.preset

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def img_size(self) -> int:
        return self.meta.img_size

    @property
    def temperature(self) -> float:
        return self.meta.temperature

    @property
    def calibration_problem(self) -> str | None:
        return self.meta.calibration_problem()

    @property
    def lung_area_range(self) -> dict | None:
        return self.meta.lung_area_range

    @property
    def ood(self) -> dict | None:
        return None if self.meta.gate is None else self.meta.gate.public().to_dict()


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPUs a container's quota allows (cgroup v2 cpu.max "QUOTA PERIOD", or v1 cfs files), rounded up;
    None when there is no quota. A Kubernetes CPU limit shows up here, not in the CPUs the process can see."""
    import math
    try:
        quota, period = Path(path).read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        per = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(q / per)) if q > 0 and per > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once), capped by a container's CPU
    quota (cgroup_cpu_limit); >= 1."""
    n = _physical_cores()
    limit = cgroup_cpu_limit()
    return min(n, limit) if limit else n


def _physical_cores() -> int:
    from ..core.cpu import cores_of
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        allowed = set(range(os.cpu_count() or 1))
    return cores_of(allowed) or max(1, len(allowed))


class TorchBackend(_MetaView):
    """A cxrkit checkpoint run by PyTorch (eval mode, no autograd); numpy in, numpy out."""

    name = "pytorch"

    def __init__(self, checkpoint, device=None):
        # torch / MONAI come in here, when a PyTorch backend is made (the package is torch-free on import)
        from ..core.checkpoint import model_from_checkpoint
        from ..core.device import pick_device
        self.checkpoint_path = self.model_file = Path(checkpoint)
        model, ck = model_from_checkpoint(checkpoint)  # FileNotFoundError / CheckpointError
        self.meta = ModelMeta.from_checkpoint(ck, str(checkpoint))  # CheckpointError
        self.device = pick_device(device or "auto")
        self.model = model.to(self.device).eval()
        self.ck = ck

    def forward(self, x: np.ndarray):
        """(B,3,S,S) float32 numpy (a CPU tensor also works) -> (seg_prob (B,1,S,S), logits (B,C)) as
        float32 numpy; runs on self.device."""
        return self.forward_ood(x)[:2]

    def forward_ood(self, x: np.ndarray):
        """forward, plus the (B,) out-of-distribution score (None when the model has no gate)."""
        import torch
        from ..core.model import predict
        check_input(x, self.img_size)
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
            seg, logits, ood = predict(self.model, xt, with_ood=True)
            return seg.cpu().numpy(), logits.cpu().numpy(), None if ood is None else ood.cpu().numpy()

    def describe(self) -> dict:
        import torch
        d = {"backend": self.name, "device": str(self.device), "checkpoint": str(self.checkpoint_path),
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d

    def explainer(self, checkpoint=None, mismatch_ok: bool = False) -> GradCamExplainer:
        """Grad-CAM from this backend's own checkpoint (already in memory), on its device."""
        cam = GradCamExplainer(self.ck, self.device)
        cam.mismatch = None  # the maps come from the very checkpoint that predicts
        return cam


_PROVIDER_ALIASES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
                     "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                     "rocm": "ROCMExecutionProvider", "openvino": "OpenVINOExecutionProvider",
                     "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}


def resolve_providers(providers=None, use_cuda: bool = False, available=None) -> list[str]:
    """Requested providers (names or short aliases, comma lists allowed) that this onnxruntime has,
    CUDA first when use_cuda, CPU always last as the fallback; unavailable ones are dropped with a
    warning."""
    if not providers and not use_cuda:
        return ["CPUExecutionProvider"]  # (onnxruntime not imported: a BF16 run may never need it)
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


# ------------------------------------------------------------------------------------- engines
PRECISIONS = ("auto", "fp32", "bf16")
FAST_EXTRA = "pip install 'cxrkit[fast]'"


def openvino_installed() -> bool:
    """Whether OpenVINO (the [fast] extra) can be imported; found without importing it (0.1 ms, not 80)."""
    import importlib.util
    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str | None:
    """The installed OpenVINO's version; None when it is not installed (it comes with the [fast] extra)."""
    if not openvino_installed():
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("openvino")
    except PackageNotFoundError:
        return "unknown"


def bf16_verdict(meta: ModelMeta) -> dict | None:
    """The model's own BF16 check (scripts/fast_paths.py --write stores it): None when it was never checked."""
    return (meta.fast_paths or {}).get("bf16")


def choose_precision(requested: str, meta: ModelMeta, cpu_only: bool, flags=None,
                     openvino: str | None | bool = True) -> tuple[str, str]:
    """(precision, why): "bf16" runs the graph in OpenVINO with BF16 matrix work, "fp32" in ONNX Runtime.
    auto takes BF16 only where all hold: a CPU run, OpenVINO installed, a CPU with AMX or AVX-512 BF16
    (elsewhere BF16 is emulated and slower), and a model whose own BF16 check passed (its class, gate and
    lungs agree with FP32 within the guards: scripts/fast_paths.py). --precision bf16 asks for it anyway
    (refused, one line, where it cannot run). openvino: whether it is installed (a version
    string counts as yes, None as no); True: look it up."""
    from ..core import cpu
    if requested not in PRECISIONS:
        raise InferenceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32", "asked for (--precision fp32)"
    ov = openvino_installed() if openvino is True else openvino
    have = cpu.bf16_flags(flags)
    problem = ("BF16 runs on the CPU only (a GPU provider or --use_cuda was asked for)" if not cpu_only else
               f"OpenVINO is not installed ({FAST_EXTRA})" if not ov else
               f"this CPU has no {' or '.join(cpu.BF16_FLAGS)} (BF16 would be emulated, slower than FP32)"
               if not have else None)
    if requested == "bf16":
        if problem:
            raise InferenceError(f"--precision bf16: {problem}; use --precision fp32 (or auto)")
        return "bf16", f"asked for (--precision bf16; CPU has {', '.join(have)})"
    verdict = bf16_verdict(meta)
    if problem is None and not (verdict or {}).get("passed"):
        problem = ("the model's BF16 check " + ("failed" if verdict else "was never run")
                   + " (scripts/fast_paths.py), so FP32 is used")
    if problem:
        return "fp32", problem
    return "bf16", f"CPU has {', '.join(have)}, OpenVINO installed, the model's BF16 check passed"


# The FP32 referee runs its close calls in zero-padded chunks of this size, one batch shape for ONNX Runtime's
# arena. At their own varying counts its memory grew through a long run: with the arena, every new shape grew
# the arena (+50 MB over 10,000 films); without it, every call left its buffers to glibc (+25 MB a step)
REFEREE_BATCH = 4


def close_calls(logits: np.ndarray, temperature: float, margin: float) -> np.ndarray:
    """Which images are close calls: their two most probable classes (calibrated) lie less than `margin`
    apart. The BF16 path's FP32 referee answers them (OnnxBackend.referee_close_calls); scripts/fast_paths.py
    fits the margin with this same rule."""
    p = np.sort(softmax_np(logits, temperature), axis=1)
    return (p[:, -1] - p[:, -2]) < margin


def _error_text(e: BaseException, limit: int = 300) -> str:
    """An engine's exception as "Type: its first line" (ONNX Runtime and OpenVINO messages run to pages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def model_cache_dir() -> Path | None:
    """Where OpenVINO keeps compiled models between runs (a run then starts 0.2 s sooner): $CXRKIT_CACHE_DIR
    ("off" disables it), else $XDG_CACHE_HOME/cxrkit or ~/.cache/cxrkit, under openvino/; None where it cannot
    be written (the model is then compiled every run)."""
    env = os.environ.get("CXRKIT_CACHE_DIR", "")
    if env.lower() == "off":
        return None
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrkit"
    d = base / "openvino"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d if os.access(d, os.W_OK) else None


_OV_IMPORT_LOCK = threading.Lock()


def import_openvino():
    """`import openvino`, without its model-conversion tools: the package's __init__ imports
    openvino.tools.ovc (convert_model, and its telemetry) inside `try: ... except ImportError`, 70 to 100 ms of
    every run's start-up here (docs/SPEED.md), for a converter this package never calls (it compiles the ONNX
    file). A None entry in sys.modules makes that import fail into the except; it is removed afterwards, and
    `openvino.convert_model` is still there for other code in the process, imported when first read."""
    import sys
    with _OV_IMPORT_LOCK:  # engines are built on background threads; the None entry must not outlive the import
        if "openvino" in sys.modules:
            import openvino as ov  # waits for an import another thread has begun
            return ov
        sys.modules.setdefault("openvino.tools.ovc", None)
        try:
            import openvino as ov
        finally:
            if sys.modules.get("openvino.tools.ovc", 0) is None:
                del sys.modules["openvino.tools.ovc"]
        if not hasattr(ov, "convert_model") and not hasattr(ov, "__getattr__"):
            def _lazy(name):
                if name == "convert_model":
                    from openvino.tools.ovc import convert_model
                    return convert_model
                raise AttributeError(f"module 'openvino' has no attribute {name!r}")
            ov.__getattr__ = _lazy
        return ov


def _ov_shape(ps) -> list:
    return [d.get_length() if d.is_static else None for d in ps]


class _OrtEngine:
    """The graph in ONNX Runtime (FP32): a small CPU runs one op at a time, each on every physical core."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str], threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # idle intra-op threads sleep instead of spinning: on a machine whose cores are shared (decode and
        # writer threads, other jobs) spinning starves them; 1.5x the CSV-only throughput measured here (docs/SPEED.md)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.active_providers = self.session.get_providers()
        self.inputs = [(i.name, list(i.shape)) for i in self.session.get_inputs()]
        self.outputs = {o.name: list(o.shape) for o in self.session.get_outputs()}
        self.version = ort.__version__

    def run(self, names: list[str], feed: dict) -> list:
        return self.session.run(names, feed)


class _OpenVinoEngine:
    """The same graph in OpenVINO on the CPU with BF16 inference precision (AMX / AVX-512 BF16 kernels)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int, digest: Callable[[], str]):
        ov = import_openvino()
        core = ov.Core()
        cache = model_cache_dir()
        if cache is not None:  # one folder per model content (digest(): its SHA-256). Compiled from the path,
            # OpenVINO keys its cache entry by the path, size and mtime in whole seconds, so a replaced file of
            # the same size (a retrain, `cp -p`, an unpacked archive) could load the old model's blob
            core.set_property({"CACHE_DIR": str(cache / digest()[:16])})
        # compiled from the path, not from read_model's graph: with the cache warm OpenVINO then loads the
        # compiled blob without parsing the ONNX file at all (0.07 s instead of 0.15)
        self.compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": "bf16",
                                                              "PERFORMANCE_HINT": "LATENCY"})
        self.inputs = [(p.get_any_name(), _ov_shape(p.get_partial_shape())) for p in self.compiled.inputs]
        self.outputs = {n: _ov_shape(p.get_partial_shape()) for p in self.compiled.outputs for n in p.get_names()}
        self._request = self.compiled.create_infer_request()
        self._ports = {n: p for p in self.compiled.outputs for n in p.get_names()}  # every name of each port
        self._lock = threading.Lock()  # one infer request: one call at a time
        self.active_providers = ["OpenVINO CPU (bf16)"]
        self.version = ov.__version__.split("-")[0]  # "2026.4.1-22982-e213a14..." -> the release

    def run(self, names: list[str], feed: dict) -> list:
        with self._lock:
            res = self._request.infer(feed)
            return [np.array(res[self._ports[n]]) for n in names]  # copies: the request reuses its buffers


_UNBOUND_WARNED: set[str] = set()  # ONNX files without a graph binding already warned about (once each)


class OnnxBackend(_MetaView):
    """An exported model run by ONNX Runtime; class names, size and temperature from the meta file."""

    name = "onnxruntime"

    def __init__(self, onnx_path, meta_path=None, providers=None, use_cuda: bool = False,
                 intra_op_threads: int | None = None, precision: str = "auto", fp32_referee: bool = True):
        self.onnx_path = self.model_file = Path(onnx_path)
        self.use_cuda = bool(use_cuda)
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
        self.meta_file = meta  # the whole file: provenance (onnx_sha256, source_checkpoint, opset) too
        self.meta = ModelMeta.from_onnx_meta(meta, str(self.meta_path))  # InferenceError
        self.providers = resolve_providers(providers, use_cuda)
        self.intra_op_threads = int(intra_op_threads or physical_cores())
        self.precision, self.precision_reason = choose_precision(precision, self.meta,
                                                                 cpu_only=self.providers == ["CPUExecutionProvider"])
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrkit-engine")
        digest = Future()  # the file's SHA-256, hashed here while the engine thread imports its runtime
        building = pool.submit(self._make_engine, precision, digest.result)
        pool.shutdown(wait=False)
        try:
            try:
                digest.set_result(model_sha256(self.onnx_path))
            except BaseException as e:
                digest.set_exception(e)
                raise
            self.graph_props = onnx_metadata_props(self.onnx_path)  # the binding facts, read without a session
        finally:
            self.engine = building.result()  # the engine's own error first: a file it cannot load is that
        self.active_providers = self.engine.active_providers
        if "CUDAExecutionProvider" in self.providers and "CUDAExecutionProvider" not in self.active_providers:
            log.warning("CUDA was requested but ONNX Runtime runs on %s", ", ".join(self.active_providers))
        self._check_model_matches_meta()  # against the meta as exported (the graph's binding is FP32's)
        self.meta = self.meta.for_precision(self.precision)  # BF16: its own gate threshold and shift reference
        # fp32_referee=False: BF16 alone (scripts/fast_paths.py measures it so; the benchmark times the model)
        self.referee_margin = ((bf16_verdict(self.meta) or {}).get("fp32_referee_margin")
                               if self.precision == "bf16" and fp32_referee else None)
        self._referee, self.n_refereed = None, 0
        if self.referee_margin and physical_cores() > 2:  # made in the background on a spare core: most runs
            # meet a close call, few at their start. On 2 cores it would take the model's and the decoders'
            # time instead (0.1 s of a 48-film run that never needs it), so it is made at the first close call
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrkit-referee")
            self._referee = pool.submit(self._make_referee)
            pool.shutdown(wait=False)

    def _make_referee(self) -> "_OrtEngine":
        return _OrtEngine(self.onnx_path, ["CPUExecutionProvider"], self.intra_op_threads)

    @functools.cached_property
    def _referee_engine(self) -> "_OrtEngine":
        """The FP32 referee at the first close call: the one built in the background at start-up, or (no
        spare core made it) built now; once either way."""
        return self._referee.result() if self._referee is not None else self._make_referee()

    def _make_engine(self, requested: str, digest: Callable[[], str]):
        """The engine of self.precision; under auto, an OpenVINO that cannot compile the graph falls back to
        ONNX Runtime FP32 (and the run says why). digest: the file's SHA-256, when it is known."""
        try:
            if self.precision == "bf16":
                try:
                    return _OpenVinoEngine(self.onnx_path, self.intra_op_threads, digest)
                except Exception as e:  # noqa: BLE001 - OpenVINO raises its own types
                    if requested == "bf16":
                        raise
                    self.precision, self.precision_reason = "fp32", (
                        f"OpenVINO could not compile the graph ({_error_text(e, 200)})")
                    log.warning("BF16 path off: %s; using ONNX Runtime FP32", self.precision_reason)
            return _OrtEngine(self.onnx_path, self.providers, self.intra_op_threads)
        except Exception as e:  # noqa: BLE001 - ORT / OpenVINO raise their own exception types
            raise InferenceError(f"{self.onnx_path}: {'OpenVINO' if self.precision == 'bf16' else 'ONNX Runtime'} "
                                 f"cannot load it ({_error_text(e)})") from None

    def _check_model_matches_meta(self):
        ins, outs = self.engine.inputs, self.engine.outputs
        if len(ins) != 1 or ins[0][0] != INPUT_NAME or any(n not in outs for n in OUTPUT_NAMES):
            raise InferenceError(f"{self.onnx_path}: not a cxrkit export (inputs {[i[0] for i in ins]}, outputs "
                                 f"{list(outs)}; expected '{INPUT_NAME}' -> {list(OUTPUT_NAMES)})")
        shp = ins[0][1]
        if len(shp) != 4 or (isinstance(shp[1], int) and shp[1] != 3):
            raise InferenceError(f"{self.onnx_path}: input shape {shp}, expected (batch, 3, H, W)")
        for d in shp[2:]:
            if isinstance(d, int) and d != self.img_size:
                raise InferenceError(f"{self.meta_path} says img_size {self.img_size} but {self.onnx_path} takes "
                                     f"{shp[2]}x{shp[3]} images: the meta file belongs to another export; "
                                     f"re-export or pass the matching --meta_path")
        c = outs["classification"]
        if len(c) != 2 or (isinstance(c[1], int) and c[1] != len(self.class_names)):
            raise InferenceError(f"{self.meta_path} lists {len(self.class_names)} class names but {self.onnx_path} "
                                 f"outputs {c[1] if len(c) == 2 else c} classes: the meta file belongs to another "
                                 f"export; re-export or pass the matching --meta_path")
        self.static_batch = shp[0] if isinstance(shp[0], int) else None
        self.outputs = list(OUTPUT_NAMES) + ([OOD_OUTPUT] if OOD_OUTPUT in outs else [])
        if self.meta.gate is not None and OOD_OUTPUT not in outs:
            raise InferenceError(f"{self.meta_path} describes an out-of-distribution gate but {self.onnx_path} has no "
                                 f"'{OOD_OUTPUT}' output: the meta file belongs to another export; re-export")
        self._check_binding()

    def _check_binding(self):
        """The meta file must be the one written with this graph: its onnx_sha256 must be the file's, and
        the graph's own metadata_props (class names and order, size, temperature, lung-area range,
        meta_id; written by export since the binding was added) must agree with it. Older graphs
        without them are read with one warning (only the checksum can be checked)."""
        fix = ("use the meta file written with this model (re-export with export_to_onnx.py, or pass the matching "
               "--meta_path)")
        want = self.meta_file.get("onnx_sha256")
        if want and want != model_sha256(self.onnx_path):
            raise InferenceError(f"{self.meta_path} was written for another ONNX file (its onnx_sha256 is not "
                                 f"{self.onnx_path}'s): {fix}")
        props = self.graph_props
        if props is None:
            raise InferenceError(f"{self.onnx_path}: its own metadata cannot be read (not a file export_to_onnx.py "
                                 f"wrote?), so {self.meta_path} cannot be checked against it: {fix}")
        if not any(k.startswith("cxrkit_") for k in props):
            key = str(self.onnx_path.resolve())
            if key not in _UNBOUND_WARNED:
                _UNBOUND_WARNED.add(key)
                log.warning("%s records no class names of its own (exported before cxrkit bound graph and meta): "
                            "class order and temperature come from %s unchecked%s; re-export to bind them",
                            self.onnx_path, self.meta_path, "" if want else ", and the meta has no onnx_sha256")
            return
        bad = self.meta.binding_mismatches(props)
        if bad:
            raise InferenceError(f"{self.meta_path} disagrees with {self.onnx_path} on {'; '.join(bad)}: {fix}")

    def forward(self, x: np.ndarray):
        """(B,3,S,S) float32 numpy -> (seg_prob (B,1,S,S), logits (B,C)) float32 numpy."""
        return self.forward_ood(x)[:2]

    def forward_ood(self, x: np.ndarray):
        """forward, plus the (B,) out-of-distribution score (None when the graph has no gate). Under BF16
        with a referee margin, the class logits of close calls come from FP32 (referee_close_calls)."""
        check_input(x, self.img_size)
        a = np.ascontiguousarray(x, dtype=np.float32)
        res = self._run(self.engine, self.outputs, a)
        ood = np.asarray(res[2], np.float32) if len(res) > 2 else None
        logits = np.asarray(res[1], np.float32)
        if self.referee_margin:
            logits = self.referee_close_calls(a, logits)
        return np.asarray(res[0], np.float32), logits, ood

    def referee_close_calls(self, a: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """BF16's close calls refereed by FP32: where the two most probable classes (calibrated) lie less
        than referee_margin apart, BF16 rounding could swap them, so those images' class logits are
        recomputed in ONNX Runtime FP32. The lungs and the gate's score stay BF16's, which the path's own
        threshold and shift reference were fitted on. scripts/fast_paths.py fits the margin: the smallest
        that brings agreement with FP32 to its target on real and shifted films.
        A referee that could not be made (ONNX Runtime's one-line error) stops the run: no close call is
        answered by BF16 alone."""
        close = close_calls(logits, self.temperature, self.referee_margin)
        if close.any():
            logits = logits.copy()
            try:
                referee = self._referee_engine
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise InferenceError(f"{self.onnx_path}: the BF16 path's FP32 referee (ONNX Runtime) cannot load it "
                                     f"({_error_text(e, 200)}); run with --precision fp32") from None
            logits[close] = np.asarray(self._run(referee, ["classification"], a[close], REFEREE_BATCH)[0], np.float32)
            self.n_refereed += int(close.sum())
        return logits

    def _run(self, engine, names, a: np.ndarray, batch: int | None = None) -> list:
        """engine's outputs `names` for a; in chunks of a fixed batch (the last one zero-padded) where the
        export has one, or where `batch` asks for one."""
        sb = self.static_batch or batch
        if sb is None:
            return engine.run(names, {INPUT_NAME: a})
        parts, n = [], a.shape[0]
        for s in range(0, n, sb):
            chunk = a[s:s + sb]
            k = chunk.shape[0]
            if k < sb:
                chunk = np.concatenate([chunk, np.zeros((sb - k, *chunk.shape[1:]), np.float32)])
            parts.append([o[:k] for o in engine.run(names, {INPUT_NAME: chunk})])
        return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]

    def describe(self) -> dict:
        from ..core import cpu
        return {"backend": self.name, "onnx_path": str(self.onnx_path), "meta_path": str(self.meta_path),
                "engine": self.engine.name, "engine_version": self.engine.version, "precision": self.precision,
                "precision_reason": self.precision_reason, "providers": self.active_providers,
                "intra_op_threads": self.intra_op_threads, "graph_optimization": "ORT_ENABLE_ALL"
                if self.engine.name == "onnxruntime" else "OpenVINO CPU plugin", "cpu": cpu.describe(),
                "opset": self.meta_file.get("opset"), "dynamic_batch": self.static_batch is None,
                **({"fp32_referee": {"margin": self.referee_margin, "images": self.n_refereed,
                                     "rule": "class logits from FP32 where BF16's top two calibrated probabilities "
                                             "lie closer than the margin"}} if self.referee_margin else {})}

    def explainer(self, checkpoint=None, mismatch_ok: bool = False) -> GradCamExplainer:
        """Grad-CAM from `checkpoint` (ONNX Runtime gives no gradients), on CUDA with --use_cuda when
        torch sees a GPU, else the CPU. It must be the checkpoint this model was exported from (the meta
        records its SHA-256): another one is refused unless mismatch_ok (--cam_checkpoint_mismatch_ok),
        and the reason is kept in .mismatch (summary.json and report.html show it)."""
        import torch
        if checkpoint is None:
            raise InferenceError(CAM_NEEDS_CHECKPOINT)
        mismatch = self._cam_mismatch(checkpoint, mismatch_ok)
        cam = GradCamExplainer(checkpoint, "cuda" if self.use_cuda and torch.cuda.is_available() else "cpu")
        cam.mismatch = mismatch
        return cam

    def _cam_mismatch(self, checkpoint, allow: bool) -> str | None:
        src = (self.meta_file.get("source_checkpoint") or {}).get("sha256")
        if not src:
            why = f"{self.meta_path} records no source checkpoint, so {checkpoint} cannot be checked against the model"
            log.warning("Grad-CAM: %s: the maps may not explain these predictions", why)
            return why
        if not Path(checkpoint).is_file() or sha256_file(checkpoint) == src:
            return None  # a missing file is reported by the checkpoint loader, one line
        why = (f"--checkpoint {checkpoint} is not the checkpoint {self.onnx_path} was exported from (SHA-256 "
               f"differs from {self.meta_path}'s source_checkpoint)")
        if not allow:
            raise InferenceError(f"{why}: its Grad-CAM maps would not explain these predictions; pass the exported "
                                 f"checkpoint, or --cam_checkpoint_mismatch_ok to draw them anyway")
        log.warning("Grad-CAM: %s: drawn anyway (--cam_checkpoint_mismatch_ok)", why)
        return why
