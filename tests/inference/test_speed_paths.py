"""Issue 26's fast paths give the same answers: the precision choice and its fallbacks, the BF16 path
against FP32 (where this CPU and OpenVINO have it), and the faster decoders and encoder against the
rules they replace, byte for byte. Speed itself is measured by scripts/benchmark_real_use.py, not here."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cxrkit.core import cpu, decode
from cxrkit.core.config import ONNX_PATH
from cxrkit.core.errors import InferenceError
from cxrkit.core.model_meta import ModelMeta
from cxrkit.inference.backends import OnnxBackend, choose_precision, openvino_version
from cxrkit.inference.render import encode_png
from tests.helpers import REPO, make_dicom

SHIPPED = REPO / ONNX_PATH
PASSED = {"bf16": {"passed": True, "ood_threshold": 9.0, "shift_reference": {"values": [[1, 2, 3, 4]]}}}


def _meta(fast_paths=None, threshold=2.0) -> ModelMeta:
    from cxrkit.core.ood import GateSpec
    return ModelMeta(class_names=["A", "B"], img_size=64, temperature=1.0, gate=GateSpec(threshold=threshold),
                     shift_reference={"values": [[0, 0, 0, 0]]}, fast_paths=fast_paths)


# ------------------------------------------------------------------------------ precision choice
def test_auto_takes_bf16_only_where_everything_holds():
    amx = frozenset({"amx_bf16", "avx512f"})
    assert choose_precision("auto", _meta(PASSED), True, amx, "2026.4")[0] == "bf16"
    # each missing condition keeps FP32 and says which one
    for meta, cpu_only, flags, ov, why in (
            (_meta(PASSED), True, frozenset({"avx2"}), "2026.4", "no amx_bf16 or avx512_bf16"),
            (_meta(PASSED), True, amx, None, "OpenVINO is not installed"),
            (_meta(PASSED), False, amx, "2026.4", "CPU only"),
            (_meta(None), True, amx, "2026.4", "never run"),
            (_meta({"bf16": {"passed": False}}), True, amx, "2026.4", "failed")):
        prec, reason = choose_precision("auto", meta, cpu_only, flags, ov)
        assert prec == "fp32" and why in reason, reason
    assert choose_precision("fp32", _meta(PASSED), True, amx, "2026.4")[0] == "fp32"


def test_asking_for_bf16_where_it_cannot_run_is_one_line_error():
    with pytest.raises(InferenceError, match="--precision bf16: this CPU has no"):
        choose_precision("bf16", _meta(PASSED), True, frozenset({"avx2"}), "2026.4")
    with pytest.raises(InferenceError, match="OpenVINO is not installed"):
        choose_precision("bf16", _meta(PASSED), True, frozenset({"amx_bf16"}), None)
    with pytest.raises(InferenceError, match="--precision must be one of"):
        choose_precision("int4", _meta(PASSED), True, frozenset(), None)


def test_a_fast_path_brings_its_own_gate_threshold_and_shift_reference():
    m = _meta(PASSED)
    assert m.for_precision("fp32") is m
    b = m.for_precision("bf16")
    assert b.gate.threshold == 9.0 and b.shift_reference == PASSED["bf16"]["shift_reference"]
    assert m.gate.threshold == 2.0  # the model's own meta is left as it was
    assert _meta(None).for_precision("bf16").gate.threshold == 2.0  # nothing fitted: FP32's are kept


def test_the_run_says_which_precision_ran(tmp_path):
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    b = OnnxBackend(SHIPPED, precision="fp32")
    d = b.describe()
    assert (d["engine"], d["precision"]) == ("onnxruntime", "fp32") and "asked for" in d["precision_reason"]
    assert d["cpu"]["model"] == cpu.cpu_model()
    auto = OnnxBackend(SHIPPED).describe()
    assert auto["precision"] in ("fp32", "bf16") and auto["precision_reason"]


@pytest.mark.skipif(not (openvino_version() and cpu.bf16_flags()),
                    reason="the BF16 path needs OpenVINO (the [fast] extra) and a CPU with AMX or AVX-512 BF16")
def test_bf16_agrees_with_fp32_on_real_films(cxr_eval_dir):
    """The shipped model's BF16 path against FP32 on real films: the same class, lungs within a pixel
    fraction, and (its own threshold) the same gate decision on these in-source films."""
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    from cxrkit.core.model_input import load_for_model, to_model_input_np
    fp, bf = OnnxBackend(SHIPPED, precision="fp32"), OnnxBackend(SHIPPED, precision="bf16")
    assert bf.describe()["engine"] == "openvino"
    from cxrkit.core.decode import ImageReadError
    u8 = []
    for p in sorted(p for p in cxr_eval_dir.rglob("*.png") if "masks" not in p.parts):
        try:
            u8.append(load_for_model(p, fp.img_size))
        except ImageReadError:  # the folder's deliberately broken files
            pass
    assert len(u8) >= 10
    x = to_model_input_np(np.stack(u8))
    (sf, lf, of), (sb, lb, ob) = fp.forward_ood(x), bf.forward_ood(x)
    assert (lf.argmax(1) == lb.argmax(1)).mean() >= 0.9
    assert np.mean((sf > 0.5) != (sb > 0.5)) < 0.01
    assert np.array_equal(of > fp.meta.gate.threshold, ob > bf.meta.gate.threshold)


# ------------------------------------------------------------------------------------- start-up
def test_graph_binding_facts_are_read_from_the_file_without_a_session(tiny_model, tmp_path):
    """The loader checks the meta file against the graph's own metadata_props without parsing the graph
    (OpenVINO then loads its cached compiled blob directly): the wire-format reader must give what ONNX
    Runtime gives, and nothing for a file that is not a ModelProto."""
    import onnxruntime as ort
    from cxrkit.core.io_utils import onnx_metadata_props
    sess = ort.InferenceSession(str(tiny_model.onnx), providers=["CPUExecutionProvider"])
    want = dict(sess.get_modelmeta().custom_metadata_map)
    assert onnx_metadata_props(tiny_model.onnx) == want and "cxrkit_class_names" in want
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all" * 10)
    assert onnx_metadata_props(junk) is None
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_model.onnx.read_bytes()[:200])  # a torn copy: the graph's length runs past the end
    assert onnx_metadata_props(cut) is None
    # a graph whose metadata this reader cannot walk is refused in one line, not taken as unbound
    b = OnnxBackend(tiny_model.onnx, precision="fp32")
    b.graph_props = None
    with pytest.raises(InferenceError, match="its own metadata cannot be read"):
        b._check_binding()


def test_the_model_file_is_hashed_once_a_run_and_again_when_it_changes(tmp_path):
    import hashlib
    import os
    from cxrkit.core import io_utils
    f = tmp_path / "m.onnx"
    f.write_bytes(b"a" * 1000)
    assert io_utils.model_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    calls = []
    real = hashlib.sha256
    try:
        hashlib.sha256 = lambda *a: calls.append(1) or real(*a)
        io_utils.model_sha256(f)
        assert not calls  # the binding check, provenance and the DICOM writer share one digest
        io_utils.sha256_file(f)
        assert calls  # output checks (outdir, shard manifests) always read the file
        st = f.stat()
        f.write_bytes(b"b" * 1000)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime put back (cp -p): still hashed anew
        assert io_utils.model_sha256(f) == real(b"b" * 1000).hexdigest()
    finally:
        hashlib.sha256 = real


def test_the_fp32_referee_is_made_at_the_first_close_call_where_no_spare_core_made_it():
    """Where nothing built the referee in the background at start-up (2 cores, where it would take the
    model's time; here an FP32 backend, which has none), the first close call builds it, once, and gets
    FP32's logits."""
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    b = OnnxBackend(SHIPPED, precision="fp32")
    assert b._referee is None
    x = np.random.default_rng(0).random((3, 3, b.img_size, b.img_size), dtype=np.float32)
    want = b.forward(x)[1]
    b.referee_margin = 1.0  # every call close (this backend is FP32 itself: the referee's answers are its own)
    tie = np.zeros((3, len(b.class_names)), np.float32)
    np.testing.assert_allclose(b.referee_close_calls(x, tie), want, rtol=1e-4, atol=1e-4)
    first = b._referee_engine
    b.referee_close_calls(x, tie)
    assert b._referee_engine is first and b.n_refereed == 6


@pytest.mark.skipif(not (openvino_version() and cpu.bf16_flags()),
                    reason="the BF16 path needs OpenVINO (the [fast] extra) and a CPU with AMX or AVX-512 BF16")
def test_openvino_keeps_one_compiled_model_per_model_content(tiny_model, tmp_path, monkeypatch):
    """OpenVINO, compiling from a path, would trust path + size + whole-second mtime: the cache folder is
    named by the file's SHA-256 instead, so a same-size replacement never loads the old model's blob."""
    import shutil
    from cxrkit.core.io_utils import model_sha256
    monkeypatch.setenv("CXRKIT_CACHE_DIR", str(tmp_path / "cache"))
    m = tmp_path / "m.onnx"
    shutil.copy2(tiny_model.onnx, m)
    shutil.copy2(tiny_model.meta_path, tmp_path / "m.onnx.meta.json")
    OnnxBackend(m, precision="bf16")
    assert [d.name for d in (tmp_path / "cache" / "openvino").iterdir()] == [model_sha256(m)[:16]]


# ------------------------------------------------------------------------------------- memory
def test_engine_calls_never_exceed_a_fixed_batch_so_peak_memory_stays_flat():
    """Peak memory must not grow with the number of films (issue 26). An engine allocates anew for a batch
    larger than any before, so the gate's re-scored views go in calls no larger than the run's batch, and
    the FP32 referee's close calls in zero-padded chunks of REFEREE_BATCH; both give the one-call answers."""
    from cxrkit.core.ood import VIEWS, make_view, score_views
    from cxrkit.inference.backends import REFEREE_BATCH
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 8, 8), dtype=np.float32)
    sizes = []

    def score(xv):
        sizes.append(len(xv))
        return xv.reshape(len(xv), -1).mean(1)
    got = score_views(score, x, np.full(5, 10.0), threshold=1.0)  # every film over: all views needed
    assert max(sizes) <= len(x) and sum(sizes) == len(x) * len(VIEWS)
    assert got[3] == {v: pytest.approx(float(score(make_view(x[3:4], v))[0])) for v in VIEWS}

    class Engine:
        def __init__(self):
            self.shapes = []

        def run(self, names, feed):
            a = next(iter(feed.values()))
            self.shapes.append(a.shape[0])
            return [a.reshape(len(a), -1)[:, :4].copy()]
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    b, eng = OnnxBackend(SHIPPED, precision="fp32"), Engine()
    a = rng.random((REFEREE_BATCH * 2 + 1, 3, 8, 8), dtype=np.float32)
    out = b._run(eng, ["classification"], a, REFEREE_BATCH)[0]
    assert set(eng.shapes) == {REFEREE_BATCH} and np.array_equal(out, a.reshape(len(a), -1)[:, :4])


