"""Build one ensemble checkpoint from trained member checkpoints (model.EnsembleNet).

  python -m cxrkit ensemble runs/cv/s42/foldall/model_checkpoints/best_covid_model.pth \\
      runs/cv/s7/foldall/model_checkpoints/best_covid_model.pth \\
      --oof runs/cv/s42 runs/cv/s7 --out model_checkpoints/best_covid_model.pth

The members must share config, classes and input size (e.g. the same recipe trained with several
--seed values and --folds K --fold all). The temperature is fitted on the pooled out-of-fold
predictions of the same recipe's fold runs (--oof, one folder per member seed), averaged exactly as
the ensemble averages: members trained on every image have no held-out images of their own.

With --data_dir, the out-of-distribution gate (cxrkit.core.ood_head) is fitted on the ensemble's own
features: statistics from the images outside fold --ood_holdout_fold of the --oof runs, threshold
from that fold's images. The network trained on those too; scripts/ood_seen_bias.py measured that
this does not lower the threshold (docs/TRUST.md, "Out-of-distribution gate").
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..core.checkpoint import load_checkpoint, make_checkpoint
from ..core.config import ModelConfig
from ..core.errors import CheckpointError, CxrkitError
from ..core.io_utils import sha256_file


def oof_temperature(oof_dirs, allow_incomplete: bool = False) -> dict:
    """Temperature of the probability-mean ensemble of the given fold-run folders' OOF predictions."""
    from .cv import fit_oof_calibration, load_oof, mean_probability_logits
    from ..core.metrics import softmax
    runs = [load_oof(d, allow_incomplete, "--allow_incomplete") for d in oof_dirs]
    for r in runs[1:]:
        if not np.array_equal(r["paths"], runs[0]["paths"]):
            raise CxrkitError("--oof folders hold out different images: use fold runs of one --fold_seed")
    logits = (mean_probability_logits([softmax(r["logits"]) for r in runs]) if len(runs) > 1
              else runs[0]["logits"])
    cal = fit_oof_calibration(runs[0]["labels"], logits)
    cal["oof_runs"] = [str(d) for d in oof_dirs]
    return cal


def fit_gate(model, ck: dict, data_dir, oof_dirs, cache_dir, holdout_fold: int = 0, workers: int = 2) -> dict:
    """ck["ood"] for the ensemble (see the module docstring); returns it."""
    from .cv import OOF_FILE, read_oof_file
    from .data import load_data
    from ..core.errors import DataError
    from ..core.ood_head import fit_ood
    held = Path(oof_dirs[0]) / f"fold{holdout_fold}" / "test_results"
    if not (held / OOF_FILE).is_file():
        raise CxrkitError(f"{held / OOF_FILE} not found: --ood_holdout_fold names a fold of the first --oof run")
    data = load_data(data_dir, ck["img_size"], Path(cache_dir), workers, 0, 1, progress=False)
    if data.classes != ck["class_names"]:
        raise DataError(f"{data_dir} has classes {data.classes}, the members {ck['class_names']}")
    held_paths = set(str(p) for p in read_oof_file(held / OOF_FILE)["paths"])
    is_held = np.array([p in held_paths for p in data.paths])
    if not is_held.any():
        raise DataError(f"none of fold {holdout_fold}'s images is in {data_dir}: pass the data the folds were made of")
    return fit_ood(model, data, np.flatnonzero(~is_held), np.flatnonzero(is_held), device="cpu")


def _member_hashes(member_paths) -> list:
    """Each member file's SHA-256. The same checkpoint twice (one path twice, a link to it, or a byte-identical
    copy) would weigh that model double and count it as two members: refused naming both."""
    seen: dict = {}
    hashes = []
    for p in member_paths:
        p = Path(p)
        try:
            key = sha256_file(p) if p.is_file() else None
        except OSError:
            key = None
        hashes.append(key)
        if key is None:
            continue  # load_checkpoint names a missing or unreadable file
        if key in seen:
            same = "the same file" if p.resolve() == seen[key].resolve() else "the same checkpoint (identical bytes)"
            raise CxrkitError(f"{p} and {seen[key]} are {same}: each member is given once; pass distinct member "
                              f"checkpoints (e.g. one per --seed)")
        seen[key] = p
    return hashes


def build_ensemble(member_paths, oof_dirs=None, allow_incomplete: bool = False) -> dict:
    """The ensemble checkpoint (a dict) of the member checkpoints; T from oof_dirs when given."""
    if len(member_paths) < 2:
        raise CxrkitError("an ensemble needs at least two member checkpoints")
    hashes = _member_hashes(member_paths)
    cal = oof_temperature(oof_dirs, allow_incomplete) if oof_dirs else None  # the --oof files are checked before any member loads
    cks = [load_checkpoint(p) for p in member_paths]
    first = cks[0]
    for p, ck in zip(member_paths[1:], cks[1:]):
        for k in ("model_config", "class_names", "img_size"):
            if ck[k] != first[k]:
                raise CheckpointError(f"{p}: its {k} differs from {member_paths[0]}'s; members must share the "
                                      f"config, classes and input size")
    if first["model_config"].get("ensemble_size", 1) != 1:
        raise CheckpointError(f"{member_paths[0]} is already an ensemble; pass single-model checkpoints")
    cfg = dataclasses.replace(ModelConfig.from_dict(first["model_config"]), ensemble_size=len(cks))
    sd = {f"members.{i}.{k}": v for i, ck in enumerate(cks) for k, v in ck["state_dict"].items()}
    # each member's own prior correction (baked into its bias; members of other folds differ a little): the
    # checkpoint-level entry is the first member's
    members = [{"file": str(p), "sha256": h, "recipe": c.get("recipe"), "epochs_run": len(c.get("history") or []),
                "prior_correction": c.get("prior_correction")} for p, h, c in zip(member_paths, hashes, cks)]
    ck = make_checkpoint(sd, cfg, first["class_names"], first["img_size"], normalization=first["normalization"],
                         recipe=first.get("recipe"), prior_correction=first.get("prior_correction"),
                         lung_area_range=first.get("lung_area_range"), history=first.get("history"),
                         training_hashes=_union_hashes(cks),
                         ensemble={"members": members,
                                   "combine": "mean of member probabilities (lung sigmoid, class softmax)"})
    if cal is not None:
        ck["temperature"] = cal["temperature"]
        ck["calibration"] = cal
    return ck


def _union_hashes(cks) -> str | None:
    """Every member's training images (cxrkit.core.fingerprint), once."""
    from ..core.fingerprint import pack, unpack
    parts = [unpack(c.get("training_hashes")) for c in cks]
    parts = [h for h in parts if h is not None]
    return pack(np.unique(np.concatenate(parts))) if parts else None
