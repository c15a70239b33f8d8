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
    """For every CLI: shows defaults and keeps the description's line breaks (usage examples). A help
    text that states its own default, or a default of None (nothing to show), gets no "(default: ...)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


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


_MODEL_SHA256: dict[tuple, str] = {}
_MODEL_SHA256_LOCK = threading.Lock()


def model_sha256(path) -> str:
    """A model file's SHA-256, computed once a process: a run records or checks it in several places (the
    binding check, OpenVINO's cache folder, the summary's provenance, the DICOM writer's device identity).
    Keyed by the file's inode, size, mtime and ctime: a replaced, rewritten or re-timestamped file (copy2 and
    utime change ctime) is hashed again. Only for model files: output checks use sha256_file, uncached."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _MODEL_SHA256_LOCK:
        if key not in _MODEL_SHA256:
            _MODEL_SHA256[key] = sha256_file(path)
        return _MODEL_SHA256[key]


def meta_path_for(onnx_path) -> Path:
    """The side-car meta file of an ONNX model: `<onnx_path>.meta.json`."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".meta.json")


# ----------------------------------------------------------------- ONNX graph <-> meta file binding
# export_to_onnx writes cxrkit_* entries into the graph's own metadata_props (ONNX key/value strings), and
# the meta file gets the same random meta_id: the loader (cxrkit.inference.OnnxBackend, reading them with
# onnx_metadata_props below, no onnx / torch / session needed) refuses a meta file whose class names, their
# order, image size, temperature, lung-area range or identity disagree with the graph's
# (cxrkit.core.model_meta.ModelMeta.graph_binding / binding_mismatches).
GRAPH_KEY_PREFIX = "cxrkit_"


def onnx_metadata_props(path) -> dict[str, str] | None:
    """An ONNX file's own metadata_props (ModelProto field 14: key/value strings), read from the protobuf
    wire format directly: a few small reads that seek past the graph, so neither onnx nor an inference
    session is needed to check the binding. None for a file this reader cannot walk (not a ModelProto, torn,
    or using the deprecated group wire types)."""
    def varint(f) -> int | None:
        shift = out = 0
        while True:
            b = f.read(1)
            if not b:
                return None
            out |= (b[0] & 0x7F) << shift
            if b[0] < 0x80:
                return out
            shift += 7

    def fields(buf: bytes):  # (field number, bytes) of one StringStringEntryProto's length-delimited fields
        import io
        f = io.BytesIO(buf)
        while (key := varint(f)) is not None:
            if key & 7 != 2:
                return
            n = varint(f)
            yield key >> 3, f.read(n or 0)

    props = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while (key := varint(f)) is not None:
            wire, num = key & 7, key >> 3
            if wire == 0:
                varint(f)
            elif wire == 2:
                n = varint(f)
                if n is None or f.tell() + n > size:
                    return None
                if num == 14:
                    kv = dict(fields(f.read(n)))
                    props[kv.get(1, b"").decode("utf-8", "replace")] = kv.get(2, b"").decode("utf-8", "replace")
                else:
                    f.seek(n, 1)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            else:
                return None
    return props
