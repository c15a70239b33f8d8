#!/usr/bin/env python
"""Print the variant table: accuracy figures of each preset trained on the same split of cxr4, read
from the run folders the trainings wrote, plus parameters, GFLOP/image, ONNX Runtime CPU latency and
2-core training throughput measured HERE (random weights: speed does not depend on the weights).

Run folders read (each holds what model_arch.py wrote, logs and JSON only):
  docs/sweep/<run>/       the 128-px, 20-epoch recipe on a lent H100 (scripts/lent_gpu/sweep.py)
  docs/cpu_runs/<run>/    the same recipe on this 2-core CPU (the shipped model's run among them)
(The earlier from-scratch recipes A and B, docs/variants/, had another schedule: docs/variant_table_v1.md.)

    python scripts/variant_table.py [--img_size 128] [--batch 16] [--reps 5] > docs/variant_table.md
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


import torch

from cxrkit.core.checkpoint import atomic_torch_save, make_checkpoint
from cxrkit.core.config import DEFAULT_CLASSES, PRESETS, make_config
from cxrkit.training.export import export_to_onnx
from cxrkit.inference import OnnxBackend
from cxrkit.core.model import build_model, count_gflops, count_parameters

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, EPOCHS = 3590, 20  # cxr4's training split; the recipe's epochs


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


def train_images_per_s(arch, img_size, batch=32, steps=4):
    """Forward + backward + AdamW step of the whole multi-task loss, channels_last, 2 warm-up steps."""
    from cxrkit.training.losses import MultiTaskLoss
    torch.manual_seed(0)
    model = build_model(make_config(arch)).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    crit = MultiTaskLoss(torch.ones(4))
    x = torch.rand(batch, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    m = (torch.rand(batch, 1, img_size, img_size) > 0.5).float()
    y, hm = torch.randint(0, 4, (batch,)), torch.ones(batch, dtype=torch.bool)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        out = model(x)
        loss = crit(out.segmentation, out.classification, m, hm, y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def read_run(d: Path):
    """(report, summary, shortcut) of a run folder in either layout, or None."""
    for rep_p, sum_p in ((d / "test_results" / "classification_report.json",
                          d / "model_checkpoints" / "training_summary.json"),
                         (d / "classification_report.json", d / "training_summary.json")):
        if rep_p.is_file() and sum_p.is_file():
            sc_p = rep_p.parent / "shortcut_check.json"
            return (json.loads(rep_p.read_text()), json.loads(sum_p.read_text()),
                    json.loads(sc_p.read_text()) if sc_p.is_file() else None)
    return None


def runs():
    for group, pattern in (("GPU sweep", "docs/sweep/*"), ("2-core CPU", "docs/cpu_runs/*"),
                           ):
        for d in sorted(ROOT.glob(pattern)):
            r = read_run(d) if d.is_dir() else None
            if r:
                yield group, d, *r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json_out", default=None)
    a = p.parse_args()
    speed = {}
    for arch in PRESETS:
        ms, params, gflop = ort_ms_per_image(arch, a.img_size, a.batch, a.reps)
        speed[arch] = dict(ort_ms=ms, params_m=params / 1e6, gflop=gflop, train_ips=train_images_per_s(arch, a.img_size))
    rows = []
    for group, d, rep, summ, sc in runs():
        arch = summ["arch"]
        if arch not in speed:
            continue
        pre = summ.get("model_config", {}).get("pretrained", False)
        hist = summ.get("history", [])
        cpu_min = sum(h["epoch_seconds"] for h in hist) / 60 if group == "2-core CPU" else None
        native = (rep.get("segmentation_native") or {}).get("dice")
        rows.append(dict(
            run=d.name, group=group, arch=arch,
            pretrained=bool(pre), epochs=summ["epochs_run"], test_acc=rep["accuracy"], test_f1=rep["macro_f1"],
            recall={c: v["recall"] for c, v in rep["per_class"].items()},
            dice=rep["segmentation"]["dice"], dice_native=native,
            lungs_only=(sc or {}).get("lungs_only", {}).get("accuracy"),
            cpu_minutes=cpu_min, cpu_minutes_est=EPOCHS * TRAIN_IMAGES / speed[arch]["train_ips"] / 60,
            **speed[arch]))
    classes = list(rows[0]["recall"]) if rows else []
    short = {c: c.split("_")[0].split(" ")[0][:5] for c in classes}
    hdr = ("| run | where | arch | ImageNet init | epochs | test acc | test macro-F1 | "
           + " | ".join(f"recall {short[c]}" for c in classes)
           + f" | lung Dice @{a.img_size} | lung Dice @mask size | lungs-only acc | params (M) | GFLOP/img @{a.img_size} "
           f"| ORT ms/img (batch {a.batch}) | 2-core train img/s | 2-core minutes for 20 epochs |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    f = lambda x, n=3: "" if x is None else f"{x:.{n}f}"  # noqa: E731
    for r in rows:
        mins = f"{r['cpu_minutes']:.0f} (measured, {r['epochs']} epochs)" if r["cpu_minutes"] else \
            f"~{r['cpu_minutes_est']:.0f} (est.)"
        print(f"| {r['run']} | {r['group']} | {r['arch']} | {'yes' if r['pretrained'] else 'no'} | {r['epochs']} | "
              f"{r['test_acc']:.3f} | {r['test_f1']:.3f} | " + " | ".join(f(r['recall'][c], 2) for c in classes)
              + f" | {f(r['dice'])} | {f(r['dice_native'])} | {f(r['lungs_only'])} | {r['params_m']:.2f} | "
              f"{r['gflop']:.2f} | {r['ort_ms']:.1f} | {r['train_ips']:.0f} | {mins} |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    print(f"\nspeed columns measured on: {cpu}, "
          f"{torch.get_num_threads()} torch threads; accuracy columns: test split of cxr4 (770 images), "
          f"argmax after prior correction")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
