"""cxrkit ensemble MEMBER.pth [MEMBER.pth ...] --oof RUN_DIR ... --out E.pth: several members as ONE
checkpoint (cxrkit.training.ensemble): temperature from the pooled out-of-fold predictions, the gate
from the members' data."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.checkpoint import atomic_torch_save
from ..core.errors import CxrkitError
from ..core.model_meta import ModelMeta
from ..training.ensemble import build_ensemble, fit_gate
from .common import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("members", nargs="+", help="member checkpoints (same config, classes, input size)")
    p.add_argument("--oof", nargs="*", default=None,
                   help="fold-run folders (fold*/test_results/oof_predictions.npz) whose pooled out-of-fold "
                        "predictions fit the temperature; one per member seed")
    p.add_argument("--data_dir", nargs="+", default=None, metavar="DIR",
                   help="the labelled data the members were trained on: fit the out-of-distribution gate (needs --oof)")
    p.add_argument("--cache_dir", default=None, help="decoded-image cache for --data_dir (default: <folder of --out>/cache)")
    p.add_argument("--ood_holdout_fold", type=int, default=0,
                   help="the gate's threshold comes from this fold's images, its statistics from the others")
    p.add_argument("--allow_incomplete", action="store_true",
                   help="fit the temperature on the held-out folds that exist (e.g. only fold 0 of a --folds 10 "
                        "design whose members were trained on the other nine): still images neither member saw")
    p.add_argument("--out", required=True, help="the ensemble checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    return run_command(lambda: _build(a))


def _build(a) -> int:
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise CxrkitError(f"{out} exists: pass --overwrite to replace it, or another --out")
    ck = build_ensemble(a.members, a.oof, a.allow_incomplete)
    # the model must load back from the file alone
    from ..core.checkpoint import model_from_checkpoint
    model, _ = model_from_checkpoint(ck)
    if a.data_dir:
        if not a.oof:
            raise CxrkitError("--data_dir (the out-of-distribution gate) needs --oof: its folds say which "
                              "images set the threshold")
        cache = a.cache_dir or out.parent / "cache"  # beside the outputs, like training's <output_dir>/cache
        ck["ood"] = fit_gate(model, ck, a.data_dir, a.oof, cache, a.ood_holdout_fold)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ck, out)
    cal, gate = ck.get("calibration"), ModelMeta.from_checkpoint(ck, str(out)).gate
    print(f"wrote {out}: {len(a.members)} members"
          + (f", T = {cal['temperature']:.3f} (ECE on OOF {cal['ece_before']:.4f} -> {cal['ece_after']:.4f})"
             if cal else ", T = 1 (no --oof)")
          + (f", out-of-distribution threshold {gate.threshold:.3f}" if gate is not None else ", no gate"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