# ------------------------------------------------------------------------------------- decoding
def test_16bit_to_8bit_shortcut_is_the_rule_byte_for_byte():
    for depth in (9, 12, 16):
        a = np.arange(2 ** depth, dtype=np.uint16).reshape(2, -1)
        want = np.clip(np.round(a.astype(np.float32) * (255.0 / (2 ** depth - 1))), 0, 255).astype(np.uint8)
        assert np.array_equal(decode._to_uint8(a), want)


@pytest.mark.parametrize("bits", [8, 16])
def test_large_grey_png_fast_path_gives_opencvs_pixels(tmp_path, bits):
    """ISA-L inflate + numpy unfiltering (None / Sub / Up rows, mixed too) against OpenCV, byte for byte;
    Average and Paeth rows, and small files, are left to OpenCV."""
    pytest.importorskip("isal")
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 4096, (64, 64)).astype(np.float32), (1024, 1024))
    a = np.clip(base + rng.normal(0, 30, base.shape), 0, 4095).astype(np.uint16)
    a[::7] = 0  # flat rows: the adaptive filter mixes row filters
    a = a if bits == 16 else np.tile((a >> 4).astype(np.uint8), (2, 2))
    for name, fast_expected in (("NONE", True), ("SUB", True), ("UP", True), ("FAST_FILTERS", True),
                                ("AVG", False), ("PAETH", False)):
        flag = getattr(cv2, f"IMWRITE_PNG_{name}" if name == "FAST_FILTERS" else f"IMWRITE_PNG_FILTER_{name}")
        p = tmp_path / f"{name}.png"
        cv2.imwrite(str(p), a, [cv2.IMWRITE_PNG_FILTER, flag])
        buf = np.fromfile(str(p), np.uint8)
        assert buf.size >= decode.FAST_INFLATE_MIN_BYTES
        fast = decode._png_grey_fast(buf)
        assert (fast is not None) == fast_expected, name
        if fast is not None:
            assert np.array_equal(fast, cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)), name
        assert np.array_equal(decode.read_gray(p), decode._to_uint8(a)), name
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), a[:64, :64])
    assert decode._png_grey_fast(np.fromfile(str(small), np.uint8)) is None
    if bits == 8:  # one IDAT chunk (the project's own encoder; OpenCV writes many): inflated from the buffer itself
        noisy = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
        one = np.frombuffer(encode_png(noisy), np.uint8)
        assert isinstance(decode._png_chunks(memoryview(one))[1], memoryview)
        assert np.array_equal(decode._png_grey_fast(one), noisy)


