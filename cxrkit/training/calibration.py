"""Calibration after training: the prior correction (logit adjustment that undoes the loss's class
weighting) and temperature scaling (Guo et al. 2017: one scalar T > 0 fitted on validation logits by
minimising NLL; calibrated probabilities are softmax(logits / T), argmax unchanged). evaluate.finalize
applies both; evaluate.calibrate fits T on a split."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .losses import inverse_frequency_weights


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    return t if np.isfinite(t) else 1.0


@torch.no_grad()
def apply_prior_correction(model, ck: dict, train_labels: np.ndarray) -> None:
    """Undo the class weighting of the loss at inference time (logit adjustment).

    Cross-entropy weighted by w_c learns logits ~ log p(c|x) + log w_c; adding -log w_c to the last
    layer's bias gives probabilities for the training-set class prior again, so a probability means
    what it says and the argmax is not biased towards rare classes. Baked into the weights (and so
    into the ONNX graph); recorded in the checkpoint. Idempotent per checkpoint.
    """
    if ck.get("prior_correction"):
        return
    n = len(ck["class_names"])
    w = inverse_frequency_weights(train_labels, n).double()
    offset = torch.where(w > 0, -torch.log(w.clamp(min=1e-12)), torch.zeros_like(w)).float()
    for last in model.class_outputs():
        last.bias += offset.to(last.bias.device)
    ck["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ck["prior_correction"] = {"logit_offset": offset.tolist(), "method": "logit adjustment: -log(inverse-frequency "
                              "class weight), added to the classifier's output bias"}


def member_prior_corrections(ck: dict, n: int) -> list:
    """The prior correction baked into each of a checkpoint's n networks: an ensemble records each member's own
    (members of other folds differ a little); a single model, or an ensemble built before members recorded
    theirs, has the checkpoint's one (for those ensembles: the first member's)."""
    members = (ck.get("ensemble") or {}).get("members") or []
    members = members if len(members) == n else [{}] * n
    return [m["prior_correction"] if "prior_correction" in m else ck.get("prior_correction") for m in members]


@torch.no_grad()
def remove_prior_correction(model, ck: dict) -> None:
    """The inverse of apply_prior_correction on a model built from `ck` (every member of an ensemble): its
    classifier as trained, for a fine-tuning start (--init_from) or a teacher (--teacher), whose outputs
    must not carry a correction that finalize applies again. Leaves `ck` as it is."""
    layers = model.class_outputs()
    for last, pc in zip(layers, member_prior_corrections(ck, len(layers))):
        if pc:
            last.bias -= torch.tensor(pc["logit_offset"], dtype=last.bias.dtype, device=last.bias.device)
