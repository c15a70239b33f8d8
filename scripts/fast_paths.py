#!/usr/bin/env python
"""Check a model's BF16 fast path (OpenVINO on a CPU with AMX or AVX-512 BF16) against FP32 (ONNX
Runtime), and with --write store the verdict and what that path needs in the model.

    python scripts/fast_paths.py --roots HELDOUT/cxr4 HELDOUT/db_extra --agreement_dir ../shared/data/cxr4 \
        --out docs/fast_paths/bf16 [--write]

--roots: folders laid out like the database (<Class>/images, <Class>/masks optional) holding films the
model never trained on; for the shipped model, fold 0 of its 10-fold split (MODEL_CARD.md says how to
rebuild those folders), the films its gate and shift reference were fitted on.

Measured per precision:
  held-out films   accuracy, macro-F1 (calibrated probabilities), Dice (where masks exist), the gate's
                   not-judged rate (each precision with its own threshold)
  non-chest        the gate's not-judged rate on the pictures scikit-image and matplotlib ship (and crops)
  agreement        the class of BF16 against FP32 on every image of --agreement_dir, and on the held-out
                   films under scanner-like shifts (cxrkit.training.shifts, every shift at 0.5 and 1.0)
  shift warning    false alarms on simulated in-source folders of 200 (cxrkit.core.shift_check), each
                   precision against its own reference
Guards (issue 26): accuracy and macro-F1 at most 0.5 points below FP32, Dice within 0.002, each gate rate
within 0.01, the shift warning's false alarms within 0.01, agreement >= 0.99 on both sets.

BF16 moves the gate's score a little (its features pass through BF16 convolutions), enough to matter for
a threshold and for a folder's median score. So the path gets its own threshold (FP32's rule, on the same
films: margin x percentile of the held-out scores) and its own shift reference (the same films and groups
as scripts/fit_shift_reference.py samples), both stored in fast_paths.bf16; a BF16 run uses them
(ModelMeta.for_precision). Speed is measured by scripts/benchmark_inference.py, not here."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cxrkit.core import ood, shift_check  # noqa: E402
from cxrkit.core.config import CHECKPOINT_PATH, ONNX_PATH  # noqa: E402
from cxrkit.core.decode import list_images, mask_for_image, read_gray, read_mask  # noqa: E402
from cxrkit.core.metrics import binary_dice_iou, classification_metrics, softmax  # noqa: E402
from cxrkit.core.model_input import lung_mask, resize_gray, to_model_input_np  # noqa: E402
from cxrkit.training.shifts import SHIFTS, apply_shift  # noqa: E402
from fit_shift_reference import features, rate, sample  # noqa: E402
from ood_eval import pictures, random_crops  # noqa: E402
from script_io import add_to_model, write_result  # noqa: E402

GUARDS = {"accuracy_drop": 0.005, "macro_f1_drop": 0.005, "dice_abs": 0.002, "gate_rate_abs": 0.01,
          "shift_false_alarm_abs": 0.01, "agreement_min": 0.99}
# the referee margin is fitted for this agreement on the films measured here, above the guard: margin for
# films the check never saw. A path that needs FP32 for more than REFEREE_MAX_SHARE of any set fails: it would
# agree only by running FP32 (and be slower than it).
REFEREE_TARGET = 0.998
REFEREE_MAX_SHARE = 0.10


def held_out(roots, class_names):
    """(grey images, labels, masks or None) of every film under the roots' class folders."""
    imgs, labels, masks = [], [], []
    for root in map(Path, roots):
        for c in class_names:
            if not (root / c).is_dir():
                continue
            for p in list_images(root / c, skip_dir=lambda d: d.name == "masks"):
                imgs.append(read_gray(p))
                labels.append(class_names.index(c))
                m = mask_for_image(p)
                masks.append(None if m is None else read_mask(m))
    return imgs, np.array(labels), masks


def outputs(backend, images, batch: int = 64, lungs: bool = True):
    """(lung masks at each image's size, class logits, gate scores or None for a model without a gate) of grey
    images."""
    masks, logits, scores = [], [], []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        x = to_model_input_np(np.stack([resize_gray(a, backend.img_size) for a in chunk]))
        seg, lg, score = backend.forward_ood(x)
        masks += [lung_mask(seg[i, 0], a.shape[:2]) for i, a in enumerate(chunk)] if lungs else []
        logits.append(lg)
        if score is not None:
            scores.append(np.asarray(score, np.float64))
    return masks, np.concatenate(logits), np.concatenate(scores) if scores else None


