#!/usr/bin/env python
"""How much lower are out-of-distribution scores of images the NETWORK trained on than of unseen
images, when the gate's statistics saw neither? A model trained on every labelled image (the shipped
ensemble) can only take its threshold from images it trained on; this measures, on a model trained
on the train split only, the factor by which that under-states the unseen images' percentile.

  python scripts/ood_seen_bias.py --checkpoint CK --split SPLIT.json --data_dir ../shared/data/cxr4
"""
import argparse
import json

import numpy as np
import torch

from cxrkit.core.checkpoint import model_from_checkpoint
from cxrkit.training.data import load_data
from cxrkit.training.split import load_or_make_split
from cxrkit.core.model import predict
from cxrkit.core.ood import DEFAULT_PERCENTILE, THRESHOLD_MARGIN
from cxrkit.core.ood_head import _batches, attach_ood, default_layers, fit_statistics, pooled_features
from cxrkit.core.model_input import to_model_input


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", required=True, help="split.json of the run that trained the checkpoint")
    p.add_argument("--data_dir", default="../shared/data/cxr4")
    p.add_argument("--cache_dir", default="cache")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, ck = model_from_checkpoint(a.checkpoint)
    attach_ood(model, None)
    data = load_data(a.data_dir, ck["img_size"], a.cache_dir, 2, 0, 1, progress=False)
    split = load_or_make_split(data, a.split)
    tr = np.random.default_rng(a.seed).permutation(split["train"])
    n_fit = int(0.8 * len(tr))
    fit_idx, seen_idx = np.sort(tr[:n_fit]), np.sort(tr[n_fit:])
    layers = default_layers(model)
    means, w = fit_statistics(pooled_features(model, _batches(data.images, fit_idx), layers, "cpu"),
                              data.labels[fit_idx])
    attach_ood(model, {"layers": layers, "class_means": torch.from_numpy(means).float(),
                       "whitening": torch.from_numpy(w).float()})

    def scores(idx):
        out = []
        with torch.no_grad():
            for u8 in _batches(data.images, idx):
                out.append(predict(model, to_model_input(torch.from_numpy(u8)), with_ood=True)[2].numpy())
        return np.concatenate(out)

    s_seen = scores(seen_idx)
    s_unseen = scores(np.concatenate([split["val"], split["test"]]))
    res = {"n_seen": len(s_seen), "n_unseen": len(s_unseen)}
    for q in (95, 99, DEFAULT_PERCENTILE):
        res[f"p{q}_seen"], res[f"p{q}_unseen"] = float(np.percentile(s_seen, q)), float(np.percentile(s_unseen, q))
    thr = THRESHOLD_MARGIN * res[f"p{DEFAULT_PERCENTILE}_seen"]
    res["ratio_p99_unseen_over_seen"] = res[f"p{DEFAULT_PERCENTILE}_unseen"] / res[f"p{DEFAULT_PERCENTILE}_seen"]
    res["unseen_flagged_at_threshold_from_seen"] = float((s_unseen > thr).mean())
    res["median_seen"], res["median_unseen"] = float(np.median(s_seen)), float(np.median(s_unseen))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
