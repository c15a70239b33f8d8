#!/usr/bin/env python
"""Print the variant table: accuracy figures of each preset trained on the same split with the
same recipe (read from docs/variants/<recipe>/<arch>/, written by scripts/device_train.sh runs), plus
parameters, GFLOP/image and ONNX Runtime CPU latency measured here (random weights: speed does not
depend on the weights).

    python scripts/variant_table.py [--img_size 128] [--batch 16] [--reps 5]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cxrkit.checkpoint import atomic_torch_save, make_checkpoint  # noqa: E402
from cxrkit.config import DEFAULT_CLASSES, PRESETS, make_config  # noqa: E402
from cxrkit.export import export_to_onnx  # noqa: E402
from cxrkit.inference import OnnxBackend  # noqa: E402
from cxrkit.model import build_model, count_gflops, count_parameters  # noqa: E402


def ort_ms_per_image(arch, img_size, batch, reps):
    torch.manual_seed(0)
    cfg = make_config(arch)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as td:
        ck = Path(td) / "m.pth"
        atomic_torch_save(make_checkpoint(model, cfg, DEFAULT_CLASSES, img_size), ck)
        export_to_onnx(ck, Path(td) / "m.onnx", img_size=img_size)
        be = OnnxBackend(Path(td) / "m.onnx")
        x = torch.rand(batch, 3, img_size, img_size).numpy()  # backends take float32 numpy arrays
        be.forward(x)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            be.forward(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times) / batch, count_parameters(model), count_gflops(model, img_size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json_out", default=None)
    a = p.parse_args()
    rows = []
    for arch in PRESETS:
        ms, params, gflop = ort_ms_per_image(arch, a.img_size, a.batch, a.reps)
        for recipe in sorted((ROOT / "docs" / "variants").iterdir()):
            d = recipe / arch
            if not (d / "classification_report.json").is_file():
                continue
            rep = json.loads((d / "classification_report.json").read_text())
            summ = json.loads((d / "training_summary.json").read_text())
            bv = summ["best_val"]
            rows.append(dict(arch=arch, recipe=recipe.name, epochs=summ["epochs_run"], best_epoch=summ["best_epoch"],
                             val_acc=bv["val_acc"], val_f1=bv["val_macro_f1"], val_dice=bv["val_dice"],
                             test_acc=rep["accuracy"], test_f1=rep["macro_f1"], test_dice=rep["segmentation"]["dice"],
                             params_m=params / 1e6, gflop=gflop, ort_ms=ms))
    hdr = (f"| arch | recipe | epochs run (best) | val acc | val F1 | val Dice | test acc | test F1 | test Dice | "
           f"params (M) | GFLOP/img @{a.img_size} | ORT CPU ms/img (batch {a.batch}) |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r['arch']} | {r['recipe']} | {r['epochs']} ({r['best_epoch']}) | {r['val_acc']:.3f} | "
              f"{r['val_f1']:.3f} | {r['val_dice']:.3f} | {r['test_acc']:.3f} | {r['test_f1']:.3f} | "
              f"{r['test_dice']:.3f} | {r['params_m']:.2f} | {r['gflop']:.2f} | {r['ort_ms']:.1f} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
