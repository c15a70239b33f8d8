"""Store the perceptual hashes of a model's training images (cxrkit.core.fingerprint) in its checkpoint and
ONNX meta, for a model trained before training recorded them (training's finalize now does it).

    python scripts/add_training_hashes.py --data_dir ../shared/data/cxr4 \
        --checkpoint model_checkpoints/best_covid_model.pth --onnx_path models/covid_multitask.onnx
    # trained on one side of a split only (a fold run): --split_file RUN/split.json (its "train" list)

The images are decoded and resized exactly as training caches them (the model's img_size), so a later
run on the same files matches them."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core.checkpoint import load_checkpoint  # noqa: E402
from cxrkit.core.config import CHECKPOINT_PATH, ONNX_PATH  # noqa: E402
from cxrkit.core.fingerprint import hashes, pack  # noqa: E402
from cxrkit.training.data import load_data  # noqa: E402
from script_io import add_to_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", nargs="+", required=True, help="the training data root(s), as given to training")
    p.add_argument("--split_file", default=None, help="only its 'train' images (default: every image)")
    p.add_argument("--checkpoint", default=str(ROOT / CHECKPOINT_PATH))
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--cache_dir", default="cache")
    a = p.parse_args(argv)
    ck = load_checkpoint(a.checkpoint)
    data = load_data(a.data_dir if len(a.data_dir) > 1 else a.data_dir[0], ck["img_size"], Path(a.cache_dir), 2, 0, 1)
    idx = np.arange(len(data.paths))
    if a.split_file:
        train = set(json.loads(Path(a.split_file).read_text())["train"])
        idx = np.array([i for i, q in enumerate(data.paths) if q in train])
        if len(idx) != len(train):
            raise SystemExit(f"{a.split_file}: {len(train) - len(idx)} training images are not in --data_dir")
    packed = pack(hashes(data.images[idx]))
    add_to_model(a.checkpoint, a.onnx_path, {"training_hashes": packed}, {"training_hashes": packed})
    print(f"training_hashes of {len(idx)} images written into {a.checkpoint} and the meta of {a.onnx_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
