"""cxrkit merge SHARD_DIR ... --out D (cxrkit-merge): the shards of one --shard K/N run as one
folder, exactly as a single run would have written it (cxrkit.inference.shard)."""
from __future__ import annotations

import argparse
import sys

from ..inference.shard import __doc__ as SHARD_DOC, merge
from .common import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cxrkit-merge", description=SHARD_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dirs", nargs="+", help="the N --save_dir folders of one --shard K/N run")
    p.add_argument("--out", required=True, help="merged predictions.csv, summary.json, report.html")
    p.add_argument("--overwrite", action="store_true", help="--out holds an earlier merge: replace its files")
    p.add_argument("--no_report", action="store_true", help="no report.html")
    a = p.parse_args(argv)
    # ValueError / KeyError: a shard folder's files are not what a shard run writes
    return run_command(lambda: _merge(a), user_errors=(ValueError, KeyError))


def _merge(a) -> int:
    s = merge(a.shard_dirs, a.out, overwrite=a.overwrite, report=not a.no_report)
    line = f"merged {len(a.shard_dirs)} shards: {s['n_processed']} images ({s['n_skipped']} skipped)"
    if s.get("classification"):
        line += f" | accuracy {s['classification']['accuracy']:.3f} macro-F1 {s['classification']['macro_f1']:.3f}"
    print(line + f" | outputs in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
