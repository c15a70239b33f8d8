"""What the measuring scripts share: writing a result as <out>.json + <out>.md, and adding fitted
statistics (never weights) to a model's checkpoint and ONNX meta."""
from __future__ import annotations

import json
from pathlib import Path


def write_result(out, rep: dict, md) -> None:
    """<out>.json (the numbers) and <out>.md (the table; a list of lines or one string); folders made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    out.with_suffix(".md").write_text(md if isinstance(md, str) else "\n".join(md) + "\n")


def add_to_model(checkpoint, onnx_path, ck_update: dict, meta_update: dict) -> None:
    """Add fitted statistics (not weights) to the checkpoint (atomically) and the ONNX meta beside the
    model; the meta's source_checkpoint hash follows the checkpoint, since the graph still comes from it."""
    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    from cxrkit.core.io_utils import meta_path_for, sha256_file, write_json_atomic
    ck = load_checkpoint(checkpoint)
    ck.update(ck_update)
    atomic_torch_save(ck, checkpoint)
    meta_p = meta_path_for(onnx_path)
    meta = json.loads(Path(meta_p).read_text())
    meta.update(meta_update)
    src = meta.get("source_checkpoint") or {}
    if src.get("file") == Path(checkpoint).name:
        meta["source_checkpoint"] = {**src, "sha256": sha256_file(checkpoint),
                                     "note": f"{', '.join(meta_update)} added after export (weights unchanged)"}
    write_json_atomic(meta_p, meta)
