"""The pixel view check (cxrkit.core.ood.two_lungs) measured with a model: how often real frontal films
pass it, and how often a lateral-film proxy fails it.

    python scripts/lateral_proxy.py --roots ../shared/data/cxr4 ../shared/data/db_extra --per_class 150 \
        --out docs/lateral/shipped            # [--write: switch the check on in the shipped model]

The proxy: one side of a real frontal film (55% of its width, the spine at the cut edge), stretched
back to a square: one lung-shaped field, square, spine at the side, which is what a lateral film
looks like to a frontal model. How good a proxy it is: it has a lateral film's outline but not its
anatomy (no overlapped lungs, heart in front, sternum, arms raised), so its detection rate is an
upper bound guess, not a measured rate on real lateral films (none are available to the project).

The model's full decision is reported too: the gate's threshold (not_chest_xray) and the two-lung rule,
either of which sets a film aside. --write stores the frontal pass rate and switches the check on
(view_check = "two_lungs" when the pass rate is >= cxrkit.core.ood.VIEW_CHECK_MIN_PASS) in the
checkpoint's and the ONNX meta's gate, for a model whose gate was fitted before the check existed
(training and `cxrkit ensemble` fit it with the gate)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core.config import CHECKPOINT_PATH, ONNX_PATH  # noqa: E402
from cxrkit.core.decode import read_gray  # noqa: E402
from cxrkit.core.metrics import wilson_interval  # noqa: E402
from cxrkit.core.model_input import lung_mask, resize_gray, to_model_input_np  # noqa: E402
from cxrkit.core.ood import two_lungs, view_check_fields  # noqa: E402
from robustness import labelled_images  # noqa: E402
from script_io import add_to_model, write_result  # noqa: E402


def one_side(img: np.ndarray, side: int, keep: float = 0.55) -> np.ndarray:
    """The lateral proxy of a frontal film: its left (side 0) or right (1) `keep` share, stretched square."""
    h, w = img.shape
    c = img[:, :int(keep * w)] if side == 0 else img[:, int((1 - keep) * w):]
    return cv2.resize(c, (h, h), interpolation=cv2.INTER_AREA)


def run(backend, images, batch: int = 64):
    """Per image: (passes the two-lung rule, ood_score)."""
    passed, scores = [], []
    for s in range(0, len(images), batch):
        x = to_model_input_np(np.stack([resize_gray(im, backend.img_size) for im in images[s:s + batch]]))
        seg, _, score = backend.forward_ood(x)
        passed += [two_lungs(lung_mask(m)) for m in seg[:, 0]]
        scores += list(np.full(len(x), np.nan) if score is None else score)
    return np.array(passed), np.array(scores, np.float64)


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "k": int(k), "n": int(n), "ci95": [lo, hi]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", required=True)
    p.add_argument("--per_class", type=int, default=150)
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--checkpoint", default=str(ROOT / CHECKPOINT_PATH), help="with --write: the checkpoint to update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="writes <out>.json and <out>.md")
    p.add_argument("--write", action="store_true", help="store the frontal pass rate and the switch in the model")
    a = p.parse_args(argv)
    from cxrkit.inference.backends import OnnxBackend
    backend = OnnxBackend(a.onnx_path)
    gate = backend.meta.gate
    thr = gate.threshold if gate is not None else np.inf
    rep = {"model": str(a.onnx_path), "per_class": a.per_class, "seed": a.seed, "groups": {}}
    frontal_all = []
    for root in a.roots:
        paths, _ = labelled_images(root, backend.class_names, a.per_class, a.seed)
        imgs = [read_gray(q) for q in paths]
        ok, sc = run(backend, imgs)
        frontal_all += ok.tolist()
        prox = [one_side(im, s) for im in imgs for s in (0, 1)]
        pok, psc = run(backend, prox)
        name = Path(root).name
        rep["groups"][name] = {"frontal_fail_two_lungs": rate(int((~ok).sum()), len(ok)),
                               "frontal_set_aside": rate(int(((~ok) | (sc > thr)).sum()), len(ok)),
                               "proxy_fail_two_lungs": rate(int((~pok).sum()), len(pok)),
                               "proxy_over_gate": rate(int((psc > thr).sum()), len(pok)),
                               "proxy_set_aside": rate(int(((~pok) | (psc > thr)).sum()), len(pok))}
    md = ["| films | frontal: fail the two-lung rule | frontal: set aside (rule or gate) | proxy: fail the rule "
          "| proxy: over the gate | proxy: set aside |", "|---|---|---|---|---|---|"]
    for name, g in rep["groups"].items():
        md.append(f"| {name} | " + " | ".join(
            f"{g[k]['rate']:.3f} [{g[k]['ci95'][0]:.3f}, {g[k]['ci95'][1]:.3f}] (n={g[k]['n']})"
            for k in ("frontal_fail_two_lungs", "frontal_set_aside", "proxy_fail_two_lungs", "proxy_over_gate",
                      "proxy_set_aside")) + " |")
    print("\n".join(md))
    if a.out:
        write_result(a.out, rep, md)
    if a.write:
        from cxrkit.core.checkpoint import load_checkpoint
        fields = view_check_fields(frontal_all)
        ck_ood = {**(load_checkpoint(a.checkpoint).get("ood") or {}), **fields}
        meta_ood = {**json.loads(Path(backend.meta_path).read_text())["ood"], **fields}
        add_to_model(a.checkpoint, a.onnx_path, {"ood": ck_ood}, {"ood": meta_ood})
        print(f"view check: {fields} written into {a.checkpoint} and {backend.meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
