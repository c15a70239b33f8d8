"""Batch inference: both CLIs, backend agreement, file formats, TTA, Grad-CAM, error handling."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cxrkit.cli import infer_pth as pth_cli
from cxrkit.cli import infer_onnx as onnx_cli
from cxrkit.core.checkpoint import load_checkpoint, model_from_checkpoint
from cxrkit.inference import (GradCamExplainer, InferenceError, OnnxBackend, TorchBackend, gather_inputs,
                              resolve_providers)
from cxrkit.core.metrics import softmax
from cxrkit.core.ood import not_judged
from cxrkit.core.model_input import load_for_model, to_model_input, to_model_input_np
from cxrkit.core.decode import read_gray
from cxrkit.core.tta import tta_predict
from tests.helpers import assert_one_line_error, make_dicom, read_predictions

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
REQUIRED_PREFIX = (["image_path", "predicted_class", "confidence"] + [f"prob_{c}" for c in CLASSES]
                   + ["lung_area_fraction", "true_class", "correct"])


def read_csv(path):
    return read_predictions(path, header=True)


def probs_of(row):
    return np.array([float(row[f"prob_{c}"]) for c in CLASSES])


def one_line_error(capsys, *needles):
    return assert_one_line_error(capsys, *needles)   # strict: nothing else on stderr


# ----------------------------------------------------------------------------- both CLIs, one folder
@pytest.fixture(scope="module")
def cli_runs(tiny_model, cxr_eval_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_runs")
    common = ["--data_dir", str(cxr_eval_dir), "--num_samples", "0", "--batch_size", "5", "--quiet", "--save_masks"]
    rc_pth = pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--device", "cpu",
                           "--save_dir", str(out / "pth")] + common)
    rc_onnx = onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--save_dir", str(out / "onnx")] + common)
    return {"rc": (rc_pth, rc_onnx), "pth": out / "pth", "onnx": out / "onnx"}


def test_cli_runs_skip_corrupt_and_write_outputs(cli_runs):
    assert cli_runs["rc"] == (0, 0)
    for key in ("pth", "onnx"):
        d = cli_runs[key]
        s = json.loads((d / "summary.json").read_text())
        assert s["n_inputs"] == 13 and s["n_processed"] == 12 and s["n_skipped"] == 1
        assert s["skipped"][0]["path"].endswith("corrupt_scan.png") and s["skipped"][0]["reason"]
        assert s["backend"] == {"pth": "pytorch", "onnx": "onnxruntime"}[key]
        assert s["throughput"]["images_per_second"] > 0 and s["throughput"]["seconds"] > 0
        c = s["classification"]
        assert c["n_labelled"] == 12 and np.asarray(c["confusion_matrix"]).sum() == 12
        assert set(c["per_class"]) == set(CLASSES) and 0 <= c["macro_f1"] <= 1
        assert s["segmentation"]["n_masks"] == 12 and 0 <= s["segmentation"]["mean_dice"] <= 1
        _, rows = read_csv(d / "predictions.csv")
        assert len(rows) == 12 and not any("corrupt" in r["image_path"] for r in rows)
        # the metrics are over every labelled image, judged or not (from the probabilities)
        assert c["accuracy"] == pytest.approx(np.mean([r["true_class"] == CLASSES[int(probs_of(r).argmax())]
                                                       for r in rows]))
        for r in rows:
            assert r["true_class"] in CLASSES and r["true_class"] in r["image_path"]
            judged = not not_judged(r["quality_flags"])  # a gated image: no class, its output under unjudged_*
            cls = r["predicted_class"] if judged else r["unjudged_model_class"]
            conf = r["confidence"] if judged else r["unjudged_model_confidence"]
            assert r["correct"] == (str(int(r["true_class"] == cls)) if judged else "")
            assert (r["predicted_class"], r["confidence"]) != ("", "") if judged else \
                (r["predicted_class"], r["confidence"]) == ("", "")
            p = probs_of(r)
            assert p.sum() == pytest.approx(1, abs=1e-5)
            assert float(conf) == pytest.approx(p.max(), abs=1e-6)
            assert cls == CLASSES[int(p.argmax())]
            ann = cv2.imread(str(d / r["annotated_png"]))
            assert ann is not None and ann.ndim == 3
            mask = cv2.imread(str(d / r["mask_png"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == read_gray(r["image_path"]).shape and set(np.unique(mask)) <= {0, 255}
        assert len({r["annotated_png"] for r in rows}) == 12
        assert not list(d.rglob("*.tmp"))


def test_csv_schema_exact(cli_runs):
    for key in ("pth", "onnx"):
        header, _ = read_csv(cli_runs[key] / "predictions.csv")
        assert header[:len(REQUIRED_PREFIX)] == REQUIRED_PREFIX


def test_backends_agree_image_by_image_and_are_calibrated(cli_runs, tiny_model):
    _, rp = read_csv(cli_runs["pth"] / "predictions.csv")
    _, ro = read_csv(cli_runs["onnx"] / "predictions.csv")
    assert [r["image_path"] for r in rp] == [r["image_path"] for r in ro]
    for a, b in zip(rp, ro):
        assert a["predicted_class"] == b["predicted_class"]
        assert np.abs(probs_of(a) - probs_of(b)).max() <= 1e-4
        assert abs(float(a["lung_area_fraction"]) - float(b["lung_area_fraction"])) <= 0.01
    ck = load_checkpoint(tiny_model.checkpoint)
    t = float(ck["temperature"])
    assert t == pytest.approx(2.5)  # set by the fixture: a non-trivial calibration to check
    for key in ("pth", "onnx"):
        s = json.loads((cli_runs[key] / "summary.json").read_text())
        assert s["calibrated"] is True and s["temperature"] == pytest.approx(t) and s["tta"] == 1
    # the CSV holds softmax(logits / T) of the checkpoint's own logits
    model, _ = model_from_checkpoint(ck)
    x = to_model_input(np.stack([load_for_model(r["image_path"], 64) for r in rp[:4]]))
    with torch.no_grad():
        logits = model(x).classification.double()
    want = torch.softmax(logits / t, 1).numpy()
    got = np.stack([probs_of(r) for r in rp[:4]])
    np.testing.assert_allclose(got, want, atol=2e-6)
    if abs(t - 1) > 0.05:
        assert np.abs(got - torch.softmax(logits, 1).numpy()).max() > 1e-4  # really calibrated


# ------------------------------------------------------------------------------------- file formats
def _make_dicom(path, pixels_u16, photometric):
    """A 12-bit secondary-capture DICOM of pixels_u16 (tests/helpers.make_dicom)."""
    make_dicom(path, pixels_u16, photometric, bits_stored=12, PatientName="Synthetic^Test")


def test_formats_16bit_rgba_dicom_and_unique_names(tiny_model, cxr_eval_dir, tmp_path):
    src = sorted((cxr_eval_dir / "Normal" / "images").glob("*.png"))
    img = cv2.normalize(cv2.imread(str(src[0]), cv2.IMREAD_GRAYSCALE), None, 0, 255, cv2.NORM_MINMAX)
    d = tmp_path / "formats"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    cv2.imwrite(str(d / "a" / "ref.png"), img)
    cv2.imwrite(str(d / "a" / "ref16.png"), img.astype(np.uint16) * 257)
    rgba = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
    rgba[..., 3] = 200
    cv2.imwrite(str(d / "a" / "refrgba.png"), rgba)
    v12 = img.astype(np.uint16) * 16                      # 12-bit data, 0..4080
    _make_dicom(d / "a" / "mono2.dcm", v12, "MONOCHROME2")
    _make_dicom(d / "a" / "mono1.dcm", (4095 - v12).astype(np.uint16), "MONOCHROME1")  # inverted pixels
    shutil.copy2(src[1], d / "b" / "ref.png")             # same basename, other folder

    assert cv2.imread(str(d / "a" / "ref16.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    ref = read_gray(d / "a" / "ref.png")
    for name in ("ref16.png", "refrgba.png", "mono2.dcm", "mono1.dcm"):
        np.testing.assert_array_equal(read_gray(d / "a" / name), ref, err_msg=name)

    out = tmp_path / "out"
    assert pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--device", "cpu", "--data_dir", str(d),
                         "--num_samples", "0", "--save_dir", str(out), "--quiet"]) == 0
    _, rows = read_csv(out / "predictions.csv")
    by = {r["image_path"].replace("\\", "/").split("formats/")[1]: r for r in rows}
    assert len(by) == 6
    base = by["a/ref.png"]
    for name in ("a/ref16.png", "a/refrgba.png", "a/mono2.dcm", "a/mono1.dcm"):
        assert by[name]["predicted_class"] == base["predicted_class"], name
        np.testing.assert_allclose(probs_of(by[name]), probs_of(base), atol=1e-6, err_msg=name)
        assert by[name]["true_class"] == ""                        # folder names are not classes here
    anns = {r["annotated_png"] for r in rows}
    assert len(anns) == 6 and all((out / a).is_file() for a in anns)
    assert {by["a/ref.png"]["annotated_png"], by["b/ref.png"]["annotated_png"]} == \
        {"annotated/a__ref.png", "annotated/b__ref.png"}


# --------------------------------------------------------------------------------------- TTA / API
def test_tta1_equals_plain_inference_on_both_backends(tiny_model, cxr_eval_dir):
    tb, ob = TorchBackend(tiny_model.checkpoint, "cpu"), OnnxBackend(tiny_model.onnx)
    assert tb.class_names == ob.class_names == CLASSES and tb.img_size == ob.img_size == 64
    assert tb.temperature == pytest.approx(ob.temperature)
    paths = sorted(cxr_eval_dir.glob("*/images/*.png"))[:6]
    paths = [p for p in paths if "corrupt" not in p.name]
    u8 = np.stack([load_for_model(p, 64) for p in paths])
    x = to_model_input_np(u8)  # backends take and return float32 numpy arrays
    assert x.dtype == np.float32 and x.shape == (len(paths), 3, 64, 64)
    assert np.array_equal(x, to_model_input(u8).numpy())  # the training path's values, bit for bit
    for b in (tb, ob):
        seg, logits = b.forward(x)
        assert isinstance(seg, np.ndarray) and seg.dtype == np.float32 and seg.shape == (len(paths), 1, 64, 64)
        assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (len(paths), 4)
        seg1, p1 = tta_predict(b.forward, x, 1, b.temperature)
        assert np.array_equal(seg1, seg)
        assert np.array_equal(p1, softmax(logits, b.temperature))
        np.testing.assert_allclose(p1, torch.softmax(torch.from_numpy(logits) / b.temperature, 1).numpy(),
                                   rtol=0, atol=1e-6)
    _, pt = tta_predict(tb.forward, x, 4, tb.temperature)
    _, po = tta_predict(ob.forward, x, 4, ob.temperature)
    assert isinstance(pt, np.ndarray) and np.abs(pt - po).max() <= 1e-4
    # torch tensors in (training evaluation): the same views, torch tensors out
    fwd = lambda t: tuple(torch.from_numpy(a) for a in tb.forward(t.numpy()))  # noqa: E731
    _, ptt = tta_predict(fwd, torch.from_numpy(x), 4, tb.temperature)
    assert isinstance(ptt, torch.Tensor) and np.array_equal(ptt.numpy(), pt)


# a fresh interpreter: the pytest process itself has torch loaded already
_NO_TORCH_PROBE = """
import json, sys
import run_onnx_inference
rc = run_onnx_inference.main(sys.argv[1:])
import cxrkit  # the Python API on the shipped ONNX model: torch-free too
m = cxrkit.load()
p = m.predict(sys.argv[sys.argv.index("--images") + 1])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai")
               or m in ("cxrkit.training.export", "cxrkit.core.checkpoint", "cxrkit.core.model", "cxrkit.training.train"))
