"""Leave-one-source-out and cross-pool tables: one training run per held-out source (model_arch.py
--holdout_source), then its accuracy on that source with a Wilson 95% interval, in one table.

    # leave-one-source-out over the class folders of two roots (a source = root:class folder); every source
    # that shares its class with another source is held out once
    python scripts/source_protocols.py --data_dir ../shared/data/cxr4 ../shared/data/db_extra \
        --source_rule '^[^/]+/([^/]+)/' --out runs/loso -- --num_epochs 10 --aug_clahe 0.5
    # cross-pool: the roots themselves are the sources (train cxr4 -> test db_extra, and the reverse)
    python scripts/source_protocols.py --data_dir ../shared/data/cxr4 ../shared/data/db_extra --out runs/xpool

Arguments after `--` go to model_arch.py (the recipe). Each run writes runs/<out>/<source>/; a finished
run is reused (its test report), so an interrupted table continues where it stopped. Writes
<out>/table.md and <out>/table.json. On 2 CPU cores one lite0 run of 10 epochs on cxr4 + db_extra takes
about 35 minutes: budget the number of sources accordingly."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def eligible(sources, labels) -> list[str]:
    """Sources with >= 2 classes, or sharing a class with another source (the issue's LOSO rule)."""
    import numpy as np
    src = np.asarray(sources, dtype=object)
    classes_of = {s: set(labels[src == s].tolist()) for s in sorted(set(sources))}
    out = []
    for s, cs in classes_of.items():
        others = set().union(*(c for t, c in classes_of.items() if t != s))
        if len(cs) >= 2 or cs & others:
            out.append(s)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", nargs="+", required=True)
    p.add_argument("--source_rule", default="")
    p.add_argument("--sources", nargs="*", default=None, help="hold out only these (default: every eligible one)")
    p.add_argument("--out", required=True)
    p.add_argument("--cache_dir", default=None)
    a = p.parse_args(argv)
    from cxrkit.training.data import load_data
    out = Path(a.out)
    cache = Path(a.cache_dir or out / "cache")
    data = load_data(a.data_dir, 128, cache, 2, 0, 1, progress=False, source_rule=a.source_rule)
    todo = a.sources or eligible(data.sources, data.labels)
    rows = {}
    for s in todo:
        run = out / s.replace("/", "_").replace(":", "_")
        rep_p = run / "test_results" / "classification_report.json"
        if not rep_p.is_file():
            cmd = [sys.executable, str(ROOT / "model_arch.py"), "--data_dir", *a.data_dir, "--holdout_source", s,
                   "--output_dir", str(run), "--cache_dir", str(cache), "--quiet", "--no_report",
                   *(["--source_rule", a.source_rule] if a.source_rule else []), *extra]
            print("running:", " ".join(cmd), flush=True)
            if subprocess.call(cmd) != 0:
                print(f"{s}: the run failed; see {run}", flush=True)
                continue
        rep = json.loads(rep_p.read_text())
        b = rep["by_source"][s]
        rows[s] = {"images": b["images"], "classes": b["classes"], "accuracy": b["accuracy"],
                   "accuracy_ci95": b["accuracy_ci95"], "run": str(run)}
    md = ["| held-out source | images (classes) | accuracy [95% CI] |", "|---|---|---|"]
    md += [f"| {s} | {r['images']} ({', '.join(f'{c} {n}' for c, n in r['classes'].items())}) | "
           f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.3f}, {r['accuracy_ci95'][1]:.3f}] |" for s, r in rows.items()]
    print("\n".join(md))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "table.json").write_text(json.dumps({"recipe": extra, "data_dir": a.data_dir,
                                                "source_rule": a.source_rule, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
