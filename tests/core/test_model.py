"""The multi-task network: output contract, gradient flow through both heads, presets, size sanity."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cxrkit.core.config import PRESETS, ModelConfig, make_config
from cxrkit.training.losses import MultiTaskLoss
from cxrkit.core.model import ModelOutput, build_model, count_gflops, count_parameters

# the seed preset is the big one: keep its images small
SHAPE_CASES = [("seed", 32), ("small", 64), ("tiny", 64)]


def _model(preset, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(make_config(preset, **kw))


@pytest.mark.parametrize("preset,size", SHAPE_CASES)
def test_output_shapes_both_heads(preset, size):
    model = _model(preset)
    x = torch.rand(3, 3, size, size)
    for mode in (True, False):  # train and eval mode give the same contract
        model.train(mode)
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, ModelOutput) and out._fields == ("segmentation", "classification")
        assert out.segmentation.shape == (3, 1, size, size)
        assert out.classification.shape == (3, 4)
        assert out.segmentation.dtype == out.classification.dtype == torch.float32
        assert torch.isfinite(out.segmentation).all() and torch.isfinite(out.classification).all()


def _bn_cancelled_biases(model, x):
    """Biases of Conv/Linear layers whose output goes straight into a BatchNorm (in execution order).

    In train mode BN subtracts the batch mean, so such a bias has an exactly-zero gradient in exact
    arithmetic (it is redundant, not disconnected): only rounding noise reaches it."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if len(list(m.children())) == 0]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    return {id(a.bias) for a, b in zip(order, order[1:])
            if getattr(a, "bias", None) is not None and isinstance(b, bn)}


@pytest.mark.parametrize("preset", ["seed", "seed_ms", "small", "tiny"])
def test_every_parameter_gets_a_gradient(preset):
    model = _model(preset).train()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    exempt = _bn_cancelled_biases(model, x)
    assert exempt, "expected Conv/Linear -> BatchNorm pairs"
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    out = model(x)
    loss = MultiTaskLoss(torch.ones(4)).forward(out.segmentation, out.classification, masks,
                                                torch.tensor([True, True]), torch.tensor([0, 3]))
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [n for n, p in model.named_parameters() if id(p) not in exempt and p.grad.abs().max() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    # the BN-cancelled set must be only biases (a weight there would mean the detection is wrong)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith("bias") for i in exempt)


@pytest.mark.parametrize("preset", ["seed", "tiny"])  # "top" and "multiscale" classification sources
def test_each_head_alone_trains_the_whole_backbone_and_not_the_other_head(preset):
    model = _model(preset).train()
    x = torch.rand(2, 3, 32, 32)
    unet_weights = [(n, p) for n, p in model.unet.named_parameters() if p.ndim > 1]
    for head, other, loss_of in (("cls_head", "seg_head", lambda o: o.classification.logsumexp(1).sum()),
                                 ("seg_head", "cls_head", lambda o: o.segmentation.sum())):
        model.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        assert all(p.grad is None for p in getattr(model, other).parameters()), f"{head} loss reached {other}"
        assert all(p.grad is not None for p in getattr(model, head).parameters())
        dead = [n for n, p in unet_weights if p.grad is None or p.grad.abs().max() == 0]
        assert not dead, f"{head} loss does not reach backbone weights {dead}"


@pytest.mark.parametrize("n", [2, 3, 7])
def test_num_classes_follows_config(n):
    model = _model("tiny", num_classes=n).eval()
    assert model.cls_head.mlp[-1].out_features == n
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).classification.shape == (2, n)


def test_multiscale_model_survives_deepcopy():
    """The EMA copy is made with deepcopy: its encoder hooks must feed the copy, not the original."""
    model = _model("small").eval()
    x = torch.rand(2, 3, 32, 32)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        a, b = model(x), clone(x)
    assert torch.equal(a.classification, b.classification) and torch.equal(a.segmentation, b.segmentation)
    assert model._captured == [] and clone._captured == []
    with torch.no_grad():
        for p in clone.cls_head.parameters():
            p.add_(1.0)
        assert not torch.equal(model(x).classification, clone(x).classification)


def test_seed_preset_size_sanity():
    seed = _model("seed")
    n = count_parameters(seed)
    assert 6.5e6 < n < 6.8e6, n   # 6,643,478 with MONAI 1.6
    assert count_parameters(_model("tiny")) < count_parameters(_model("small")) < n
    seed.train()
    g = count_gflops(seed, 256)
    assert g == pytest.approx(14.5, abs=0.3)
    assert seed.training, "count_gflops must restore the training mode"
    # FLOPs scale with the pixel count
    assert count_gflops(seed, 128) == pytest.approx(g / 4, rel=0.02)


def test_config_round_trip_and_errors():
    for preset in PRESETS:
        cfg = make_config(preset, num_classes=3)
        d = cfg.to_dict()
        assert all(not isinstance(v, tuple) for v in d.values())  # plain data for weights_only loading
        assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown --arch"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**make_config("tiny").to_dict(), "wings": 2})
    with pytest.raises(ValueError, match="cls_source"):
        build_model(make_config("tiny", cls_source="sideways"))


