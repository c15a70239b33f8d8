"""Issue 25, "Reliability, round 4": the training findings (R4-01 ...), each failing before its fix.

  R4-01  training's data caching keeps every step from bytes to the cached array inside the per-file
         guard: a multi-frame colour DICOM is decoded or a counted skip, never the caching's end
"""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import copy_real_subset
from tests.helpers import CXR_DATA


@pytest.mark.parametrize("workers", [0, 1])
def test_r4_01_multiframe_colour_dicom_in_training_data_is_decoded_or_skipped(workers, tmp_path,
                                                                              cxr_data_available):
    from pydicom.data import get_testdata_file

    from cxrkit.training.data import build_cache
    root = tmp_path / "data"
    copy_real_subset(root, 2, masks=False)
    names = ["SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"]
    for n in names:
        shutil.copy2(get_testdata_file(n), root / "Normal" / "images" / n)
    d = build_cache(root, 32, tmp_path / "cache", workers=workers, progress=False)
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in d.skipped}
    kept = {p.split("/")[-1] for p in d.paths}
    assert len(kept - set(names)) == 8 and CXR_DATA.is_dir()
    for n in names:
        assert (n in kept) != (n in skipped) and "\n" not in skipped.get(n, "")
