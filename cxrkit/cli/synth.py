"""cxrkit synth --out demo_data --per_class 40: SYNTHETIC chest-X-ray-like images with lung masks
(cxrkit.training.synthetic), for the demo and the tests; not real radiographs."""
from __future__ import annotations

import argparse
import sys

from ..core.config import DEFAULT_CLASSES
from ..training.synthetic import __doc__ as SYNTH_DOC, generate
from .common import run_command

__doc__ = SYNTH_DOC  # noqa: F811 - the parser's description


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_data")
    p.add_argument("--per_class", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return run_command(lambda: _make(a))


def _make(a) -> None:
    generate(a.out, a.per_class, a.seed)
    print(f"wrote {a.per_class * len(DEFAULT_CLASSES)} SYNTHETIC images with masks to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
