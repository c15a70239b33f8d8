"""Data pipeline: discover the database layout, decode each image ONCE into a uint8 cache, make a
stratified near-duplicate-aware split, and serve batches (augmented on the training device).

Layouts accepted (class names come from the folders, sorted):
    <data_dir>/<Class>/images/<name>  with  <data_dir>/<Class>/masks/<name>   (database layout)
    <data_dir>/<Class>/<name>                                                  (classification only)
A sample without a mask still trains the classifier; its segmentation loss is skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import OUTSIDE_LUNG_FILLS
from ..core.device import barrier
from ..core.errors import DataError
from ..core.io_utils import atomic_path, write_json_atomic
from ..core.decode import IMAGE_EXTS, ImageReadError, find_mask, list_images, read_gray, read_mask
from ..core.model_input import resize_gray, resize_mask

log = logging.getLogger("cxrkit")


@dataclass
class Sample:
    image: str            # path relative to data_dir (the split file stores these)
    label: int
    mask: str | None      # relative path, or None when the class has no masks folder / no mask


def discover(data_dir) -> tuple[list[str], list[Sample]]:
    """Class names and samples of a data folder; raises DataError with the fix when unusable."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir {root}: not a folder; point it at the database root "
                        f"(<Class>/images/*.png with <Class>/masks/*.png)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"--data_dir {root}: no class folders found; expected <Class>/images/*.png "
                        f"(with <Class>/masks/) or <Class>/*.png")
    classes, samples, n_nomask = [], [], 0
    for cdir in class_dirs:
        img_dir = cdir / "images" if (cdir / "images").is_dir() else cdir
        if img_dir == cdir:
            files = sorted(p for p in cdir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                           and not p.name.startswith("."))
        else:
            files = list_images(img_dir)
        if not files:
            raise DataError(f"class folder {cdir} has no images ({', '.join(sorted(IMAGE_EXTS))}): "
                            f"add images or remove the folder")
        label = len(classes)
        classes.append(cdir.name)
        mask_dir = cdir / "masks"
        for f in files:
            m = find_mask(mask_dir, f.name) if mask_dir.is_dir() else None
            if m is None and mask_dir.is_dir():
                n_nomask += 1
            samples.append(Sample(str(f.relative_to(root)), label,
                                  str(m.relative_to(root)) if m is not None else None))
    if n_nomask:
        log.warning("%d images have no mask in their class's masks/ folder: classification only", n_nomask)
    no_masks = [c.name for c in class_dirs if c.name in classes and not (c / "masks").is_dir()]
    if no_masks:
        log.warning("class(es) %s have no masks/ folder: their images train the classifier only (no lung "
                    "segmentation loss, no Dice)", ", ".join(map(repr, no_masks)))
    return classes, samples


# ----------------------------------------------------------------------------------------- cache
def _decode_one(args):
    root, s, size = args
    try:  # every step from bytes to the cached array: any exception is this file's skip reason
        full = read_gray(Path(root) / s.image)
        if full.ndim != 2 or full.dtype != np.uint8:
            raise ImageReadError(s.image, f"decoded to an unsupported array {tuple(full.shape)} {full.dtype}")
        img = resize_gray(full, size)
    except ImageReadError as e:
        return None, None, e.reason, None
    except Exception as e:  # noqa: BLE001 - one bad file never stops the caching
        return None, None, " ".join(f"{type(e).__name__}: {e}".split())[:300], None
    mask, mreason, aspect = None, None, None
    if s.mask is not None:
        try:
            m = read_mask(Path(root) / s.mask)
            mask = resize_mask(m, size)
            (ih, iw), (mh, mw) = full.shape[:2], m.shape[:2]
            if abs(iw / ih - mw / mh) > 0.01 * (iw / ih):  # both are stretched to a square: misaligned
                aspect = f"{s.mask} is {mw}x{mh} for a {iw}x{ih} image"
        except Exception as e:  # noqa: BLE001 - an unusable mask is noted, never the caching's end
            mreason = f"mask {s.mask}: {getattr(e, 'reason', None) or ' '.join(f'{type(e).__name__}: {e}'.split())}"
    return img, mask, mreason, aspect


def _check_every_class_usable(classes, samples, ok, skipped) -> None:
    """A class whose every image is undecodable would train an output that never saw an example."""
    reasons = {d["path"]: d["reason"] for d in skipped}
    for c, name in enumerate(classes):
        idx = [i for i, s in enumerate(samples) if s.label == c]
        if idx and not any(ok[i] for i in idx):
            first = samples[idx[0]].image
            raise DataError(f"class '{name}': none of its {len(idx)} images could be decoded ({len(idx)} unreadable "
                            f"files, e.g. {first}: {reasons.get(first, 'unreadable')}); fix or remove that folder")


def _cache_key(root: Path, samples: list[Sample], size: int) -> str:
    h = hashlib.sha1(f"v3|{size}".encode())  # v2: masks resized like the images; v3: mask paths in meta
    for s in samples:
        for rel in (s.image, s.mask):
            if rel is None:
                h.update(b"|-")
                continue
            st = (root / rel).stat()
            h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class CachedData:
    classes: list[str]
    paths: list[str]         # relative image paths, aligned with the arrays
    labels: np.ndarray       # (N,) int64
    images: np.ndarray       # (N, S, S) uint8 (memory-mapped)
    masks: np.ndarray        # (N, S, S) uint8 0/1
    has_mask: np.ndarray     # (N,) bool
    skipped: list[dict]      # [{"path", "reason"}]
    root: str
    mask_paths: list | None = None  # relative mask path per image (None entries: no mask); for Dice at the
                                    # masks' own resolution. None when unknown (a carried cache folder)

    # where each image comes from (cxrkit.training.sources): the root's name, plus --source_rule's part
    sources: list[str] = field(default_factory=list)
    root_of: dict | None = None     # several roots: paths are "<root name>/<relative path>"; name -> folder

    _native: dict = field(default_factory=dict, repr=False, compare=False)  # index -> (packed bits, shape)

    def file(self, rel: str) -> Path:
        """The file behind a relative path of this data (image or mask)."""
        if self.root_of:
            name, _, rest = rel.partition("/")
            return Path(self.root_of[name]) / rest
        return Path(self.root) / rel

    def reachable(self) -> bool:
        roots = list(self.root_of.values()) if self.root_of else [self.root]
        return all(r and Path(r).is_dir() for r in roots)

    def native_masks(self, idx) -> list | None:
        """The ground-truth masks of images idx at their files' own resolution (0/1 uint8), None for
        images without one; None altogether when the mask files cannot be reached. Each file is read
        once and kept bit-packed (validation asks for the same masks every epoch)."""
        if not self.mask_paths or not self.reachable():
            return None
        out = []
        for i in map(int, idx):
            if i not in self._native:
                rel = self.mask_paths[i] if self.has_mask[i] else None
                try:
                    m = read_mask(self.file(rel)) if rel else None
                except (ImageReadError, OSError):
                    m = None
                self._native[i] = None if m is None else (np.packbits(m.astype(bool)), m.shape)
            packed = self._native[i]
            out.append(None if packed is None else
                       np.unpackbits(packed[0], count=packed[1][0] * packed[1][1]).reshape(packed[1]))
        return out


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def build_cache(data_dir, img_size: int, cache_dir, workers: int = 2, progress: bool = True) -> CachedData:
    """Decode + resize every image and mask once; reuse the cache while the files are unchanged."""
    root = Path(data_dir)
    classes, samples = discover(root)
    key = _cache_key(root, samples, img_size)
    cdir = Path(cache_dir) / f"{img_size}px-{key}"
    meta_p = cdir / "meta.json"
    if not meta_p.is_file():
        cdir.mkdir(parents=True, exist_ok=True)
        n = len(samples)
        images = np.zeros((n, img_size, img_size), np.uint8)
        masks = np.zeros((n, img_size, img_size), np.uint8)
        has_mask = np.zeros(n, bool)
        ok = np.zeros(n, bool)
        skipped = []
        jobs = [(str(root), s, img_size) for s in samples]
        it = map(_decode_one, jobs) if workers <= 0 else None
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
        try:
            if pool is not None:
                it = pool.map(_decode_one, jobs, chunksize=64)
            from tqdm import tqdm
            aspects = []
            for i, (img, mask, reason, aspect) in enumerate(tqdm(it, total=n, desc=f"caching {img_size}px",
                                                                  disable=not progress, leave=False)):
                s = samples[i]
                if aspect:
                    aspects.append(aspect)
                if img is None:
                    skipped.append({"path": s.image, "reason": reason})
                    log.warning("skipped %s: %s", s.image, reason)
                    continue
                ok[i] = True
                images[i] = img
                if mask is not None:
                    masks[i], has_mask[i] = mask, True
                elif reason:
                    skipped.append({"path": s.mask, "reason": reason + " (image kept, classification only)"})
                    log.warning("%s", reason)
        finally:
            if pool is not None:
                pool.shutdown()
        keep = np.flatnonzero(ok)
        if keep.size == 0:
            raise DataError(f"--data_dir {root}: none of the {n} images could be decoded")
        _check_every_class_usable(classes, samples, ok, skipped)
        if aspects:  # once, not per file
            log.warning("%d masks have another aspect ratio than their images and are stretched to fit (e.g. %s): "
                        "check that they belong to these images", len(aspects), aspects[0])
        _atomic_save_npy(cdir / "images.npy", images[keep])
        _atomic_save_npy(cdir / "masks.npy", masks[keep])
        meta = {"classes": classes, "img_size": img_size,
                "paths": [samples[i].image for i in keep],
                "labels": [samples[i].label for i in keep],
                "mask_paths": [samples[i].mask if has_mask[i] else None for i in keep],
                "has_mask": has_mask[keep].tolist(), "skipped": skipped}
        write_json_atomic(meta_p, meta, indent=None)  # meta last: its presence marks a complete cache
        if skipped:
            log.warning("%d files skipped while caching (listed in %s)", len(skipped), meta_p)
    return load_cache(cdir, root)


def load_cache(cdir, root="") -> CachedData:
    cdir = Path(cdir)
    meta = json.loads((cdir / "meta.json").read_text())
    return CachedData(classes=meta["classes"], paths=meta["paths"],
                      labels=np.asarray(meta["labels"], np.int64),
                      images=np.load(cdir / "images.npy", mmap_mode="r"),
                      masks=np.load(cdir / "masks.npy", mmap_mode="r"),
                      has_mask=np.asarray(meta["has_mask"], bool),
                      skipped=meta["skipped"], root=str(root), mask_paths=meta.get("mask_paths"),
                      sources=[Path(str(root)).name or "data"] * len(meta["paths"]))


# --------------------------------------------------------------------------------------- batches
class BatchDataset(torch.utils.data.Dataset):
    """Indexed by a LIST of indices: one fancy-index read of the memmap per batch."""

    def __init__(self, data: CachedData, indices: np.ndarray):
        self.data, self.indices = data, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, batch_pos):
        idx = np.sort(self.indices[np.asarray(batch_pos)])
        d = self.data
        return (torch.from_numpy(np.ascontiguousarray(d.images[idx])),
                torch.from_numpy(np.ascontiguousarray(d.masks[idx])),
                torch.from_numpy(d.has_mask[idx]),
                torch.from_numpy(d.labels[idx]))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled (seed, epoch)-deterministic batches, sharded across DDP ranks; set_epoch per epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world: int = 1, drop_last: bool = False, balance=None):
        self.n, self.bs, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last, self.epoch = rank, world, drop_last, 0
        self.balance = balance  # None, or (labels, sources, indices): sources.balanced_order draws the epoch

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _order(self):
        order = np.arange(self.n)
        if self.balance is not None:
            from .sources import balanced_order
            order = balanced_order(*self.balance, np.random.default_rng([self.seed, self.epoch]))
        elif self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        if self.world > 1:  # pad to a multiple of world so every rank runs the same number of steps
            pad = (-len(order)) % self.world
            order = np.concatenate([order, order[:pad]])[self.rank::self.world]
        return order

    def __iter__(self):
        order = self._order()
        for s in range(0, len(order), self.bs):
            b = order[s:s + self.bs]
            if self.drop_last and len(b) < self.bs:
                break
            yield b.tolist()

    def __len__(self):
        m = len(self._order())
        return m // self.bs if self.drop_last else -(-m // self.bs)


def make_loader(data: CachedData, indices, batch_size, shuffle, seed=0, rank=0, world=1,
                workers=0, pin=False, drop_last=False, balance_sources=False):
    balance = (data.labels, data.sources, np.asarray(indices)) if balance_sources else None
    sampler = EpochBatchSampler(len(indices), batch_size, shuffle, seed, rank, world, drop_last, balance)
    return torch.utils.data.DataLoader(BatchDataset(data, indices), batch_size=None, sampler=sampler,
                                       num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0)


# ---------------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, m: torch.Tensor, cfg, gen: torch.Generator, has_mask: torch.Tensor | None = None):
    """Random affine (rotation, scale, shift) on image AND mask together, then optional outside-lung
    randomisation, then brightness/contrast on the image. x: (B, 3, S, S) in [0, 1]; m: (B, 1, S, S)
    in {0, 1}; has_mask: (B,) bool (samples without a mask are never lung-masked). Runs on x's device.

    No horizontal flips: a chest film is not mirror-symmetric (heart and aortic knob on the left,
    lateral markers), a flipped film is an anatomically implausible input, and the database holds
    none, so flips would teach invariance the data never needs.
    """
    b, dev = x.shape[0], x.device
    u = lambda: (torch.rand(b, generator=gen) * 2 - 1)  # noqa: E731  U(-1, 1) per sample, CPU RNG
    x = scanner_look(x, cfg, gen)
    ang = u() * np.deg2rad(cfg.aug_rotate_deg)
    scale = 1 + u() * cfg.aug_scale
    tx, ty = u() * cfg.aug_shift * 2, u() * cfg.aug_shift * 2  # affine_grid units: [-1, 1] = full width
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(dev)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = (F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    if cfg.outside_lung_aug > 0 and has_mask is not None:
        x = outside_lung_randomise(x, m, has_mask, cfg.outside_lung_aug, cfg.outside_lung_fill, cfg.outside_lung_margin, gen)
    bright = (u() * cfg.aug_brightness).to(dev).view(b, 1, 1, 1)
    contrast = (1 + u() * cfg.aug_contrast).to(dev).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp_(0, 1)
    return x, m


def scanner_look(x: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Make a film look processed by another site: with probability cfg.aug_clahe per sample, CLAHE
    (clip 2, 8x8 tiles: the contrast enhancement one source of cxr4's COVID films has and the others
    lack, so the model cannot use "enhanced" as a shortcut for COVID); then a random gamma in
    [1/(1+g), 1+g], g = cfg.aug_gamma (exposure and detector response curves). Off (0) draws nothing
    from `gen`, so recipes without it keep their exact random stream."""
    b = x.shape[0]
    if cfg.aug_clahe > 0:
        pick = torch.rand(b, generator=gen) < cfg.aug_clahe
        if bool(pick.any()):
            import cv2
            clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
            idx = torch.nonzero(pick).flatten().tolist()
            u8 = (x[idx, 0] * 255).round().to(torch.uint8).cpu().numpy()
            eq = torch.from_numpy(np.stack([clahe.apply(im) for im in u8])).to(x.device, torch.float32) / 255
            x = x.clone()
            x[idx] = eq.unsqueeze(1).expand(-1, x.shape[1], -1, -1)
    if cfg.aug_gamma > 0:
        g = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * float(np.log1p(cfg.aug_gamma)))
        x = x.clamp(0, 1) ** g.to(x.device).view(b, 1, 1, 1)
    if cfg.aug_shifts > 0:
        x = random_shifts(x, cfg.aug_shifts, gen)
    return x


# the intensity shifts of cxrkit.training.shifts that leave the lungs where they are (no crop), so the
# mask still fits; CLAHE has its own probability (aug_clahe)
TRAIN_SHIFTS = ("gamma", "contrast", "blur", "sharpen", "noise", "jpeg", "downup", "border_text")
MAX_TRAIN_SHIFT_LEVEL = 0.7  # robustness curves go to level 1: their top is beyond what training saw


def random_shifts(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """With probability p per sample, one of TRAIN_SHIFTS at a level in [0, MAX_TRAIN_SHIFT_LEVEL]; every
    draw comes from `gen`, so a resumed run repeats it exactly."""
    from .shifts import apply_shift
    b = x.shape[0]
    pick = torch.rand(b, generator=gen) < p
    kind = torch.randint(len(TRAIN_SHIFTS), (b,), generator=gen)
    level = torch.rand(b, generator=gen) * MAX_TRAIN_SHIFT_LEVEL
    seeds = torch.randint(2 ** 31 - 1, (b,), generator=gen)
    if not bool(pick.any()):
        return x
    x = x.clone()
    for i in torch.nonzero(pick).flatten().tolist():
        u8 = (x[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = apply_shift(u8, TRAIN_SHIFTS[int(kind[i])], float(level[i]), int(seeds[i]))
        x[i] = (torch.from_numpy(out).to(x.device, torch.float32) / 255).unsqueeze(0).expand(x.shape[1], -1, -1)
    return x


def outside_lung_randomise(x, m, has_mask, p: float, fill: str, margin_frac: float, gen: torch.Generator):
    """With probability p per sample that has a lung mask, replace every pixel outside the lung mask
    (dilated by margin_frac of the image size, so the lung border itself stays) by a fill:
      noise    - Gaussian noise with the image's own mean and standard deviation
      blur     - the image blurred beyond recognition (box filter of 1/8 of the image size)
      constant - the image's mean grey
    Why: cxr4's classes come mostly from different sources, and what lies outside the lungs (labels,
    collimation, body habitus, film look) identifies the source; hiding it in half the training
    images pushes the classifier towards lung content. Training only: inference is unchanged."""
    if fill not in OUTSIDE_LUNG_FILLS:
        raise ValueError(f"outside_lung_fill must be one of {OUTSIDE_LUNG_FILLS}, got {fill!r}")
    b, _, s, _ = x.shape
    pick = (torch.rand(b, generator=gen) < p).to(x.device) & has_mask.to(x.device).bool()
    noise = torch.randn(x.shape[0], 1, s, s, generator=gen).to(x.device)  # drawn always: RNG use is fixed
    if not bool(pick.any()):
        return x
    r = max(0, int(round(margin_frac * s)))
    keep = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r) if r > 0 else m
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    if fill == "noise":
        std = x.std(dim=(1, 2, 3), keepdim=True)
        filler = (mean + std * noise).clamp(0, 1).expand_as(x)
    elif fill == "blur":
        k = max(3, (s // 8) | 1)
        filler = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    else:
        filler = mean.expand_as(x)
    mixed = x * keep + filler * (1 - keep)
    return torch.where(pick.view(b, 1, 1, 1), mixed, x)


# ------------------------------------------------------------------------------------ loading
def load_data(data_dir, img_size, cache_dir, workers, rank, world, progress=True, source_rule=""):
    """The training data of one root or several (a list): each root cached on its own, several joined
    (join_roots); every image gets its source (cxrkit.training.sources). A prebuilt cache folder
    (meta.json + images.npy) is accepted as a root too."""
    from .sources import apply_source_rule, root_names
    dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    if not dirs:
        raise DataError("--data_dir: give at least one data folder")
    parts = [_load_root(d, img_size, cache_dir, workers, rank, world, progress) for d in dirs]
    names = root_names(dirs)
    data = parts[0] if len(parts) == 1 else join_roots(parts, names, [str(d) for d in dirs])
    if len(parts) == 1:
        data.sources = [names[0]] * len(data.paths)
    data.sources = apply_source_rule(data, source_rule)
    return data


def _load_root(data_dir, img_size, cache_dir, workers, rank, world, progress):
    p = Path(data_dir)
    if (p / "meta.json").is_file() and (p / "images.npy").is_file():
        data = load_cache(p, p)
        if data.images.shape[1] != img_size:
            raise DataError(f"cache {p} holds {data.images.shape[1]}px images but --img_size is {img_size}")
        return data
    if rank == 0:
        data = build_cache(p, img_size, cache_dir, workers=workers, progress=progress)
    barrier(world)
    if rank != 0:
        data = build_cache(p, img_size, cache_dir, workers=0, progress=False)  # reads the cache rank 0 made
    return data


def join_roots(parts: list[CachedData], names: list[str], dirs: list[str]) -> CachedData:
    """Several roots as one data set: classes are the union of their class folders (sorted), paths
    "<root name>/<relative path>", arrays concatenated in memory (a few hundred MB at most at 128 px)."""
    classes = sorted(set().union(*(p.classes for p in parts)))
    def prefixed(name, rels):
        return [None if r is None else f"{name}/{r}" for r in rels]
    return CachedData(
        classes=classes,
        paths=[q for n, p in zip(names, parts) for q in prefixed(n, p.paths)],
        labels=np.concatenate([np.array([classes.index(p.classes[l]) for l in p.labels], np.int64) for p in parts]),
        images=np.concatenate([np.asarray(p.images) for p in parts]),
        masks=np.concatenate([np.asarray(p.masks) for p in parts]),
        has_mask=np.concatenate([p.has_mask for p in parts]),
        skipped=[{**d, "path": f"{n}/{d['path']}"} for n, p in zip(names, parts) for d in p.skipped],
        root="", root_of=dict(zip(names, dirs)),
        mask_paths=[q for n, p in zip(names, parts) for q in prefixed(n, p.mask_paths or [None] * len(p.paths))],
        sources=[n for n, p in zip(names, parts) for _ in p.paths])
