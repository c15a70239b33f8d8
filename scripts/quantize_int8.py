#!/usr/bin/env python
"""Try static INT8 quantization of the exported model (ONNX Runtime, QDQ, per-channel weights) and
compare it with FP32 on the test split: accuracy, macro-F1, Dice, agreement, and CPU latency.
A decision aid, not a shipping step: the INT8 model is kept only if it is faster here with no
meaningful loss (see docs/SPEED.md, "INT8").

    python scripts/quantize_int8.py --onnx_path models/covid_multitask.onnx \
        --data_dir ../shared/data/cxr4 --split_file model_checkpoints/split.json
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from cxrkit.training.data import build_cache  # noqa: E402
from cxrkit.training.split import load_or_make_split  # noqa: E402
from cxrkit.core.metrics import binary_dice_iou, classification_metrics, softmax  # noqa: E402


def run(sess, x, bs=32):
    segs, logits = [], []
    for i in range(0, len(x), bs):
        s, c = sess.run(["segmentation", "classification"], {"image": x[i:i + bs]})
        segs.append(s); logits.append(c)
    return np.concatenate(segs), np.concatenate(logits)


def dice(seg, masks):
    """Mean per-image Dice at 0.5 (metrics.binary_dice_iou, the project's one numpy Dice)."""
    return float(np.mean([binary_dice_iou(p[0] > 0.5, t)[0] for p, t in zip(seg, masks)]))


def latency_ms(sess, x, reps=7, bs=16):
    xb = x[:bs]
    sess.run(None, {"image": xb})
    t = []
    for _ in range(reps):
        t0 = time.perf_counter(); sess.run(None, {"image": xb}); t.append(time.perf_counter() - t0)
    return 1000 * statistics.median(t) / bs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx_path", default="models/covid_multitask.onnx")
    p.add_argument("--data_dir", default="../shared/data/cxr4")
    p.add_argument("--split_file", default="model_checkpoints/split.json")
    p.add_argument("--cache_dir", default="cache")
    p.add_argument("--n_calib", type=int, default=128, help="validation images used for calibration")
    p.add_argument("--json_out", default=None)
    a = p.parse_args()
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = json.loads(Path(a.onnx_path + ".meta.json").read_text())
    size, classes, temp = meta["img_size"], meta["class_names"], meta["temperature"]
    data = build_cache(a.data_dir, size, a.cache_dir, workers=2, progress=False)
    split = load_or_make_split(data, a.split_file)
    to_x = lambda idx: np.repeat((np.asarray(data.images[idx], np.float32) / 255.0)[:, None], 3, 1)  # noqa: E731
    calib = to_x(split["val"][: a.n_calib])
    test_idx = split["test"]
    xt, yt, mt = to_x(test_idx), data.labels[test_idx], np.asarray(data.masks[test_idx])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"image": b}

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 2
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"; q = Path(td) / "int8.onnx"
        quant_pre_process(a.onnx_path, str(pre))
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        rows = {}
        for name, path in (("fp32", a.onnx_path), ("int8", str(q))):
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            seg, lg = run(sess, xt)
            m = classification_metrics(yt, softmax(lg, temp), classes)
            rows[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "dice": dice(seg, mt),
                          "ms_per_image_batch16": latency_ms(sess, xt), "pred": lg.argmax(1)}
    agree = float((rows["fp32"]["pred"] == rows["int8"]["pred"]).mean())
    for r in rows.values():
        r.pop("pred")
    out = {"n_test": int(len(test_idx)), "prediction_agreement": agree, **rows}
    print(json.dumps(out, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
