"""Test-time augmentation shared by evaluation and both inference backends.

A backend is any `forward(x) -> (seg_prob (B,1,S,S), cls_logits (B,C))` on torch tensors. N
deterministic mild affine views (identity first; no flips, training used none) are run, each
segmentation map is warped back to the original frame, and probabilities are averaged.
N = 1 is exactly plain inference (no warp is applied at all).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# (rotation degrees, scale, shift x, shift y) as fractions of the image; identity first
_VIEWS = [(0, 1.0, 0, 0), (5, 1.0, 0, 0), (-5, 1.0, 0, 0), (0, 1.06, 0, 0), (0, 0.94, 0, 0),
          (0, 1.0, 0.03, 0), (0, 1.0, -0.03, 0), (0, 1.0, 0, 0.03), (0, 1.0, 0, -0.03)]
MAX_TTA = len(_VIEWS)


def _theta(deg, scale, sx, sy) -> torch.Tensor:
    a = math.radians(deg)
    c, s = math.cos(a) / scale, math.sin(a) / scale
    return torch.tensor([[c, -s, 2 * sx], [s, c, 2 * sy], [0, 0, 1]], dtype=torch.float32)


def _warp(x: torch.Tensor, m3: torch.Tensor) -> torch.Tensor:
    theta = m3[:2].to(x.device, x.dtype).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tta_predict(forward, x: torch.Tensor, n: int = 1, temperature: float = 1.0):
    """Returns (seg_prob (B,1,S,S), class probabilities (B,C) = mean softmax(logits / T))."""
    if not 1 <= n <= MAX_TTA:
        raise ValueError(f"--tta must be between 1 and {MAX_TTA}, got {n}")
    seg_sum, prob_sum = None, None
    for view in _VIEWS[:n]:
        m3 = _theta(*view)
        xi = x if view == _VIEWS[0] else _warp(x, m3)
        seg, logits = forward(xi)
        seg, logits = torch.as_tensor(seg).float(), torch.as_tensor(logits).float()
        if view != _VIEWS[0]:
            seg = _warp(seg, torch.linalg.inv(m3))
        probs = torch.softmax(logits / temperature, dim=1)
        seg_sum = seg if seg_sum is None else seg_sum + seg
        prob_sum = probs if prob_sum is None else prob_sum + probs
    return seg_sum / n, prob_sum / n