def refereed(bf16_logits, fp32_logits, temperature: float, margin: float):
    """What the BF16 backend returns with an FP32 referee (OnnxBackend.referee_close_calls): FP32's logits
    where BF16's call is close (backends.close_calls, the backend's own rule); and the share refereed."""
    from cxrkit.inference.backends import close_calls
    close = close_calls(bf16_logits, temperature, margin)
    return np.where(close[:, None], fp32_logits, bf16_logits), float(close.mean())


def fit_margin(pairs: dict, temperature: float, target: float) -> float:
    """The smallest referee margin (steps of 0.01) that brings class agreement with FP32 to `target` on
    every set of (bf16 logits, fp32 logits) pairs."""
    for m in np.round(np.arange(0.0, 1.0001, 0.01), 2):
        if all(np.mean(refereed(b, f, temperature, m)[0].argmax(1) == f.argmax(1)) >= target
               for b, f in pairs.values()):
            return float(m)
    return 1.0


def not_judged(backend, gate, images, scores, batch: int = 64) -> float:
    """Share of images the gate sets aside (its views included), as the pipeline decides."""
    flagged = 0
    for s in range(0, len(images), batch):
        x = to_model_input_np(np.stack([resize_gray(a, backend.img_size) for a in images[s:s + batch]]))
        sc = scores[s:s + batch]
        views = gate.score_views(lambda xv: backend.forward_ood(xv)[2], x, sc)
        flagged += sum(bool(gate.decide(v, w)) for v, w in zip(sc, views))
    return flagged / max(1, len(images))


