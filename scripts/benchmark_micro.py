#!/usr/bin/env python
"""Single-operation times behind docs/SPEED.md's "What made it faster" table: each fast path and the rule it
replaces, on one film of each real-use benchmark set (medians of several calls, one thread).

    python scripts/benchmark_real_use.py --work SETS ...     # makes the sets (or reuses them)
    python scripts/benchmark_micro.py --work SETS
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--work", required=True, help="the real-use benchmark's sets (scripts/benchmark_sets.py)")
p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr4"))
a = p.parse_args()
import time, glob, numpy as np, cv2, pydicom
from cxrkit.core import decode
def T(f, n=7):
    f(); t = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return round(1000 * sorted(t)[len(t) // 2], 1)
p16 = sorted(glob.glob(f"{a.work}/png16/*.png"))[0]
buf = np.fromfile(p16, np.uint8)
print("png16: cv2.imdecode", T(lambda: cv2.imdecode(buf, -1)), "fast path", T(lambda: decode._png_grey_fast(buf)),
      "read_gray", T(lambda: decode.read_gray(p16)))
dc = sorted(glob.glob(f"{a.work}/dicom/IM*"))[0]
ds = pydicom.dcmread(dc); arr = ds.pixel_array
print("dicom: per-pixel rule", T(lambda: decode._dicom_gray(dc, arr, ds, False)), "table", T(lambda: decode._dicom_gray_by_lut(arr, ds, False)),
      "read_gray", T(lambda: decode.read_gray(dc)))
dj = sorted(glob.glob(f"{a.work}/dicom_jpll/IM*"))[0]
dsj = pydicom.dcmread(dj)
print("jpll: gdcm pixel_array", T(lambda: pydicom.dcmread(dj).pixel_array, 3), "libjpeg-turbo", T(lambda: decode._lossless_jpeg_frame(dsj)),
      "read_gray", T(lambda: decode.read_gray(dj), 3))
jp = sorted(glob.glob(f"{a.work}/jpeg/*.jpg"))[0]
print("jpeg read_gray", T(lambda: decode.read_gray(jp)))
from cxrkit.inference.render import render_annotation, display_image, encode_png
from cxrkit.inference.thumbs import make_thumbnail
g = decode.read_gray(sorted(glob.glob(f"{a.data_dir}/COVID/images/*.png"))[0])
seg = np.zeros((128, 128), np.float32); seg[20:100, 15:55] = 0.9; seg[20:100, 70:110] = 0.9
names = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]; probs = np.array([0.7, 0.1, 0.15, 0.05])
for h in (320, 512):
    d = display_image(g, h) if h == 320 else cv2.resize(g, (512, 512))
    img = render_annotation(d, seg, names, probs, "COVID", title="x", notes=["a", "b"])
    print(f"annotated at {h}: render", T(lambda: render_annotation(d, seg, names, probs, "COVID", title="x", notes=["a", "b"]), 30),
          "encode (isal)", T(lambda: encode_png(img), 30), "encode (OpenCV)", T(lambda: cv2.imencode(".png", img), 30),
          "thumbnail", T(lambda: cv2.imencode(".jpg", make_thumbnail(d, seg)), 30))
