"""Where the shipped model files are, whatever the working directory.

The defaults `models/covid_multitask.onnx` and `model_checkpoints/best_covid_model.pth`
(cxrkit.core.config) are relative paths. `resolve_default` keeps a path that exists; for a default that
does not exist under the working directory it looks, in order, in

  1. the source checkout this package was imported from (an editable install, or running from the
     repository: <checkout>/models/...), and
  2. the data files a wheel installs: <prefix>/share/cxrkit/models/ for sys.prefix and the user
     base (pyproject.toml ships the ONNX model and its meta there; the .pth checkpoint is not in
     the wheel),

and otherwise raises FileNotFoundError with one line naming the flag to pass. Torch-free.
"""
from __future__ import annotations

import site
import sys
from pathlib import Path

SHARE_DIR = Path("share") / "cxrkit" / "models"


def candidates(default: str) -> list[Path]:
    """Places a default model path may be found, best first (the working directory not included)."""
    rel = Path(default)
    out = [Path(__file__).resolve().parents[2] / rel]  # the checkout (cxrkit/core/ is two levels down)
    prefixes = [sys.prefix, getattr(sys, "base_prefix", sys.prefix)]
    try:
        prefixes.append(site.getuserbase())
    except Exception:  # noqa: BLE001 - no user base (embedded interpreters)
        pass
    for pre in dict.fromkeys(prefixes):
        out.append(Path(pre) / SHARE_DIR / rel.name)
    return out


def resolve_default(path, default: str, flag: str) -> Path:
    """`path` when it exists or is not the default; else the first installed copy of the default.
    A missing default is a one-line FileNotFoundError naming `flag`."""
    p = Path(path)
    if p.exists() or str(path) != str(default):
        return p
    for c in candidates(default):
        if c.is_file():
            return c
    hint = ""
    from .config import CHECKPOINT_PATH
    if str(default) == CHECKPOINT_PATH:  # the wheel carries the ONNX model only (32 MB less to install)
        hint = (f" (the shipped checkpoint is not in the wheel: take {CHECKPOINT_PATH} from the project's git "
                f"repository; its SHA-256 is source_checkpoint.sha256 in the installed ONNX meta)")
    raise FileNotFoundError(f"{flag} {default}: not found under the working directory, the source checkout or "
                            f"the installed package ({sys.prefix}/{SHARE_DIR}); pass {flag} PATH{hint}")
