#!/usr/bin/env python
"""Train and evaluate (--evaluate) the multi-task network: `python model_arch.py --help`.

A thin door onto cxrkit.cli.train (also `cxrkit train` once installed)."""
import sys

from cxrkit.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
