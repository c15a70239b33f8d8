"""The pretrained lite0 preset: ImageNet weights load correctly, the multi-task contract holds, every
parameter trains, checkpoints round-trip without the weights package, the encoder LR groups,
outside-lung randomisation and Dice at the masks' own resolution."""
from __future__ import annotations

import os

import cv2
import matplotlib
import numpy as np
import pytest
import torch

from cxrkit.cli import train as model_arch
from cxrkit.core.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint, model_from_checkpoint
from cxrkit.core.config import TrainConfig, make_config
from cxrkit.core.config import OUTSIDE_LUNG_FILLS
from cxrkit.training.data import augment, outside_lung_randomise
from cxrkit.core.encoders import EfficientNetLite0, load_lite0_imagenet
from cxrkit.training.losses import MultiTaskLoss
from cxrkit.core.metrics import native_resolution_dice
from cxrkit.core.model import ModelOutput, build_model
from cxrkit.training.engine import param_groups

GRACE_HOPPER = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def test_imagenet_weights_classify_grace_hopper_as_military_uniform():
    """A mis-mapped layer, a wrong padding or an untrained network cannot give ImageNet class 652."""
    enc = EfficientNetLite0(with_imagenet_fc=True)
    load_lite0_imagenet(enc)
    enc.eval()
    rgb = cv2.imread(GRACE_HOPPER)[:, :, ::-1]
    x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    with torch.no_grad():
        p = enc((x - 0.5) / 0.5).softmax(1)[0]
    assert int(p.argmax()) == 652, p.topk(3)
    assert float(p[652]) > 0.2
    # the same network with random weights does not
    torch.manual_seed(0)
    rnd = EfficientNetLite0(with_imagenet_fc=True).eval()
    with torch.no_grad():
        assert int(rnd((x - 0.5) / 0.5).argmax()) != 652


def test_pretrained_flag_loads_the_encoder_and_only_the_encoder():
    torch.manual_seed(0)
    scratch = build_model(make_config("lite0"), load_pretrained=False)
    torch.manual_seed(0)
    pre = build_model(make_config("lite0"), load_pretrained=True)
    ref = EfficientNetLite0()
    load_lite0_imagenet(ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(pre.encoder.state_dict()[k], v), k
    assert not torch.equal(scratch.encoder._conv_stem.weight, pre.encoder._conv_stem.weight)
    # decoder and heads are the seeded fresh init in both
    assert torch.equal(scratch.cls_head.mlp[-1].weight, pre.cls_head.mlp[-1].weight)
    # --no-pretrained (config) never loads, even when asked to
    torch.manual_seed(0)
    off = build_model(make_config("lite0", pretrained=False), load_pretrained=True)
    assert torch.equal(off.encoder._conv_stem.weight, scratch.encoder._conv_stem.weight)


def test_output_contract_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(make_config("lite0", num_classes=3)).train()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.segmentation.shape == (2, 1, 64, 64) and out.classification.shape == (2, 3)
    masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
    MultiTaskLoss(torch.ones(3))(out.segmentation, out.classification, masks, torch.tensor([True, True]),
                                 torch.tensor([0, 2])).total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # non-square multiples of 32 keep the full-size mask contract
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 96, 160)).segmentation.shape == (1, 1, 96, 160)


def test_checkpoint_round_trip_is_exact_and_needs_no_weights_package(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = make_config("lite0")
    model = build_model(cfg, load_pretrained=True).eval()
    p = tmp_path / "ck.pth"
    atomic_torch_save(make_checkpoint(model, cfg, ["a", "b", "c", "d"], 64), p)
    from cxrkit.core import encoders as enc
    monkeypatch.setattr(enc, "lite0_weights_path", lambda: (_ for _ in ()).throw(AssertionError("loaded weights")))
    rebuilt, ck = model_from_checkpoint(p)
    assert ck["model_config"]["backbone"] == "lite0" and ck["model_config"]["pretrained"] is True
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), rebuilt.eval()(x)
    assert torch.equal(a.classification, b.classification) and torch.equal(a.segmentation, b.segmentation)


def test_encoder_learns_at_a_lower_rate():
    model = build_model(make_config("lite0"))
    groups = param_groups(model, 1e-3, 0.3)
    assert [g["lr"] for g in groups] == [pytest.approx(3e-4), 1e-3]
    enc = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == enc
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(param_groups(model, 1e-3, 1.0)) == 1
    assert len(param_groups(build_model(make_config("tiny")), 1e-3, 0.3)) == 1  # no encoder: one group


def _lung_batch(b=4, s=64):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 1, s, s, generator=g) * 0.5 + 0.25).repeat(1, 3, 1, 1)  # grey, like to_model_input
    m = torch.zeros(b, 1, s, s)
    m[:, :, 16:48, 10:28] = 1
    m[:, :, 16:48, 36:54] = 1
    return x, m


