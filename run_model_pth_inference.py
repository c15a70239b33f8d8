#!/usr/bin/env python
"""Batch inference with a PyTorch checkpoint: annotated PNGs, predictions.csv, summary.json.

  python run_model_pth_inference.py --data_dir DATA --save_dir out/pth_inference
  python run_model_pth_inference.py --images a.png b.dcm --gradcam --save_masks

Same pipeline, preprocessing and outputs as run_onnx_inference.py. Probabilities are calibrated with
the checkpoint's temperature. Research software: not for diagnosis.
"""
from __future__ import annotations

import argparse
import sys

from cxrkit.config import CHECKPOINT_PATH
from cxrkit.inference import add_gradcam_args, add_input_args, add_output_args, add_run_args, run_cli
from cxrkit.io_utils import HelpFormatter
from cxrkit.shipped import resolve_default


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=CHECKPOINT_PATH, help="trained cxrkit checkpoint")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_input_args(p)
    add_output_args(p, "out/pth_inference")
    add_run_args(p)
    add_gradcam_args(p, onnx=False)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxrkit.inference import TorchBackend
    holder = {}

    def make_backend():
        holder["b"] = TorchBackend(resolve_default(args.checkpoint, CHECKPOINT_PATH, "--checkpoint"), args.device)
        return holder["b"]

    return run_cli(args, make_backend, cam_checkpoint=args.checkpoint,
                   cam_device=lambda: holder["b"].device)


if __name__ == "__main__":
    sys.exit(main())
