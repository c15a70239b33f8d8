"""One member of an ensemble checkpoint as a single-model checkpoint: a --init_from start, or the
single model that a distilled student (--teacher) is compared with.

    python scripts/extract_member.py --checkpoint model_checkpoints/best_covid_model.pth --member 0 --out member0.pth

The member keeps its own weights (with the ensemble's prior correction, which each member carries) and the
ensemble's class names, input size, normalisation, lung-area range (from the training masks) and recipe; the
ensemble-level parts (temperature, gate, shift statistics) are dropped, since they were fitted on the
ensemble's outputs, not this member's."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrkit.core.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, make_checkpoint  # noqa: E402
from cxrkit.core.config import CHECKPOINT_PATH, ModelConfig  # noqa: E402
from cxrkit.training.calibration import member_prior_corrections  # noqa: E402


def extract(ck: dict, k: int) -> dict:
    n = ck["model_config"].get("ensemble_size", 1)
    if n < 2:
        raise CheckpointError("the checkpoint is a single model, not an ensemble")
    if not 0 <= k < n:
        raise CheckpointError(f"--member {k}: the ensemble has members 0 to {n - 1}")
    cfg = dataclasses.replace(ModelConfig.from_dict(ck["model_config"]), ensemble_size=1)
    pre = f"members.{k}."
    sd = {key[len(pre):]: v for key, v in ck["state_dict"].items() if key.startswith(pre)}
    member = (ck.get("ensemble") or {}).get("members", [{}] * n)[k]
    return make_checkpoint(sd, cfg, ck["class_names"], ck["img_size"], normalization=ck["normalization"],
                           recipe=member.get("recipe") or ck.get("recipe"),
                           prior_correction=member_prior_corrections(ck, n)[k],
                           lung_area_range=ck.get("lung_area_range"), extracted_from={"member": k, **member})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / CHECKPOINT_PATH))
    p.add_argument("--member", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        atomic_torch_save(extract(load_checkpoint(a.checkpoint), a.member), a.out)
    except (CheckpointError, OSError) as e:  # a wrong --checkpoint or --out: one line, no traceback
        print(f"error: {a.checkpoint}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} (member {a.member} of {a.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