def test_dicom_by_table_is_the_per_pixel_rule_byte_for_byte(tmp_path):
    import pydicom
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 4096, (64, 48)).astype(np.uint16)
    cases = [("MONOCHROME2", {}), ("MONOCHROME2", {"WindowCenter": 1500, "WindowWidth": 1200}),
             ("MONOCHROME2", {"RescaleSlope": 2, "RescaleIntercept": -1024}), ("MONOCHROME1", {})]
    for i, (photometric, tags) in enumerate(cases):
        p = tmp_path / f"IM{i:06d}"
        make_dicom(p, arr, photometric=photometric, bits_stored=12, **tags)
        ds = pydicom.dcmread(p)
        mono1 = photometric == "MONOCHROME1"
        fast = decode._dicom_gray_by_lut(ds.pixel_array, ds, mono1)
        assert fast is not None and np.array_equal(fast, decode._dicom_gray(p, ds.pixel_array, ds, mono1)), tags
        assert np.array_equal(decode.read_gray(p), fast)


def test_jpeg_lossless_dicom_is_decoded(tmp_path):
    """What PACS archives hold: JPEG Lossless (process 14, SV1), decoded through GDCM, named like IM000001."""
    imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs (the [bench] extra) encodes the test file")
    import sys
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark_sets import _dicom_bytes
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 4096, (96, 80)).astype(np.uint16)
    assert imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1,
                                                             bitspersample=12)).shape == arr.shape
    (tmp_path / "IM000001").write_bytes(_dicom_bytes(arr, jpeg_lossless=True))
    (tmp_path / "IM000002").write_bytes(_dicom_bytes(arr, jpeg_lossless=False))
    tags: dict = {}
    a = decode.read_gray_info(tmp_path / "IM000001", tags)[0]
    assert tags["ViewPosition"] == "PA" and tags["SOPInstanceUID"]
    assert np.array_equal(a, decode.read_gray(tmp_path / "IM000002"))
    # libjpeg-turbo's frame (the [fast] path) is GDCM's, value for value
    import pydicom
    ds = pydicom.dcmread(tmp_path / "IM000001")
    fast = decode._lossless_jpeg_frame(ds)
    assert fast is not None and np.array_equal(fast, ds.pixel_array) and np.array_equal(fast, arr)