def refit_threshold(stored: ood.GateSpec, scores_fp32, scores_fast) -> dict:
    """FP32's rule (margin x percentile) on the same films, for the fast path; the FP32 refit beside it
    shows how close the rule on these films comes to the stored threshold."""
    p = stored.percentile
    th = stored.margin * float(np.percentile(scores_fast, p))
    return {"threshold": th, "fp32_refit_on_these_films": stored.margin * float(np.percentile(scores_fp32, p)),
            "fp32_stored": stored.threshold, "rule": stored.rule}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", required=True, help="held-out films (<Class>/images[, masks])")
    p.add_argument("--agreement_dir", required=True, help="every image here is scored by both precisions")
    p.add_argument("--onnx_path", default=str(ROOT / ONNX_PATH))
    p.add_argument("--checkpoint", default=str(ROOT / CHECKPOINT_PATH))
    p.add_argument("--per_group", type=int, default=200, help="shift reference sample (fit_shift_reference's)")
    p.add_argument("--folders", type=int, default=1000,
                   help="simulated in-source folders for the false-alarm rate (1,000: a standard error of about 0.005 at 2%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    p.add_argument("--write", action="store_true", help="store fast_paths.bf16 in the checkpoint and ONNX meta")
    a = p.parse_args(argv)
    from cxrkit.core import cpu
    from cxrkit.inference.backends import OnnxBackend, openvino_version
    fp32 = OnnxBackend(a.onnx_path, precision="fp32")
    # one-line error where the CPU or OpenVINO lacks it; BF16 alone here, the referee is simulated (refereed)
    bf16 = OnnxBackend(a.onnx_path, precision="bf16", fp32_referee=False)
    names, gate, temp = fp32.class_names, fp32.meta.resolve_gate(), fp32.temperature
    if gate is None:
        p.error(f"{a.onnx_path} carries no out-of-distribution gate: this check compares the gate's rates and refits "
                f"its threshold for BF16; fit a gate first (docs/TRUST.md)")

    imgs, y, masks = held_out(a.roots, names)
    res = {k: outputs(b, imgs) for k, b in (("fp32", fp32), ("bf16", bf16))}
    th = refit_threshold(gate, res["fp32"][2], res["bf16"][2])
    agree_paths = [q for q in list_images(a.agreement_dir) if "masks" not in q.parts]
    agree_imgs = [read_gray(q) for q in agree_paths]
    shifted = [apply_shift(im, name, lv, seed=i) for name in SHIFTS for lv in (0.5, 1.0)
               for i, im in enumerate(imgs)]
    pairs = {f"held-out films ({len(imgs)})": (res["bf16"][1], res["fp32"][1])}
    for label, group in ((f"{Path(a.agreement_dir).name} (all {len(agree_imgs)})", agree_imgs),
                         (f"held-out films under {len(SHIFTS)} shifts x 2 levels ({len(shifted)})", shifted)):
        pairs[label] = (outputs(bf16, group, lungs=False)[1], outputs(fp32, group, lungs=False)[1])
    del agree_imgs, shifted
    margin = fit_margin(pairs, temp, REFEREE_TARGET)
    agreement, raw_agreement, referee_share = {}, {}, {}
    for label, (b, f) in pairs.items():
        lg, share = refereed(b, f, temp, margin)
        agreement[label] = float(np.mean(lg.argmax(1) == f.argmax(1)))
        raw_agreement[label], referee_share[label] = float(np.mean(b.argmax(1) == f.argmax(1))), share
    res["bf16"] = (res["bf16"][0], refereed(res["bf16"][1], res["fp32"][1], temp, margin)[0], res["bf16"][2])
    gates = {"fp32": gate, "bf16": replace(gate, threshold=th["threshold"])}
    non_chest = pictures()
    non_chest = non_chest + random_crops(non_chest)
    rows = {}
    for k, b in (("fp32", fp32), ("bf16", bf16)):
        lungs, logits, scores = res[k]
        m = classification_metrics(y, softmax(logits, temp), names)
        dice = [binary_dice_iou(lz, t)[0] for lz, t in zip(lungs, masks) if t is not None]
        rows[k] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "dice": float(np.mean(dice)) if dice else float("nan"),
                   "n_masks": len(dice), "not_judged_heldout": not_judged(b, gates[k], imgs, scores),
                   "not_judged_non_chest": not_judged(b, gates[k], non_chest, outputs(b, non_chest, lungs=False)[2]),
                   "threshold": gates[k].threshold}
    # the shift reference of each precision on fit_shift_reference's sample; false alarms half/half
    s_paths, s_groups = sample(a.roots, a.per_group, a.seed)
    s_imgs = [read_gray(q) for q in s_paths]
    refs, false_alarm, feats = {}, {}, {}
    for k, b in (("fp32", fp32), ("bf16", bf16)):
        v = feats[k] = features(b, s_imgs)
        refs[k] = shift_check.make_reference(v, s_groups)
        rng = np.random.default_rng(a.seed)
        half = np.zeros(len(s_groups), bool)
        for g in sorted(set(s_groups)):  # sorted: a set of strings iterates in a per-process order
            idx = np.flatnonzero(s_groups == g)
            half[rng.permutation(idx)[: len(idx) // 2]] = True
        false_alarm[k] = rate(v[~half], s_groups[~half], shift_check.make_reference(v[half], s_groups[half]),
                              200, a.folders, rng)
        rows[k]["shift_false_alarm_n200"] = false_alarm[k]
    # the FP32 path with the model's stored reference on BF16 features: what BF16 would do without its own
    rng = np.random.default_rng(a.seed + 1)
    rows["bf16"]["shift_false_alarm_n200_with_fp32_reference"] = rate(
        feats["bf16"], s_groups, fp32.meta.shift_reference or refs["fp32"], 200, a.folders, rng)

    f, b = rows["fp32"], rows["bf16"]
    checks = {"accuracy": b["accuracy"] >= f["accuracy"] - GUARDS["accuracy_drop"],
              "macro_f1": b["macro_f1"] >= f["macro_f1"] - GUARDS["macro_f1_drop"],
              "dice": f["n_masks"] == 0 or abs(b["dice"] - f["dice"]) <= GUARDS["dice_abs"],
              "gate_heldout": abs(b["not_judged_heldout"] - f["not_judged_heldout"]) <= GUARDS["gate_rate_abs"],
              "gate_non_chest": abs(b["not_judged_non_chest"] - f["not_judged_non_chest"]) <= GUARDS["gate_rate_abs"],
              "shift_false_alarm": abs(b["shift_false_alarm_n200"] - f["shift_false_alarm_n200"])
              <= GUARDS["shift_false_alarm_abs"],
              **{f"agreement: {k}": v >= GUARDS["agreement_min"] for k, v in agreement.items()},
              **{f"refereed at most {REFEREE_MAX_SHARE:.0%}: {k}": v <= REFEREE_MAX_SHARE for k, v in referee_share.items()}}
    passed = all(checks.values())
    rep = {"model": str(a.onnx_path), "roots": a.roots, "n_heldout": len(imgs), "n_non_chest": len(non_chest),
           "cpu": cpu.describe(), "openvino": openvino_version(), "guards": GUARDS, "rows": rows,
           "agreement_with_fp32": agreement, "agreement_with_fp32_without_referee": raw_agreement,
           "fp32_referee_margin": margin, "refereed_share": referee_share, "referee_target": REFEREE_TARGET,
           "threshold": th, "checks": checks, "passed": passed,
           "command": "python scripts/fast_paths.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = [f"BF16 (OpenVINO {rep['openvino']}) against FP32 (ONNX Runtime), `{Path(a.onnx_path).name}`; CPU "
          f"{rep['cpu']['model']} ({', '.join(rep['cpu']['flags'])}); {len(imgs)} held-out films, "
          f"{len(non_chest)} non-chest pictures", "",
          "| | FP32 | BF16 | guard | passed |", "|---|---|---|---|---|"]
    for key, label, guard, chk in (("accuracy", "accuracy (held-out)", "drop <= 0.005", "accuracy"),
                                   ("macro_f1", "macro-F1 (held-out)", "drop <= 0.005", "macro_f1"),
                                   ("dice", f"Dice ({f['n_masks']} masks)", "abs diff <= 0.002", "dice"),
                                   ("not_judged_heldout", "not judged, held-out films", "abs diff <= 0.01",
                                    "gate_heldout"),
                                   ("not_judged_non_chest", "not judged, non-chest pictures", "abs diff <= 0.01",
                                    "gate_non_chest"),
                                   ("shift_false_alarm_n200", "shift warning false alarms (n = 200)",
                                    "abs diff <= 0.01", "shift_false_alarm"),
                                   ("threshold", "gate threshold", "own refit", None)):
        md.append(f"| {label} | {f[key]:.4f} | {b[key]:.4f} | {guard} | "
                  f"{'-' if chk is None else 'yes' if checks[chk] else 'NO'} |")
    md += [f"| class agreement, {k} | | {v:.4f} (without the referee {raw_agreement[k]:.4f}; refereed "
           f"{referee_share[k]:.3f}) | >= 0.99 | {'yes' if checks[f'agreement: {k}'] else 'NO'} |"
           for k, v in agreement.items()]
    md += ["", f"FP32 referee: an image whose BF16 top two calibrated probabilities lie closer than {margin:.2f} gets "
               f"its class from FP32 (the smallest margin that brings agreement to {REFEREE_TARGET} on every set "
               f"above); BF16 rows above include it."]
    md += ["", f"Without its own shift reference BF16 would raise the shift warning on "
               f"{b['shift_false_alarm_n200_with_fp32_reference']:.3f} of in-source folders of 200.",
           f"Verdict: {'PASSED' if passed else 'FAILED'}: auto precision "
           f"{'uses' if passed else 'does not use'} BF16 for this model."]
    print("\n".join(md))
    write_result(a.out, rep, md)
    if a.write:
        entry = {"engine": "openvino", "passed": passed, "checks": checks, "measured": {"rows": rows,
                 "agreement_with_fp32": agreement, "refereed_share": referee_share}, "guards": GUARDS,
                 "fp32_referee_margin": margin, "cpu": rep["cpu"], "openvino": rep["openvino"],
                 "ood_threshold": th["threshold"], "shift_reference": refs["bf16"], "report": str(a.out)}
        add_to_model(a.checkpoint, a.onnx_path, {"fast_paths": {"bf16": entry}}, {"fast_paths": {"bf16": entry}})
        print(f"fast_paths.bf16 (passed={passed}) written into {a.checkpoint} and the ONNX meta")
    return 0


if __name__ == "__main__":
    sys.exit(main())
