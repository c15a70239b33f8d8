#!/usr/bin/env python
"""Inference throughput and memory on real X-rays (CPU). A benchmark, not a test.

  python scripts/benchmark_inference.py --checkpoint model_checkpoints/best_covid_model.pth \
      --onnx_path models/covid_multitask.onnx --n_images 48 [--seed_arch_baseline]

Rows (images/s and the process's peak RSS during the row):
  model only      PyTorch / ONNX Runtime, batch 1 and 16: preprocessed tensors in, outputs out
  end to end      cxrkit.inference.run_pipeline in this process (decode threads, model, annotated
                  PNGs, CSV, summary), PyTorch / ONNX Runtime, batch 1 and 16
  plain pipeline  what a naive seed repository does: PyTorch eager, one image at a time, one
                  matplotlib figure per image saved with savefig (same model and size)
  run_onnx_inference.py as a whole process (subprocess, batch 16, overlays + CSV; includes Python
                  start-up, imports and session creation); its ratio over the plain pipeline is printed.
  bulk rows       (--bulk 1000,10000) run_onnx_inference.py as a whole process over --data_dir with
                  --num_samples N: today's default outputs (annotated PNGs + report) at the first N, and the
                  bulk mode `--outputs csv` at every N; prints the CSV-only / default throughput ratio
                  and the CSV-only peak RSS per N. --bulk_only skips every other row.
With --seed_arch_baseline the plain pipeline is also timed with a randomly initialised `seed` preset
model at 256 px (what the original repository shipped).

Peak RSS: the kernel's high-water mark (VmHWM) is reset before each row via /proc/self/clear_refs, so
each in-process row reports its own peak (which includes everything already loaded in the process);
the subprocess row reports that process's own maximum RSS. Where the reset is not allowed, a 5 ms
sampler of VmRSS is used instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrkit.core.io_utils import HelpFormatter  # noqa: E402


# ------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs."""

    def __enter__(self):
        self.exact = _reset_hwm()
        self.peak_kib, self._stop = 0, threading.Event()
        if not self.exact:
            def sample():
                while not self._stop.is_set():
                    self.peak_kib = max(self.peak_kib, _status_kib("VmRSS") or 0)
                    time.sleep(0.005)
            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.peak_kib = _status_kib("VmHWM") or 0
        else:
            self._stop.set()
            self._t.join()
        if not self.peak_kib:  # no /proc: process-lifetime maximum
            import resource
            self.peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = self.peak_kib / 1024
        return False


# ----------------------------------------------------------------------------------- workloads
def model_only(forward, u8: list[np.ndarray], batch: int) -> float:
    from cxrkit.core.model_input import to_model_input_np  # backends take float32 numpy arrays
    forward(to_model_input_np(np.stack(u8[:batch])))  # warm-up (allocations, ORT first-run)
    t0 = time.perf_counter()
    for s in range(0, len(u8), batch):
        forward(to_model_input_np(np.stack(u8[s:s + batch])))
    return time.perf_counter() - t0


def plain_read(path):
    """How a naive script reads a file: OpenCV's 8-bit grey (a DICOM through pydicom, scaled to 8 bits)."""
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        import pydicom
        a = pydicom.dcmread(str(path)).pixel_array.astype(np.float32)
        img = ((a - a.min()) / (a.max() - a.min() + 1e-6) * 255).astype(np.uint8)
    return img


