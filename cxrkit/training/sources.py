"""Sources as data: where each training image comes from, and the source-aware protocols built on it.

A source is the name of the image's data root (`--data_dir cxr4 db_extra`: "cxr4", "db_extra"), plus,
with `--source_rule REGEX`, the first group the rule captures from "<root name>/<path in the root>"
("cxr4/COVID/images/covid_1.png"): `--source_rule '^[^/]+/([^/]+)/'` makes every class folder of every
root a source ("cxr4:COVID"). In the COVID-19 Radiography Database a class is mostly one source, so
a model can learn the source instead of the disease; these are how the project measures that:

- `--holdout_source NAME`: train (and validate) without that source's images; its images are the test set.
- `--balance_sources`: within a class, every source is drawn equally often per epoch (with replacement).
- test reports break accuracy down by source (`by_source` in classification_report.json).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..core.errors import DataError, UsageError


def root_names(dirs) -> list[str]:
    """One distinct name per data root: its folder name, "-2", "-3"... added where two roots share one."""
    names, seen = [], Counter()
    for d in dirs:
        base = Path(d).resolve().name or "data"
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def apply_source_rule(data, rule: str) -> list[str]:
    """Each image's source: its root's name, plus ":<group 1>" where `rule` matches "<root name>/<path>"."""
    if not rule:
        return list(data.sources)
    try:
        rx = re.compile(rule)
    except re.error as e:
        raise UsageError(f"--source_rule {rule!r} is not a regular expression ({e}); e.g. '^[^/]+/([^/]+)/' "
                         f"for one source per class folder") from None
    if rx.groups < 1:
        raise UsageError(f"--source_rule {rule!r} captures nothing: put the source's part in a group, "
                         f"e.g. '^[^/]+/([^/]+)/'")
    out = []
    for src, path in zip(data.sources, data.paths):
        full = path if data.root_of else f"{src}/{path}"
        m = rx.search(full)
        out.append(f"{src}:{m.group(1)}" if m and m.group(1) else src)
    return out


def holdout(split: dict, sources: list[str], name: str) -> dict:
    """The split for --holdout_source: train and validation without `name`'s images, test = all of them."""
    src = np.asarray(sources)
    if name not in set(sources):
        raise UsageError(f"--holdout_source {name!r}: no such source; the data's sources are "
                         f"{', '.join(sorted(set(sources)))}")
    held = src == name
    out = {k: np.asarray(v)[~held[np.asarray(v, np.int64)]] if len(v) else np.asarray(v, np.int64)
           for k, v in split.items() if k in ("train", "val")}
    out["test"] = np.flatnonzero(held)
    if len(out["train"]) == 0:
        raise DataError(f"--holdout_source {name!r}: every training image comes from it; add another source")
    return out


def balanced_order(labels: np.ndarray, sources: list[str], idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch of positions into idx (same length), drawn with replacement so that within each class
    every source has the same expected share; each class keeps its own count."""
    idx = np.asarray(idx)
    lab, src = labels[idx], np.asarray(sources, dtype=object)[idx]
    w = np.zeros(len(idx))
    for c in np.unique(lab):
        in_c = lab == c
        names, counts = np.unique(src[in_c], return_counts=True)
        per = dict(zip(names, counts))
        w[in_c] = [in_c.sum() / (len(names) * per[s]) for s in src[in_c]]
    return rng.choice(len(idx), size=len(idx), replace=True, p=w / w.sum())


def by_source(sources, idx, labels, preds, classes) -> dict:
    """Accuracy per source of the evaluated images (with its image and class counts), for test reports."""
    from ..core.metrics import wilson_interval
    src = np.asarray(sources, dtype=object)[np.asarray(idx)]
    out = {}
    for name in sorted(set(src)):
        m = src == name
        k, n = int((labels[m] == preds[m]).sum()), int(m.sum())
        out[name] = {"images": n, "accuracy": k / n, "accuracy_ci95": list(wilson_interval(k, n)),
                     "classes": {classes[c]: int(n) for c, n in zip(*np.unique(labels[m], return_counts=True))}}
    return out


def describe(sources, labels, classes) -> str:
    """'cxr4 5130 (COVID 2130, ...); db_extra 2649 (...)': the sources and their class counts, one line."""
    src = np.asarray(sources, dtype=object)
    parts = []
    for name in sorted(set(sources)):
        m = src == name
        per = ", ".join(f"{classes[c]} {n}" for c, n in zip(*np.unique(labels[m], return_counts=True)))
        parts.append(f"{name} {int(m.sum())} ({per})")
    return "; ".join(parts)
