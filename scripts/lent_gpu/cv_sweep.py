#!/usr/bin/env python
"""LENT-GPU HELPER: the 5-fold cross-validation behind MODEL_CARD.md's figures and the shipped
all-data models, run on a lent GPU machine by scripts/lent_gpu/cv.sh. Every run is plain
`model_arch.py` with the default recipe (lite0, 128 px, 20 epochs, batch 32, outside-lung noise
0.75): `--folds 5 --fold k` for k = 0..4 and `--fold all`, for each seed. All runs share the GPU at
once (a batch-32 lite0 step leaves an H200 mostly idle); --max_minutes is a guard only.

  python scripts/lent_gpu/cv_sweep.py --data CACHE_DIR --out runs/cv [--seeds 42,7] [--folds 5]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_one(seed, fold, a):
    d = Path(a.out) / f"s{seed}" / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "model_arch.py", "--data_dir", a.data, "--output_dir", str(d), "--quiet",
           "--workers", str(a.workers), "--folds", str(a.folds), "--fold", str(fold), "--seed", str(seed),
           "--max_minutes", str(a.max_minutes), *a.extra.split()]
    t0 = time.time()
    with open(d / "train.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.write(f"wall {time.time() - t0:.1f}s rc {r.returncode}\n")
    return f"s{seed}/fold{fold}", f"rc {r.returncode} in {time.time() - t0:.0f}s"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/cv")
    p.add_argument("--seeds", default="42,7")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--all", action=argparse.BooleanOptionalAction, default=True, help="also --fold all per seed")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max_minutes", type=float, default=6.5, help="training guard per run")
    p.add_argument("--extra", default="", help="extra model_arch.py flags (a recipe variant)")
    a = p.parse_args()
    jobs = [(int(s), f) for s in a.seeds.split(",") for f in (["all"] if a.all else []) + list(range(a.folds))]
    t = time.time()
    with ThreadPoolExecutor(len(jobs)) as ex:
        for name, status in ex.map(lambda j: run_one(j[0], j[1], a), jobs):
            print(f"{time.time() - t:6.0f}s {name}: {status}", flush=True)


if __name__ == "__main__":
    main()
