"""Export a trained checkpoint to ONNX (+ <model>.onnx.meta.json) and check it against PyTorch.

  python export_to_onnx.py --checkpoint model_checkpoints/best_covid_model.pth \
      --onnx_path models/covid_multitask.onnx

Graph: input `image` (B, 3, H, W) float32 RGB in [0, 1]; outputs `segmentation` (lung
probabilities) and `classification` (logits; calibrated probabilities = softmax(logits / T), T in the
meta file). Research software: not for diagnosis.
"""
from __future__ import annotations

import argparse
import sys

from ..core.config import CHECKPOINT_PATH, ONNX_PATH, ExportConfig
from ..core.io_utils import HelpFormatter
from .common import run_command

E = ExportConfig()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("files")
    g.add_argument("--checkpoint", default=CHECKPOINT_PATH, help="trained cxrkit checkpoint")
    g.add_argument("--onnx_path", default=ONNX_PATH,
                   help="output model; the meta file is written next to it as <onnx_path>.meta.json")
    g = p.add_argument_group("export")
    g.add_argument("--img_size", type=int, default=None, help="input size; None = the checkpoint's training size")
    g.add_argument("--opset", type=int, default=E.opset, help="ONNX opset (the dynamo fallback exporter needs >= 18)")
    g.add_argument("--no_dynamic_batch", dest="dynamic_batch", action="store_false",
                   help="fix the batch dimension to 1 instead of a dynamic 'batch' axis (dynamic batch: %(default)s)")
    g.add_argument("--exporter", default=E.exporter, choices=["auto", "torchscript", "dynamo"],
                   help="auto = TorchScript exporter (dynamo=False) first, torch.export-based one if that fails")
    g.add_argument("--device", default=E.device, help="device the model is traced on (cpu, cuda, cuda:N)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --onnx_path and its meta file (without it they are refused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        from ..training.export import export_to_onnx, meta_path_for
        meta = export_to_onnx(args.checkpoint, args.onnx_path, img_size=args.img_size, opset=args.opset,
                              dynamic_batch=args.dynamic_batch, device=args.device, exporter=args.exporter,
                              overwrite=args.overwrite)
        worst = max(max(v["max_abs_diff_class_prob"], v["max_abs_diff_class_prob_calibrated"])
                    for v in meta["parity"]["batches"].values())
        worst_seg = max(v["max_abs_diff_seg_prob"] for v in meta["parity"]["batches"].values())
        print(f"wrote {args.onnx_path} (opset {meta['opset']}, {meta['exporter']}, {meta['img_size']}px, "
              f"{'dynamic' if meta['dynamic_batch'] else 'fixed'} batch) and {meta_path_for(args.onnx_path)} | "
              f"parity vs PyTorch at batch {', '.join(meta['parity']['batches'])}: class prob {worst:.2g}, "
              f"seg prob {worst_seg:.2g} | classes {meta['class_names']}, T={meta['temperature']:.3f}")
        return 0

    # ValueError: a checkpoint or flag value the export cannot take; RuntimeError: the exporters or the
    # parity check failed (exit 1)
    return run_command(body, user_errors=(ValueError,), failures=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