@pytest.mark.parametrize("fill", OUTSIDE_LUNG_FILLS)
def test_outside_lung_randomise_changes_only_outside_the_dilated_lungs(fill):
    x, m = _lung_batch()
    has = torch.tensor([True, True, True, False])
    y = outside_lung_randomise(x.clone(), m, has, 1.0, fill, 2 / 64, torch.Generator().manual_seed(1))
    dil = torch.nn.functional.max_pool2d(m, 5, stride=1, padding=2)
    inside = dil.expand_as(x) > 0
    assert torch.equal(y[:3][inside[:3]], x[:3][inside[:3]]), "lung pixels (and the margin) must stay"
    assert not torch.equal(y[:3][~inside[:3]], x[:3][~inside[:3]]), "outside pixels must change"
    assert torch.equal(y[3], x[3]), "a sample without a mask is never masked"
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2]), "stays greyscale"


def test_outside_lung_probability_and_determinism():
    x, m = _lung_batch(64)
    has = torch.ones(64, dtype=torch.bool)
    y0 = outside_lung_randomise(x.clone(), m, has, 0.0, "noise", 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(y0, x)
    y = outside_lung_randomise(x.clone(), m, has, 0.5, "noise", 0.03, torch.Generator().manual_seed(1))
    changed = (y != x).flatten(1).any(1).float().mean()
    assert 0.25 < float(changed) < 0.75
    y2 = outside_lung_randomise(x.clone(), m, has, 0.5, "noise", 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    with pytest.raises(ValueError, match="outside_lung_fill"):
        outside_lung_randomise(x, m, has, 0.5, "paint", 0.03, torch.Generator())


def test_augment_applies_outside_lung_option_only_when_asked():
    x, m = _lung_batch()
    has = torch.ones(4, dtype=torch.bool)
    base = dict(aug_rotate_deg=0, aug_scale=0, aug_shift=0, aug_brightness=0, aug_contrast=0)
    off = TrainConfig(**base, outside_lung_aug=0.0)
    on = TrainConfig(**base, outside_lung_aug=1.0, outside_lung_fill="constant")
    xa, _ = augment(x, m, off, torch.Generator().manual_seed(0), has)
    xb, _ = augment(x, m, on, torch.Generator().manual_seed(0), has)
    assert torch.allclose(xa, x, atol=1e-6)
    assert not torch.allclose(xb, x, atol=1e-3)


def test_native_resolution_dice_resizes_the_prediction_to_the_mask():
    gt = np.zeros((256, 256), np.uint8)
    gt[64:192, 40:120] = 1
    prob = cv2.resize(gt.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    r = native_resolution_dice(prob[None], [gt])
    assert r["n_masks"] == 1 and r["dice"] > 0.98
    shifted = np.roll(prob, 8, axis=1)
    assert native_resolution_dice(shifted[None], [gt])["dice"] < 0.9


@pytest.mark.slow
def test_tiny_pretrained_training_run_end_to_end(mdt_subset, tmp_path):
    """model_arch.py with the lite0 preset (ImageNet start, outside-lung noise) trains, finalises and
    writes Dice at the masks' own resolution into the test report."""
    out = tmp_path / "lite0"
    rc = model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(out), "--arch", "lite0",
                          "--img_size", "64", "--num_epochs", "1", "--batch_size", "8", "--workers", "0",
                          "--outside_lung_aug", "0.5", "--quiet", "--device", "cpu"])
    assert rc == 0
    ck = load_checkpoint(out / "model_checkpoints" / "best_covid_model.pth")
    assert ck["model_config"]["backbone"] == "lite0" and ck["recipe"]["pretrained"] is True
    assert ck["recipe"]["outside_lung_aug"] == 0.5 and ck["recipe"]["encoder_lr_mult"] == 0.3
    import json
    rep = json.loads((out / "test_results" / "classification_report.json").read_text())
    assert rep["segmentation_native"]["n_masks"] > 0 and 0 <= rep["segmentation_native"]["dice"] <= 1
    hist = json.loads((out / "model_checkpoints" / "training_summary.json").read_text())["history"]
    assert hist[0]["val_dice_native"] is not None


@pytest.mark.parametrize("flags,needle", [(["--arch", "tiny", "--pretrained", "--img_size", "32"], "--arch lite0"),
                                          (["--arch", "lite0", "--img_size", "100"], "multiple of 32")])
def test_bad_lite0_flags_are_one_line_errors(mdt_subset, tmp_path, capsys, flags, needle):
    rc = model_arch.main(["--data_dir", str(mdt_subset), "--output_dir", str(tmp_path / "x"), *flags,
                          "--num_epochs", "1", "--workers", "0", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