print(json.dumps({"rc": rc, "heavy": heavy, "api": [p.predicted_class, len(p.probabilities), p.lung_mask.shape[0]]}))
"""


@pytest.mark.slow
def test_onnx_cli_never_imports_torch(tiny_model, cxr_eval_dir, tmp_path):
    """The CPU ONNX path (no Grad-CAM, --tta 1) must not import torch or MONAI: importing torch is
    ~1.5 s of a ~3.4 s whole-process run over 48 images (start-up time of run_onnx_inference.py)."""
    paths = [p for p in sorted(cxr_eval_dir.glob("*/images/*.png")) if "corrupt" not in p.name][:4]
    out = tmp_path / "no_torch"
    r = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, "--onnx_path", str(tiny_model.onnx),
                        "--images", *map(str, paths), "--save_dir", str(out), "--quiet"],
                       cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, r.stderr
    assert res["heavy"] == [], f"the ONNX inference path (CLI, then cxrkit.load().predict) imported {res['heavy']}"
    assert res["api"][1] == 4 and res["api"][2] == cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED).shape[0]
    s = json.loads((out / "summary.json").read_text())
    assert s["backend"] == "onnxruntime" and s["n_processed"] == 4 and s["tta"] == 1


def test_gather_inputs(tmp_path, cxr_eval_dir):
    items = gather_inputs(cxr_eval_dir, class_names=CLASSES)
    assert len(items) == 13 and not any("masks" in str(i.path) for i in items)
    real = [i for i in items if "corrupt" not in i.path.name]
    assert all(i.true_class in CLASSES and i.mask_path is not None for i in real)
    a = gather_inputs(cxr_eval_dir, class_names=CLASSES, num_samples=5, seed=3)
    b = gather_inputs(cxr_eval_dir, class_names=CLASSES, num_samples=5, seed=3)
    assert [i.path for i in a] == [i.path for i in b] and len(a) == 5
    # a single class folder, and explicit files: class from the folder names
    one = gather_inputs(cxr_eval_dir / "Viral Pneumonia", class_names=CLASSES)
    assert {i.true_class for i in one} == {"Viral Pneumonia"}
    ex = gather_inputs(images=[str(real[0].path)], class_names=CLASSES)
    assert ex[0].true_class == real[0].true_class and ex[0].mask_path == real[0].mask_path
    with pytest.raises(InferenceError, match="no images found"):
        gather_inputs(tmp_path, class_names=CLASSES)


# -------------------------------------------------------------------------------------------- CAMs
def test_gradcam_maps(tiny_model, cxr_eval_dir, tmp_path):
    cam = GradCamExplainer(tiny_model.checkpoint)
    assert cam.layer.startswith("net.unet.model")
    paths = [p for p in sorted(cxr_eval_dir.glob("*/images/*.png")) if "corrupt" not in p.name][:4]
    x = to_model_input(np.stack([load_for_model(p, 64) for p in paths]))
    maps = [cam(x, np.full(4, c)) for c in range(4)]
    for m in maps:
        assert m.shape == (4, 64, 64) and np.isfinite(m).all() and m.min() >= 0
    assert any(not np.allclose(maps[0], maps[c]) for c in range(1, 4)), "map does not depend on the class"
    mixed = cam(x, [0, 1, 2, 3])  # one target per sample == separate single-class calls
    for i in range(4):
        # equal up to float noise (batch composition changes the conv kernels' summation order)
        np.testing.assert_allclose(mixed[i], maps[i][i], rtol=0, atol=1e-2 * float(maps[i][i].max()) + 1e-12)

    out = tmp_path / "cam"
    assert onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--checkpoint", str(tiny_model.checkpoint),
                          "--images", *map(str, paths[:2]), "--cam_class", "Normal", "--save_cams",
                          "--save_dir", str(out), "--quiet"]) == 0
    _, rows = read_csv(out / "predictions.csv")
    s = json.loads((out / "summary.json").read_text())
    assert s["gradcam"]["target"] == "Normal" and s["gradcam"]["layer"] == cam.layer
    for r in rows:
        assert r["cam_class"] == "Normal"
        saved = np.load(out / r["cam_file"])
        assert saved.shape == (64, 64) and saved.dtype == np.float32
        ann = cv2.imread(str(out / r["annotated_png"]))
        assert ann.shape[1] > 2 * ann.shape[0]  # X-ray + Grad-CAM + text panels


# ------------------------------------------------------------------------------------------ errors
def test_empty_folder_and_bad_inputs(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "masks").mkdir(parents=True)
    cv2.imwrite(str(empty / "masks" / "m.png"), np.zeros((16, 16), np.uint8))  # masks are not inputs
    assert pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--data_dir", str(empty),
                         "--save_dir", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "no images found", str(empty))
    assert onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--data_dir", str(empty),
                          "--save_dir", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, "no images found")
    assert onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--data_dir", str(tmp_path / "missing"),
                          "--quiet"]) == 2
    one_line_error(capsys, "not a folder")
    assert pth_cli.main(["--checkpoint", str(tmp_path / "no.pth"), "--data_dir", str(empty)]) == 2
    one_line_error(capsys, "no.pth")
    assert onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--data_dir", str(empty), "--gradcam"]) == 2
    one_line_error(capsys, "--checkpoint")
    assert pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--data_dir", str(empty),
                         "--cam_class", "Nope"]) == 2
    one_line_error(capsys, "Nope")
    assert pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--data_dir", str(empty), "--tta", "99"]) == 2
    one_line_error(capsys, "--tta")


def test_onnx_meta_missing_or_mismatched(tiny_model, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    shutil.copy2(tiny_model.onnx, model)
    with pytest.raises(InferenceError, match="meta file not found"):
        OnnxBackend(model)
    assert onnx_cli.main(["--onnx_path", str(model), "--images", "x.png"]) == 2
    one_line_error(capsys, "meta file not found", "m.onnx.meta.json")

    meta = json.loads(tiny_model.meta_path.read_text())
    bad_size = tmp_path / "size.json"
    bad_size.write_text(json.dumps({**meta, "img_size": 128}))
    with pytest.raises(InferenceError, match="img_size 128"):
        OnnxBackend(model, bad_size)
    bad_cls = tmp_path / "cls.json"
    bad_cls.write_text(json.dumps({**meta, "class_names": CLASSES[:3]}))
    with pytest.raises(InferenceError, match="3 class names"):
        OnnxBackend(model, bad_cls)
    assert onnx_cli.main(["--onnx_path", str(model), "--meta_path", str(bad_cls), "--images", "x.png"]) == 2
    one_line_error(capsys, "class names")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InferenceError, match="not valid JSON"):
        OnnxBackend(model, broken)


def test_providers_fall_back_to_cpu(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="cxrkit"):
        got = resolve_providers(["cuda"], use_cuda=True, available=["CPUExecutionProvider"])
    assert got == ["CPUExecutionProvider"] and "CUDAExecutionProvider is not available" in caplog.text
    assert resolve_providers(["cpu"], use_cuda=True, available=["CUDAExecutionProvider", "CPUExecutionProvider"]) \
        == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    b = OnnxBackend(tiny_model.onnx, use_cuda=True)  # no CUDA here: warns, runs on CPU
    assert b.active_providers[-1] == "CPUExecutionProvider"


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as e:
        onnx_cli.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "Grad-CAM" in out and "(default:" in out


def test_both_backends_enforce_the_input_contract(tiny_model):
    """Both backends check every batch (preprocess.check_input): a 0..255 image, the wrong size or
    dtype is a clear ValueError, never a silently wrong prediction."""
    size = int(tiny_model.meta["img_size"])
    ok = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    for backend in (TorchBackend(tiny_model.checkpoint, device="cpu"), OnnxBackend(tiny_model.onnx)):
        seg, logits = backend.forward(ok)
        assert seg.shape == (2, 1, size, size) and logits.shape[0] == 2
        with pytest.raises(ValueError, match="divide 8-bit images by 255"):
            backend.forward(ok * 255)
        with pytest.raises(ValueError, match=r"\(B, 3, "):
            backend.forward(ok[:, :, :-1])
        with pytest.raises(ValueError, match="float32"):
            backend.forward(ok.astype(np.float64))


def test_both_backends_meet_the_backend_contract(tiny_model):
    """One explicit contract (cxrkit.inference.Backend): both backends implement it, the report header
    reads it alike, Grad-CAM comes from the backend (ONNX: only with a checkpoint), and the pipeline,
    the CLI body and the report no longer probe a backend with getattr."""
    import inspect

    from cxrkit.cli import infer as cli
    from cxrkit.inference import Backend, pipeline
    from cxrkit.inference.report import model_info
    tb, ob = TorchBackend(tiny_model.checkpoint, "cpu"), OnnxBackend(tiny_model.onnx)
    for b in (tb, ob):
        assert isinstance(b, Backend)
    it, io_ = model_info(tb), model_info(ob)
    assert it["file"] == str(tiny_model.checkpoint) and io_["file"] == str(tiny_model.onnx)
    assert it["preset"] == io_["preset"] == load_checkpoint(tiny_model.checkpoint)["model_config"]["preset"]
    assert (it["img_size"], it["temperature"]) == (io_["img_size"], io_["temperature"])
    assert tb.explainer().class_names == ob.explainer(tiny_model.checkpoint).class_names == tb.class_names
    with pytest.raises(InferenceError, match="needs --checkpoint"):
        ob.explainer(None)
    from cxrkit.inference import report
    for mod in (cli, pipeline, report):
        assert "getattr(backend" not in inspect.getsource(mod)
    assert "holder" not in inspect.getsource(pth_cli)


def test_onnx_threads_follow_a_container_cpu_quota(tmp_path):
    """A Kubernetes CPU limit is a cgroup quota, not fewer visible CPUs: ONNX Runtime's thread count obeys it."""
    from cxrkit.inference.backends import cgroup_cpu_limit
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert cgroup_cpu_limit(str(f)) == 2          # 1.5 CPUs: 2 threads
    f.write_text("100000 100000\n")
    assert cgroup_cpu_limit(str(f)) == 1
    f.write_text("max 100000\n")
    assert cgroup_cpu_limit(str(f)) is None       # no quota


