#!/usr/bin/env python
"""Try static INT8 quantization of the exported model (ONNX Runtime, QDQ, per-channel weights, convolutions
and the classifier's Gemm; activations calibrated on training films) and compare it with FP32 on held-out
films: accuracy, macro-F1, Dice, class agreement, the gate's not-judged rate, and the model's speed.
A decision aid, not a shipping step (docs/SPEED.md, "What was tried").

    python scripts/quantize_int8.py --roots HELDOUT/cxr4 HELDOUT/db_extra \
        --calib_dir ../shared/data/cxr4 --json_out docs/fast_paths/int8.json

--roots: held-out films as in scripts/fast_paths.py. --calib_dir: films to calibrate the activation ranges
on (a random --n_calib of them; the model's training films are the issue's choice)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core.config import ONNX_PATH  # noqa: E402
from cxrkit.core.decode import list_images  # noqa: E402
from cxrkit.core.metrics import binary_dice_iou, classification_metrics, softmax  # noqa: E402
from cxrkit.core.model_input import lung_mask, load_for_model, resize_gray, to_model_input_np  # noqa: E402
from fast_paths import held_out  # noqa: E402


def session(path: str, threads: int = 2):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess, x, bs: int = 32):
    outs = [sess.run(["segmentation", "classification", "ood_score"], {"image": x[i:i + bs]})
            for i in range(0, len(x), bs)]
    return [np.concatenate([o[j] for o in outs]) for j in range(3)]


def ms_per_image(sess, x, bs: int = 16, reps: int = 7) -> float:
    xb = x[:bs]
    sess.run(None, {"image": xb})
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"image": xb})
        t.append(time.perf_counter() - t0)
    return 1000 * statistics.median(t) / bs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--roots", nargs="+", required=True)
    p.add_argument("--calib_dir", required=True)
    p.add_argument("--n_calib", type=int, default=256)
    p.add_argument("--json_out", default=None)
    a = p.parse_args(argv)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from cxrkit.core import cpu
    meta = json.loads(Path(a.onnx_path + ".meta.json").read_text())
    names, temp, th = meta["class_names"], meta["temperature"], meta["ood"]["threshold"]
    imgs, y, masks = held_out(a.roots, names)
    x = to_model_input_np(np.stack([resize_gray(im, meta["img_size"]) for im in imgs]))
    files = [f for f in list_images(a.calib_dir) if "masks" not in f.parts]
    pick = np.random.default_rng(0).choice(len(files), min(a.n_calib, len(files)), replace=False)
    calib = to_model_input_np(np.stack([load_for_model(files[i], meta["img_size"]) for i in sorted(pick)]))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 16] for i in range(0, len(calib), 16))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"image": b}

    rows = {}
    with tempfile.TemporaryDirectory() as td:
        pre, q = str(Path(td) / "pre.onnx"), str(Path(td) / "int8.onnx")
        quant_pre_process(a.onnx_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm"])
        for name, path in (("fp32", a.onnx_path), ("int8", q)):
            sess = session(path)
            seg, lg, ood = run(sess, x)
            m = classification_metrics(y, softmax(lg, temp), names)
            dice = [binary_dice_iou(lung_mask(seg[i, 0], t.shape[:2]), t)[0] for i, t in enumerate(masks) if t is not None]
            rows[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "dice": float(np.mean(dice)),
                          "not_judged_heldout": float(np.mean(ood > th)), "ms_per_image_batch16": ms_per_image(sess, x),
                          "pred": lg.argmax(1)}
    agree = float((rows["fp32"]["pred"] == rows["int8"]["pred"]).mean())
    for r in rows.values():
        r.pop("pred")
    out = {"model": a.onnx_path, "n_heldout": len(y), "cpu": cpu.describe(), "class_agreement": agree, **rows,
           "command": "python scripts/quantize_int8.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=1))
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
