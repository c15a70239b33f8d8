#!/usr/bin/env python
"""The real-use benchmark (`make benchmark`): run_onnx_inference.py as a whole process (start-up,
imports and session included) over image sets that look like what users hold, in the default mode
(annotated PNGs + report) and the bulk mode (`--outputs csv`), each beside the plain seed pipeline
(one image at a time, eager PyTorch, the original `seed` model at 256 px, one matplotlib figure per
image) measured in the same run. A benchmark, not a test.

    python scripts/benchmark_real_use.py                      # every set, both modes
    python scripts/benchmark_real_use.py --sets png256 --modes bulk --n_small 687

Sets (scripts/benchmark_sets.py, made from real films into --work, never committed): 48 and --n_small
real 256-px PNGs; --n_full films at 2048 x 2048 16-bit PNG, 2500 x 3000 DICOM (uncompressed and JPEG
Lossless) and 2048 x 2048 JPEG. Printed per row: images/s of the whole process, its peak RSS, the
precision and engine that ran (summary.json backend_info), and the stage times the pipeline summed
(decode, preprocess, model, write; they overlap across threads). The CPU model and its SIMD flags
head the output. --decode_compare runs the named sets in bulk mode with decoding in threads and in
processes. --memory_check also runs bulk PNG-256 at 4x and 16x --n_small images (the same films
repeated): peak RSS must not grow with the number of images. Run it on an idle machine; compare figures within one run."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_inference import plain_per_image_pipeline, run_script_subprocess  # noqa: E402
from benchmark_sets import SETS, make_set, real_films  # noqa: E402

MODES = {"default": [], "bulk": ["--outputs", "csv"]}


def model_only_rows(onnx_path, films, batches=(1, 8, 16, 32, 64)) -> list[dict]:
    """ms per image of the model alone (preprocessed real films in, outputs out; median of 5 passes over
    64 images), per precision that runs here and batch size: the engine and batch-size choice."""
    import statistics
    import numpy as np
    from cxrkit.core.errors import InferenceError
    from cxrkit.core.model_input import load_for_model, to_model_input_np
    from cxrkit.inference.backends import OnnxBackend
    rows = []
    for prec in ("fp32", "bf16"):
        try:
            b = OnnxBackend(onnx_path, precision=prec, fp32_referee=False)  # the model alone
        except InferenceError as e:
            print(f"model only, {prec}: not here ({e})")
            continue
        x = to_model_input_np(np.stack([load_for_model(f, b.img_size) for f in films[:64]]))
        for bs in batches:
            b.forward_ood(x[:bs])  # warm-up (first call of a shape)
            t = []
            for _ in range(5):
                t0 = time.perf_counter()
                for i in range(0, len(x), bs):
                    b.forward_ood(x[i:i + bs])
                t.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(t) / len(x)
            rows.append({"set": "model only", "mode": f"{prec} batch {bs}", "engine": b.engine.name,
                         "ms_per_image": ms, "images_per_s": 1000 / ms})
            print(f"model only  {prec} {b.engine.name:<12} batch {bs:>3}: {ms:6.2f} ms/image ({1000 / ms:7.1f} img/s)",
                  flush=True)
    return rows


def seed_rate(paths, tmp: Path) -> float:
    """Images/s of the plain seed pipeline over `paths` (random-init `seed` preset at 256 px)."""
    import torch
    from cxrkit.core.config import make_config
    from cxrkit.core.model import build_model
    torch.manual_seed(0)
    model = build_model(make_config("seed", num_classes=4)).eval()
    s = plain_per_image_pipeline(model, paths, 256, 1.0, ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"],
                                 tmp / "plain_seed")
    shutil.rmtree(tmp / "plain_seed", ignore_errors=True)
    return len(paths) / s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "cxr4"), help="real X-rays")
    p.add_argument("--onnx_path", default=str(REPO / "models" / "covid_multitask.onnx"))
    p.add_argument("--sets", default="png48," + ",".join(SETS), help="png48 = 48 real 256-px PNGs")
    p.add_argument("--modes", default="default,bulk")
    p.add_argument("--n_small", type=int, default=687, help="real 256-px PNGs in the png256 set")
    p.add_argument("--n_full", type=int, default=200,
                   help="films in each full-size set (a whole process's start-up, ~0.5 s, weighs on small sets)")
    p.add_argument("--n_seed", type=int, default=24, help="images the plain seed pipeline times per set")
    p.add_argument("--precision", default="auto", help="run_onnx_inference.py --precision")
    p.add_argument("--extra", default="", help="more run_onnx_inference.py arguments, space-separated")
    p.add_argument("--decode_compare", default="png16",
                   help="sets also run in bulk mode with --decode threads and --decode processes (comma list)")
    p.add_argument("--memory_check", action="store_true")
    p.add_argument("--model_only", action="store_true", help="also the model alone per precision and batch size")
    p.add_argument("--work", default=None, help="where the sets are made (default: a temporary folder)")
    p.add_argument("--json_out", default=None)
    a = p.parse_args(argv)
    from cxrkit.core import cpu
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cxr_realuse_"))
    tmp = Path(tempfile.mkdtemp(prefix="cxr_realuse_out_"))
    info = {"cpu": cpu.describe(), "logical_cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "command": "python scripts/benchmark_real_use.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"CPU: {info['cpu']['model']} | flags: {' '.join(info['cpu']['flags'])} | {os.cpu_count()} logical CPUs "
          f"| load average {info['load_average_at_start'][0]:.2f}", flush=True)
    sets = [s for s in a.sets.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    small = real_films(a.data_dir, max(a.n_small, 48), seed=0)
    full_src = real_films(a.data_dir, a.n_full, seed=1)
    rows = model_only_rows(a.onnx_path, small) if a.model_only else []
    for name in sets:
        t0 = time.perf_counter()
        folder = (make_set("png48", small[:48], work) if name == "png48" else
                  make_set(name, small[:a.n_small] if name == "png256" else full_src, work))
        files = sorted(q for q in folder.iterdir() if not q.name.startswith("."))
        made = time.perf_counter() - t0
        seed = seed_rate(files[:a.n_seed] if name != "png48" else files, tmp)
        for mode in modes:
            out = tmp / f"{name}_{mode}"
            wall, mib, summ = run_script_subprocess(a.onnx_path, [], out, 16,
                                                    ["--data_dir", str(folder), "--num_samples", "0"],
                                                    MODES[mode] + ["--precision", a.precision] + a.extra.split())
            bi, th = summ["backend_info"], summ["throughput"]
            r = {"set": name, "mode": mode, "images": summ["n_processed"], "skipped": summ.get("n_skipped"),
                 "seconds": wall, "images_per_s": summ["n_processed"] / wall, "peak_rss_mib": mib,
                 "seed_images_per_s": seed, "vs_seed": summ["n_processed"] / wall / seed,
                 "engine": bi.get("engine"), "precision": bi.get("precision"), "stage_seconds": th["stage_seconds"],
                 "pipeline_seconds": th["seconds"], "set_made_s": made}
            rows.append(r)
            st = r["stage_seconds"]
            print(f"{name:<11} {mode:<8} {r['images']:>5} img {wall:7.2f} s {r['images_per_s']:7.1f} img/s "
                  f"({r['vs_seed']:5.1f}x seed {seed:5.2f} img/s) {mib:6.0f} MiB peak | {r['precision']} "
                  f"{r['engine']} | decode {st['decode']:.2f} prep {st['preprocess']:.2f} model {st['model']:.2f} "
                  f"write {st['write']:.2f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    by = {(r["set"], r["mode"]): r for r in rows}
    for name in sets:
        if (name, "default") in by and (name, "bulk") in by:
            print(f"{name}: default mode at {by[(name, 'default')]['images_per_s'] / by[(name, 'bulk')]['images_per_s']:.2f}"
                  f" of bulk mode's throughput")
    for name in [x for x in a.decode_compare.split(",") if x and x in sets]:
        for mode in ("threads", "processes"):
            wall, mib, summ = run_script_subprocess(a.onnx_path, [], tmp / "dec", 16,
                                                    ["--data_dir", str(work / name), "--num_samples", "0"],
                                                    MODES["bulk"] + ["--precision", a.precision, "--decode", mode])
            rows.append({"set": name, "mode": f"bulk, --decode {mode}", "images": summ["n_processed"],
                         "seconds": wall, "images_per_s": summ["n_processed"] / wall, "peak_rss_mib": mib,
                         "stage_seconds": summ["throughput"]["stage_seconds"]})
            print(f"{name:<11} bulk --decode {mode:<9} {summ['n_processed']:>5} img {wall:7.2f} s "
                  f"{summ['n_processed'] / wall:7.1f} img/s {mib:6.0f} MiB peak", flush=True)
            shutil.rmtree(tmp / "dec", ignore_errors=True)
    if a.memory_check:  # peak RSS at 4x and 16x the png256 set (the same films repeated)
        for k in (4, 16):
            folder = make_set(f"png256x{k}", [f for f in small[:a.n_small] for _ in range(k)], work)
            wall, mib, summ = run_script_subprocess(a.onnx_path, [], tmp / "mem", 16,
                                                    ["--data_dir", str(folder), "--num_samples", "0"],
                                                    MODES["bulk"] + ["--precision", a.precision])
            rows.append({"set": folder.name, "mode": "bulk (memory)", "images": summ["n_processed"],
                         "seconds": wall, "images_per_s": summ["n_processed"] / wall, "peak_rss_mib": mib})
            print(f"memory: {summ['n_processed']} images, peak RSS {mib:.0f} MiB "
                  f"({summ['n_processed'] / wall:.1f} img/s)", flush=True)
            shutil.rmtree(tmp / "mem", ignore_errors=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({**info, "rows": rows}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