# -------------------------------------------------------------------------------------- writing
def test_png_encoder_round_trips_grey_and_colour():
    rng = np.random.default_rng(3)
    for shape in ((1, 1), (7, 5), (1, 9, 3), (120, 90, 3)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(cv2.imdecode(np.frombuffer(encode_png(a), np.uint8), cv2.IMREAD_UNCHANGED), a)
    from PIL import Image
    a = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(a))))[..., ::-1], a)


def test_summary_carries_stage_times(tmp_path):
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    from cxrkit.cli import infer_onnx
    from cxrkit.training.synthetic import generate
    data = generate(tmp_path / "syn", per_class=2, seed=4)
    assert infer_onnx.main(["--data_dir", str(data), "--save_dir", str(tmp_path / "o"), "--quiet",
                            "--no_report"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    st = s["throughput"]["stage_seconds"]
    assert set(st) == {"decode", "preprocess", "model", "write"} and all(v > 0 for v in st.values())
    assert s["backend_info"]["precision"] in ("fp32", "bf16")


def test_decoding_in_processes_gives_the_same_csv(tmp_path):
    """--decode processes (worker processes from a fork server) against threads: identical predictions."""
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    from cxrkit.cli import infer_onnx
    from cxrkit.training.synthetic import generate
    data = generate(tmp_path / "syn", per_class=3, seed=6)
    for mode in ("threads", "processes"):
        assert infer_onnx.main(["--data_dir", str(data), "--save_dir", str(tmp_path / mode), "--quiet", "--outputs",
                                "csv", "--decode", mode, "--precision", "fp32", "--workers", "2"]) == 0
    assert (tmp_path / "threads" / "predictions.csv").read_bytes() == \
        (tmp_path / "processes" / "predictions.csv").read_bytes()
    assert json.loads((tmp_path / "processes" / "summary.json").read_text())["decode"] == "processes"


def test_auto_decode_takes_processes_for_archives_of_full_size_films(tmp_path):
    from types import SimpleNamespace
    from cxrkit.inference.pipeline import PROCESS_MIN_FILE_BYTES, PROCESS_MIN_IMAGES, decode_mode
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(b"x" * PROCESS_MIN_FILE_BYTES)
    opts = SimpleNamespace(decode="auto", workers=2)
    items = lambda p, n: [SimpleNamespace(path=p)] * n  # noqa: E731
    assert decode_mode(opts, items(big, PROCESS_MIN_IMAGES)) == "processes"
    assert decode_mode(opts, items(big, PROCESS_MIN_IMAGES - 1)) == "threads"
    assert decode_mode(opts, items(small, 1000)) == "threads"
    assert decode_mode(SimpleNamespace(decode="auto", workers=1), items(big, 1000)) == "threads"
    assert decode_mode(SimpleNamespace(decode="processes", workers=2), items(small, 1)) == "processes"


def test_shipped_model_is_found_from_another_working_directory(tmp_path, monkeypatch):
    """The source checkout is searched (cxrkit/core/shipped.py is two folders below it)."""
    from cxrkit.core.shipped import resolve_default
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    monkeypatch.chdir(tmp_path)
    assert resolve_default(ONNX_PATH, ONNX_PATH, "--onnx_path").resolve() == SHIPPED.resolve()


def test_physical_cores_count_hyper_threads_once_from_one_read_of_cpuinfo(monkeypatch):
    two_cores_four_threads = "".join(f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {p // 2}\n\n" for p in range(4))
    monkeypatch.setattr(cpu, "_cpuinfo_lines", lambda: tuple(two_cores_four_threads.splitlines(keepends=True)))
    assert cpu.cores_of({0, 1, 2, 3}) == 2
    assert cpu.cores_of({0, 1}) == 1  # the process may run on one core's two threads only
    monkeypatch.setattr(cpu, "_cpuinfo_lines", lambda: ("processor\t: 0\n", "\n"))
    assert cpu.cores_of({0}) is None  # cpuinfo without core ids: the caller counts logical CPUs


@pytest.mark.skipif(not openvino_version(), reason="OpenVINO is not installed (the [fast] extra)")
def test_openvino_starts_without_its_converter_which_stays_reachable():
    code = ("import sys\nfrom cxrkit.inference.backends import import_openvino\nov = import_openvino()\n"
            "assert 'openvino.tools.ovc' not in sys.modules, 'the converter was imported at start-up'\n"
            "assert ov.Core is not None\n"
            "from openvino.tools.ovc import convert_model\nassert ov.convert_model is convert_model\n"
            "assert import_openvino() is ov\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]


def test_a_run_whose_stderr_is_not_a_terminal_draws_no_bar_and_never_imports_tqdm(tmp_path):
    if not SHIPPED.is_file():
        pytest.skip(f"shipped model {SHIPPED} not found")
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    code = ("import sys, run_onnx_inference\nrc = run_onnx_inference.main(['--data_dir', sys.argv[1], '--save_dir', "
            "sys.argv[2], '--outputs', 'csv', '--precision', 'fp32'])\n"
            "assert 'tqdm' not in sys.modules, 'tqdm was imported'\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(img.parent), str(tmp_path / "out")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "\r" not in r.stderr and "inference:" not in r.stderr  # no bar in a captured log
    assert (tmp_path / "out" / "summary.json").is_file()
