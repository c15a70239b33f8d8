"""The out-of-distribution score inside the network, and the one function that fits it.

`OODHead` holds, as non-persistent buffers, the statistics of pooled intermediate encoder features
on the training split: per-class means and a whitening matrix W with W W^T = the inverse of one
shared (Ledoit-Wolf) covariance. Attached to a model (`attach_ood`), it reads the tapped layers'
outputs through forward hooks while the model runs, and `cxrkit.core.model.predict(..., with_ood=True)`
returns

    ood_score = min over classes c of ||(f - mu_c) W||^2 / D

f = the spatial mean and standard deviation of each tapped channel (the class-conditional squared Mahalanobis distance of Lee et al. 2018 divided by the feature
dimension D, so a typical training image scores about 1). Because it is computed by the network, the
ONNX export carries it as a third output (`ood_score`) and both backends agree to float32 precision.

The statistics live in the checkpoint under ck["ood"] (plain tensors and numbers, so
torch.load(weights_only=True) reads them), not in the state_dict: checkpoints without them load as
before, with no gate. `fit_ood` is what the end of training calls (see its docstring).
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from torch import nn

from .ood import (DEFAULT_PERCENTILE, MIN_VAL_IMAGES, OOD_FORMAT, THRESHOLD_MARGIN, GateSpec,
                  threshold_from_scores)

log = logging.getLogger("cxrkit")


def default_layers(model: nn.Module) -> list[str]:
    """The dotted names of the model's declared OOD layers (MultiTaskNet.ood_layers)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in model.ood_layers()]


class OODHead(nn.Module):
    """Pooled features of `layers` -> min-class squared Mahalanobis distance / D, (B,) float32."""

    def __init__(self, layers, class_means: torch.Tensor, whitening: torch.Tensor):
        super().__init__()
        self.layers = list(layers)
        w = whitening.float()
        # ||(f - mu_c) W||^2 = ||f W - mu_c W||^2: one (B, D) x (D, D) product, then C distances
        self.register_buffer("whitening", w, persistent=False)
        self.register_buffer("means_w", class_means.float() @ w, persistent=False)
        self._on = False
        self._feats: list[torch.Tensor] = []
        self._handles = []

    def hook(self, model: nn.Module) -> None:
        for name in self.layers:
            self._handles.append(model.get_submodule(name).register_forward_hook(self._capture))

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture(self, _module, _inputs, out):
        if self._on:  # spatial mean and standard deviation of each channel
            o = out.float()
            self._feats += [o.mean(dim=(2, 3)), o.std(dim=(2, 3))]

    @contextlib.contextmanager
    def capturing(self):
        self._on, self._feats = True, []
        try:
            yield
        finally:
            self._on = False

    def score_captured(self) -> torch.Tensor:
        if len(self._feats) != 2 * len(self.layers):
            raise RuntimeError(f"OOD head captured {len(self._feats)} pooled maps, expected {2 * len(self.layers)}")
        f = torch.cat(self._feats, dim=1)
        self._feats = []
        g = f @ self.whitening                                        # (B, D)
        d2 = ((g.unsqueeze(1) - self.means_w.unsqueeze(0)) ** 2).sum(dim=2)  # (B, C)
        return d2.min(dim=1).values / g.shape[1]


def attach_ood(model: nn.Module, stats: dict | None) -> nn.Module:
    """Attach (or, with None, remove) the OOD head described by a checkpoint's ck["ood"]; returns model."""
    old = getattr(model, "ood_head", None)
    if old is not None:
        old.unhook()
        del model.ood_head
    gate = GateSpec.from_dict(stats)
    if gate is not None:
        head = OODHead(gate.layers, torch.as_tensor(gate.class_means), torch.as_tensor(gate.whitening))
        p = next(model.parameters(), None)
        if p is not None:
            head.to(p.device)
        model.ood_head = head
        head.hook(model)
    return model


