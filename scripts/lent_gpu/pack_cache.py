#!/usr/bin/env python
"""Pack a decoded-image cache folder into one compact file (lossless WebP images, bit-packed
masks), and unpack it again. Used to carry the training data to a remote GPU machine whose upload
limit is far below the PNG database's size.

  python scripts/lent_gpu/pack_cache.py pack   CACHE_DIR  data.pack.npz
  python scripts/lent_gpu/pack_cache.py unpack data.pack.npz CACHE_DIR
"""
import sys
from pathlib import Path

import cv2
import numpy as np


def pack(cdir, out):
    cdir = Path(cdir)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    meta = (cdir / "meta.json").read_text()
    images = np.load(cdir / "images.npy", mmap_mode="r")
    masks = np.load(cdir / "masks.npy", mmap_mode="r")
    blobs = [cv2.imencode(".webp", np.asarray(im), [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes() for im in images]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez_compressed(out, meta=np.frombuffer(meta.encode(), np.uint8), blob=np.frombuffer(b"".join(blobs), np.uint8),
             offsets=offsets, masks=np.packbits(np.asarray(masks, bool)), shape=np.array(images.shape))
    print(f"packed {len(blobs)} images into {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")


def unpack(src, cdir):
    z = np.load(src)
    cdir = Path(cdir)
    cdir.mkdir(parents=True, exist_ok=True)
    shape = tuple(z["shape"])
    blob, off = z["blob"], z["offsets"]
    images = np.stack([cv2.imdecode(blob[off[i]:off[i + 1]], cv2.IMREAD_GRAYSCALE) for i in range(shape[0])])
    masks = np.unpackbits(z["masks"])[: int(np.prod(shape))].reshape(shape).astype(np.uint8)
    assert images.shape == shape, (images.shape, shape)
    np.save(cdir / "images.npy", images)
    np.save(cdir / "masks.npy", masks)
    (cdir / "meta.json").write_text(bytes(z["meta"]).decode())
    print(f"unpacked {shape[0]} images to {cdir}")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](sys.argv[2], sys.argv[3])
