#!/usr/bin/env python
"""The variant table under the cross-validation protocol (issue 19): each lever's pooled out-of-fold
figures over all of cxr4 with 95% intervals and its paired difference against the single model, next
to its cost measured HERE: 2-core training images/s, ONNX Runtime ms/image (batch 16) and a whole
run_onnx_inference.py process (images/s over --n_images real X-rays, overlays + CSV + report).

  python scripts/cv_variant_table.py [--cv docs/cv] [--checkpoint model_checkpoints/best_covid_model.pth]
      [--n_images 96] > docs/variant_table_cv.md

Levers read from the committed fold runs (docs/cv/s42, docs/cv/s7: the default recipe, seeds 42 and 7,
5 folds each, 19 of 20 epochs, see MODEL_CARD.md): one model, another seed, 4-view TTA, the two seeds'
ensemble (mean probability), the ensemble + TTA. The shipped ensemble checkpoint gives the speed rows;
its first member alone gives the single-model rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def single_member(ck: dict) -> dict:
    """The first member of an ensemble checkpoint as a single-model checkpoint (same calibration)."""
    from cxrkit.core.config import ModelConfig
    cfg = dataclasses.replace(ModelConfig.from_dict(ck["model_config"]), ensemble_size=1)
    sd = {k.split(".", 2)[2]: v for k, v in ck["state_dict"].items() if k.startswith("members.0.")}
    out = {k: v for k, v in ck.items() if k not in ("state_dict", "model_config", "ood", "ensemble")}
    out.update(model_config=cfg.to_dict(), state_dict=sd)
    return out


def ort_ms(onnx_path, size, batch=16, reps=7) -> float:
    from cxrkit.inference import OnnxBackend
    be = OnnxBackend(onnx_path)
    x = np.random.default_rng(0).random((batch, 3, size, size), np.float32)
    be.forward(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        be.forward(x)
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts) / batch


def train_img_s(size, batch=32, steps=4) -> float:
    sys.path.insert(0, str(ROOT / "scripts"))
    from variant_table import train_images_per_s
    return train_images_per_s("lite0", size, batch, steps)


def whole_process(onnx_path, data_dir, n, tta, out) -> float:
    cmd = [sys.executable, str(ROOT / "run_onnx_inference.py"), "--onnx_path", str(onnx_path), "--data_dir",
           str(data_dir), "--num_samples", str(n), "--save_dir", str(out), "--quiet", "--tta", str(tta)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-500:])
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cv", default=str(ROOT / "docs" / "cv"))
    p.add_argument("--checkpoint", default=str(ROOT / "model_checkpoints" / "best_covid_model.pth"))
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "cxr4"))
    p.add_argument("--n_images", type=int, default=96)
    a = p.parse_args()
    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    from cxrkit.training.cv import load_oof, paired_difference, pooled_figures
    from cxrkit.training.export import export_to_onnx
    from cxrkit.core.metrics import softmax

    r42, r7 = load_oof(Path(a.cv) / "s42"), load_oof(Path(a.cv) / "s7")
    y, cls = r42["labels"], r42["classes"]
    p42, p7 = softmax(r42["logits"]), softmax(r7["logits"])
    lo = (r42["lungs_only_probs"] + r7["lungs_only_probs"]) / 2
    dice = np.nanmean([r42["dice"], r7["dice"]], axis=0)
    rows = [("one model (seed 42)", p42, r42["dice"], r42["lungs_only_probs"], "single", 1),
            ("one model (seed 7)", p7, r7["dice"], r7["lungs_only_probs"], "single", 1),
            ("one model + TTA 4", r42["tta4_probs"], None, None, "single", 4),
            ("2-seed ensemble (shipped)", (p42 + p7) / 2, dice, lo, "ensemble", 1),
            ("2-seed ensemble + TTA 4", (r42["tta4_probs"] + r7["tta4_probs"]) / 2, None, None, "ensemble", 4)]

    ck = load_checkpoint(a.checkpoint)
    size = int(ck["img_size"])
    cost = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        paths = {"ensemble": td / "ens.onnx", "single": td / "one.onnx"}
        atomic_torch_save(single_member(ck), td / "one.pth")
        export_to_onnx(a.checkpoint, paths["ensemble"])
        export_to_onnx(td / "one.pth", paths["single"])
        tr = train_img_s(size)
        for kind in ("single", "ensemble"):
            ms = ort_ms(paths[kind], size)
            for tta in (1, 4):
                wp = whole_process(paths[kind], a.data_dir, a.n_images, tta, td / f"o_{kind}_{tta}")
                n_models = 1 if kind == "single" else ck["model_config"].get("ensemble_size", 1)
                cost[(kind, tta)] = (tr / n_models, ms * tta, wp,
                                     paths[kind].stat().st_size / 2 ** 20)

    print(f"Cross-validated figures: pooled out-of-fold predictions over {len(y)} images of cxr4 (5 folds, "
          f"`python -m cxrkit cv docs/cv/s42 docs/cv/s7`), in %, 95% intervals; differences paired against "
          f"one model (seed 42), '=' when the interval holds 0.\n")
    print(f"Cost measured here: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; training: "
          f"lite0 forward+backward+AdamW, batch 32, channels_last (an ensemble trains each member); ONNX "
          f"Runtime: batch 16, median of 7, x views; whole process: run_onnx_inference.py over "
          f"{a.n_images} real X-rays (overlays, CSV, report).\n")
    print("| variant | accuracy | macro-F1 | Lung_Opacity recall | lungs-only acc | Dice | accuracy vs one model "
          "| 2-core train img/s | ORT ms/img | whole-process img/s | ONNX MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, probs, d, lop, kind, tta in rows:
        f = pooled_figures(y, probs, cls, d, lop)
        diff = paired_difference(y, p42, probs)
        c = cost[(kind, tta)]

        def ci(v, lohi):
            return f"{100 * v:.1f} [{100 * lohi[0]:.1f}, {100 * lohi[1]:.1f}]"
        lo_txt = ci(f["lungs_only_accuracy"], f["lungs_only_accuracy_ci95"]) if "lungs_only_accuracy" in f else "-"
        dice_txt = ci(f["dice"], f["dice_ci95"]) if "dice" in f else "-"
        dd = ("-" if probs is p42 else f"{100 * diff['accuracy_diff']:+.1f} [{100 * diff['accuracy_diff_ci95'][0]:+.1f}, "
              f"{100 * diff['accuracy_diff_ci95'][1]:+.1f}]{'' if diff['differs'] else ' ='}")
        print(f"| {name} | {ci(f['accuracy'], f['accuracy_ci95'])} | {ci(f['macro_f1'], f['macro_f1_ci95'])} | "
              f"{ci(f['recall']['Lung_Opacity']['value'], f['recall']['Lung_Opacity']['ci95'])} | {lo_txt} | "
              f"{dice_txt} | {dd} | {c[0]:.0f} | {c[1]:.1f} | {c[2]:.1f} | {c[3]:.1f} |")


if __name__ == "__main__":
    main()
