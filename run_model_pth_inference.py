#!/usr/bin/env python
"""Batch inference with a PyTorch checkpoint: `python run_model_pth_inference.py --help`.

A thin door onto cxrkit.cli.infer_pth (also `cxrkit infer-pth` once installed)."""
import sys

from cxrkit.cli.infer_pth import main

if __name__ == "__main__":
    sys.exit(main())
