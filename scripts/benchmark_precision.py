#!/usr/bin/env python
"""The model alone at each precision on this CPU: ONNX Runtime FP32 against OpenVINO BF16 (what `auto`
picks where the CPU has AMX or AVX-512 BF16 and the model passed its BF16 check), on the same real films,
batch by batch, median over repeats. Prints the CPU and its flags beside the figures, and what `auto`
chose here and why. It answers one question per machine: is the fast path faster on THIS CPU?

    python scripts/benchmark_precision.py --data_dir ../shared/data/cxr4 --n 256 --batch 16
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrkit.core import cpu  # noqa: E402
from cxrkit.core.decode import read_gray  # noqa: E402
from cxrkit.core.errors import ImageReadError  # noqa: E402
from cxrkit.core.model_input import resize_gray, to_model_input_np  # noqa: E402
from cxrkit.core.config import ONNX_PATH  # noqa: E402
from cxrkit.core.shipped import resolve_default  # noqa: E402
from cxrkit.inference.backends import OnnxBackend, physical_cores  # noqa: E402


def films(data_dir: Path, n: int, size: int) -> np.ndarray:
    """n films spread evenly over every class folder's images, resized to the model's input."""
    paths = sorted(data_dir.glob("*/images/*.png"))
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)] if paths else []
    u8 = []
    for p in paths:
        try:
            u8.append(resize_gray(read_gray(p), size))
        except ImageReadError as e:
            print(f"skipped: {e}", file=sys.stderr)
    if not u8:
        sys.exit(f"error: no decodable PNG under {data_dir}/<Class>/images/; pass --data_dir")
    return np.stack(u8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx_path", default=ONNX_PATH)
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "cxr4"))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    a.onnx_path = resolve_default(a.onnx_path, ONNX_PATH, "--onnx_path")
    d = cpu.describe()
    print(f"CPU: {d['model']} | flags: {', '.join(d['flags']) or 'none of note'} | cores {physical_cores()}")
    auto = OnnxBackend(a.onnx_path)
    print(f"auto precision here: {auto.precision} ({auto.precision_reason})")
    size = auto.meta.img_size
    x = to_model_input_np(films(Path(a.data_dir), a.n, size))
    res = {}
    for prec in ("fp32", "bf16"):
        try:
            b = OnnxBackend(a.onnx_path, precision=prec, fp32_referee=False)
        except Exception as e:  # noqa: BLE001 - a CPU without the path: say so and go on
            print(f"{prec}: not available here ({str(e).splitlines()[0][:160]})")
            continue
        b.forward(x[: a.batch])  # the batch shape's kernels, outside the timing
        t = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for s in range(0, len(x), a.batch):
                b.forward(x[s:s + a.batch])
            t.append(time.perf_counter() - t0)
        res[prec] = sorted(t)[len(t) // 2]
        print(f"{prec}: {b.engine.__class__.__name__.strip('_')}, {len(x) / res[prec]:.0f} img/s "
              f"({1000 * res[prec] / len(x):.2f} ms/img, median of {a.repeats} passes over {len(x)} films, batch {a.batch})")
    if len(res) == 2:
        print(f"BF16 / FP32 speed: {res['fp32'] / res['bf16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
