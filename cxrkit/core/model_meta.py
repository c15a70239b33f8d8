"""What a model carries for its users, typed once: `ModelMeta` (class names, size, temperature and
calibration, lung-area range, prior correction, the out-of-distribution gate, config and recipe), read
from a checkpoint dict or an ONNX meta file, written into the meta file by export, bound to the graph's
metadata_props, and checked in one place.

Torch-free on import: the ONNX inference path uses it (why: cxrkit/inference/__init__.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from .errors import CheckpointError, CxrkitError, InferenceError
from .io_utils import GRAPH_KEY_PREFIX
from .ood import GateSpec

DEFAULT_TEMPERATURE = 1.0  # a checkpoint saved before calibration has none: probabilities are raw softmax
ONNX_NEEDS = ("class_names", "img_size", "temperature")
# graph metadata_props key -> (what a mismatch is called, how its string is parsed)
_BINDING = {"cxrkit_meta_id": ("identity (meta_id)", str),
            "cxrkit_class_names": ("class names or their order", json.loads),
            "cxrkit_img_size": ("image size", int),
            "cxrkit_temperature": ("temperature", float),
            "cxrkit_lung_area_range": ("lung-area range", json.loads),
            "cxrkit_ood_threshold": ("OOD threshold", float)}
ONNX_CALIBRATION = ("class probabilities = softmax(classification / temperature) (temperature scaling fitted on "
                    "the validation split)")


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class ModelMeta:
    """A model's contract with its users; `where` names its file in every error."""
    class_names: list
    img_size: int
    temperature: float                  # probabilities = softmax(logits / temperature)
    calibration: object = None          # how T was fitted (checkpoint: a dict or None; ONNX meta: its note)
    lung_area_range: dict | None = None  # training lung-area percentiles (None: quality's default)
    prior_correction: object = None
    gate: GateSpec | None = None        # the out-of-distribution gate (None: none stored)
    model_config: dict = field(default_factory=dict)
    recipe: dict | None = None
    normalization: dict | None = None
    trained_img_size: int | None = None
    meta_id: str | None = None          # the export's identity, repeated in the graph
    shift_reference: dict | None = None  # the run-level shift warning's in-source sample (core.shift_check)
    training_hashes: str | None = None   # perceptual hashes of the training images (core.fingerprint)
    fast_paths: dict | None = None       # reduced-precision runs checked against FP32 (scripts/fast_paths.py)
    where: str = "model"
    error: type = CxrkitError           # what check() raises (CheckpointError / InferenceError)

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(cls, ck: dict, where: str = "checkpoint") -> "ModelMeta":
        """From a checkpoint dict (load_checkpoint's); checked. An uncalibrated one has T = 1."""
        m = cls(class_names=list(ck["class_names"]), img_size=int(ck["img_size"]),
                temperature=_float(ck.get("temperature", DEFAULT_TEMPERATURE)), calibration=ck.get("calibration"),
                lung_area_range=ck.get("lung_area_range"), prior_correction=ck.get("prior_correction"),
                gate=GateSpec.from_dict(ck.get("ood")), model_config=ck.get("model_config") or {},
                recipe=ck.get("recipe"), normalization=ck.get("normalization"),
                trained_img_size=int(ck["img_size"]), shift_reference=ck.get("shift_reference"),
                training_hashes=ck.get("training_hashes"), fast_paths=ck.get("fast_paths"), where=where,
                error=CheckpointError)
        m.check()
        return m

    @classmethod
    def from_onnx_meta(cls, meta: dict, where: str = "ONNX meta file") -> "ModelMeta":
        """From a parsed <model>.onnx.meta.json; checked. Class names, size and temperature are required."""
        if not isinstance(meta, dict) or any(k not in meta for k in ONNX_NEEDS):
            raise InferenceError(f"{where}: not a cxrkit ONNX meta file (needs {', '.join(ONNX_NEEDS)}); "
                                 f"re-export with export_to_onnx.py")
        try:
            names, size = [str(c) for c in meta["class_names"]], int(meta["img_size"])
        except (TypeError, ValueError) as e:
            raise InferenceError(f"{where}: unreadable class_names / img_size ({e}); re-export with "
                                 f"export_to_onnx.py") from None
        m = cls(class_names=names, img_size=size, temperature=_float(meta["temperature"]),
                calibration=meta.get("calibration"), lung_area_range=meta.get("lung_area_range"),
                prior_correction=meta.get("prior_correction"), gate=GateSpec.from_dict(meta.get("ood")),
                model_config=meta.get("model_config") or {}, recipe=meta.get("recipe"),
                normalization=meta.get("normalization"), trained_img_size=meta.get("trained_img_size"),
                meta_id=meta.get("meta_id"), shift_reference=meta.get("shift_reference"),
                training_hashes=meta.get("training_hashes"), fast_paths=meta.get("fast_paths"), where=where,
                error=InferenceError)
        m.check()
        return m

    def to_onnx_meta(self) -> dict:
        """The model part of <model>.onnx.meta.json (export adds provenance, graph and parity)."""
        return {"meta_id": self.meta_id, "class_names": list(self.class_names),
                "num_classes": len(self.class_names), "img_size": int(self.img_size),
                "trained_img_size": self.trained_img_size, "normalization": self.normalization,
                "normalization_applied_in_graph": True, "temperature": self.temperature,
                "prior_correction": self.prior_correction, "lung_area_range": self.lung_area_range,
                "ood": None if self.gate is None else self.gate.public().to_dict(),
                "calibration": ONNX_CALIBRATION, "model_config": self.model_config, "recipe": self.recipe,
                **({"shift_reference": self.shift_reference} if self.shift_reference else {}),
                **({"training_hashes": self.training_hashes} if self.training_hashes else {}),
                **({"fast_paths": self.fast_paths} if self.fast_paths else {})}

    def for_precision(self, precision: str) -> "ModelMeta":
        """The meta a run at `precision` uses. FP32 is the model as fitted. A reduced precision moves the
        gate's score a little (its features pass through the reduced-precision layers): its own threshold
        and shift reference, fitted by the same rules on the same films (fast_paths[precision], written by
        scripts/fast_paths.py), replace FP32's; without them the FP32 ones are kept."""
        fp = (self.fast_paths or {}).get(precision) if precision != "fp32" else None
        if not fp:
            return self
        gate = self.gate
        if gate is not None and fp.get("ood_threshold") is not None:
            gate = replace(gate, threshold=float(fp["ood_threshold"]))
        return replace(self, gate=gate, shift_reference=fp.get("shift_reference") or self.shift_reference)

    # ---------------------------------------------------------------------------------- checks
    def check(self) -> "ModelMeta":
        """THE validation of a model's metadata; one line naming the file (self.error) when it fails."""
        names = self.class_names
        if not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names):
            raise self.error(f"{self.where}: class_names must be a list of names, got {names!r}")
        if len(set(names)) != len(names):
            raise self.error(f"{self.where}: class_names {names} has duplicates")
        if not self.img_size > 0:
            raise self.error(f"{self.where}: img_size must be > 0, got {self.img_size}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise self.error(f"{self.where}: temperature must be a finite number > 0, got {self.temperature!r}; "
                             f"refit it with model_arch.py --evaluate CHECKPOINT --calibrate")
        return self

    @property
    def preset(self) -> str | None:
        return self.model_config.get("preset")

    def calibration_problem(self) -> str | None:
        """Why the probabilities are not calibrated, or None. finalize (cxrkit.training.finalize) adds a
        prior correction and fits a temperature on validation; a best checkpoint saved during training
        has neither (temperature 1, no prior_correction)."""
        if self.temperature != 1.0:
            return None
        if not self.prior_correction:
            return ("it has not been calibrated (temperature 1, no prior correction): an intermediate checkpoint "
                    "saved during training, before the final prior correction and temperature scaling. "
                    "Probabilities are raw softmax; finish training or run model_arch.py --evaluate CHECKPOINT "
                    "--calibrate")
        return ("its temperature is 1 (not fitted: too few validation images?), so probabilities are not "
                "temperature-calibrated")

    def resolve_gate(self, threshold_override: float | None = None) -> GateSpec | None:
        """The gate a run uses (GateSpec.resolve; a model without one is GateSpec()). A threshold for a model
        that carries no gate is refused: it has no score to compare with the threshold."""
        if threshold_override is not None and self.gate is None:
            raise ValueError(f"--ood_threshold {threshold_override:g}: this model carries no out-of-distribution "
                             f"gate (no OOD score to compare with a threshold; a training with too few validation "
                             f"images fits none), so nothing would be flagged; leave --ood_threshold out")
        return (self.gate or GateSpec()).resolve(threshold_override)

    # ---------------------------------------------------------------------------- graph binding
    def graph_binding(self) -> dict[str, str]:
        """The metadata_props export writes into the graph (the loader compares them with the meta file)."""
        out = {"cxrkit_meta_id": str(self.meta_id or ""), "cxrkit_class_names": json.dumps(list(self.class_names)),
               "cxrkit_img_size": str(int(self.img_size)), "cxrkit_temperature": repr(float(self.temperature))}
        if self.lung_area_range is not None:
            out["cxrkit_lung_area_range"] = json.dumps(self.lung_area_range, sort_keys=True)
        if self.gate is not None and self.gate.threshold is not None:
            out["cxrkit_ood_threshold"] = repr(float(self.gate.threshold))
        return out

    def binding_mismatches(self, props: dict) -> list[str]:
        """What this meta says differently from the graph's cxrkit_* metadata_props; [] when they agree.
        Each entry is a short phrase, e.g. "class names or their order (graph ['A', 'B'], meta ['B', 'A'])"."""
        graph = {k: v for k, v in props.items() if k.startswith(GRAPH_KEY_PREFIX)}
        want = self.graph_binding()
        out = []
        for key in sorted(set(graph) | set(want)):
            if key not in _BINDING:
                continue
            label, parse = _BINDING[key]
            try:
                g = parse(graph[key]) if key in graph else None
                m = parse(want[key]) if key in want else None
            except (ValueError, TypeError):
                g, m = graph.get(key), want.get(key)
            if g != m:
                out.append(f"{label} (graph {g!r}, meta {m!r})")
        return out
