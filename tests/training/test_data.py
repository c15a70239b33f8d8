"""Decoding quirks, database discovery, the decoded-image cache, the split, batching, augmentation."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from cxrkit.cli import train as model_arch
from cxrkit.training import data as data_mod
from cxrkit.core.config import TrainConfig
from cxrkit.training.data import BatchDataset, DataError, EpochBatchSampler, augment, build_cache, discover
from cxrkit.training.split import load_or_make_split, make_split, near_duplicate_groups
from cxrkit.core.decode import ImageReadError, read_gray, read_mask
from cxrkit.core.model_input import resize_gray, resize_mask


def imwrite(path, arr, params=()):
    """cv2.imwrite that works for any file name (encodes in memory, writes the bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, arr, list(params))
    assert ok, path
    buf.tofile(str(path))
    return path


def make_image(h=64, w=64, seed=0):
    """A smooth 8-bit image that uses the full 0..255 range, plus some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 255.0 * (xx + yy) / (h + w - 2) + rng.normal(0, 8, (h, w))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    img[0, 0], img[-1, -1] = 0, 255
    return img


def rect_pair(img_size, mask_size, box=(0.25, 0.30, 0.60, 0.80)):
    """An image and a mask of different sizes showing the same bright rectangle (fractions y0,x0,y1,x1)."""
    def draw(s, value):
        a = np.zeros((s, s), np.uint8)
        y0, x0, y1, x1 = (int(round(f * s)) for f in box)
        a[y0:y1, x0:x1] = value
        return a
    img = draw(img_size, 220)
    img += 20  # not pure black: a real film has a background
    return img, draw(mask_size, 255)


def iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


# ==================================================================================== decoding
def test_16bit_png_holding_8bit_data_reads_back_identically(tmp_path):
    u8 = make_image()
    p = imwrite(tmp_path / "sixteen.png", u8.astype(np.uint16) * 257)
    assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert np.array_equal(read_gray(p), u8)


def test_12bit_data_in_16bit_png_is_scaled_by_4095(tmp_path):
    u8 = make_image(seed=1)
    u12 = np.round(u8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    assert u12.max() == 4095
    g = read_gray(imwrite(tmp_path / "twelve.png", u12))
    assert g.dtype == np.uint8
    assert np.abs(g.astype(int) - u8).max() <= 1     # / 65535 would leave it at most 16: nearly black
    assert g.max() == 255


def test_rgb_and_rgba_png_become_luminance(tmp_path):
    gray = make_image(seed=2)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    assert np.array_equal(read_gray(imwrite(tmp_path / "rgb copy.png", bgr)), gray)
    bgra = np.dstack([bgr, np.random.default_rng(0).integers(0, 256, gray.shape, dtype=np.uint8)])
    assert np.array_equal(read_gray(imwrite(tmp_path / "rgba copy.png", bgra)), gray)  # alpha ignored
    # channel order: R=200, G=100, B=50 -> 0.299*200 + 0.587*100 + 0.114*50 = 124.2
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 50, 100, 200   # OpenCV stores BGR
    assert np.all(read_gray(imwrite(tmp_path / "colour.png", colour)) == 124)


@pytest.mark.parametrize("name,params,tol", [
    ("x.jpg", (cv2.IMWRITE_JPEG_QUALITY, 95), 3.0),
    ("x.JPEG", (cv2.IMWRITE_JPEG_QUALITY, 95), 3.0),
    ("x.bmp", (), 0.0),
    ("x.tif", (), 0.0),
    ("Viral Pneumonia (12) - copy [1] é.png", (), 0.0),
])
def test_formats_and_awkward_names(tmp_path, name, params, tol):
    img = make_image(seed=3)
    for arr in (img, cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)):
        g = read_gray(imwrite(tmp_path / name, arr, params))
        assert g.shape == img.shape and g.dtype == np.uint8
        assert np.abs(g.astype(float) - img).mean() <= tol


def test_masks_in_any_encoding_decode_to_the_same_0_1_mask(tmp_path):
    _, m255 = rect_pair(64, 64)
    m01 = (m255 > 0).astype(np.uint8)
    variants = {"m 0-1.png": m01, "m 0-255.png": m255, "m rgb.png": cv2.cvtColor(m255, cv2.COLOR_GRAY2BGR),
                "m 16bit.png": m01.astype(np.uint16) * 65535, "m.bmp": m255}
    for name, arr in variants.items():
        m = read_mask(imwrite(tmp_path / name, arr))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}, name
        assert np.array_equal(m, m01), name
    assert not read_mask(imwrite(tmp_path / "empty.png", np.zeros((16, 16), np.uint8))).any()


def test_unreadable_files_raise_a_one_line_error_naming_the_file(tmp_path):
    cases = {"corrupt (1).png": b"\x89PNG\r\n\x1a\n garbage", "empty.png": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    imwrite(tmp_path / "tiny.png", np.zeros((4, 4), np.uint8))
    for name in [*cases, "tiny.png", "missing.png"]:
        with pytest.raises(ImageReadError) as ei:
            read_gray(tmp_path / name)
        msg = str(ei.value)
        assert name in msg and len(msg.splitlines()) == 1, msg


# =================================================================================== discovery
def test_discover_both_layouts_masks_by_stem_hidden_folders_ignored(tmp_path):
    img = make_image()
    _, mask = rect_pair(64, 64)
    imwrite(tmp_path / "A" / "images" / "a (1).png", img)
    imwrite(tmp_path / "A" / "masks" / "a (1).png", mask)
    imwrite(tmp_path / "A" / "images" / "a 2.jpg", img)
    imwrite(tmp_path / "A" / "masks" / "a 2.png", mask)          # mask found by stem, other extension
    imwrite(tmp_path / "A" / "images" / "no mask.png", img)      # missing mask: classification only
    imwrite(tmp_path / "B c" / "flat (1).png", img)               # <Class>/*.png, no masks folder
    (tmp_path / "B c" / "notes.txt").write_text("not an image")
    imwrite(tmp_path / ".ipynb_checkpoints" / "x.png", img)       # hidden: not a class
    (tmp_path / "README.txt").write_text("top-level files are ignored")
    classes, samples = discover(tmp_path)
    assert classes == ["A", "B c"]
    by_name = {os.path.basename(s.image): s for s in samples}
    assert set(by_name) == {"a (1).png", "a 2.jpg", "no mask.png", "flat (1).png"}
    assert by_name["a (1).png"].mask == os.path.join("A", "masks", "a (1).png")
    assert by_name["a 2.jpg"].mask == os.path.join("A", "masks", "a 2.png")
    assert by_name["no mask.png"].mask is None and by_name["flat (1).png"].mask is None
    assert by_name["flat (1).png"].label == 1 and by_name["a 2.jpg"].label == 0


def _bad_data_dirs(tmp_path):
    img = make_image()
    empty_images = tmp_path / "empty_images"
    imwrite(empty_images / "COVID" / "images" / "c.png", img)
    (empty_images / "Normal" / "images").mkdir(parents=True)
    (empty_images / "Normal" / "masks").mkdir()
    empty_flat = tmp_path / "empty_flat"
    imwrite(empty_flat / "COVID" / "c.png", img)
    (empty_flat / "Viral Pneumonia").mkdir()
    no_classes = tmp_path / "no_classes"
    no_classes.mkdir()
    imwrite(no_classes / "loose.png", img)
    a_file = imwrite(tmp_path / "a_file.png", img)
    return {"empty class (images/)": (empty_images, str(empty_images / "Normal")),
            "empty class (flat)": (empty_flat, str(empty_flat / "Viral Pneumonia")),
            "no class folders": (no_classes, "no class folders"),
            "not a folder": (a_file, "not a folder"),
            "missing": (tmp_path / "nowhere", "not a folder")}


def test_unusable_data_dirs_raise_data_error(tmp_path):
    for case, (path, needle) in _bad_data_dirs(tmp_path).items():
        with pytest.raises(DataError) as ei:
            discover(path)
        msg = str(ei.value)
        assert needle in msg and len(msg.splitlines()) == 1, (case, msg)


def test_model_arch_reports_bad_data_dirs_in_one_line(tmp_path, capsys):
    for case, (path, needle) in _bad_data_dirs(tmp_path).items():
        capsys.readouterr()
        rc = model_arch.main(["--data_dir", str(path), "--output_dir", str(tmp_path / "out" / case.replace(" ", "_")),
                              "--arch", "tiny", "--img_size", "32", "--workers", "0", "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert err.startswith("error: ") and needle in err, (case, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (case, err)


# ======================================================================================= cache
def test_cache_resizes_image_and_mask_together(tmp_path):
    """299-px image with a 256-px mask (the database's quirk), RGB on either side: both end up at
    img_size and still overlap."""
    img, mask = rect_pair(299, 256)
    root = tmp_path / "data"
    imwrite(root / "Lung" / "images" / "gray (1).png", img)
    imwrite(root / "Lung" / "masks" / "gray (1).png", mask)
    imwrite(root / "Lung" / "images" / "rgb (2).png", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    imwrite(root / "Lung" / "masks" / "rgb (2).png", cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))
    imwrite(root / "Lung" / "images" / "zero-one.png", img)
    imwrite(root / "Lung" / "masks" / "zero-one.png", (mask > 0).astype(np.uint8))
    imwrite(root / "Other" / "x.png", img)
    d = build_cache(root, 64, tmp_path / "cache", workers=0, progress=False)
    assert d.images.shape == d.masks.shape == (4, 64, 64) and d.images.dtype == np.uint8
    assert d.has_mask.tolist() == [True, True, True, False]
    for i in range(3):
        assert set(np.unique(d.masks[i])) == {0, 1}
        assert iou(d.images[i] > 128, d.masks[i]) > 0.95
        assert np.array_equal(d.masks[i], d.masks[0])
    assert not d.masks[3].any()


def _centroid(w):
    w = np.asarray(w, np.float64)
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()


@pytest.mark.parametrize("size", [64, 128])
def test_resized_mask_is_not_shifted_against_the_image(size):
    """Over 20 random rectangles (299-px image, 256-px mask), the mask's centroid after resizing
    must sit on the image rectangle's centroid on average. Nearest-neighbour mask resizing (the
    old code) was off by 0.3-0.5 px, always in the same direction."""
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(20):
        y0, x0 = rng.uniform(0.1, 0.4, 2)
        img, mask = rect_pair(299, 256, (y0, x0, y0 + rng.uniform(0.2, 0.5), x0 + rng.uniform(0.2, 0.5)))
        m = resize_mask((mask > 0).astype(np.uint8), size)
        assert m.shape == (size, size) and set(np.unique(m)) == {0, 1}
        offsets.append(_centroid(m) - _centroid(resize_gray(img, size).astype(np.float64) - 20))
    mean = np.mean(offsets, axis=0)
    assert np.abs(mean).max() < 0.2, f"mask shifted by {mean} px against the image"


def test_cache_skips_corrupt_files_and_keeps_the_rest(tmp_path):
    root = tmp_path / "data"
    img, mask = rect_pair(64, 64)
    for i in range(3):
        imwrite(root / "A" / "images" / f"good {i}.png", img)
        imwrite(root / "A" / "masks" / f"good {i}.png", mask)
    (root / "A" / "images" / "bad (1).png").write_bytes(b"not a png")
    imwrite(root / "A" / "images" / "bad mask.png", img)
    (root / "A" / "masks" / "bad mask.png").write_bytes(b"\x89PNG\r\n\x1a\n no")
    imwrite(root / "A" / "images" / "no mask.png", img)
    imwrite(root / "B" / "images" / "b.png", img)
    d = build_cache(root, 32, tmp_path / "cache", workers=0, progress=False)
    names = [os.path.basename(p) for p in d.paths]
    assert names == ["bad mask.png", "good 0.png", "good 1.png", "good 2.png", "no mask.png", "b.png"]
    assert d.labels.tolist() == [0, 0, 0, 0, 0, 1]
    assert d.has_mask.tolist() == [False, True, True, True, False, False]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in d.skipped}
    assert set(skipped) == {"bad (1).png", "bad mask.png"}
    assert "classification only" in skipped["bad mask.png"]
    # the record survives a reload of the cache
    assert len(build_cache(root, 32, tmp_path / "cache", workers=0, progress=False).skipped) == 2


def test_cache_all_images_unreadable_is_a_data_error(tmp_path):
    (tmp_path / "data" / "A").mkdir(parents=True)
    (tmp_path / "data" / "A" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 images"):
        build_cache(tmp_path / "data", 32, tmp_path / "cache", workers=0, progress=False)


def test_cache_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    img, mask = rect_pair(64, 64)
    data_dir = tmp_path / "d"
    for c in ("A", "B"):
        imwrite(data_dir / c / "images" / "i.png", img)
        imwrite(data_dir / c / "masks" / "i.png", mask)
    first = build_cache(data_dir, 32, tmp_path / "cache", workers=0, progress=False)

    def boom(_):
        raise AssertionError("decoded again although nothing changed")
    with monkeypatch.context() as mp:
        mp.setattr(data_mod, "_decode_one", boom)
        again = build_cache(data_dir, 32, tmp_path / "cache", workers=0, progress=False)
    assert np.array_equal(again.images, first.images)
    imwrite(data_dir / "B" / "images" / "i.png", 255 - img)  # content (size / mtime) changes
    st = os.stat(data_dir / "B" / "images" / "i.png")
    os.utime(data_dir / "B" / "images" / "i.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_cache(data_dir, 32, tmp_path / "cache", workers=0, progress=False)
    assert not np.array_equal(changed.images[1], first.images[1])
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_real_subset_cache(mdt_cache, mdt_subset, mdt_subset_info):
    """48 real images, classes from the folders (one with a space), the corrupt file skipped, the
    image without a mask kept for classification, worker processes give the same arrays."""
    info = mdt_subset_info
    assert mdt_cache.classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert len(mdt_cache.paths) == 4 * info.per_class
    assert np.bincount(mdt_cache.labels).tolist() == [info.per_class] * 4
    assert [s["path"] for s in mdt_cache.skipped] == [info.corrupt]
    no_mask = [p for p, h in zip(mdt_cache.paths, mdt_cache.has_mask) if not h]
    assert len(no_mask) == 1 and no_mask[0].startswith(info.no_mask_class + os.sep)
    assert any(" " in p and "(" in p for p in mdt_cache.paths)
    assert all(set(np.unique(m)) <= {0, 1} for m in mdt_cache.masks)
    par = build_cache(mdt_subset, 64, mdt_subset.parent / "cache_workers", workers=2, progress=False)
    assert par.paths == mdt_cache.paths and np.array_equal(par.images, mdt_cache.images)
    assert np.array_equal(par.masks, mdt_cache.masks) and np.array_equal(par.has_mask, mdt_cache.has_mask)


# ======================================================================================= split
def _check_partition(split, n):
    parts = [set(split[k].tolist()) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == n, "an index is in two splits"
    assert set().union(*parts) == set(range(n))


def test_make_split_is_stratified_disjoint_and_deterministic():
    counts = [40, 17, 23, 11]
    labels = np.repeat(np.arange(4), counts)
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]
    groups = np.arange(len(labels))
    s1 = make_split(labels, groups, 0.15, 0.2, seed=3)
    _check_partition(s1, len(labels))
    for c, n_c in enumerate(counts):
        for k, frac in (("val", 0.15), ("test", 0.2), ("train", 0.65)):
            got = int((labels[s1[k]] == c).sum())
            assert abs(got - n_c * frac) <= 1, (c, k, got, n_c * frac)
    s2 = make_split(labels, groups, 0.15, 0.2, seed=3)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    s3 = make_split(labels, groups, 0.15, 0.2, seed=4)
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1)
    _check_partition(s3, len(labels))


def test_near_duplicates_are_grouped_and_kept_on_one_side(mdt_cache):
    images = np.asarray(mdt_cache.images)
    labels = mdt_cache.labels
    assert len(np.unique(near_duplicate_groups(images))) == len(images), "the real subset has no near-duplicates"
    rng = np.random.default_rng(0)
    originals = [0, 13, 26, 39, 45]          # one or two per class
    extra, extra_labels, dup_of = [], [], []
    for i in originals:
        for _ in range(3):                   # three near-copies each: tiny noise, 1-level brightness change
            noisy = images[i].astype(np.float32) + rng.normal(0, 2, images[i].shape) + rng.integers(-1, 2)
            extra.append(np.clip(noisy, 0, 255).astype(np.uint8))
            extra_labels.append(labels[i])
            dup_of.append(i)
    all_images = np.concatenate([images, np.stack(extra)])
    all_labels = np.concatenate([labels, extra_labels])
    groups = near_duplicate_groups(all_images)
    n = len(images)
    for j, i in enumerate(dup_of):
        assert groups[n + j] == groups[i], f"copy {j} of image {i} not grouped with it"
    assert len(np.unique(groups)) == n, "unrelated images were merged"
    for seed in range(10):
        split = make_split(all_labels, groups, 0.15, 0.15, seed)
        _check_partition(split, len(all_images))
        side = {}
        for k, idx in split.items():
            for i in idx:
                side.setdefault(groups[i], set()).add(k)
        assert all(len(s) == 1 for s in side.values()), f"seed {seed}: a near-duplicate group was split"


def test_load_or_make_split_writes_and_reuses_the_file(mdt_cache, tmp_path):
    p = tmp_path / "run" / "split.json"
    s1 = load_or_make_split(mdt_cache, p, seed=1)
    js = json.loads(p.read_text())
    assert js["classes"] == mdt_cache.classes and js["seed"] == 1
    for k in ("train", "val", "test"):
        assert js[k] == [mdt_cache.paths[i] for i in s1[k]]   # relative paths, not indices
    _check_partition(s1, len(mdt_cache.paths))
    s2 = load_or_make_split(mdt_cache, p, seed=999, val_frac=0.4)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert not any(f.name.endswith(".tmp") for f in p.parent.iterdir())
    js["classes"] = ["A", "B"]
    p.write_text(json.dumps(js))
    with pytest.raises(DataError, match="made for classes"):
        load_or_make_split(mdt_cache, p)


# ===================================================================================== batches
@pytest.mark.parametrize("n,bs,world,drop_last", [(13, 4, 1, False), (13, 4, 1, True), (13, 4, 2, False),
                                                  (10, 3, 2, True)])
def test_epoch_batch_sampler(n, bs, world, drop_last):
    samplers = [EpochBatchSampler(n, bs, True, seed=7, rank=r, world=world, drop_last=drop_last)
                for r in range(world)]
    seen = []
    for s in samplers:
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(b) == bs for b in batches) if drop_last else all(0 < len(b) <= bs for b in batches)
        seen += [i for b in batches for i in b]
        s.set_epoch(2)
        assert list(s) == batches, "same (seed, epoch): same order"
        s.set_epoch(3)
        assert list(s) != batches, "a new epoch reshuffles"
    assert len({len(s) for s in samplers}) == 1, "every rank runs the same number of steps"
    if not drop_last:
        assert set(seen) == set(range(n))
    unshuffled = EpochBatchSampler(n, bs, False)
    assert [i for b in unshuffled for i in b] == list(range(n))


def test_batch_dataset_serves_aligned_arrays(mdt_cache):
    idx = np.array([5, 40, 17, 2])
    ds = BatchDataset(mdt_cache, idx)
    imgs, masks, has, y = ds[[0, 1, 2]]
    rows = np.sort(idx[[0, 1, 2]])
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 64, 64)
    assert np.array_equal(imgs.numpy(), mdt_cache.images[rows])
    assert np.array_equal(masks.numpy(), mdt_cache.masks[rows])
    assert has.tolist() == mdt_cache.has_mask[rows].tolist() and y.tolist() == mdt_cache.labels[rows].tolist()


# ================================================================================ augmentation
def _square_batch(b=8, s=64):
    x = torch.zeros(b, 3, s, s)
    m = torch.zeros(b, 1, s, s)
    x[:, :, 16:40, 12:36] = 1.0      # off-centre, so a flip or a transposition would show
    m[:, :, 16:40, 12:36] = 1.0
    return x, m


def test_augment_keeps_image_and_mask_aligned():
    x, m = _square_batch()
    cfg = TrainConfig()
    xa, ma = augment(x, m, cfg, torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ma.shape == m.shape
    assert xa.min() >= 0 and xa.max() <= 1
    assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}
    assert not torch.equal(ma, m), "augmentation did nothing"
    for i in range(len(x)):
        bright = (xa[i].mean(0) > 0.5).numpy()
        assert iou(bright, ma[i, 0].numpy() > 0) > 0.85, i
        # rotation <= 10 deg, scale +-10 %, shift +-6 %: the square's centre moves a few pixels only
        ys, xs = np.nonzero(ma[i, 0].numpy())
        assert abs(ys.mean() - 27.5) < 8 and abs(xs.mean() - 23.5) < 8, i


def test_augment_is_deterministic_per_generator_seed():
    x, m = _square_batch()
    x = x * 0.8 + 0.1 * torch.rand_like(x)
    cfg = TrainConfig()
    a = augment(x, m, cfg, torch.Generator().manual_seed(11))
    b = augment(x, m, cfg, torch.Generator().manual_seed(11))
    c = augment(x, m, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_augment_with_zero_strength_is_the_identity():
    x, m = _square_batch()
    x = x * 0.7 + 0.2 * torch.rand_like(x)
    cfg = TrainConfig(aug_rotate_deg=0, aug_scale=0, aug_shift=0, aug_brightness=0, aug_contrast=0)
    xa, ma = augment(x, m, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(xa, x, atol=1e-5)
    assert torch.equal(ma, m)


# ============================================================================== synthetic data
def test_synthetic_set_has_the_database_quirks_and_a_usable_split(tmp_path):
    """The built-in demo set (cxrkit.training.synthetic): 299-px images with 256-px masks, some RGB files,
    awkward names; and its images must not all look like near-duplicates of each other (they did:
    all Normal and Viral Pneumonia images formed ONE group, so the split put both classes in test
    only and the demo model never trained on them)."""
    from cxrkit.training.synthetic import generate
    root = generate(tmp_path / "syn", per_class=20, seed=0)
    classes, samples = discover(root)
    assert classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"] and len(samples) == 80
    raw = [cv2.imread(str(root / s.image), cv2.IMREAD_UNCHANGED) for s in samples]
    masks = [cv2.imread(str(root / s.mask), cv2.IMREAD_UNCHANGED) for s in samples]
    assert {im.shape[:2] for im in raw} == {(299, 299)} and {m.shape[:2] for m in masks} == {(256, 256)}
    assert any(im.ndim == 3 for im in raw) and any(m.ndim == 3 for m in masks)
    assert any("(" in s.image for s in samples) and any(" " in s.image for s in samples)
    d = build_cache(root, 64, tmp_path / "cache", workers=0, progress=False)
    assert d.has_mask.all() and not d.skipped
    # the lungs are darker than the rest of the body in every image: mask and image agree
    for img, m in zip(d.images, d.masks):
        assert img[m == 1].mean() < img[(m == 0)][img[m == 0] > 60].mean()
    groups = near_duplicate_groups(d.images)
    assert np.bincount(groups).max() <= 2
    split = load_or_make_split(d, tmp_path / "split.json")
    for k, idx in split.items():
        assert set(d.labels[idx].tolist()) == {0, 1, 2, 3}, f"{k} split misses a class"


def test_lung_mask_is_the_one_threshold_rule():
    """preprocess.lung_mask: the lung probabilities resized bilinearly to (H, W), then > LUNG_THRESHOLD
    (the rule every mask, Dice, outline and lung area uses); without a size, only the threshold."""
    from cxrkit.core.config import LUNG_THRESHOLD
    from cxrkit.core.model_input import lung_mask
    rng = np.random.default_rng(0)
    p = rng.random((32, 32)).astype(np.float32)
    p[0, 0] = LUNG_THRESHOLD  # exactly at the threshold: not lung
    assert LUNG_THRESHOLD == 0.5
    np.testing.assert_array_equal(lung_mask(p), p > 0.5)
    assert not lung_mask(p)[0, 0]
    want = cv2.resize(p, (50, 70), interpolation=cv2.INTER_LINEAR) > 0.5  # (W, H) for OpenCV
    got = lung_mask(p.astype(np.float64), (70, 50))
    assert got.dtype == bool and got.shape == (70, 50)
    np.testing.assert_array_equal(got, want)
