"""Light file helpers shared by the torch side (export, training) and the ONNX Runtime inference path.

The ONNX inference path imports it, so it stays torch-free on import (why: cxrkit/inference/__init__.py; tests/test_inference.py enforces it).

* Atomic file writes: write a temp file in the same folder, then os.replace (never a torn file).
* The exported graph's input/output names and the side-car `<model>.onnx.meta.json` path.
* The CLIs' shared argparse help formatter.
* SHA-256 of a file (meta files record the ONNX model's and source checkpoint's hashes).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

from .errors import os_error

# ONNX graph contract (see cxrkit.training.export): one input, two outputs
INPUT_NAME = "image"
OUTPUT_NAMES = ("segmentation", "classification")
OOD_OUTPUT = "ood_score"  # optional third output: (B,) out-of-distribution score (cxrkit.core.ood_head)


# the largest --batch_size any CLI takes (inference and training): a batch of 100000 held 4.3 GB at 1,000
# images, with no gain in speed
MAX_BATCH_SIZE = 1024


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """For every CLI: shows defaults and keeps the description's line breaks (usage examples)."""


def tmp_name(path) -> Path:
    """A temporary name next to `path`, unique per process and thread (never `<file>.tmp`, which two
    runs or two threads would share)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path):
    """The one atomic-write pattern: yields a temp path unique to this process and thread in the same
    folder; when the block succeeds it replaces `path` (os.replace), when it fails it is removed. So a
    crash or a second run never leaves a torn or mixed file. An OSError (disk full, no permission,
    read-only file system) becomes cxrkit.core.errors.OutputWriteError: one line naming `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # disk full, no permission, read-only: one line naming the file (cxrkit.core.errors)
        raise os_error(e, path) from None
    finally:
        try:
            tmp.unlink()
        except OSError:  # never written, or already replaced
            pass


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path, obj, indent: int | None = 2) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())


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


# ----------------------------------------------------------------- ONNX graph <-> meta file binding
# export_to_onnx writes these into the graph's own metadata_props (ONNX key/value strings), and the
# meta file gets the same random meta_id: the loader (cxrkit.inference.OnnxBackend, reading them with
# onnxruntime's get_modelmeta(), no onnx / torch import) refuses a meta file whose class names, their
# order, image size, temperature, lung-area range or identity disagree with the graph's.
GRAPH_KEY_PREFIX = "cxrkit_"


def graph_binding(meta: dict) -> dict[str, str]:
    """The metadata_props an export writes, from its meta dict."""
    out = {"cxrkit_meta_id": str(meta["meta_id"]),
           "cxrkit_class_names": json.dumps([str(c) for c in meta["class_names"]]),
           "cxrkit_img_size": str(int(meta["img_size"])),
           "cxrkit_temperature": repr(float(meta["temperature"]))}
    if meta.get("lung_area_range") is not None:
        out["cxrkit_lung_area_range"] = json.dumps(meta["lung_area_range"], sort_keys=True)
    if (meta.get("ood") or {}).get("threshold") is not None:
        out["cxrkit_ood_threshold"] = repr(float(meta["ood"]["threshold"]))
    return out


def binding_mismatches(props: dict, meta: dict) -> list[str]:
    """What a meta dict says differently from the graph's cxrkit_* metadata_props; [] when they agree.
    Each entry is a short phrase, e.g. "class names (graph ['A', 'B'], meta ['B', 'A'])"."""
    def parse(key, raw):
        if key in ("cxrkit_class_names", "cxrkit_lung_area_range"):
            return json.loads(raw)
        if key == "cxrkit_img_size":
            return int(raw)
        if key in ("cxrkit_temperature", "cxrkit_ood_threshold"):
            return float(raw)
        return raw

    graph = {k: v for k, v in props.items() if k.startswith(GRAPH_KEY_PREFIX)}
    try:
        want = graph_binding({**meta, "meta_id": meta.get("meta_id", "")})
    except (KeyError, TypeError, ValueError):
        return ["its fields (unreadable class_names / img_size / temperature)"]
    labels = {"cxrkit_meta_id": "identity (meta_id)", "cxrkit_class_names": "class names or their order",
              "cxrkit_img_size": "image size", "cxrkit_temperature": "temperature",
              "cxrkit_lung_area_range": "lung-area range", "cxrkit_ood_threshold": "OOD threshold"}
    out = []
    for key in sorted(set(graph) | set(want)):
        if key not in labels:
            continue
        try:
            g = parse(key, graph[key]) if key in graph else None
            m = parse(key, want[key]) if key in want else None
        except (ValueError, TypeError):
            g, m = graph.get(key), want.get(key)
        if g != m:
            out.append(f"{labels[key]} (graph {g!r}, meta {m!r})")
    return out
