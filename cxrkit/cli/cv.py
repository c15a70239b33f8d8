"""cxrkit cv RUN_DIR [RUN_DIR ...] --out D: pool the out-of-fold predictions of k-fold runs
(cxrkit.training.cv): figures with 95% intervals, ensembles and paired differences."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UsageError
from ..training.cv import cv_report, markdown
from .common import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pool the out-of-fold predictions of k-fold runs: figures with "
                                            "95%% intervals, ensembles and paired differences.")
    p.add_argument("run_dirs", nargs="+", help="folders holding fold*/test_results/oof_predictions.npz")
    p.add_argument("--out", default=None, help="write cv_report.json and cv_report.md here (a folder)")
    p.add_argument("--allow_incomplete", action="store_true",
                   help="pool a run set even when folds of its --folds K (its split.json files) have no "
                        "oof_predictions.npz yet; the report says which are missing (default: refused)")
    a = p.parse_args(argv)
    return run_command(lambda: _pool(a), user_errors=(ValueError,))


def _check_out(out: Path) -> None:
    """--out is a folder (created when missing): refuse a regular file there or above it before pooling."""
    for q in (out, *out.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                where = f"--out {out}" if q == out else f"--out {out}: {q}"
                raise UsageError(f"{where} is a file, not a folder: --out takes a folder for cv_report.json and "
                                 f"cv_report.md (created when missing); choose another path")
            return


def _pool(a) -> int:
    if a.out:
        _check_out(Path(a.out))
    rep = cv_report(a.run_dirs, a.allow_incomplete)
    md = markdown(rep)
    print(md)
    if a.out:
        from ..core.io_utils import write_json_atomic, write_bytes_atomic
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "cv_report.json", rep)
        write_bytes_atomic(out / "cv_report.md", md.encode())
    return 0



if __name__ == "__main__":
    sys.exit(main())
