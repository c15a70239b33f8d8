"""Checkpoints, prior correction, and model_arch.py end to end: artifacts, exact resume, DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cxrkit.cli import train as model_arch
from cxrkit.core.checkpoint import (FORMAT, CheckpointError, atomic_torch_save, clean_state_dict,
                                    load_checkpoint, make_checkpoint, model_from_checkpoint,
                                    strip_for_release)
from cxrkit.core.config import ModelConfig, make_config
from cxrkit.training.data import build_cache
from cxrkit.training.split import load_or_make_split
from cxrkit.training.evaluate import predict_split
from cxrkit.training.losses import inverse_frequency_weights
from cxrkit.core.metrics import classification_metrics, softmax
from cxrkit.core.model import build_model
from cxrkit.training.calibration import apply_prior_correction

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
TIMING_KEYS = {"train_images_per_s", "epoch_seconds"}


def train_args(data_dir, out, img_size=64, epochs=1, *extra):
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--arch", "tiny", "--img_size", str(img_size),
            "--num_epochs", str(epochs), "--batch_size", "8", "--workers", "0", "--quiet", "--device", "cpu",
            *extra]


def error_lines(stderr: str) -> list[str]:
    """stderr without log records (pytest may or may not let those through)."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]


def assert_same(a, b, where="ck"):
    """Recursive equality; tensors must be bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


# ================================================================================== checkpoints
def _trained_tiny(seed=0, classes=4):
    """A tiny model whose BN statistics and weights are no longer at their initial values."""
    torch.manual_seed(seed)
    model = build_model(make_config("tiny", num_classes=classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        out = model(torch.rand(4, 3, 32, 32))
        (out.classification.logsumexp(1).mean() + out.segmentation.mean()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = _trained_tiny()
    cfg = model.cfg
    ck = make_checkpoint(model, cfg, CLASSES, 32, epoch=3, temperature=1.7)
    path = tmp_path / "sub dir" / "ck (1).pth"
    atomic_torch_save(ck, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck (1).pth"]      # no temp file left
    raw = torch.load(path, weights_only=True)                                     # plain data only
    assert raw["format"] == FORMAT and raw["class_names"] == CLASSES and raw["img_size"] == 32
    assert raw["normalization"] == {"mean": list(cfg.mean), "std": list(cfg.std)} and raw["temperature"] == 1.7
    rebuilt, ck2 = model_from_checkpoint(path)
    assert not rebuilt.training and ModelConfig.from_dict(ck2["model_config"]) == cfg
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    assert torch.equal(a.segmentation, b.segmentation) and torch.equal(a.classification, b.classification)
    # the state dict includes BN running statistics
    sd = rebuilt.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_clean_state_dict_strips_wrapper_prefixes():
    v = torch.zeros(1)
    sd = {"module.a.weight": v, "_orig_mod.b.bias": v, "module._orig_mod.c": v, "_orig_mod.module.d": v,
          "e.module.f": v, "plain": v}
    out = clean_state_dict(sd)
    assert list(out) == ["a.weight", "b.bias", "c", "d", "e.module.f", "plain"]
    assert all(t is v for t in out.values())


def test_wrapped_models_save_and_load_unprefixed(tmp_path):
    model = _trained_tiny(seed=1)

    class Wrapper(nn.Module):            # what DistributedDataParallel looks like to make_checkpoint
        def __init__(self, m):
            super().__init__()
            self.module = m
    ck = make_checkpoint(Wrapper(model), model.cfg, CLASSES, 32)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["state_dict"])
    # a checkpoint written by other code with DDP + torch.compile prefixes still loads
    ck["state_dict"] = {f"module._orig_mod.{k}": v for k, v in ck["state_dict"].items()}
    atomic_torch_save(ck, tmp_path / "prefixed.pth")
    rebuilt, _ = model_from_checkpoint(tmp_path / "prefixed.pth")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).classification, rebuilt(x).classification)


class NotPlainData:
    pass


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope" / "best_covid_model.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)
    torch.save({"state_dict": {}}, tmp_path / "untagged.pth")
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(tmp_path / "untagged.pth")
    torch.save({"format": FORMAT, "obj": NotPlainData()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="pickled.pth"):      # weights_only: no arbitrary objects
        load_checkpoint(tmp_path / "pickled.pth")
    ck = make_checkpoint(_trained_tiny(), make_config("small"), CLASSES, 32)  # weights of another preset
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_checkpoint(ck)
    for e in (FileNotFoundError, CheckpointError):
        assert issubclass(e, Exception)


def test_strip_for_release_drops_training_state():
    ck = {"state_dict": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "train_state_dict": {}, "epoch": 1}
    assert set(strip_for_release(ck)) == {"state_dict", "epoch"}


# ============================================================================= prior correction
def test_prior_correction_offsets_the_bias_by_minus_log_w_once():
    model = _trained_tiny(seed=2)
    ck = make_checkpoint(model, model.cfg, CLASSES, 32)
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 3])
    w = inverse_frequency_weights(labels, 4).double()          # [0.5, 2, 1, 2]
    last = model.cls_head.mlp[-1]
    before = last.bias.detach().clone()
    apply_prior_correction(model, ck, labels)
    expected = (before.double() - torch.log(w)).float()
    assert torch.allclose(last.bias, expected, atol=1e-6)
    assert ck["prior_correction"]["logit_offset"] == pytest.approx((-torch.log(w)).tolist(), abs=1e-6)
    assert torch.equal(ck["state_dict"]["cls_head.mlp.9.bias"], last.bias.detach())
    corrected = last.bias.detach().clone()
    apply_prior_correction(model, ck, labels)                   # idempotent per checkpoint
    assert torch.equal(last.bias, corrected)
    rebuilt, _ = model_from_checkpoint(ck)
    assert torch.equal(rebuilt.cls_head.mlp[-1].bias, corrected)


def test_prior_correction_leaves_absent_classes_finite():
    model = _trained_tiny(seed=3)
    ck = make_checkpoint(model, model.cfg, CLASSES, 32)
    before = model.cls_head.mlp[-1].bias.detach().clone()
    apply_prior_correction(model, ck, np.array([0, 0, 1, 1]))   # w = [0.5, 0.5, 0, 0]: classes 2, 3 absent
    after = model.cls_head.mlp[-1].bias.detach()
    assert torch.isfinite(after).all()
    assert torch.equal(after[2:], before[2:]) and torch.allclose(after[:2], before[:2] + np.log(2.0))


# ================================================================================= end to end
@pytest.fixture(scope="module")
def run_1epoch(mdt_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("mdt_run") / "out dir"
    rc = model_arch.main(train_args(mdt_subset, out, 64, 1))
    return SimpleNamespace(rc=rc, out=out, data=mdt_subset)


def test_training_writes_every_artifact(run_1epoch):
    assert run_1epoch.rc == 0
    out = run_1epoch.out
    for rel in ["model_checkpoints/best_covid_model.pth", "model_checkpoints/last_checkpoint.pth",
                "model_checkpoints/training_curves.png", "model_checkpoints/training_summary.json",
                "split.json", "test_results/classification_report.json", "test_results/confusion_matrix_test.png",
                "test_results/roc_curves_test.png", "test_results/reliability_test.png"]:
        p = out / rel
        assert p.is_file() and p.stat().st_size > 0, rel
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not leftovers, leftovers


def test_split_file_of_the_run(run_1epoch, mdt_subset_info):
    js = json.loads((run_1epoch.out / "split.json").read_text())
    assert js["classes"] == CLASSES
    parts = [js[k] for k in ("train", "val", "test")]
    assert [len(p) for p in parts] == [32, 8, 8]
    everything = set().union(*map(set, parts))
    assert len(everything) == 48 and mdt_subset_info.corrupt not in everything   # the corrupt file was skipped
    assert all(not os.path.isabs(p) for p in everything)
    for k in ("val", "test"):                                           # stratified: 2 per class
        assert list(js["counts"][k].values()) == [2, 2, 2, 2]


def test_test_report_contents(run_1epoch):
    rep = json.loads((run_1epoch.out / "test_results" / "classification_report.json").read_text())
    assert set(rep["per_class"]) == set(CLASSES)
    for c, v in rep["per_class"].items():
        assert {"precision", "recall", "f1", "support", "roc_auc"} <= set(v), c
        assert v["support"] == 2
        assert v["roc_auc"] is None or 0 <= v["roc_auc"] <= 1
    for k in ("accuracy", "macro_f1", "weighted_f1"):
        assert 0 <= rep[k] <= 1, k
    seg = rep["segmentation"]
    assert {"dice", "iou", "bce"} <= set(seg) and 0 <= seg["dice"] <= 1 and 0 <= seg["iou"] <= 1 and seg["bce"] > 0
    cal = rep["calibration"]
    assert {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal)
    assert all(np.isfinite(cal[k]) for k in ("ece_before", "ece_after", "nll_before", "nll_after"))
    best = torch.load(run_1epoch.out / "model_checkpoints" / "best_covid_model.pth", weights_only=True)
    assert cal["temperature"] == best["temperature"]      # T is fitted on validation, reported on test
    assert rep["n_images"] == 8 and np.sum(rep["confusion_matrix"]) == 8


def test_best_checkpoint_stands_alone_and_reproduces_the_report(run_1epoch):
    ck_dir = run_1epoch.out / "model_checkpoints"
    best = torch.load(ck_dir / "best_covid_model.pth", weights_only=True)
    for k in ("class_names", "img_size", "normalization", "temperature", "model_config", "state_dict",
              "prior_correction"):
        assert k in best, k
    assert best["class_names"] == CLASSES and best["img_size"] == 64
    assert best["model_config"]["preset"] == "tiny" and best["model_config"]["num_classes"] == 4
    assert best["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert isinstance(best["temperature"], float) and 0.05 <= best["temperature"] <= 20
    assert not {"optimizer", "scheduler", "scaler", "train_state_dict"} & set(best)
    last = torch.load(ck_dir / "last_checkpoint.pth", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "train_state_dict", "history", "epoch"} <= set(last)
    assert last["optimizer"]["state"] and last["epoch"] == 0

    model, ck = model_from_checkpoint(ck_dir / "best_covid_model.pth")   # no flags, no config files
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.segmentation.shape == (2, 1, 64, 64) and out.classification.shape == (2, 4)
    # the test report is this checkpoint (prior-corrected, temperature-scaled) on the test split
    data = build_cache(run_1epoch.data, 64, run_1epoch.out / "cache", workers=0, progress=False)
    split = load_or_make_split(data, run_1epoch.out / "split.json")
    r = predict_split(model, data, split["test"], torch.device("cpu"))
    m = classification_metrics(r["labels"], softmax(r["logits"], ck["temperature"]), CLASSES)
    rep = json.loads((run_1epoch.out / "test_results" / "classification_report.json").read_text())
    assert m["accuracy"] == pytest.approx(rep["accuracy"]) and m["macro_f1"] == pytest.approx(rep["macro_f1"])
    assert m["confusion_matrix"] == rep["confusion_matrix"]
    assert r["seg"]["dice"] == pytest.approx(rep["segmentation"]["dice"])


def test_training_summary(run_1epoch):
    s = json.loads((run_1epoch.out / "model_checkpoints" / "training_summary.json").read_text())
    assert s["arch"] == "tiny" and s["classes"] == CLASSES and s["epochs_run"] == 1 and len(s["history"]) == 1
    assert s["split_sizes"] == {"train": 32, "val": 8, "test": 8} and s["world_size"] == 1
    row = s["history"][0]
    for k in ("train_loss", "train_seg", "train_cls", "val_loss", "val_acc", "val_macro_f1", "val_dice", "lr"):
        assert np.isfinite(row[k]), k


def test_resume_with_another_arch_is_refused_in_one_line(run_1epoch, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run_1epoch.out, out)
    capsys.readouterr()
    rc = model_arch.main(train_args(run_1epoch.data, out, 64, 2, "--resume") + ["--arch", "small"])
    err = error_lines(capsys.readouterr().err)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "last_checkpoint.pth" in err[0], err
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_classification_only_flat_layout_with_three_classes(mdt_subset, tmp_path):
    """<Class>/*.png with no masks folders: the class count comes from the data, the segmentation
    loss is skipped, and the report says there was no mask to score."""
    data = tmp_path / "flat"
    for c in CLASSES[:3]:
        (data / c).mkdir(parents=True)
        for p in sorted((mdt_subset / c / "images").iterdir())[:10]:
            if "broken" not in p.name:
                shutil.copy(p, data / c / p.name)
    out = tmp_path / "out"
    assert model_arch.main(train_args(data, out, 32, 1)) == 0
    ck = torch.load(out / "model_checkpoints" / "best_covid_model.pth", weights_only=True)
    assert ck["class_names"] == CLASSES[:3] and ck["model_config"]["num_classes"] == 3
    model, _ = model_from_checkpoint(ck)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).classification.shape == (1, 3)
    last = torch.load(out / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)
    assert last["history"][0]["train_seg"] == 0.0
    rep = json.loads((out / "test_results" / "classification_report.json").read_text())
    assert rep["segmentation"]["dice"] is None and rep["segmentation"]["n_masks"] == 0
    assert set(rep["per_class"]) == set(CLASSES[:3])


# ======================================================================================= resume
@pytest.fixture(scope="module")
def resume_runs(mdt_subset, tmp_path_factory):
    """A: 2 epochs straight. B: interrupted after epoch 1, then --resume. All in this process, so the
    runs also check that nothing depends on leftover global RNG state (weight init included)."""
    root = tmp_path_factory.mktemp("mdt_resume")
    a, b = root / "A", root / "B"
    rc_a = model_arch.main(train_args(mdt_subset, a, 32, 2))
    rc_b1 = model_arch.main(train_args(mdt_subset, b, 32, 2, "--stop_after_epoch", "1"))
    after_b1 = {"last": torch.load(b / "model_checkpoints" / "last_checkpoint.pth", weights_only=True),
                "test_results": (b / "test_results").exists()}
    rc_b2 = model_arch.main(train_args(mdt_subset, b, 32, 2, "--resume"))
    return SimpleNamespace(rc=(rc_a, rc_b1, rc_b2), a=a, b=b, after_b1=after_b1)


def test_interrupted_run_stops_after_epoch_1(resume_runs):
    assert resume_runs.rc == (0, 0, 0)
    last = resume_runs.after_b1["last"]
    assert last["epoch"] == 0 and len(last["history"]) == 1
    assert not resume_runs.after_b1["test_results"], "an interrupted run must not write the test report"


def test_resumed_run_is_bit_identical_to_the_straight_run(resume_runs):
    la = torch.load(resume_runs.a / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)
    lb = torch.load(resume_runs.b / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)
    assert la["epoch"] == lb["epoch"] == 1
    for key in ("state_dict", "train_state_dict", "optimizer", "scheduler", "scaler"):
        assert_same(la[key], lb[key], key)
    assert without_timing(la["history"]) == without_timing(lb["history"])
    assert (la["best_score"], la["bad_epochs"]) == (lb["best_score"], lb["bad_epochs"])
    ba = torch.load(resume_runs.a / "model_checkpoints" / "best_covid_model.pth", weights_only=True)
    bb = torch.load(resume_runs.b / "model_checkpoints" / "best_covid_model.pth", weights_only=True)
    assert_same(ba["state_dict"], bb["state_dict"], "best")
    assert ba["temperature"] == bb["temperature"] and ba["epoch"] == bb["epoch"]
    ra = json.loads((resume_runs.a / "test_results" / "classification_report.json").read_text())
    rb = json.loads((resume_runs.b / "test_results" / "classification_report.json").read_text())
    assert ra == rb


# ========================================================================================== DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes(mdt_subset, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "model_arch.py"), *train_args(mdt_subset, out, 32, 1)]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s:\n{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    log = f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    assert p.returncode == 0, log
    lines = p.stdout.splitlines()
    assert sum(ln.startswith("epoch   1/1") for ln in lines) == 1, log   # rank 0 reports, once
    assert sum(ln.startswith("test |") for ln in lines) == 1, log
    for rel in ["model_checkpoints/best_covid_model.pth", "model_checkpoints/last_checkpoint.pth",
                "model_checkpoints/training_summary.json", "split.json", "test_results/classification_report.json"]:
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "model_checkpoints" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    model, ck = model_from_checkpoint(out / "model_checkpoints" / "best_covid_model.pth")
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    assert not [q for q in out.rglob("*.tmp")]


def test_lung_focus_trains_records_itself_and_exports(mdt_subset, tmp_path, capsys):
    """--lung_focus crop_mask end to end: one epoch of lite0 (no ImageNet weights) on real films, the
    checkpoint's config carries the focus settings so it rebuilds alone, and the export's parity check
    passes on the crop graph. A backbone without a second encoder is refused in one line."""
    from cxrkit.cli import export as export_cli
    from cxrkit.core.checkpoint import model_from_checkpoint
    out = tmp_path / "focus"
    args = ["--data_dir", str(mdt_subset), "--output_dir", str(out), "--arch", "lite0", "--no-pretrained",
            "--img_size", "64", "--num_epochs", "1", "--batch_size", "8", "--workers", "0", "--quiet",
            "--device", "cpu", "--no_report", "--lung_focus", "crop_mask", "--focus_margin", "0.2"]
    assert model_arch.main(args) == 0
    ck_path = out / "model_checkpoints" / "best_covid_model.pth"
    ck = torch.load(ck_path, weights_only=True)
    assert ck["model_config"]["lung_focus"] == "crop_mask" and ck["model_config"]["focus_margin"] == 0.2
    model, _ = model_from_checkpoint(ck)
    assert model.focus_encoder is not None
    onnx = tmp_path / "focus.onnx"
    assert export_cli.main(["--checkpoint", str(ck_path), "--onnx_path", str(onnx)]) == 0
    meta = json.loads(onnx.with_suffix(".onnx.meta.json").read_text())
    assert meta["parity"]["passed"] is True
    capsys.readouterr()
    assert model_arch.main(train_args(mdt_subset, tmp_path / "bad", 32, 1, "--lung_focus", "crop")) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--lung_focus" in err[0] and "lite0" in err[0]


# ============================================================= --resume before the first checkpoint
def test_resume_before_any_checkpoint_starts_with_the_same_weights_as_a_fresh_run(tmp_path):
    """A queued or cluster job passes --resume every time, the first time included: that first start must get
    the ImageNet encoder (lite0) like a run without the flag, not random weights under a recipe that says
    pretrained (it trained to 0.41 held-out accuracy, all COVID, on cxr4 before this was fixed)."""
    from cxrkit.core.config import RunOptions, TrainConfig, make_config
    from cxrkit.training.train import init_model, resumable
    ck_dir = tmp_path / "model_checkpoints"
    mk = lambda resume: SimpleNamespace(cfg=TrainConfig(seed=3), opts=RunOptions(resume=resume),  # noqa: E731
                                        model_cfg=make_config("lite0", num_classes=4), ck_dir=ck_dir, rank=0)
    plain, queued = mk(False), mk(True)
    assert not resumable(plain.opts, ck_dir) and not resumable(queued.opts, ck_dir)
    a, b = init_model(plain).state_dict(), init_model(queued).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck_dir.mkdir()
    (ck_dir / "last_checkpoint.pth").write_bytes(b"x")
    assert resumable(queued.opts, ck_dir) and not resumable(plain.opts, ck_dir)


def test_resume_before_any_checkpoint_still_applies_init_from(run_1epoch, tmp_path):
    src = run_1epoch.out / "model_checkpoints" / "best_covid_model.pth"
    outs = {}
    for name, extra in (("plain", ()), ("queued", ("--resume",))):
        outs[name] = tmp_path / name
        assert model_arch.main(train_args(run_1epoch.data, outs[name], 64, 1, "--init_from", str(src), *extra)) == 0
    load = lambda d: torch.load(d / "model_checkpoints" / "last_checkpoint.pth", weights_only=True)  # noqa: E731
    assert_same(load(outs["plain"])["state_dict"], load(outs["queued"])["state_dict"])
