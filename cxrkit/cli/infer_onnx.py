"""Batch inference with an exported ONNX model (ONNX Runtime): annotated PNGs, predictions.csv,
summary.json.

  python run_onnx_inference.py --data_dir DATA --onnx_path models/covid_multitask.onnx
  python run_onnx_inference.py --images a.png --use_cuda
  python run_onnx_inference.py --data_dir DATA --gradcam --checkpoint model_checkpoints/best_covid_model.pth

Class names, input size and the calibration temperature come from <onnx_path>.meta.json (written by
export_to_onnx.py). Same pipeline and outputs as run_model_pth_inference.py. Research software: not
for diagnosis.
"""
from __future__ import annotations

import sys

from ..core.config import ONNX_PATH
from .infer import inference_parser, run_cli
from ..core.shipped import resolve_default


def _model_args(g):
    g.add_argument("--onnx_path", default=ONNX_PATH,
                   help="exported model (the default is also found in the installed package)")
    g.add_argument("--meta_path", default=None, help="meta file; None = <onnx_path>.meta.json")
    g.add_argument("--use_cuda", action="store_true",
                   help="CUDAExecutionProvider first, CPU as fallback (warns and uses CPU when CUDA is unavailable)")
    g.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                   help="ONNX Runtime execution providers in priority order (e.g. CUDAExecutionProvider, or "
                        "cuda cpu); CPU is always appended as the fallback")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = number of physical cores)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: BF16 in OpenVINO where the CPU has AMX or AVX-512 BF16, OpenVINO is installed "
                        "(the [fast] extra) and the model's own BF16 check passed, else FP32 in ONNX Runtime; "
                        "summary.json says which ran and why")


def parse_args(argv=None):
    return inference_parser(__doc__, _model_args, "out/onnx_inference", onnx=True).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..inference import OnnxBackend

    def make_backend():
        onnx_path = resolve_default(args.onnx_path, ONNX_PATH, "--onnx_path")  # the installed copy too
        return OnnxBackend(onnx_path, args.meta_path, providers=args.providers, use_cuda=args.use_cuda,
                           intra_op_threads=args.threads or None, precision=args.precision)

    # Grad-CAM: gradients from --checkpoint, on CUDA with --use_cuda (OnnxBackend.explainer)
    return run_cli(args, make_backend, cam_checkpoint=args.checkpoint,
                   cam_mismatch_ok=args.cam_checkpoint_mismatch_ok)


if __name__ == "__main__":
    sys.exit(main())