@torch.no_grad()
def pooled_features(model, u8_batches, layers, device) -> np.ndarray:
    """(N, D) float64 pooled features of `layers` for an iterable of (B, S, S) uint8 arrays."""
    from .model_input import to_model_input
    head = OODHead(layers, torch.zeros(1, 1), torch.zeros(1, 1))
    was = getattr(model, "ood_head", None)
    if was is not None:
        was.unhook()
    head.hook(model)
    out = []
    try:
        model.eval()
        for u8 in u8_batches:
            x = to_model_input(torch.as_tensor(np.ascontiguousarray(u8)).to(device))
            with head.capturing():
                model(x)
            out.append(torch.cat(head._feats, 1).double().cpu().numpy())
            head._feats = []
    finally:
        head.unhook()
        if was is not None:
            was.hook(model)
    return np.concatenate(out) if out else np.zeros((0, 0))


def _batches(images, idx, bs=64):
    idx = np.sort(np.asarray(idx))
    for s in range(0, len(idx), bs):
        yield np.asarray(images[idx[s:s + bs]])


def fit_statistics(feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (C, D) and the whitening W (D, D) of one Ledoit-Wolf covariance of the
    class-centred features (W W^T = precision)."""
    from sklearn.covariance import LedoitWolf
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    centred = feats - means[np.searchsorted(classes, labels)]
    prec = LedoitWolf().fit(centred).precision_
    prec = (prec + prec.T) / 2
    return means, np.linalg.cholesky(prec)


def fit_ood(model: nn.Module, data, train_idx, val_idx, device=None, layers=None,
            percentile: float = DEFAULT_PERCENTILE, margin: float = THRESHOLD_MARGIN,
            min_val: int = MIN_VAL_IMAGES) -> dict | None:
    """Fit the OOD gate of a trained model and attach it; returns the dict to store as ck["ood"]
    (None, and no gate, when fewer than `min_val` validation images are given: a percentile of a
    handful of scores is no threshold).

    data: a cxrkit.training.data.CachedData (uint8 images at the model's input size); train_idx / val_idx:
    its training and validation split indices. Statistics come from the training images; the
    threshold is `margin` x the `percentile`-th percentile of the validation images' scores (images
    the statistics never saw; cxrkit.core.ood says why the margin).
    Also recorded: the validation images' ratios for the inverted / rotated checks (cxrkit.core.ood).
    """
    from .ood import view_scores_np
    device = device or next(model.parameters()).device
    val_idx = np.asarray(val_idx)
    if len(val_idx) < min_val:
        log.warning("only %d validation images: too few to set an out-of-distribution threshold, no gate fitted "
                    "(needs >= %d)", len(val_idx), min_val)
        attach_ood(model, None)
        return None
    layers = list(layers or default_layers(model))
    attach_ood(model, None)
    ftr = pooled_features(model, _batches(data.images, train_idx), layers, device)
    means, w = fit_statistics(ftr, np.asarray(data.labels)[np.sort(np.asarray(train_idx))])
    stats = {"format": OOD_FORMAT, "layers": layers, "pool": "spatial mean and standard deviation per channel",
             "class_means": torch.from_numpy(means).float(), "whitening": torch.from_numpy(w).float(),
             "feature_dim": int(means.shape[1]), "n_train": int(len(train_idx))}
    attach_ood(model, stats)
    from .model import predict

    two_lungs_seen = []  # the pixel view check's pass/fail on the validation images (first call only)

    def score(x):  # (B, 3, S, S) float32 numpy in [0, 1] -> (B,) scores
        out, keep = [], not two_lungs_seen
        with torch.no_grad():
            for s in range(0, len(x), 64):
                xt = torch.from_numpy(np.ascontiguousarray(x[s:s + 64])).to(device)
                seg, _, sc = predict(model, xt, with_ood=True)
                out.append(sc.double().cpu().numpy())
                if keep:
                    two_lungs_seen.extend(two_lungs(lung_mask(m)) for m in seg[:, 0].cpu().numpy())
        return np.concatenate(out)

    from .model_input import lung_mask, to_model_input_np
    from .ood import two_lungs, view_check_fields
    val_x = to_model_input_np(np.concatenate(list(_batches(data.images, val_idx))))
    sv = score(val_x)
    stats.update(threshold_from_scores(sv, percentile, margin, view_scores_np(score, val_x)))
    stats.update(view_check_fields(two_lungs_seen))
    log.info("out-of-distribution gate: threshold %.3f (p%s of %d validation scores)", stats["threshold"],
             percentile, len(sv))
    return stats
