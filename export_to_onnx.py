#!/usr/bin/env python
"""Export a checkpoint to ONNX and check it against PyTorch: `python export_to_onnx.py --help`.

A thin door onto cxrkit.cli.export (also `cxrkit export` once installed)."""
import sys

from cxrkit.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
