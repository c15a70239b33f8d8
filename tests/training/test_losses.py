"""Losses and temperature scaling on hand-made inputs with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrkit.training.calibration import fit_temperature
from cxrkit.training.losses import MultiTaskLoss, dice_loss, inverse_frequency_weights, seg_loss


def _half_mask(b=2, s=16):
    t = torch.zeros(b, 1, s, s)
    t[:, :, :, : s // 2] = 1
    return t


# ------------------------------------------------------------------------------------------ Dice
def test_dice_loss_known_values():
    t = _half_mask()
    perfect = dice_loss((t * 2 - 1) * 50, t)
    assert perfect.shape == (2,)
    assert torch.allclose(perfect, torch.zeros(2), atol=1e-6)
    wrong = dice_loss((1 - 2 * t) * 50, t)          # lung predicted where there is none and vice versa
    assert (wrong > 0.99).all()
    # p = 0.5 everywhere on an all-lung target of N pixels: 1 - (N + 1) / (1.5 N + 1) (eps = 1)
    n = 16 * 16
    half = dice_loss(torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16))
    assert half.item() == pytest.approx(1 - (n + 1) / (1.5 * n + 1), rel=1e-6)
    # both empty counts as perfect agreement (eps), not as a division by zero
    assert dice_loss(torch.full((1, 1, 8, 8), -50.0), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(0, abs=1e-6)


def test_dice_loss_is_per_sample():
    t = _half_mask()
    logits = torch.stack([(t[0] * 2 - 1) * 50, (1 - 2 * t[1]) * 50])
    d = dice_loss(logits, t)
    assert d[0] < 1e-6 and d[1] > 0.99


# ------------------------------------------------------------------------------------ seg loss
def test_seg_loss_ignores_samples_without_mask():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 16, 16)
    masks = (torch.rand(4, 1, 16, 16) > 0.5).float()
    has = torch.tensor([True, False, True, False])
    ref = seg_loss(logits, masks, has)
    masks2 = masks.clone()
    masks2[~has] = 1 - masks2[~has]                     # change only the ignored samples' masks
    assert torch.equal(seg_loss(logits, masks2, has), ref)
    # equals the mean of (Dice + BCE) over the masked samples only
    sel = has.nonzero().flatten()
    bce = F.binary_cross_entropy_with_logits(logits[sel], masks[sel], reduction="none").flatten(1).mean(1)
    expected = (dice_loss(logits[sel], masks[sel]) + bce).mean()
    assert ref.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seg_loss_without_any_mask_is_zero_but_differentiable():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    loss = seg_loss(logits, torch.ones(3, 1, 8, 8), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad                            # still in the graph (DDP needs every step to backward)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------------------------- class weights
def test_inverse_frequency_weights_known_values():
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), 2)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    # an absent class gets weight 0 (not inf or nan)
    w = inverse_frequency_weights(np.array([0, 0, 0, 1, 3, 3]), 4)
    assert torch.allclose(w, torch.tensor([6 / 12, 6 / 4, 0.0, 6 / 8]))
    # with every class present the mean weight over the samples is 1
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 2, 3])
    w = inverse_frequency_weights(labels, 4)
    assert w[torch.from_numpy(labels)].mean().item() == pytest.approx(1.0)
    assert torch.allclose(inverse_frequency_weights(np.array([0, 1, 2, 3]), 4), torch.ones(4))


def test_multitask_loss_combines_the_parts():
    torch.manual_seed(0)
    seg = torch.randn(4, 1, 16, 16)
    masks = (torch.rand(4, 1, 16, 16) > 0.5).float()
    has = torch.tensor([True, True, False, True])
    cls = torch.randn(4, 3)
    y = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([0.5, 2.0, 1.5])
    crit = MultiTaskLoss(w, seg_weight=0.7, cls_weight=2.5)
    parts = crit(seg, cls, masks, has, y)
    assert parts.seg.item() == pytest.approx(seg_loss(seg, masks, has).item(), rel=1e-6)
    # weighted CE by hand: sum_i w_yi * nll_i / sum_i w_yi
    logp = torch.log_softmax(cls.double(), 1)
    nll = -logp[torch.arange(4), y]
    cls_ref = float((w.double()[y] * nll).sum() / w.double()[y].sum())
    assert parts.cls.item() == pytest.approx(cls_ref, rel=1e-5)
    assert parts.total.item() == pytest.approx(0.7 * parts.seg.item() + 2.5 * parts.cls.item(), rel=1e-6)
    unweighted = MultiTaskLoss(None)(seg, cls, masks, has, y)
    assert unweighted.cls.item() == pytest.approx(float(nll.mean()), rel=1e-5)


# ---------------------------------------------------------------------------------- calibration
def _nll(logits, labels, t):
    return float(F.cross_entropy(torch.as_tensor(logits / t), torch.as_tensor(labels)))


def test_fit_temperature_softens_overconfident_logits():
    """Predicted class gets logit 8, others 0, but only 70 % of predictions are right: the NLL
    optimum puts the top probability at 0.7, i.e. exp(8/T) = 3 * 0.7 / 0.3 -> T = 8 / ln 7."""
    n, c, margin = 1000, 4, 8.0
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, n)
    pred = labels.copy()
    pred[700:] = (labels[700:] + 1) % c
    logits = np.zeros((n, c))
    logits[np.arange(n), pred] = margin
    t = fit_temperature(logits, labels)
    assert t > 1
    assert t == pytest.approx(margin / math.log(7), rel=0.01)
    assert _nll(logits, labels, t) < _nll(logits, labels, 1.0) - 0.5


def test_fit_temperature_keeps_calibrated_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2.0, (20000, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])   # labels drawn from the model's own probabilities
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(1.0, abs=0.05)


def test_fit_temperature_is_clamped_on_separable_data():
    labels = np.arange(40) % 4
    logits = np.eye(4)[labels] * 10.0            # always right: NLL keeps falling as T -> 0
    t = fit_temperature(logits, labels)
    assert 0.05 <= t < 1 and np.isfinite(t)


def test_numpy_classification_metrics_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score
    from cxrkit.core.metrics import classification_metrics
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[:50] = np.round(probs[:50], 1)            # ties in the scores
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    pred = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(4)).tolist()
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
    for i, k in enumerate("abcd"):
        pc = m["per_class"][k]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
        assert pc["roc_auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    # a class never predicted and never present: zeros, no AUC, no crash
    m2 = classification_metrics(np.array([0, 0, 1]), np.array([[.9, .1, 0], [.8, .2, 0], [.3, .7, 0]]), ["a", "b", "c"])
    c = m2["per_class"]["c"]
    assert {k: c[k] for k in ("precision", "recall", "f1", "support", "roc_auc")} == \
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "roc_auc": None}
    assert c["specificity"] == 1.0 and c["npv"] == 1.0 and c["recall_ci95"] == [0.0, 1.0]  # no positives: 0/0