def test_inputs_the_model_trained_on_are_counted_and_left_out_of_the_metrics(tiny_model, cxr_eval_dir, tmp_path,
                                                                            capsys):
    """Perceptual hashes of the training split travel with the model (checkpoint and ONNX meta); a run on
    those images says how many it saw and scores none of them, unless --include_training_images."""
    from cxrkit.core.fingerprint import FLAG_IN_TRAINING
    split = json.loads((tiny_model.root / "train_out" / "split.json").read_text())
    n_train = len(split["train"])
    assert tiny_model.meta.get("training_hashes")
    out = tmp_path / "seen"
    assert onnx_cli.main(["--data_dir", str(tiny_model.train_data), "--onnx_path", str(tiny_model.onnx),
                          "--save_dir", str(out), "--outputs", "csv", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    flagged = {Path(r["image_path"]).relative_to(tiny_model.train_data).as_posix()
               for r in read_predictions(out) if FLAG_IN_TRAINING in r["quality_flags"].split(";")}
    assert flagged == set(split["train"])               # exactly the training split, not val / test
    assert s["in_training_set"]["n"] == n_train and not s["in_training_set"]["in_metrics"]
    rows = read_predictions(out)
    seen_judged = sum(FLAG_IN_TRAINING in r["quality_flags"].split(";") and not not_judged(r["quality_flags"])
                      for r in rows)
    c = s["classification"]
    assert (c or {}).get("n_in_training_left_out", 0) == seen_judged
    assert c is None or c["n_labelled"] == sum(FLAG_IN_TRAINING not in r["quality_flags"].split(";")
                                               and not not_judged(r["quality_flags"]) for r in rows)
    assert f"{n_train} of {s['n_processed']} inputs were in the model's training set" in capsys.readouterr().out
    # unseen images: nothing matches
    out2 = tmp_path / "unseen"
    assert pth_cli.main(["--data_dir", str(cxr_eval_dir), "--checkpoint", str(tiny_model.checkpoint),
                         "--save_dir", str(out2), "--outputs", "csv", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out2 / "summary.json").read_text())["in_training_set"]["n"] == 0
