#!/usr/bin/env python
"""Batch inference with an exported ONNX model (ONNX Runtime, torch-free): `python run_onnx_inference.py --help`.

A thin door onto cxrkit.cli.infer_onnx (also `cxrkit infer` once installed)."""
import sys

from cxrkit.cli.infer_onnx import main

if __name__ == "__main__":
    sys.exit(main())
