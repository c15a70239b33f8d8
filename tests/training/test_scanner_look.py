"""Appearance augmentation (data.scanner_look): another site's processing, applied reproducibly."""
import dataclasses

import numpy as np
import torch

from cxrkit.core.config import TrainConfig
from cxrkit.training.data import TRAIN_SHIFTS, scanner_look


def _batch(b=8, s=64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, s, s, generator=g).expand(-1, 3, -1, -1).contiguous()
    return x


def _run(cfg, seed=1):
    return scanner_look(_batch(), cfg, torch.Generator().manual_seed(seed))


def test_off_is_identity_and_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state().clone()
    x = _batch()
    assert torch.equal(scanner_look(x, TrainConfig(), gen), x)
    assert torch.equal(gen.get_state(), before)  # recipes without it keep their random stream


def test_each_lever_changes_the_images_reproducibly_and_keeps_channels_grey():
    for kw in ({"aug_clahe": 1.0}, {"aug_gamma": 0.5}, {"aug_shifts": 1.0}):
        cfg = dataclasses.replace(TrainConfig(), **kw)
        a, b = _run(cfg), _run(cfg)
        assert torch.equal(a, b), kw                       # same generator state, same images (bit-identical resume)
        assert not torch.equal(a, _batch()), kw
        assert float(a.min()) >= 0 and float(a.max()) <= 1, kw
        assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2]), kw


def test_shift_probability_is_honoured():
    cfg = dataclasses.replace(TrainConfig(), aug_shifts=0.5)
    x = _batch(b=200, s=32)
    out = scanner_look(x, cfg, torch.Generator().manual_seed(0))
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert 60 < int(changed.sum()) < 120  # about half (a level near 0 can leave one unchanged)
    assert "collimation" not in TRAIN_SHIFTS  # a crop would move the lungs away from their mask
