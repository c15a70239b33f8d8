"""cxrkit cv RUN_DIR [RUN_DIR ...] --out D: pool the out-of-fold predictions of k-fold runs
(cxrkit.training.cv): figures with 95% intervals, ensembles and paired differences."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..training.cv import cv_report, markdown
from .common import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pool the out-of-fold predictions of k-fold runs: figures with "
                                            "95%% intervals, ensembles and paired differences.")
    p.add_argument("run_dirs", nargs="+", help="folders holding fold*/test_results/oof_predictions.npz")
    p.add_argument("--out", default=None, help="write cv_report.json and cv_report.md here")
    a = p.parse_args(argv)
    return run_command(lambda: _pool(a), user_errors=(ValueError,))


def _pool(a) -> int:
    rep = cv_report(a.run_dirs)
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
