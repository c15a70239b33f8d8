#!/usr/bin/env python
"""The outside-lung / pretraining comparison table (MODEL_CARD.md) from sweep run folders, and the
choice of the shipped outside-lung setting by the rule fixed BEFORE the sweep ran:

  Among the pretrained lite0 settings, take the one with the largest mean VALIDATION lungs-only
  accuracy gain over P = 0, among those whose mean validation accuracy as is is at most 1 point
  below P = 0's. Means are over the seeds that ran. Ties go to the smaller P.

  python scripts/outside_lung_table.py docs/sweep            # markdown table + the choice
  python scripts/outside_lung_table.py docs/sweep --choice   # print only the chosen setting's name
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def load_run(d: Path) -> dict | None:
    try:
        rep = json.loads((d / "test_results" / "classification_report.json").read_text())
        sc = json.loads((d / "test_results" / "shortcut_check.json").read_text())
        summ = json.loads((d / "model_checkpoints" / "training_summary.json").read_text())
    except (OSError, ValueError):
        return None
    v = sc.get("validation", {})
    hist = summ.get("history", [])
    return {
        "name": d.name, "setting": re.sub(r"_s\d+$", "", d.name),
        "test_acc": rep["accuracy"], "test_f1": rep["macro_f1"],
        "test_recall": {c: rep["per_class"][c]["recall"] for c in rep["classes"]},
        "test_dice": rep["segmentation"]["dice"],
        "test_lungs_only": sc["lungs_only"]["accuracy"], "test_lungs_removed": sc["lungs_removed"]["accuracy"],
        "test_cam": (sc.get("cam_mass_in_lungs") or {}).get("mean"),
        "val_acc": v.get("original", {}).get("accuracy"), "val_lungs_only": v.get("lungs_only", {}).get("accuracy"),
        "val_cam": (v.get("cam_mass_in_lungs") or {}).get("mean"),
        "epochs": len(hist), "train_s": sum(h["epoch_seconds"] for h in hist),
    }


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def by_setting(runs):
    g = defaultdict(list)
    for r in runs:
        g[r["setting"]].append(r)
    return g


def p_of(setting: str) -> float:
    m = re.search(r"(\d+)$", setting.split("_")[1]) if "_" in setting else None
    return int(m.group(1)) / 100 if m and setting.split("_")[1] != "p0" else 0.0


def choose(runs) -> str | None:
    g = by_setting([r for r in runs if r["name"].startswith("lite0_")])
    if "lite0_p0" not in g:
        return None
    base_acc = mean(r["val_acc"] for r in g["lite0_p0"])
    base_lo = mean(r["val_lungs_only"] for r in g["lite0_p0"])
    best, best_key = "lite0_p0", (0.0, 0.0)
    for s, rs in g.items():
        acc, lo = mean(r["val_acc"] for r in rs), mean(r["val_lungs_only"] for r in rs)
        if acc is None or lo is None or acc < base_acc - 0.01:
            continue
        key = (lo - base_lo, -p_of(s))
        if key > best_key:
            best, best_key = s, key
    return best


def fmt(x, nd=3):
    return "" if x is None else f"{x:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--choice", action="store_true")
    a = ap.parse_args()
    runs = [r for d in sorted(Path(a.root).iterdir()) if d.is_dir() and (r := load_run(d))]
    c = choose(runs)
    if a.choice:
        print(c or "")
        return
    print("| setting | seeds | val acc | val lungs-only | test acc | test macro-F1 | test lungs-only | "
          "test lungs-removed | test CAM mass in lungs | test Dice (128 px) | train s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, rs in by_setting(runs).items():
        cells = [mean(r[k] for r in rs) for k in ("val_acc", "val_lungs_only", "test_acc", "test_f1",
                                                   "test_lungs_only", "test_lungs_removed", "test_cam", "test_dice")]
        print(f"| {s}{' (chosen)' if s == c else ''} | {len(rs)} | " + " | ".join(fmt(x) for x in cells)
              + f" | {mean(r['train_s'] for r in rs):.0f} |")
    print("\nper run:")
    for r in runs:
        rec = " ".join(f"{k[:5]} {v:.2f}" for k, v in r["test_recall"].items())
        print(f"  {r['name']}: test acc {r['test_acc']:.3f} F1 {r['test_f1']:.3f} lungs-only "
              f"{r['test_lungs_only']:.3f} | val acc {fmt(r['val_acc'])} lungs-only {fmt(r['val_lungs_only'])} "
              f"| recall {rec} | {r['epochs']} epochs {r['train_s']:.0f}s")
    print(f"\nchosen by the rule: {c}")


if __name__ == "__main__":
    main()
