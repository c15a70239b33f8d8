"""Shared pytest fixtures.

Add other fixtures in their own clearly marked section below; the inference/export section keeps
its names prefixed with `cxr_` / `tiny_`.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# =============================================================================================
# Inference / ONNX export fixtures: ONE tiny checkpoint trained on real X-rays and exported once
# per test session. Images are copied from the shared database into pytest's tmp folders at test
# time (never into the repository).
# =============================================================================================
CXR_DATA = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data" / "cxr4"))
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
        pytest.skip(f"real chest X-ray data not found at {CXR_DATA} (set CXR_DATA_DIR)")
    return CXR_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, cxr_data_available):
    """Train arch 'tiny' at 64 px for 1 epoch (model_arch.py, in-process) and export it to ONNX."""
    import model_arch
    from cxrkit.export import export_to_onnx, meta_path_for

    root = tmp_path_factory.mktemp("cxr_tiny")
    data = root / "data"
    copy_real_subset(data, TRAIN_PER_CLASS)
    out = root / "train_out"
    rc = model_arch.main(["--data_dir", str(data), "--arch", "tiny", "--img_size", "64", "--num_epochs", "1",
                          "--batch_size", "8", "--output_dir", str(out), "--workers", "0", "--quiet"])
    assert rc == 0, "training the tiny test checkpoint failed"
    ck = out / "model_checkpoints" / "best_covid_model.pth"
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
