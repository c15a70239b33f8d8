"""Atomic file writes: write a temp file in the same folder, then os.replace (never a torn file)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path, obj, indent: int | None = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)