def plain_per_image_pipeline(model, paths, size: int, temperature: float, class_names, out_dir: Path) -> float:
    """The naive loop: read, resize, eager forward of ONE image, one matplotlib figure per image."""
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        img = plain_read(p)
        img = cv2.resize(img, (size, size))
        x = torch.from_numpy(img).float().div(255.0)[None, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            out = model(x)
        probs = torch.softmax(out.classification / temperature, 1)[0].numpy()
        mask = (torch.sigmoid(out.segmentation)[0, 0] > 0.5).numpy()
        pred = int(probs.argmax())
        fig, ax = plt.subplots(1, 3, figsize=(15, 5))
        ax[0].imshow(img, cmap="gray"); ax[0].set_title("input"); ax[0].axis("off")
        ax[1].imshow(img, cmap="gray"); ax[1].imshow(mask, cmap="jet", alpha=0.4)
        ax[1].set_title("predicted lungs"); ax[1].axis("off")
        ax[2].barh(list(class_names), probs); ax[2].set_xlim(0, 1); ax[2].set_title("class probabilities")
        fig.suptitle(f"{Path(p).name}: {class_names[pred]} ({probs[pred]:.1%})")
        fig.savefig(out_dir / f"{i:04d}_result.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    return time.perf_counter() - t0


# Runs a script as __main__ and, at exit, writes the process's own VmHWM (peak RSS after exec) to a
# file. getrusage/wait4's ru_maxrss is not used for this: it also counts the parent's memory that the
# forked child held before exec.
_PEAK_WRAPPER = """import atexit, os, runpy, sys
def _peak():
    try:
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                open(os.environ['CXR_PEAK_RSS_FILE'], 'w').write(line.split()[1])
    except OSError:
        pass
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_script_subprocess(onnx_path, paths, out_dir: Path, batch: int, inputs=None, extra=()):
    """run_onnx_inference.py as its own process; returns (wall seconds, its peak RSS MiB, summary).
    inputs: argv naming the inputs (default: --images PATHS --num_samples 0)."""
    peak_file = out_dir.with_suffix(".peak")
    env = dict(os.environ, CXR_PEAK_RSS_FILE=str(peak_file))
    inputs = list(inputs) if inputs is not None else ["--images", *map(str, paths), "--num_samples", "0"]
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, str(REPO / "run_onnx_inference.py"), "--onnx_path", str(onnx_path),
           *inputs, "--batch_size", str(batch), "--save_dir", str(out_dir), "--quiet", *extra]
    log = out_dir.with_suffix(".log")
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"run_onnx_inference.py failed ({rc}):\n{log.read_text()[-2000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    try:
        mib = int(peak_file.read_text()) / 1024
    except (OSError, ValueError):
        mib = float("nan")
    return wall, mib, summary


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default="model_checkpoints/best_covid_model.pth")
    g.add_argument("--onnx_path", default="models/covid_multitask.onnx",
                   help="exported model (+ .meta.json); exported to a temporary folder when missing")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "cxr4"), help="real X-rays")
    g.add_argument("--n_images", type=int, default=48)
    g.add_argument("--seed", type=int, default=0, help="image sampling seed")
    g = p.add_argument_group("run")
    g.add_argument("--batches", default="1,16", help="comma list of batch sizes for the model-only / e2e rows")
    g.add_argument("--seed_arch_baseline", action="store_true",
                   help="also time the plain pipeline with a random-init `seed` preset model at 256 px")
    g.add_argument("--bulk", default="", metavar="N1,N2",
                   help="bulk rows: whole-process default vs --outputs csv over N images of --data_dir")
    g.add_argument("--bulk_only", action="store_true", help="only the bulk rows")
    g.add_argument("--json_out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def bulk_main(args, sizes) -> int:
    """Bulk rows: run_onnx_inference.py over N images of --data_dir, default outputs vs --outputs csv."""
    import shutil
    onnx_path = Path(args.onnx_path)
    tmp = Path(tempfile.mkdtemp(prefix="cxr_bulk_"))
    rows = []
    print(f"bulk rows: {args.data_dir}, batch 16, ONNX Runtime, whole process | CPU: {os.cpu_count()} logical")

    def one(n, label, extra):
        out = tmp / f"{label}_{n}"
        wall, mib, summ = run_script_subprocess(onnx_path, [], out, 16, ["--data_dir", str(args.data_dir),
                                                                          "--num_samples", str(n), "--seed",
                                                                          str(args.seed)], extra)
        du = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2 ** 20
        r = {"case": f"whole process, {label}", "images": summ["n_processed"], "seconds": wall,
             "images_per_s": summ["n_processed"] / wall, "pipeline_images_per_s":
                 summ["throughput"]["images_per_second"], "peak_rss_mib": mib, "output_mib": du}
        rows.append(r)
        print(f"  {r['case']:<44} {r['images']:>6} img {wall:8.1f} s {r['images_per_s']:8.1f} img/s "
              f"{mib:7.0f} MiB peak {du:8.1f} MiB written", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return r

    base = one(sizes[0], "default outputs (annotated + report)", [])
    csvs = [one(n, "--outputs csv", ["--outputs", "csv"]) for n in sizes]
    ratio = csvs[0]["images_per_s"] / base["images_per_s"]
    print(f"\nCSV-only / default throughput at {sizes[0]} images: {ratio:.2f}x")
    print("CSV-only peak RSS: " + ", ".join(f"{r['images']} images {r['peak_rss_mib']:.0f} MiB" for r in csvs))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"bulk_rows": rows}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from cxrkit.core.checkpoint import CheckpointError
    from cxrkit.core.config import make_config
    from cxrkit.training.export import export_to_onnx, meta_path_for
    from cxrkit.inference import (InferenceError, OnnxBackend, PipelineOptions, TorchBackend,
                                  gather_inputs, run_pipeline)
    from cxrkit.core.model import build_model
    from cxrkit.core.model_input import load_for_model

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.bulk_only:
        return bulk_main(args, [int(b) for b in args.bulk.split(",") if b.strip()] or [1000, 10000])
    tmp = Path(tempfile.mkdtemp(prefix="cxr_bench_"))
    try:
        tb = TorchBackend(args.checkpoint, "cpu")
        onnx_path = Path(args.onnx_path)
        if not onnx_path.is_file() or not meta_path_for(onnx_path).is_file():
            onnx_path = tmp / "model.onnx"
            print(f"{args.onnx_path} (or its meta file) not found: exporting {args.checkpoint} to {onnx_path}")
            export_to_onnx(args.checkpoint, onnx_path)
        ob = OnnxBackend(onnx_path)
        items = gather_inputs(args.data_dir, class_names=tb.class_names, num_samples=args.n_images, seed=args.seed)
    except (FileNotFoundError, CheckpointError, InferenceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = [it.path for it in items]
    n, size = len(paths), tb.img_size
    print(f"{n} images from {args.data_dir} | model {tb.ck['model_config'].get('preset')} {size}px | "
          f"torch threads {torch.get_num_threads()}, ORT intra-op threads {ob.intra_op_threads} | "
          f"CPU: {os.cpu_count()} logical")
    rows = []

    def add(case, backend, batch, seconds, mib, note=""):
        rows.append({"case": case, "backend": backend, "batch": batch, "images": n, "seconds": seconds,
                     "images_per_s": n / seconds, "peak_rss_mib": mib, "note": note})
        r = rows[-1]
        print(f"  {case:<34} {backend:<12} {str(batch):>5} {r['images_per_s']:9.2f} img/s "
              f"{seconds:8.2f} s {mib:9.0f} MiB {note}", flush=True)

    u8 = [load_for_model(p, size) for p in paths]
    for name, be in (("pytorch", tb), ("onnxruntime", ob)):
        for b in batches:
            with PeakRSS() as m:
                s = model_only(be.forward, u8, b)
            add("model only", name, b, s, m.mib)
    for name, be in (("pytorch", tb), ("onnxruntime", ob)):
        for b in batches:
            its = gather_inputs(images=[str(p) for p in paths], class_names=be.class_names)
            with PeakRSS() as m:
                t0 = time.perf_counter()
                run_pipeline(be, its, tmp / f"e2e_{name}_{b}", PipelineOptions(batch_size=b, progress=False))
                s = time.perf_counter() - t0
            add("end to end (in process)", name, b, s, m.mib)
    with PeakRSS() as m:
        s_plain = plain_per_image_pipeline(tb.model, paths, size, tb.temperature, tb.class_names, tmp / "plain")
    add("plain per-image pipeline", "pytorch", 1, s_plain, m.mib, f"matplotlib savefig, {size}px")
    s_seed = None
    if args.seed_arch_baseline:
        torch.manual_seed(0)
        seed_model = build_model(make_config("seed", num_classes=len(tb.class_names))).eval()
        with PeakRSS() as m:
            s_seed = plain_per_image_pipeline(seed_model, paths, 256, 1.0, tb.class_names, tmp / "plain_seed")
        add("plain per-image pipeline (seed)", "pytorch", 1, s_seed, m.mib, "random-init seed preset, 256px")
        del seed_model
    wall, mib, summ = run_script_subprocess(onnx_path, paths, tmp / "script", 16)
    add("run_onnx_inference.py (process)", "onnxruntime", 16, wall, mib,
        f"in-pipeline {summ['throughput']['images_per_second']:.1f} img/s")

    print()
    print(f"{'case':<34} {'backend':<12} {'batch':>5} {'img/s':>9} {'seconds':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['case']:<34} {r['backend']:<12} {str(r['batch']):>5} {r['images_per_s']:9.2f} "
              f"{r['seconds']:8.2f} {r['peak_rss_mib']:13.0f}")
    ratio = s_plain / wall
    e2e = {(r["backend"], r["batch"]): r for r in rows if r["case"].startswith("end to end")}
    if ("onnxruntime", 16) in e2e:
        r16 = e2e[("onnxruntime", 16)]["images_per_s"] * s_plain / n
        print(f"\nend to end in process: ONNX Runtime batch 16 runs at {r16:.2f}x the plain per-image pipeline's "
              f"throughput")
    print(f"end to end: run_onnx_inference.py (whole process, batch 16) is {ratio:.2f}x the throughput of the "
          f"plain per-image pipeline with the same model ({n / wall:.2f} vs {n / s_plain:.2f} img/s)")
    if s_seed is not None:
        print(f"            and {s_seed / wall:.2f}x the plain pipeline with the original seed model at 256 px "
              f"({n / s_seed:.2f} img/s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "ratio_vs_plain": ratio,
                                                   "ratio_vs_seed_plain": None if s_seed is None else s_seed / wall},
                                                  indent=2))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
