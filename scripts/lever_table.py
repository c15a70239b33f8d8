"""Paired comparison of models (training recipes, "arms") on the same held-out images, plain and under
scanner-like shifts (cxrkit.training.shifts): accuracy with Wilson 95% intervals per arm, and each arm's
difference from the first (the baseline) with a paired bootstrap 95% interval (images resampled, the
same resample for both arms). An interval that excludes 0 is a measured effect; one that straddles 0 is
"did nothing measurable" at this sample size.

    python scripts/lever_table.py --data_dir ../shared/data/db_extra --per_class 300 \
        --arm base=runs/lever/base/fold0/model_checkpoints/best_covid_model.pth \
        --arm aug=runs/lever/aug/fold0/model_checkpoints/best_covid_model.pth --out docs/levers/cross_pool

An arm is NAME=FILE (.pth: PyTorch backend; .onnx: ONNX Runtime), or NAME=FILE,FILE,... for several
training runs of one recipe (seeds): each image then counts as the share of those runs that got it right,
so the arm's accuracy is their mean and its interval a bootstrap over the images. That interval is for
THESE runs: it does not cover what another seed would give. So the table also prints each run's own
difference from the baseline's run of the same position (same seed, when the arms list them in one
order); where those disagree in sign, the pooled interval is no evidence of an effect. Only images that no arm trained on
give an honest figure (cross-pool: arms trained on cxr4, tested on db_extra). The gate is not applied:
every image is scored, so the arms are compared on the same images. Writes <out>.json and <out>.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core.decode import read_gray  # noqa: E402
from cxrkit.core.errors import ImageReadError  # noqa: E402
from cxrkit.core.metrics import wilson_interval  # noqa: E402
from cxrkit.training.shifts import apply_shift  # noqa: E402
from robustness import labelled_images, predict  # noqa: E402
from script_io import write_result  # noqa: E402

DEFAULT_CONDITIONS = ("none", "clahe@0.5", "clahe@1", "gamma@1", "contrast@1", "blur@1", "sharpen@1", "noise@0.5",
                      "noise@1", "jpeg@1", "downup@1", "border_text@1", "collimation@0.5", "collimation@1")


def load(path: str):
    from cxrkit.inference.backends import OnnxBackend, TorchBackend
    return OnnxBackend(path) if str(path).endswith(".onnx") else TorchBackend(path, "cpu")


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) - mean(a) of two per-image correctness arrays and its paired bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    d = b[idx].mean(1) - a[idx].mean(1)
    return float(b.mean() - a.mean()), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def mean_ci(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval (images resampled) of the mean of per-image scores: paired_diff_ci against 0."""
    return paired_diff_ci(np.zeros_like(x), x, seed=seed)[1:]


