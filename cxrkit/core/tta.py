"""Test-time augmentation shared by evaluation and both inference backends.

`forward(x) -> (seg_prob (B,1,S,S), cls_logits (B,C))`. N deterministic mild affine views (identity
first; no flips, training used none) are run, each segmentation map is warped back to the original
frame, and probabilities are averaged. N = 1 is exactly plain inference (no warp is applied at all).

Two calling conventions, chosen by the type of x:
* torch tensors (training evaluation, cxrkit.training.evaluate): forward takes and returns tensors; the
  warps run on x's device.
* numpy arrays (the inference backends, cxrkit.inference): forward takes and returns float32 numpy
  arrays. N = 1 runs in numpy only; N > 1 imports torch for the warps (on the CPU).

torch is imported inside the functions: this module is torch-free on import (why: cxrkit/inference/__init__.py; tests/test_inference.py enforces it).
"""
from __future__ import annotations

import math

import numpy as np

from .metrics import softmax as _softmax_np

# (rotation degrees, scale, shift x, shift y) as fractions of the image; identity first
_VIEWS = [(0, 1.0, 0, 0), (5, 1.0, 0, 0), (-5, 1.0, 0, 0), (0, 1.06, 0, 0), (0, 0.94, 0, 0),
          (0, 1.0, 0.03, 0), (0, 1.0, -0.03, 0), (0, 1.0, 0, 0.03), (0, 1.0, 0, -0.03)]
MAX_TTA = len(_VIEWS)


def _theta(deg, scale, sx, sy):
    import torch
    a = math.radians(deg)
    c, s = math.cos(a) / scale, math.sin(a) / scale
    return torch.tensor([[c, -s, 2 * sx], [s, c, 2 * sy], [0, 0, 1]], dtype=torch.float32)


def _warp(x, m3):
    import torch.nn.functional as F
    theta = m3[:2].to(x.device, x.dtype).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _tta_torch(forward, x, n: int, temperature: float):
    """(mean seg, mean probs, the identity view's third output or None when forward gives two)."""
    import torch
    seg_sum, prob_sum, score = None, None, None
    for view in _VIEWS[:n]:
        m3 = _theta(*view)
        xi = x if view == _VIEWS[0] else _warp(x, m3)
        seg, logits, *rest = forward(xi)
        seg, logits = torch.as_tensor(seg).float(), torch.as_tensor(logits).float()
        if view != _VIEWS[0]:
            seg = _warp(seg, torch.linalg.inv(m3))
        elif rest:
            score = rest[0]
        probs = torch.softmax(logits / temperature, dim=1)
        seg_sum = seg if seg_sum is None else seg_sum + seg
        prob_sum = probs if prob_sum is None else prob_sum + probs
    return seg_sum / n, prob_sum / n, score


def tta_predict(forward, x, n: int = 1, temperature: float = 1.0, with_ood: bool = False):
    """Returns (seg_prob (B,1,S,S), class probabilities (B,C) = mean softmax(logits / T)), as torch
    tensors when x is a tensor, as float32 numpy arrays when x is a numpy array.
    with_ood: forward returns (seg, logits, ood_score or None), and so does this, the score being the
    identity view's (the gate judges the image itself, not its augmented views)."""
    if not 1 <= n <= MAX_TTA:
        raise ValueError(f"--tta must be between 1 and {MAX_TTA}, got {n}")
    if not isinstance(x, np.ndarray):
        seg, probs, score = _tta_torch(forward, x, n, temperature)
        return (seg, probs, score) if with_ood else (seg, probs)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n == 1:  # plain inference: numpy only, no torch import
        seg, logits, *rest = forward(x)
        seg, logits = np.asarray(seg, np.float32), np.asarray(logits, np.float32)
        probs = _softmax_np(logits, temperature).astype(np.float32, copy=False)
        return (seg, probs, rest[0] if rest else None) if with_ood else (seg, probs)
    import torch  # the affine warps of N > 1 views use torch's grid_sample (CPU)

    def fwd(t):
        seg, logits, *rest = forward(t.numpy())
        return torch.from_numpy(np.asarray(seg, np.float32)), torch.from_numpy(np.asarray(logits, np.float32)), *rest

    seg, probs, score = _tta_torch(fwd, torch.from_numpy(x), n, temperature)
    return (seg.numpy(), probs.numpy(), score) if with_ood else (seg.numpy(), probs.numpy())
