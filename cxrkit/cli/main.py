"""`cxrkit COMMAND [ARGS...]`: one door onto every command (each also has its own entry point).

    cxrkit train ...        (model_arch.py)           cxrkit evaluate ...  (model_arch.py --evaluate)
    cxrkit export ...       (export_to_onnx.py)       cxrkit infer ...     (run_onnx_inference.py)
    cxrkit infer-pth ...    (run_model_pth_inference.py)
    cxrkit merge ...        cxrkit cv ...             cxrkit ensemble ...  cxrkit synth ...
"""
from __future__ import annotations

import importlib
import sys

from .common import fail

# command -> (module under cxrkit.cli, arguments put before the user's)
COMMANDS = {"train": ("train", []), "evaluate": ("train", ["--evaluate"]), "export": ("export", []),
            "infer": ("infer_onnx", []), "infer-pth": ("infer_pth", []), "merge": ("merge", []),
            "cv": ("cv", []), "ensemble": ("ensemble", []), "synth": ("synth", [])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__
        print(f"cxrkit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        return fail(f"unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)} (cxrkit --help)")
    module, pre = COMMANDS[argv[0]]
    cmd = importlib.import_module(f"{__package__}.{module}")
    return cmd.main(pre + argv[1:])
