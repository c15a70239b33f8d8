"""Light file helpers shared by the torch side (export, training) and the ONNX Runtime inference path.

This module must stay free of torch / MONAI imports: `cxrkit.inference` imports it on the CPU ONNX
path, whose start-up time matters (importing torch alone costs ~1.5 s there).

* Atomic file writes: write a temp file in the same folder, then os.replace (never a torn file).
* The exported graph's input/output names and the side-car `<model>.onnx.meta.json` path.
* The CLIs' shared argparse help formatter.
* SHA-256 of a file (meta files record the ONNX model's and source checkpoint's hashes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

# ONNX graph contract (see cxrkit.export): one input, two outputs
INPUT_NAME = "image"
OUTPUT_NAMES = ("segmentation", "classification")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """For every CLI: shows defaults and keeps the description's line breaks (usage examples)."""


class UsageError(ValueError):
    """A wrong flag value or flag combination; str() is a one-line message with the fix."""


def write_json_atomic(path, obj, indent: int | None = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def meta_path_for(onnx_path) -> Path:
    """The side-car meta file of an ONNX model: `<onnx_path>.meta.json`."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".meta.json")
