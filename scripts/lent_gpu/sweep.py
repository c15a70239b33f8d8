#!/usr/bin/env python
"""LENT-GPU HELPER: the outside-lung / pretraining sweep behind MODEL_CARD.md's tables, run on a lent
GPU machine (H100/H200) by scripts/lent_gpu/sweep.sh. Every run is plain `model_arch.py` (the CPU
recipe's flags: 128 px, 20 epochs, batch 32) followed by `--evaluate --shortcut_check`.

Several runs share the GPU at once (a batch-32 lite0 step leaves an H100 mostly idle), highest
priority first, and no run starts after --deadline_s: whatever finished is reported.

  python scripts/lent_gpu/sweep.py --data CACHE_DIR --split split.json --out runs_sweep [--parallel 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (name, extra model_arch.py flags), in priority order
RUNS = []
for seed in (42, 7):
    RUNS += [
        (f"lite0_p0_s{seed}", ["--outside_lung_aug", "0"]),
        (f"lite0_noise50_s{seed}", ["--outside_lung_aug", "0.5", "--outside_lung_fill", "noise"]),
        (f"lite0_noise25_s{seed}", ["--outside_lung_aug", "0.25", "--outside_lung_fill", "noise"]),
        (f"lite0_noise75_s{seed}", ["--outside_lung_aug", "0.75", "--outside_lung_fill", "noise"]),
        (f"lite0_blur50_s{seed}", ["--outside_lung_aug", "0.5", "--outside_lung_fill", "blur"]),
        (f"lite0_constant50_s{seed}", ["--outside_lung_aug", "0.5", "--outside_lung_fill", "constant"]),
    ]
    if seed == 42:
        RUNS += [
            ("lite0scratch_p0_s42", ["--no-pretrained", "--outside_lung_aug", "0"]),
            ("seed_p0_s42", ["--arch", "seed", "--outside_lung_aug", "0"]),
            ("small_p0_s42", ["--arch", "small", "--outside_lung_aug", "0"]),
        ]


def run_one(name, extra, a, t_start):
    if time.time() - t_start > a.deadline_s:
        return name, "skipped (deadline)"
    d = Path(a.out) / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(a.split, d / "split.json")
    seed = name.rsplit("_s", 1)[1]
    arch = "lite0"
    if "--arch" in extra:
        arch = extra[extra.index("--arch") + 1]
        extra = [e for i, e in enumerate(extra) if e != "--arch" and (i == 0 or extra[i - 1] != "--arch")]
    base = [sys.executable, "model_arch.py", "--data_dir", a.data, "--output_dir", str(d), "--quiet",
            "--workers", "2"]
    train = base + ["--arch", arch, "--img_size", "128", "--num_epochs", str(a.epochs), "--batch_size", "32",
                    "--seed", seed, "--max_minutes", str(a.max_minutes), *extra]
    ev = base + ["--evaluate", str(d / "model_checkpoints" / "best_covid_model.pth"), "--shortcut_check"]
    t0 = time.time()
    with open(d / "train.log", "w") as log:
        log.write(" ".join(train) + "\n")
        log.flush()
        r = subprocess.run(train, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode == 0:
            r = subprocess.run(ev, stdout=log, stderr=subprocess.STDOUT)
        log.write(f"wall {time.time() - t0:.1f}s rc {r.returncode}\n")
    return name, f"rc {r.returncode} in {time.time() - t0:.0f}s"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--out", default="runs_sweep")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max_minutes", type=float, default=3.0, help="guard per run")
    p.add_argument("--deadline_s", type=float, default=420, help="start no run after this many seconds")
    p.add_argument("--only", default="", help="comma list of run names (default: all)")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "3")
    runs = [r for r in RUNS if not a.only or r[0] in a.only.split(",")]
    t_start = time.time()
    with ThreadPoolExecutor(a.parallel) as ex:
        for name, status in ex.map(lambda r: run_one(r[0], r[1], a, t_start), runs):
            print(f"{time.time() - t_start:6.0f}s {name}: {status}", flush=True)


if __name__ == "__main__":
    main()
