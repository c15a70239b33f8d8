"""Reliability findings (issue 9 F1-F8, issue 15 R1-R8; index in tests/inference/test_reliability_inference.py)
that protect cxrkit.core: the output-folder claim (core.outdir) and image decoding (core.decode)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxrkit.core.decode import ImageReadError, read_gray
from tests.helpers import png_header_only


def test_f2_a_crashed_runs_outputs_are_known_and_refused_until_overwrite(tmp_path):
    """The manifest is written before the first output: a run killed half-way leaves a list of what it
    wrote, and the next run needs --overwrite, which removes exactly those files."""
    from cxrkit.core.outdir import SaveDirError, claim_save_dir
    out = tmp_path / "out"
    dead = claim_save_dir(out).acquire()
    dead.plan(["predictions.csv", "annotated/a.png", "annotated/b.png"])
    (out / "annotated").mkdir()
    (out / "annotated" / "a.png").write_bytes(b"half")       # b.png was never written
    dead.release()                                           # what the OS does when the process dies
    with pytest.raises(SaveDirError, match="did not finish.*--overwrite"):
        claim_save_dir(out).acquire()
    with claim_save_dir(out, overwrite=True) as again:
        assert again.removed == ["annotated/a.png"] and not (out / "annotated").exists()


def test_f6_pixel_limit_is_decided_before_decoding(tmp_path, monkeypatch):
    huge = png_header_only(tmp_path / "huge.png", 40000, 40000)

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although the header says it is too large")
    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageReadError) as e:
        read_gray(huge)
    assert e.value.reason == "image is 40000x40000 px, over the 100 MP limit"


def test_f8_multi_page_tiff_is_noted(tmp_path):
    from PIL import Image

    from cxrkit.core.decode import read_gray_info
    u8 = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "m.tiff", save_all=True, append_images=[Image.fromarray(255 - u8)])
    arr, notes = read_gray_info(tmp_path / "m.tiff")
    assert np.array_equal(arr, u8) and notes == ["multi-page TIFF (2 pages): only the first page was used"]


# ---------------------------------------------------------------- issue 25 (round 4), core findings
@pytest.mark.parametrize("name, frames", [("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 30)])
def test_r4_01_multiframe_colour_dicom_decodes_its_first_frame_with_a_note(name, frames):
    from pydicom.data import get_testdata_file

    from cxrkit.core.decode import read_gray_info
    g, notes = read_gray_info(get_testdata_file(name))
    assert g.ndim == 2 and g.dtype.name == "uint8"
    assert notes == [f"multi-frame DICOM ({frames} frames): only the first frame was used"]


def test_r4_09_disk_full_while_torch_save_writes_is_the_one_line_os_error(tmp_path, monkeypatch):
    import torch

    from cxrkit.core.checkpoint import atomic_torch_save
    from cxrkit.core.errors import OutputWriteError

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1408\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "best.pth"
    with pytest.raises(OutputWriteError) as e:
        atomic_torch_save({"a": 1}, target)
    assert str(target) in str(e.value) and "\n" not in str(e.value) and "file write failed" in str(e.value)
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary file left


def test_a_small_file_that_decodes_huge_is_refused_by_its_header(tmp_path):
    """The pixel limit alone let a 776 KB 16-bit RGBA PNG of 9990 x 9990 take GBs: the decode budget counts
    bytes per pixel from the header, before any pixel is decoded."""
    import cv2
    import numpy as np

    from cxrkit.core.decode import ImageReadError, read_gray_info
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 4), np.uint16))
    b = bytearray(buf.tobytes())
    (tmp_path / "small16.png").write_bytes(bytes(b))
    assert read_gray_info(tmp_path / "small16.png")[0].shape == (8, 8)   # a small one decodes
    b[16:20], b[20:24] = (9990).to_bytes(4, "big"), (9990).to_bytes(4, "big")  # the header claims 9990 x 9990
    (tmp_path / "huge16.png").write_bytes(bytes(b))
    with pytest.raises(ImageReadError, match="decode budget"):
        read_gray_info(tmp_path / "huge16.png")


def test_decode_threads_share_one_byte_budget():
    """Several decode threads never hold more than the budget at once: the second large file waits."""
    import threading
    import time

    from cxrkit.core.decode import ByteBudget
    b = ByteBudget(100)
    order = []

    def big(name, hold_s):
        with b.hold(70):
            order.append(("in", name, b.used))
            time.sleep(hold_s)
        order.append(("out", name))

    t1 = threading.Thread(target=big, args=("a", 0.3))
    t1.start()
    time.sleep(0.05)
    t2 = threading.Thread(target=big, args=("b", 0.0))
    t2.start()
    t1.join()
    t2.join()
    assert order[0] == ("in", "a", 70) and order[1] == ("out", "a") and order[2] == ("in", "b", 70)
    with b.hold(500):             # a request over the whole budget still runs, alone
        assert b.used == 100
    assert b.used == 0


def _zero_png_16bit_rgba(path, side: int) -> None:
    """A valid 16-bit RGBA PNG of side x side zeros, written row by row (never held in memory)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp, row = zlib.compressobj(9), b"\x00" * (1 + side * 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_four_huge_16bit_rgba_pngs_keep_peak_memory_low(tmp_path):
    """Four 9990 x 9990 16-bit RGBA PNGs (about 0.8 MB each on disk, 761 MB each decoded) beside a real-sized
    image: refused by their headers, so the run's peak RSS stays far under 1.5 GB."""
    import json
    import subprocess
    import sys

    import cv2
    import numpy as np

    from tests.helpers import REPO
    d = tmp_path / "in"
    d.mkdir()
    for k in range(4):
        _zero_png_16bit_rgba(d / f"huge{k}.png", 9990)
    cv2.imwrite(str(d / "ok.png"), np.full((512, 512), 100, np.uint8))
    # VmHWM: this process's own peak (getrusage's ru_maxrss survives exec and would count pytest's own)
    code = ("import re, sys; from cxrkit.cli import infer_onnx; "
            f"rc = infer_onnx.main(['--data_dir', {str(d)!r}, '--save_dir', {str(tmp_path / 'out')!r}, "
            "'--outputs', 'csv', '--quiet', '--workers', '4']); "
            "print('RSS_KB', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rss_mb = int(p.stdout.split("RSS_KB")[1].split()[0]) / 1024
    assert rss_mb < 1536, rss_mb
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["n_processed"] == 1 and len(s["skipped"]) == 4
    assert all("decode budget" in x["reason"] for x in s["skipped"])
