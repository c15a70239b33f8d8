"""ONNX export: graph contract, parity with PyTorch, the meta file, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrkit.core.checkpoint import load_checkpoint, model_from_checkpoint
from cxrkit.training.export import CLASS_PROB_TOL, SEG_PROB_TOL, export_to_onnx, sha256_file


def test_export_graph_meta_and_parity(tiny_model):
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(tiny_model.onnx), full_check=True)
    meta = json.loads(tiny_model.meta_path.read_text())
    ck = load_checkpoint(tiny_model.checkpoint)
    assert meta == tiny_model.meta
    for k in ("class_names", "img_size", "normalization", "temperature", "outputs", "opset", "dynamic_batch",
              "model_config", "source_checkpoint", "input", "parity"):
        assert k in meta, k
    assert meta["class_names"] == ck["class_names"] and meta["img_size"] == ck["img_size"] == 64
    assert meta["temperature"] == pytest.approx(ck["temperature"])
    assert meta["normalization"] == ck["normalization"] and meta["model_config"] == ck["model_config"]
    assert meta["source_checkpoint"]["sha256"] == sha256_file(tiny_model.checkpoint)
    assert meta["onnx_sha256"] == sha256_file(tiny_model.onnx)
    assert meta["dynamic_batch"] is True and meta["opset"] == 17
    assert meta["input"]["name"] == "image" and meta["input"]["range"] == [0.0, 1.0]
    assert set(meta["outputs"]) == {"segmentation", "classification"}
    par = meta["parity"]
    assert par["passed"] and set(par["batches"]) == {"1", "4"}
    assert par["tolerances"] == {"class_prob_max_abs_diff": CLASS_PROB_TOL, "seg_prob_max_abs_diff": SEG_PROB_TOL}
    for v in par["batches"].values():
        assert v["max_abs_diff_class_prob_calibrated"] <= CLASS_PROB_TOL
        assert v["max_abs_diff_seg_prob"] <= SEG_PROB_TOL
    assert not list(tiny_model.onnx.parent.glob("*.tmp"))

    # graph contract and an independent parity check at batch 3 (dynamic axis)
    sess = ort.InferenceSession(str(tiny_model.onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["segmentation", "classification"]
    assert isinstance(sess.get_inputs()[0].shape[0], str)
    model, _ = model_from_checkpoint(tiny_model.checkpoint)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    seg, cls = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert seg.shape == (3, 1, 64, 64) and cls.shape == (3, 4)
    assert seg.min() >= 0 and seg.max() <= 1  # probabilities, not logits
    np.testing.assert_allclose(seg, torch.sigmoid(ref.segmentation).numpy(), atol=1e-5)
    np.testing.assert_allclose(cls, ref.classification.numpy(), atol=1e-4)


def test_export_static_batch(tiny_model, tmp_path):
    from cxrkit.inference import OnnxBackend, TorchBackend
    meta = export_to_onnx(tiny_model.checkpoint, tmp_path / "static.onnx", dynamic_batch=False)
    assert meta["dynamic_batch"] is False and set(meta["parity"]["batches"]) == {"1"}
    assert meta["input"]["shape"][0] == 1
    ob, tb = OnnxBackend(tmp_path / "static.onnx"), TorchBackend(tiny_model.checkpoint, "cpu")
    x = torch.rand(3, 3, 64, 64).numpy()  # backends take and return float32 numpy arrays
    (s1, c1), (s2, c2) = ob.forward(x), tb.forward(x)  # batch 3 runs as 3 x batch 1
    assert c1.shape == (3, 4) and s1.shape == (3, 1, 64, 64)
    np.testing.assert_allclose(c1, c2, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-4)


def test_export_errors(tmp_path, capsys, tiny_model):
    from cxrkit.cli import export as cli
    missing = tmp_path / "nope" / "best.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        export_to_onnx(missing, tmp_path / "m.onnx")
    assert cli.main(["--checkpoint", str(missing), "--onnx_path", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    with pytest.raises(ValueError, match="multiple of 16"):
        export_to_onnx(tiny_model.checkpoint, tmp_path / "m.onnx", img_size=70)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.meta.json").exists()


def test_export_other_size_and_parity_failure(tiny_model, tmp_path, monkeypatch):
    from cxrkit.training import export as exp
    from cxrkit.inference import OnnxBackend
    meta = export_to_onnx(tiny_model.checkpoint, tmp_path / "m96.onnx", img_size=96)
    assert meta["img_size"] == 96 and meta["trained_img_size"] == 64
    b = OnnxBackend(tmp_path / "m96.onnx")
    seg, cls = b.forward(torch.rand(2, 3, 96, 96))
    assert seg.shape == (2, 1, 96, 96) and cls.shape == (2, 4)
    monkeypatch.setattr(exp, "CLASS_PROB_TOL", -1.0)  # any difference now fails the parity check
    with pytest.raises(RuntimeError, match="disagrees with PyTorch"):
        export_to_onnx(tiny_model.checkpoint, tmp_path / "bad.onnx")
    assert not list(tmp_path.glob("bad.onnx*"))