def diff_cell(d: dict) -> str:
    """'+0.012 [-0.010, +0.034]', and each run's own difference where the arms have several runs."""
    cell = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    return cell + (f" ({', '.join(f'{v:+.3f}' for v in d['per_run'])} by run)" if "per_run" in d else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--arm", action="append", required=True, metavar="NAME=FILE", help="first = the baseline")
    p.add_argument("--per_class", type=int, default=300, help="images per class folder (0 = all)")
    p.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    arms = [tuple(s.split("=", 1)) for s in a.arm]
    backends = {n: [(f, load(f)) for f in files.split(",")] for n, files in arms}
    names = list(backends[arms[0][0]][0][1].class_names)
    for n, runs in backends.items():
        for f, b in runs:
            if list(b.class_names) != names:
                sys.exit(f"error: {n}={f} has classes {list(b.class_names)}, the first arm {names}: arms must "
                         f"share their classes, in one order")
    paths, labels = labelled_images(a.data_dir, names, a.per_class, a.seed)
    originals, keep, skipped = [], [], []
    for i, q in enumerate(paths):
        try:
            originals.append(read_gray(q))
            keep.append(i)
        except ImageReadError as e:  # counted and named, never a traceback: the table is over the rest
            print(f"skipped: {e}", file=sys.stderr)
            skipped.append(str(q))
    if skipped:
        print(f"{len(skipped)} of {len(paths)} images skipped (not decodable)", file=sys.stderr)
    if not keep:
        sys.exit(f"error: no decodable image under {a.data_dir}")
    labels = np.asarray(labels)[keep]
    rep = {"data_dir": a.data_dir, "n": len(labels), "skipped": skipped, "arms": dict(arms), "baseline": arms[0][0],
           "rows": {}}
    for cond in a.conditions.split(","):
        if cond == "none":
            imgs = originals
        else:
            name, lv = cond.split("@")
            imgs = [apply_shift(im, name, float(lv), seed=a.seed + i) for i, im in zip(keep, originals)]  # file's index
        correct, runs_correct = {}, {}
        row = {}
        for n, runs in backends.items():
            preds = [predict(b, imgs, b.img_size)[0].argmax(1) for _, b in runs]
            per_run = [(pr == labels).astype(np.float64) for pr in preds]
            correct[n], runs_correct[n] = np.mean(per_run, axis=0), per_run
            # where the films went: true class -> predicted class counts, summed over the arm's runs
            confusion = sum(np.bincount(labels * len(names) + pr, minlength=len(names) ** 2) for pr in preds)
            if len(runs) == 1:
                k = int(correct[n].sum())
                row[n] = {"accuracy": k / len(labels), "ci95": list(wilson_interval(k, len(labels)))}
            else:
                row[n] = {"accuracy": float(correct[n].mean()), "ci95": list(mean_ci(correct[n], seed=a.seed)),
                          "per_run": [float(c.mean()) for c in per_run]}
            row[n]["predicted"] = {names[t]: {names[q]: int(confusion[t * len(names) + q]) for q in range(len(names))}
                                   for t in sorted(set(labels.tolist()))}
        for n, _ in arms[1:]:
            d, lo, hi = paired_diff_ci(correct[arms[0][0]], correct[n], seed=a.seed)
            row[n]["diff_vs_baseline"] = {"diff": d, "ci95": [lo, hi]}
            base_runs = runs_correct[arms[0][0]]
            if len(runs_correct[n]) > 1 and len(runs_correct[n]) == len(base_runs):
                row[n]["diff_vs_baseline"]["per_run"] = [float(r.mean() - b.mean())
                                                         for r, b in zip(runs_correct[n], base_runs)]
        rep["rows"][cond] = row
        print(cond, {n: round(r["accuracy"], 3) for n, r in row.items()}, flush=True)
    counts = ", ".join(f"{names[c]} {int((labels == c).sum())}" for c in sorted(set(labels.tolist())))
    md = [f"Arms on `{a.data_dir}` ({len(labels)} images: {counts}); baseline `{arms[0][0]}`; "
          f"difference = arm - baseline, paired bootstrap 95% interval", "",
          "| condition | " + " | ".join(f"{n} accuracy [95% CI]" for n, _ in arms)
          + "".join(f" | {n} - {arms[0][0]} [95% CI]" for n, _ in arms[1:]) + " |",
          "|---|" + "---|" * (2 * len(arms) - 1)]
    for cond, row in rep["rows"].items():
        cells = [f"{row[n]['accuracy']:.3f} [{row[n]['ci95'][0]:.3f}, {row[n]['ci95'][1]:.3f}]" for n, _ in arms]
        cells += [diff_cell(row[n]["diff_vs_baseline"]) for n, _ in arms[1:]]
        md.append(f"| {cond} | " + " | ".join(cells) + " |")
    clean = rep["rows"].get("none")
    if clean:
        md += ["", "Where the clean films went (true class: predicted counts, summed over each arm's runs):", ""]
        md += [f"- {n}: " + "; ".join(f"{t} -> " + ", ".join(f"{q} {k}" for q, k in got.items() if k)
                                     for t, got in clean[n]["predicted"].items()) for n, _ in arms]
    print("\n".join(md))
    write_result(a.out, rep, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