def test_output_stride_is_the_one_size_rule():
    """Both networks say how much their encoder shrinks the input (lite0 32, a MONAI UNet the product
    of its strides); training and export both refuse a size that is not a multiple of it."""
    from cxrkit.core.errors import UsageError
    from cxrkit.core.model import check_img_size, output_stride
    lite = build_model(make_config("lite0", pretrained=False))
    tiny = _model("tiny")
    assert lite.output_stride == lite.encoder.output_stride == output_stride(lite.cfg) == 32
    assert tiny.output_stride == output_stride(make_config("tiny", strides=(2, 2, 2))) * 2 == 16
    for m in (lite, tiny):
        check_img_size(m.cfg, 4 * m.output_stride)
        for bad in (0, m.output_stride + 8, 100):
            with pytest.raises(UsageError, match=f"multiple of {m.output_stride}"):
                check_img_size(m.cfg, bad)
    with torch.no_grad():  # a size the rule accepts runs, and the mask comes back at the input size
        assert lite.eval()(torch.rand(1, 3, 64, 64)).segmentation.shape[-2:] == (64, 64)


def test_input_zscore_makes_the_model_blind_to_a_films_exposure():
    """--input_zscore (issue 22's intensity standardisation lever): each film's own mean and spread are
    removed inside the network, so a brighter or flatter copy of a film gives the same outputs."""
    import torch
    from cxrkit.core.config import ModelConfig, make_config
    from cxrkit.core.model import build_model
    cfg = make_config("lite0", num_classes=4)
    cfg.input_zscore = True
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a, b = m(x), m(0.6 * x + 0.3)
    assert torch.allclose(a.classification, b.classification, atol=1e-4)
    assert torch.allclose(a.segmentation, b.segmentation, atol=1e-3)
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "input_zscore"}).input_zscore is False


def test_lung_crop_frames_the_lungs_and_falls_back_to_the_whole_film():
    """lung_crop (issue 22's lung-ROI lever): the crop is centred on the lungs' box, its half-side is the
    margin times the box's larger half-extent, and a film with no lung pixel is kept whole."""
    from cxrkit.core.model import lung_crop
    x = torch.zeros(2, 3, 64, 64)
    x[:, :, 16:48, 8:40] = 1.0          # a bright 32 x 32 square...
    lung = torch.zeros(2, 1, 64, 64)
    lung[0, :, 16:48, 8:40] = 1.0        # ...that is the lungs of film 0; film 1 has none
    crop = lung_crop(x, lung, margin=0.0, size=32, mask_outside=False)
    assert crop.shape == (2, 3, 32, 32)
    assert torch.allclose(crop[0], torch.ones(3, 32, 32), atol=1e-5)   # exactly the square
    assert torch.allclose(crop[1], nn.functional.interpolate(x[1:], size=32, mode="bilinear",
                                                             align_corners=False, antialias=False)[0], atol=1e-5)
    stray = lung.clone()
    stray[0, :, 60, 60] = 1.0            # a one-pixel false positive far away does not stretch the box
    assert torch.equal(lung_crop(x, stray, 0.0, 32, False), crop)
    wide = lung_crop(x, lung, margin=1.0, size=64, mask_outside=False)  # half-side doubled: the square fills the middle half
    assert wide[0, 0, 32, 32] == 1 and wide[0, 0, 4, 32] == 0 and 0.2 < wide[0].mean() < 0.3
    x[:, :, 0:8, :] = 0.5                # something outside the lungs...
    masked = lung_crop(x, lung, margin=1.0, size=64, mask_outside=True)
    grey = lung_crop(x, lung, 1.0, 64, False)[0].mean()
    assert (masked[0, :, :4] - grey).abs().max() < 1e-5  # ...is greyed with the crop's mean
    assert masked[0, 0, 32, 32] == 1
    assert torch.equal(lung_crop(x, lung, 1.0, 64, True)[1], lung_crop(x, lung, 1.0, 64, False)[1])  # no lungs: all kept


@pytest.mark.parametrize("mode", ["crop", "crop_mask"])
def test_lung_focus_model_reads_its_class_from_the_crop_and_exports(mode, tmp_path):
    """--lung_focus: a second encoder classifies the crop around the predicted lungs; what lies outside
    that crop cannot change the class, gradients reach both encoders, and the ONNX graph (GridSample)
    gives PyTorch's outputs, at any batch size."""
    from cxrkit.core.errors import UsageError
    cfg = make_config("lite0", num_classes=4, lung_focus=mode)
    torch.manual_seed(0)
    m = build_model(cfg)
    x = torch.rand(3, 3, 64, 64)
    m(x).classification.sum().backward()
    assert m.focus_encoder._conv_stem.weight.grad.abs().sum() > 0
    assert m.encoder._conv_stem.weight.grad is None or m.encoder._conv_stem.weight.grad.abs().sum() == 0  # mask detached
    m.eval()
    with pytest.raises(UsageError, match="Grad-CAM"):
        m.bottleneck
    import numpy as np
    import onnxruntime as ort
    path = tmp_path / "f.onnx"
    torch.onnx.export(m, x, str(path), opset_version=17, input_names=["image"], dynamo=False,
                      output_names=["segmentation", "classification"], dynamic_axes={"image": {0: "b"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xb in (x, x[:1]):
        with torch.no_grad():
            ref = m(xb)
        seg, cls = sess.run(None, {"image": xb.numpy()})
        assert np.abs(cls - ref.classification.numpy()).max() < 1e-4
        assert np.abs(seg - ref.segmentation.numpy()).max() < 1e-3
