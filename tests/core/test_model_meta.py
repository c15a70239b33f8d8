"""Issue 24 item 2: one typed model contract (cxrkit.core.model_meta.ModelMeta, cxrkit.core.ood.GateSpec).
The shipped files load through it; check() refuses a bad temperature in one line naming the file;
GateSpec keeps the on-disk dict and decides like the pipeline always did."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cxrkit.core import ood
from cxrkit.core.errors import CheckpointError, CxrkitError, InferenceError
from cxrkit.core.model_meta import ModelMeta
from cxrkit.core.ood import GateSpec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PTH = ROOT / "model_checkpoints" / "best_covid_model.pth"
SHIPPED_META = ROOT / "models" / "covid_multitask.onnx.meta.json"
META = {"class_names": ["A", "B"], "img_size": 64, "temperature": 1.5}


@pytest.mark.skipif(not SHIPPED_PTH.is_file(), reason="shipped checkpoint not present")
def test_shipped_checkpoint_loads_through_model_meta():
    from cxrkit.core.checkpoint import load_checkpoint  # weights_only=True
    ck = load_checkpoint(SHIPPED_PTH)
    m = ModelMeta.from_checkpoint(ck, str(SHIPPED_PTH))
    assert m.class_names == list(ck["class_names"]) and m.img_size == int(ck["img_size"])
    assert m.temperature == float(ck["temperature"]) and m.temperature > 0
    assert m.gate is not None and m.gate.threshold == pytest.approx(float(ck["ood"]["threshold"]))
    # the gate's dict round-trips exactly (tensors included), and public() drops only the tensors
    assert list(m.gate.to_dict()) == list(ck["ood"])
    assert m.gate.public().to_dict() == {k: v for k, v in ck["ood"].items() if k not in ("class_means", "whitening")}


@pytest.mark.skipif(not SHIPPED_META.is_file(), reason="shipped ONNX meta not present")
def test_shipped_onnx_meta_loads_and_round_trips():
    meta = json.loads(SHIPPED_META.read_text())
    m = ModelMeta.from_onnx_meta(meta, str(SHIPPED_META))
    assert (m.class_names, m.img_size, m.temperature) == (meta["class_names"], meta["img_size"], meta["temperature"])
    assert m.gate.to_dict() == meta["ood"]
    out = m.to_onnx_meta()
    for k in ("class_names", "img_size", "temperature", "lung_area_range", "ood", "prior_correction",
              "model_config", "meta_id"):
        assert out[k] == meta[k], k
    assert ModelMeta.from_onnx_meta(out, "again").graph_binding() == m.graph_binding()


@pytest.mark.parametrize("t", [math.inf, math.nan, 0.0, -1.0, "warm"])
def test_check_refuses_a_bad_temperature_in_one_line(t):
    with pytest.raises(InferenceError) as e:
        ModelMeta.from_onnx_meta({**META, "temperature": t}, "models/x.onnx.meta.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("models/x.onnx.meta.json: temperature must be a finite number > 0")
    with pytest.raises(CheckpointError, match=r"^run/best.pth: temperature must be a finite number > 0"):
        ModelMeta.from_checkpoint({**META, "temperature": t}, "run/best.pth")


def test_checkpoint_without_temperature_is_uncalibrated():
    m = ModelMeta.from_checkpoint(META | {"temperature": 1.0}, "ck")
    assert ModelMeta.from_checkpoint({k: v for k, v in META.items() if k != "temperature"}, "ck").temperature == 1.0
    assert "not been calibrated" in m.calibration_problem()
    assert ModelMeta.from_checkpoint(META, "ck").calibration_problem() is None


def test_onnx_meta_without_the_required_keys_is_refused():
    with pytest.raises(CxrkitError, match="not a cxrkit ONNX meta file"):
        ModelMeta.from_onnx_meta({"class_names": ["A"]}, "m.json")
    with pytest.raises(CxrkitError, match="duplicates"):
        ModelMeta.from_onnx_meta({**META, "class_names": ["A", "A"]}, "m.json")


def test_gate_spec_resolve_and_decide():
    stored = {"format": ood.OOD_FORMAT, "layers": ["x"], "class_means": "t", "whitening": "t", "threshold": 2.0,
              "rule": "r", "future_key": 1}
    g = GateSpec.from_dict(stored)
    assert g.to_dict() == stored and list(g.to_dict()) == list(stored)  # unknown keys kept too
    assert GateSpec.from_dict(None) is None and GateSpec.from_dict({}) is None
    r = g.resolve()
    assert r.to_dict() == {"format": ood.OOD_FORMAT, "layers": ["x"], "threshold": 2.0, "rule": "r",
                           "source": "model", "future_key": 1}
    o = g.resolve(3.0)
    assert (o.threshold, o.stored_threshold, o.source) == (3.0, 2.0, "--ood_threshold")
    assert GateSpec().resolve(4.0).to_dict() == {"threshold": 4.0,
                                                 "source": "--ood_threshold (the model has no stored gate)"}
    assert GateSpec().resolve() is None and GateSpec(rule="r").resolve() is None
    with pytest.raises(ValueError, match="--ood_threshold must be > 0"):
        g.resolve(0.0)
    assert r.decide(1.9) == [] and r.decide(2.1) == [ood.FLAG_NOT_CXR]
    assert o.decide(2.1) == []  # the override moved the threshold
    assert r.decide(5.0, {"inverse": 1.0}) == [ood.FLAG_INVERTED]
    assert r.decide(5.0, {"rot90": 1.0}) == [ood.FLAG_ROTATED]
    assert r.decide(math.nan) == []
