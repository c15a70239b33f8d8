"""The split of a cached data set: near-duplicate groups (32-px thumbnail correlation), the stratified
train/val/test split, and with --folds the k-fold assignment (make_folds); made once and written
to split.json, which --resume and evaluation reuse."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import DataError
from ..core.io_utils import write_json_atomic

log = logging.getLogger("cxrkit")


def near_duplicate_groups(images: np.ndarray, threshold: float = TrainConfig.dup_threshold, thumb: int = 32,
                          block: int = 2048) -> np.ndarray:
    """Group id per image; images whose 32-px thumbnails correlate above `threshold` share a group."""
    import cv2
    n = len(images)
    th = np.stack([cv2.resize(np.asarray(im), (thumb, thumb), interpolation=cv2.INTER_AREA)
                   for im in images]).reshape(n, -1).astype(np.float32)
    th -= th.mean(axis=1, keepdims=True)
    th /= np.linalg.norm(th, axis=1, keepdims=True) + 1e-6
    parent = np.arange(n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for s in range(0, n, block):
        sim = th[s:s + block] @ th.T
        ii, jj = np.nonzero(sim > threshold)
        for i, j in zip(ii + s, jj):
            if i < j:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def shuffled_class_groups(labels: np.ndarray, groups: np.ndarray, seed: int):
    """The near-duplicate groups of each class in turn (a group's class: its members' majority),
    sorted then shuffled by one rng of `seed`; yields (the class's groups, every group's members).
    The one walk that make_split and make_folds deal groups from."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    glabel = {g: np.bincount(labels[m]).argmax() for g, m in members.items()}
    for c in np.unique(labels):
        gs = np.array(sorted(g for g in uniq if glabel[g] == c))
        rng.shuffle(gs)
        yield gs, members


def make_split(labels: np.ndarray, groups: np.ndarray, val_frac: float, test_frac: float,
               seed: int) -> dict[str, np.ndarray]:
    """Stratified by class, whole near-duplicate groups to one side; deterministic for a seed."""
    out = {"train": [], "val": [], "test": []}
    for gs, members in shuffled_class_groups(labels, groups, seed):
        n_c = sum(len(members[g]) for g in gs)
        targets = {"test": round(n_c * test_frac), "val": round(n_c * val_frac)}
        counts = {"test": 0, "val": 0}
        for g in gs:
            side = next((k for k in ("test", "val") if counts[k] < targets[k]), "train")
            if side != "train":
                counts[side] += len(members[g])
            out[side].extend(members[g].tolist())
    return {k: np.array(sorted(v), np.int64) for k, v in out.items()}


def load_or_make_split(data, split_path, val_frac=TrainConfig.val_frac,
                       test_frac=TrainConfig.test_frac, seed=TrainConfig.seed, dup_threshold=TrainConfig.dup_threshold,
                       folds: int = 0, fold=None, fold_seed: int = 0) -> dict[str, np.ndarray]:
    """Reuse split_path when it exists (resume, evaluation), else make and write it atomically.
    folds > 0: fold `fold` (an int or "all") of a k-fold assignment (make_folds) instead of train/val/test."""
    split_path = Path(split_path)
    index = {p: i for i, p in enumerate(data.paths)}
    if split_path.is_file():
        js = json.loads(split_path.read_text())
        if js.get("classes") != data.classes:
            raise DataError(f"{split_path}: made for classes {js.get('classes')}, data has {data.classes}; "
                            f"use a new --output_dir or delete the split file")
        if folds and (js.get("folds"), js.get("fold"), js.get("fold_seed")) != (folds, fold, fold_seed):
            raise DataError(f"{split_path}: made for folds={js.get('folds')} fold={js.get('fold')} fold_seed="
                            f"{js.get('fold_seed')}, not --folds {folds} --fold {fold} --fold_seed {fold_seed}; "
                            f"use one --output_dir per fold")
        out = {}
        for k in ("train", "val", "test"):
            missing = [p for p in js[k] if p not in index]
            if missing:
                log.warning("%d %s images of %s are not in the data (skipped), e.g. %s",
                            len(missing), k, split_path, missing[0])
            out[k] = np.array(sorted(index[p] for p in js[k] if p in index), np.int64)
        return out
    groups = near_duplicate_groups(data.images, dup_threshold)
    n_groups = int(sum(np.bincount(groups)[np.unique(groups)] > 1))
    if folds:
        fold_of = make_folds(data.labels, groups, folds, fold_seed)
        split = fold_split(fold_of, fold)
        js = {"folds": folds, "fold": fold, "fold_seed": fold_seed, "fold_of": fold_of.tolist(),
              "note": "k-fold run: val = test = the held-out fold, monitored only (the last epoch is kept)"}
    else:
        split = make_split(data.labels, groups, val_frac, test_frac, seed)
        js = {"seed": seed, "val_frac": val_frac, "test_frac": test_frac}
    js.update({"dup_threshold": dup_threshold, "classes": data.classes, "near_duplicate_groups": n_groups,
               "counts": {k: {c: int((data.labels[v] == i).sum()) for i, c in enumerate(data.classes)}
                          for k, v in split.items()}})
    js.update({k: [data.paths[i] for i in v] for k, v in split.items()})
    write_json_atomic(split_path, js, indent=1)
    log.info("split written to %s (%d near-duplicate groups kept on one side)", split_path, n_groups)
    for side, want in (("val", val_frac), ("test", test_frac)):
        absent = [c for c, n in js["counts"][side].items() if n == 0]
        if want > 0 and absent:  # its metrics there would silently leave the class out
            log.warning("class(es) %s have no image in the %s split (%s image(s) in all): their %s figures are "
                        "missing; add images to them", ", ".join(map(repr, absent)),
                        "validation" if side == "val" else "test",
                        ", ".join(str(int((data.labels == data.classes.index(c)).sum())) for c in absent),
                        "validation" if side == "val" else "test")
    return split


# ------------------------------------------------------------------------------------ folds
def make_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per image: stratified by class, each near-duplicate group whole in one fold.
    Groups of a class are shuffled (seed) and dealt to the fold with the fewest images of that class
    so far (ties to the lowest id): deterministic, and fold sizes per class differ by at most one group."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    fold = np.full(len(labels), -1, np.int64)
    for gs, members in shuffled_class_groups(labels, groups, seed):
        counts = np.zeros(k, np.int64)
        for g in gs:
            f = int(counts.argmin())
            fold[members[g]] = f
            counts[f] += len(members[g])
    return fold


def fold_split(fold_of: np.ndarray, fold) -> dict[str, np.ndarray]:
    """train = every other fold, val = test = the held-out fold (monitored, never used to select);
    fold "all": train on everything, nothing held out."""
    if fold == "all":
        return {"train": np.arange(len(fold_of)), "val": np.zeros(0, np.int64), "test": np.zeros(0, np.int64)}
    held = np.flatnonzero(fold_of == int(fold))
    return {"train": np.flatnonzero(fold_of != int(fold)), "val": held, "test": held}
