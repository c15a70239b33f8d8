"""Batch inference with a PyTorch checkpoint: annotated PNGs, predictions.csv, summary.json.

  python run_model_pth_inference.py --data_dir DATA --save_dir out/pth_inference
  python run_model_pth_inference.py --images a.png b.dcm --gradcam --save_masks

Same pipeline, preprocessing and outputs as run_onnx_inference.py. Probabilities are calibrated with
the checkpoint's temperature. Research software: not for diagnosis.
"""
from __future__ import annotations

import sys

from ..core.config import CHECKPOINT_PATH, InferConfig
from .infer import inference_parser, run_cli
from ..core.shipped import resolve_default


def _model_args(g):
    g.add_argument("--checkpoint", default=CHECKPOINT_PATH, help="trained cxrkit checkpoint")
    g.add_argument("--device", default=InferConfig.device, help="auto, cpu, cuda or cuda:N")


def parse_args(argv=None):
    return inference_parser(__doc__, _model_args, "out/pth_inference", onnx=False).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..inference import TorchBackend
    # Grad-CAM uses the backend's own checkpoint, on its device (TorchBackend.explainer)
    return run_cli(args, lambda: TorchBackend(resolve_default(args.checkpoint, CHECKPOINT_PATH, "--checkpoint"),
                                              args.device), cam_checkpoint=args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
