"""Input discovery: folders, explicit files, true classes from folder names, mask files, output names."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InferenceError
from ..core.outdir import is_output_dir
from ..core.decode import IMAGE_EXTS, list_images, mask_for_image, missing_reason


log = logging.getLogger("cxrkit")


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class InputItem:
    path: Path
    rel: str                       # display / naming path (relative to the data folder when there is one)
    true_class: str | None = None  # a model class name, when the folder names it
    mask_path: Path | None = None  # ground-truth lung mask, when a masks/ folder has one
    out_stem: str = ""             # unique output file stem


def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", s.strip().lower())


def _is_mask_path(p: Path, root: Path) -> bool:
    try:
        parts = p.relative_to(root).parts[:-1]
    except ValueError:
        parts = p.parts[:-1]
    return any(x.lower() == "masks" for x in parts)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._()+-]+", "_", s).strip("._") or "image"


def assign_output_stems(items: list[InputItem]) -> None:
    """Unique (case-insensitively) file stems from the relative paths: 'COVID/images/a.png' ->
    'COVID__images__a', then '_2', '_3', ... on collision."""
    taken = set()
    for it in items:
        rel = Path(it.rel)
        parts = [*rel.parts[:-1], rel.stem]
        base = "__".join(_safe(p) for p in parts if p not in ("", ".", "..", "/"))[-150:] or "image"
        stem, k = base, 2
        while stem.lower() in taken:
            stem, k = f"{base}_{k}", k + 1
        taken.add(stem.lower())
        it.out_stem = stem


def _output_dir_filter(exclude):
    """skip_dir for list_images: the --save_dir (exclude) and any folder holding a cxrkit output
    manifest are outputs, never inputs; pruned folders are collected in skip.pruned."""
    ex = Path(exclude).resolve() if exclude else None

    def skip(d: Path) -> bool:
        hit = is_output_dir(d) or (ex is not None and d.resolve() == ex)
        if hit:
            skip.pruned.append(str(d))
        return hit
    skip.pruned = []
    skip.exclude = ex
    return skip


def gather_inputs(data_dir=None, images=None, class_names=(), num_samples: int = 0, seed: int = 0,
                  exclude=None) -> list[InputItem]:
    """The images to run on.

    data_dir: searched recursively (any folder of images); folders named `masks` are ground truth, not
      inputs. The true class is the nearest enclosing folder (the data folder itself included) whose
      name is a model class (case, '_', '-' and spaces ignored) - so the database layout
      <Class>/images/<name> + <Class>/masks/<name> gives labels and masks.
    images: explicit files (or folders, expanded recursively); a file's class is its folder's name,
      or the folder above an `images` folder.
    num_samples > 0 picks that many at random (numpy default_rng(seed)); 0 = all.
    exclude: the run's --save_dir; it and every folder holding a cxrkit output manifest are skipped
      (outputs are never read back as inputs). Symlinked sub-folders are followed (loops cut).
    """
    lookup = {_norm_name(c): c for c in class_names}
    skip = _output_dir_filter(exclude)
    if num_samples is None or num_samples < 0:
        raise InferenceError(f"--num_samples must be >= 0 (0 = all), got {num_samples}")
    items: list[InputItem] = []
    if images:
        for s in images:
            p = Path(s)
            if p.is_dir():
                found = [q for q in list_images(p, skip_dir=skip) if not _is_mask_path(q, p)]
                items += [_item(q, str(Path(p.name) / q.relative_to(p)), lookup, p) for q in found]
            elif skip.exclude is None or skip.exclude not in _resolved(p).parents:
                items.append(_item(p, p.name, lookup, None))
            else:
                skip.pruned.append(str(p))
        if not items:
            raise InferenceError(f"--images: no images found in {', '.join(map(str, images))}")
        if all(not it.path.exists() for it in items):
            why = missing_reason(items[0].path)
            raise InferenceError(f"--images: none of the {len(items)} files can be read (first: {items[0].path}: "
                                 f"{why}); give image files that exist")
    elif data_dir is not None:
        root = Path(data_dir)
        if root.is_file():
            raise InferenceError(f"--data_dir {root} is a file, not a folder: to run on one image use --images "
                                 f"{root}")
        if not root.is_dir():
            raise InferenceError(f"--data_dir {root}: not a folder (point it at a folder of images, or the database "
                                 f"root <Class>/images/*.png)")
        items = [_item(p, str(p.relative_to(root)), lookup, root)
                 for p in list_images(root, skip_dir=skip) if not _is_mask_path(p, root)]
        if not items:
            raise InferenceError(f"--data_dir {root}: no images found (searched recursively for "
                                 f"{', '.join(sorted(IMAGE_EXTS))}; 'masks' folders are ground truth, not inputs"
                                 + (f"; cxrkit output folders are not inputs either: {skip.pruned[0]}"
                                    if skip.pruned else "") + ")")
    else:
        raise InferenceError("no inputs: give --data_dir DIR or --images FILE [FILE ...]")
    if skip.pruned:
        log.info("not read as inputs (outputs of cxrkit runs): %s", ", ".join(skip.pruned[:5])
                 + (f" and {len(skip.pruned) - 5} more" if len(skip.pruned) > 5 else ""))
    if 0 < num_samples < len(items):
        pick = np.sort(np.random.default_rng(seed).choice(len(items), num_samples, replace=False))
        log.info("picked %d of %d inputs at random (--num_samples %d, --seed %d; --num_samples 0 runs all)",
                 num_samples, len(items), num_samples, seed)
        items = [items[i] for i in pick]
    assign_output_stems(items)
    return items


def _root_names(root: Path) -> list[str]:
    """The data folder's own name (and its parent's when it is an `images` folder), nearest first."""
    r = root.resolve()
    return [r.name] + ([r.parent.name] if r.name.lower() == "images" else [])


def _resolved(p: Path) -> Path:
    """p.resolve(), or p made absolute where it cannot be resolved (a symlink loop: RuntimeError on Python
    < 3.13, OSError after); such a file stays an input and its decoding skips it, saying why (missing_reason)."""
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(p))


def _item(p: Path, rel: str, lookup: dict, root: Path | None) -> InputItem:
    """root None: an explicit file, labelled by its folder (or the folder above `images`); else the
    nearest folder between the file and root (root included) named like a model class."""
    true = None
    if lookup:
        if root is None:
            q = _resolved(p)
            cands = [q.parent.name] + ([q.parent.parent.name] if q.parent.name.lower() == "images" else [])
        else:
            cands = list(reversed(p.relative_to(root).parts[:-1])) + _root_names(root)
        true = next((lookup[_norm_name(c)] for c in cands if _norm_name(c) in lookup), None)
    return InputItem(path=p, rel=rel, true_class=true, mask_path=mask_for_image(p))
