"""Shared pytest fixtures.

Add other fixtures in their own clearly marked section below; the inference/export section keeps
its names prefixed with `cxr_` / `tiny_`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]

# =============================================================================================
# Markers (registered in pyproject.toml): every test that uses a real-data fixture is `realdata`,
# so `pytest -m "not realdata and not slow"` is the quick unit run that needs no data.
# =============================================================================================
# Tests that train or start subprocesses in their body carry @pytest.mark.slow; these fixtures train (or
# run a CLI over a folder) once per module/session, so every test using them is `slow` too.
REALDATA_FIXTURES = {"cxr_data_available", "tiny_model", "cxr_eval_dir", "mdt_subset", "mdt_cache"}
SLOW_FIXTURES = {"tiny_model", "run_1epoch", "resume_runs", "fold_runs", "evaluated", "cli_runs", "report_runs",
                 "bad_input_runs", "shipped_runs", "misuse_files"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if REALDATA_FIXTURES & used:
            item.add_marker(pytest.mark.realdata)
        if SLOW_FIXTURES & used:
            item.add_marker(pytest.mark.slow)


# =============================================================================================
# Inference / ONNX export fixtures: ONE tiny checkpoint trained on real X-rays and exported once
# per test session. Images are copied from the shared database into pytest's tmp folders at test
# time (never into the repository).
# =============================================================================================
from tests.helpers import CXR_DATA, NO_DATA_REASON  # noqa: E402  (CXR_DATA_DIR, else ../shared/data/cxr4)
CXR_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
TRAIN_PER_CLASS = 14   # "a dozen+" per class for the 1-epoch tiny model
EVAL_PER_CLASS = 3     # 12 inference images, disjoint from the training ones


def copy_real_subset(dst: Path, per_class: int, offset: int = 0, masks: bool = True) -> list[Path]:
    """Copy `per_class` images (+ masks) per class, in sorted order from `offset`, into the database
    layout under dst; returns the copied image paths."""
    out = []
    for c in CXR_CLASSES:
        src_img = CXR_DATA / c / "images"
        names = sorted(os.listdir(src_img))[offset:offset + per_class]
        (dst / c / "images").mkdir(parents=True, exist_ok=True)
        if masks:
            (dst / c / "masks").mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy2(src_img / n, dst / c / "images" / n)
            out.append(dst / c / "images" / n)
            m = CXR_DATA / c / "masks" / n
            if masks and m.is_file():
                shutil.copy2(m, dst / c / "masks" / n)
    return out


@pytest.fixture(scope="session")
def cxr_data_available():
    if not all((CXR_DATA / c / "images").is_dir() for c in CXR_CLASSES):
        pytest.skip(NO_DATA_REASON)
    return CXR_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, cxr_data_available):
    """Train arch 'tiny' at 64 px for 1 epoch (model_arch.py, in-process) and export it to ONNX."""
    from cxrkit.training.export import export_to_onnx, meta_path_for
    from tests.helpers import train_tiny

    root = tmp_path_factory.mktemp("cxr_tiny")
    data = root / "data"
    copy_real_subset(data, TRAIN_PER_CLASS)
    out = root / "train_out"
    rc = train_tiny(data, out, img_size=64, device=None)
    assert rc == 0, "training the tiny test checkpoint failed"
    ck = out / "model_checkpoints" / "best_covid_model.pth"
    # 8 validation images are too few to fit a temperature (it stays 1): set a known one, so the
    # tests see both backends apply a real calibration
    from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint
    ckd = load_checkpoint(ck)
    ckd["temperature"] = 2.5
    atomic_torch_save(ckd, ck)
    onnx_path = root / "models" / "tiny.onnx"
    meta = export_to_onnx(ck, onnx_path)
    return SimpleNamespace(checkpoint=ck, onnx=onnx_path, meta_path=meta_path_for(onnx_path), meta=meta,
                           root=root, train_data=data)


@pytest.fixture(scope="session")
def cxr_eval_dir(tmp_path_factory, cxr_data_available):
    """A dozen real images (3 per class, not used for training) in the database layout with masks,
    plus one corrupt file."""
    root = tmp_path_factory.mktemp("cxr_eval") / "data"
    copy_real_subset(root, EVAL_PER_CLASS, offset=TRAIN_PER_CLASS)
    (root / "COVID" / "images" / "corrupt_scan.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


# =============================================================================================
# Model / data-pipeline / training fixtures (tests/test_model.py, test_losses.py, test_data.py,
# test_training.py). Names prefixed `mdt_`. One small real subset is copied per session into a
# pytest tmp folder (never into the repository); training tests copy it again before changing it.
# =============================================================================================
MDT_PER_CLASS = 12              # 48 real images: split 32 / 8 / 8 with the default fractions
MDT_OFFSET = 40                 # disjoint from the inference fixtures' images (not required, just tidy)
MDT_CORRUPT = "COVID/images/broken scan (copy).png"   # a corrupt file the pipeline must skip
MDT_NO_MASK = "Normal"          # the first image of this class has its mask removed


@pytest.fixture(scope="session")
def mdt_subset(tmp_path_factory):
    """Real chest X-rays in the database layout (<Class>/images + <Class>/masks; names with spaces
    and parentheses), plus the quirks training must survive: one corrupt image and one image
    without a mask. Treat as read-only."""
    if not all((CXR_DATA / c / "images").is_dir() for c in CXR_CLASSES):
        pytest.skip(NO_DATA_REASON)
    root = tmp_path_factory.mktemp("mdt") / "data"
    copy_real_subset(root, MDT_PER_CLASS, offset=MDT_OFFSET)
    (root / MDT_CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n truncated, not an image")
    first = sorted((root / MDT_NO_MASK / "masks").iterdir())[0]
    first.unlink()
    return root


@pytest.fixture(scope="session")
def mdt_subset_info():
    """What mdt_subset contains, for assertions (no `import conftest` in test modules)."""
    return SimpleNamespace(per_class=MDT_PER_CLASS, corrupt=MDT_CORRUPT, no_mask_class=MDT_NO_MASK)


@pytest.fixture(scope="session")
def mdt_cache(mdt_subset, tmp_path_factory):
    """The subset decoded once at 64 px (cxrkit.training.data.CachedData)."""
    from cxrkit.training.data import build_cache
    return build_cache(mdt_subset, 64, tmp_path_factory.mktemp("mdt_cache"), workers=0, progress=False)
