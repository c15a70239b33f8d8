"""K-fold cross-validation: fold assignment, out-of-fold (OOF) predictions and their pooled report.

Why: one 770-image test split carries a 95% interval of about +-2 points, and a recipe picked on it
over one or two seeds fits its noise. Pooling the held-out predictions of K fold models scores the
recipe on every labelled image (5,130 for cxr4: intervals about +-0.9 points), and two recipes are
compared image by image (paired bootstrap), so a difference inside the interval reads as none.

  model_arch.py --data_dir D --folds 5 --fold 0 --output_dir runs/cv/s42/fold0   # ... one run per fold
  python -m cxrkit cv runs/cv/s42                       # pooled figures with 95% intervals
  python -m cxrkit cv runs/cv/s42 runs/cv/s7 --out docs/cv   # each, their ensemble, paired differences

Fold runs: train on K-1 folds, the held-out fold is monitored every epoch but never selects anything
(the last epoch is kept, no early stopping), and finalize writes its predictions to
test_results/oof_predictions.npz. `--fold all` trains the same recipe on every image (the shipped model).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DataError
from ..core.metrics import CI_RESAMPLES as METRICS_CI_RESAMPLES, CI_SEED
from ..core.metrics import classification_metrics, expected_calibration_error, nll, softmax

OOF_FILE = "oof_predictions.npz"
# pooled CV figures go into the model card: twice the per-run reports' resamples, for steadier interval ends
CI_RESAMPLES = 2 * METRICS_CI_RESAMPLES


def parse_fold(value: str, folds: int):
    """--fold: an integer in [0, folds) or 'all'; folds must be 2 or more (ValueError naming the flag)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds {folds}: give the number of folds, 2 or more (0, the default, trains without "
                         f"folds: the usual train/val/test split)")
    if value == "all":
        return "all"
    try:
        f = int(value)
    except ValueError:
        f = -1
    if not 0 <= f < folds:
        raise ValueError(f"--fold {value!r}: give a fold number from 0 to {folds - 1}, or 'all'")
    return f


# ------------------------------------------------------------------------ OOF predictions
def write_oof(path, data, idx, result: dict, tta_probs=None, lungs_only_probs=None) -> None:
    """One fold's held-out predictions: relative paths, labels, logits (prior-corrected, before the
    temperature), per-image Dice at the model input (NaN where there is no mask), and optional TTA
    and lungs-only probabilities."""
    from ..core.io_utils import atomic_path
    arrays = {"paths": np.array([data.paths[i] for i in idx]), "labels": result["labels"],
              "logits": result["logits"], "dice": result["dice_per_image"], "classes": np.array(data.classes)}
    if tta_probs is not None:
        arrays["tta4_probs"] = tta_probs
    if lungs_only_probs is not None:
        arrays["lungs_only_probs"] = lungs_only_probs
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# what a fold run's write_oof always writes (tta4_probs and lungs_only_probs are optional)
OOF_KEYS = ("paths", "labels", "logits", "dice", "classes")


def read_oof_file(path) -> dict:
    """One fold's oof_predictions.npz as a dict of arrays, loaded without pickle; a file that is not one
    (empty, truncated, text, another archive, arrays missing or of the wrong shape) is a DataError naming it."""
    import zipfile
    path = Path(path)

    def bad(why: str) -> DataError:
        return DataError(f"{path}: not an out-of-fold predictions file written by a fold run ({why}); rerun that "
                         f"fold (model_arch.py --folds K --fold k --output_dir {path.parent.parent})")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise bad(f"cannot be read: {e.strerror or type(e).__name__}") from None
    if size == 0:
        raise bad("empty file, 0 bytes")
    if head != b"PK\x03\x04":
        raise bad("not a .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        # ValueError includes object (pickled) arrays, refused: a fold run writes none
        raise bad(f"truncated or damaged, {type(e).__name__}") from None
    missing = [k for k in OOF_KEYS if k not in arrays]
    if missing:
        raise bad(f"no {', '.join(repr(k) for k in missing)} array{'s' if len(missing) > 1 else ''}")
    n, lg = len(arrays["paths"]), arrays["logits"]
    if (lg.ndim != 2 or not np.issubdtype(lg.dtype, np.floating) or lg.shape != (n, len(arrays["classes"]))
            or any(arrays[k].shape[:1] != (n,) for k in ("labels", "dice", "tta4_probs", "lungs_only_probs")
                   if k in arrays)):
        raise bad("its arrays' shapes do not match: paths, labels, dice one entry per image, logits one row "
                  "per image and a column per class")
    return arrays


def _read_split(path: Path) -> dict | None:
    """A fold run's split.json (its folds and fold), None when the folder has none."""
    import json
    if not path.is_file():
        return None
    try:
        js = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable split.json ({type(e).__name__}); the fold run that wrote it was "
                        f"cut short or the file was edited: rerun that fold") from None
    return js if isinstance(js, dict) else None


def fold_completeness(run_dir, files) -> dict:
    """How many folds the fold runs under run_dir were made with (K, from their split.json files) and which
    of folds 0..K-1 have no oof file: {"folds": K or None, "missing": [k, ...]}."""
    import re
    run_dir = Path(run_dir)
    splits = {d: _read_split(d / "split.json") for d in sorted(run_dir.glob("fold*")) if d.is_dir()}
    ks = sorted({js.get("folds") for js in splits.values() if js and isinstance(js.get("folds"), int)})
    if len(ks) > 1:
        raise DataError(f"{run_dir}: its fold runs were made with different --folds ({', '.join(map(str, ks))}, in "
                        f"their split.json): pool runs of one --folds K")
    if not ks:
        return {"folds": None, "missing": []}
    have = set()
    for f in files:
        d = Path(f).parent.parent
        js = splits.get(d) or {}
        k = js.get("fold")
        if not isinstance(k, int):
            m = re.fullmatch(r"fold(\d+)", d.name)
            k = int(m.group(1)) if m else None
        have.add(k)
    return {"folds": ks[0], "missing": sorted(set(range(ks[0])) - have)}


def load_oof(run_dir, allow_incomplete: bool = False, incomplete_flag: str | None = None) -> dict:
    """Pool every fold*/test_results/oof_predictions.npz under run_dir (sorted by path). Every fold of
    the runs' --folds K (their split.json) must be there: a missing fold is a DataError naming it, unless
    allow_incomplete (incomplete_flag: the command's option that allows it, named in the message)."""
    files = sorted(Path(run_dir).glob(f"fold*/test_results/{OOF_FILE}"))
    if not files:
        raise FileNotFoundError(f"no fold*/test_results/{OOF_FILE} under {run_dir}: run model_arch.py --folds K "
                                f"--fold k --output_dir {run_dir}/foldk first")
    done = fold_completeness(run_dir, files)
    k = done["folds"]
    if not allow_incomplete and (k is None or done["missing"]):
        allow = f", or pass {incomplete_flag} to pool only the folds there are" if incomplete_flag else ""
        if k is None:
            raise DataError(f"{run_dir}: no fold*/split.json, so the number of folds K is unknown and a missing "
                            f"fold would go unnoticed: pool the fold runs' own output folders (each holds "
                            f"split.json){allow}")
        miss = done["missing"]
        many = len(miss) > 1
        how = "; ".join(f"model_arch.py ... --folds {k} --fold {m} --output_dir {Path(run_dir) / f'fold{m}'}"
                        for m in miss[:3]) + ("; ..." if len(miss) > 3 else "")
        raise DataError(f"{run_dir}: fold{'s' if many else ''} {', '.join(map(str, miss))} of its {k} folds "
                        f"(--folds {k} in the fold runs' split.json) ha{'ve' if many else 's'} no "
                        f"test_results/{OOF_FILE}, so the pooled figures would leave {'their' if many else 'its'} "
                        f"images out: train {'them' if many else 'it'} first ({how}){allow}")
    parts = [read_oof_file(f) for f in files]
    classes = [str(c) for c in parts[0]["classes"]]
    for f, p in zip(files[1:], parts[1:]):
        if [str(c) for c in p["classes"]] != classes:
            raise DataError(f"{f}: classes {[str(c) for c in p['classes']]}, {files[0]} has {classes}: "
                            f"the fold runs used different data")
    keys = [key for key in parts[0] if key != "classes" and all(key in p for p in parts)]
    out = {key: np.concatenate([p[key] for p in parts]) for key in keys}
    order = np.argsort(out["paths"])
    out = {key: v[order] for key, v in out.items()}
    if len(np.unique(out["paths"])) != len(out["paths"]):
        raise DataError(f"{run_dir}: an image is held out by two folds: the fold runs used different fold files")
    out["classes"], out["n_folds"], out["files"] = classes, len(files), [str(f) for f in files]
    out["folds_expected"], out["missing_folds"] = k, done["missing"]
    return out


# ------------------------------------------------------------------------------- intervals
def _bootstrap(stat, n: int, seed: int = CI_SEED, resamples: int = CI_RESAMPLES) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.nanquantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def pooled_figures(labels, probs, classes, dice=None, lungs_only_probs=None) -> dict:
    """Accuracy (Wilson), macro-F1, per-class recall, Dice and lungs-only accuracy (bootstrap), 95%."""
    from ..core.metrics import bootstrap_macro_f1, wilson_interval
    labels = np.asarray(labels)
    n = len(labels)
    pred = probs.argmax(1)
    m = classification_metrics(labels, probs, classes)
    out = {"n_images": int(n), "accuracy": m["accuracy"],
           "accuracy_ci95": list(wilson_interval(int((pred == labels).sum()), n)),
           "macro_f1": m["macro_f1"],
           "macro_f1_ci95": list(bootstrap_macro_f1(labels, pred, len(classes), CI_RESAMPLES, CI_SEED)),
           "recall": {}}
    for i, name in enumerate(classes):
        sel = labels == i
        k = int((pred[sel] == i).sum())
        out["recall"][name] = {"value": k / max(int(sel.sum()), 1), "ci95": list(wilson_interval(k, int(sel.sum()))),
                               "n": int(sel.sum())}
    out["confusion_matrix"] = m["confusion_matrix"]
    if dice is not None:
        d = np.asarray(dice, np.float64)
        d = d[np.isfinite(d)]
        if len(d):
            out["dice"] = float(d.mean())
            out["dice_ci95"] = list(_bootstrap(lambda ix: d[ix].mean(), len(d)))
            out["dice_n_masks"] = int(len(d))
    if lungs_only_probs is not None:
        k = int((lungs_only_probs.argmax(1) == labels).sum())
        out["lungs_only_accuracy"] = k / n
        out["lungs_only_accuracy_ci95"] = list(wilson_interval(k, n))
    return out


def paired_difference(labels, probs_a, probs_b) -> dict:
    """Accuracy and macro-F1 of b minus a on the same images, with paired-bootstrap 95% intervals;
    'differs' is False when the accuracy interval contains 0."""
    from ..core.metrics import macro_f1_from_confusion
    labels = np.asarray(labels)
    n, c = len(labels), probs_a.shape[1]
    ca, cb = probs_a.argmax(1) == labels, probs_b.argmax(1) == labels
    code_a, code_b = labels * c + probs_a.argmax(1), labels * c + probs_b.argmax(1)

    def f1(code, ix):
        return macro_f1_from_confusion(np.bincount(code[ix], minlength=c * c).reshape(c, c))

    acc = _bootstrap(lambda ix: cb[ix].mean() - ca[ix].mean(), n)
    mf1 = _bootstrap(lambda ix: f1(code_b, ix) - f1(code_a, ix), n)
    d = float(cb.mean() - ca.mean())
    return {"accuracy_diff": d, "accuracy_diff_ci95": list(acc),
            "macro_f1_diff": float(f1(code_b, np.arange(n)) - f1(code_a, np.arange(n))), "macro_f1_diff_ci95": list(mf1),
            "differs": not (acc[0] <= 0 <= acc[1])}


def mean_probability_logits(probs: list) -> np.ndarray:
    """Logits of the probability-mean ensemble of several (N, C) probability arrays: log of the mean,
    which softmax maps back to that mean (what model.EnsembleNet outputs)."""
    return np.log(np.clip(np.mean(probs, axis=0), 1e-12, 1))


def fit_oof_calibration(labels, logits) -> dict:
    """Temperature fitted on the pooled OOF logits (what the shipped all-data model is calibrated with),
    with ECE / NLL before and after."""
    from .calibration import fit_temperature
    t = fit_temperature(logits, labels)
    raw, cal = softmax(logits), softmax(logits, t)
    return {"temperature": t, "ece_before": expected_calibration_error(labels, raw)[0],
            "ece_after": expected_calibration_error(labels, cal)[0], "nll_before": nll(labels, raw),
            "nll_after": nll(labels, cal), "n_images": int(len(labels)), "fitted_on": "pooled out-of-fold logits"}


# ---------------------------------------------------------------------------------- report
def cv_report(run_dirs: list[str], allow_incomplete: bool = False) -> dict:
    """Figures of each run set (plain and 4-view TTA), of their probability-average ensemble, and the
    paired differences against the first set. Every run set must hold all its folds (load_oof) unless
    allow_incomplete; the report then says which folds are missing."""
    runs = {str(d): load_oof(d, allow_incomplete, "--allow_incomplete") for d in run_dirs}
    first = next(iter(runs.values()))
    for d, r in runs.items():
        if not np.array_equal(r["paths"], first["paths"]):
            raise DataError(f"{d} holds out other images than {run_dirs[0]}: compare runs over the same folds")
    classes, labels = first["classes"], first["labels"]
    rep = {"classes": classes, "n_images": int(len(labels)), "runs": {}, "ci": "95%: Wilson for proportions, "
           f"percentile bootstrap ({CI_RESAMPLES} resamples, seed {CI_SEED}) for macro-F1, Dice and differences"}
    base = softmax(first["logits"])
    for d, r in runs.items():
        p = softmax(r["logits"])
        row = {"n_folds": r["n_folds"], "folds_expected": r["folds_expected"], "missing_folds": r["missing_folds"],
               "plain": pooled_figures(labels, p, classes, r["dice"],
                                                                r.get("lungs_only_probs")),
               "calibration": fit_oof_calibration(labels, r["logits"])}
        if "tta4_probs" in r:
            row["tta4"] = pooled_figures(labels, r["tta4_probs"], classes)
            row["tta4_vs_plain"] = paired_difference(labels, p, r["tta4_probs"])
        if d != str(run_dirs[0]):
            row["vs_first"] = paired_difference(labels, base, p)
        rep["runs"][d] = row
    if len(runs) > 1:
        ens = np.mean([softmax(r["logits"]) for r in runs.values()], axis=0)
        dice = np.nanmean([r["dice"] for r in runs.values()], axis=0) if all(
            np.isfinite(r["dice"]).any() for r in runs.values()) else None
        lo = [r.get("lungs_only_probs") for r in runs.values()]
        lo = np.mean(lo, axis=0) if all(x is not None for x in lo) else None
        rep["ensemble"] = {"members": list(runs), "plain": pooled_figures(labels, ens, classes, dice, lo),
                           "vs_first": paired_difference(labels, base, ens),
                           "calibration": fit_oof_calibration(labels, mean_probability_logits(
                               [softmax(r["logits"]) for r in runs.values()]))}
        if all("tta4_probs" in r for r in runs.values()):
            ens4 = np.mean([r["tta4_probs"] for r in runs.values()], axis=0)
            rep["ensemble"]["tta4"] = pooled_figures(labels, ens4, classes)
            rep["ensemble"]["tta4_vs_first"] = paired_difference(labels, base, ens4)
    return rep


def _pct(x) -> str:
    return f"{100 * x:.1f}"


def _ci(v, ci) -> str:
    return f"{_pct(v)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def markdown(rep: dict) -> str:
    cls = rep["classes"]
    head = ("| run | accuracy | macro-F1 | " + " | ".join(f"{c} recall" for c in cls)
            + " | Dice | lungs-only acc | diff vs first (acc) |")
    lines = [f"Pooled out-of-fold figures over {rep['n_images']} images, in % with {rep['ci']}.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    partial = [(d, r) for d, r in rep["runs"].items() if r.get("missing_folds") or r.get("folds_expected") is None]
    if partial:  # --allow_incomplete: say so before the figures
        lines[1:1] = ["", *(f"INCOMPLETE (--allow_incomplete): {d} pools {r['n_folds']} fold(s)"
                            + (f" of {r['folds_expected']}, fold(s) {', '.join(map(str, r['missing_folds']))} "
                               f"missing" if r.get("folds_expected") else ", the number of folds unknown (no "
                                                                           "split.json)")
                            + ": these figures are not over every image" for d, r in partial)]

    def row(name, f, diff=None):
        rec = " | ".join(_ci(f["recall"][c]["value"], f["recall"][c]["ci95"]) for c in cls)
        dice = _ci(f["dice"], f["dice_ci95"]) if "dice" in f else ""
        lo = _ci(f["lungs_only_accuracy"], f["lungs_only_accuracy_ci95"]) if "lungs_only_accuracy" in f else ""
        dd = ""
        if diff:
            dd = (f"{100 * diff['accuracy_diff']:+.1f} [{100 * diff['accuracy_diff_ci95'][0]:+.1f}, "
                  f"{100 * diff['accuracy_diff_ci95'][1]:+.1f}]" + ("" if diff["differs"] else " (no difference)"))
        lines.append(f"| {name} | {_ci(f['accuracy'], f['accuracy_ci95'])} | "
                     f"{_ci(f['macro_f1'], f['macro_f1_ci95'])} | {rec} | {dice} | {lo} | {dd} |")

    for d, r in rep["runs"].items():
        row(d, r["plain"], r.get("vs_first"))
        if "tta4" in r:
            row(f"{d} + TTA 4", r["tta4"], r["tta4_vs_plain"])
    if "ensemble" in rep:
        e = rep["ensemble"]
        row("ensemble (mean probability)", e["plain"], e["vs_first"])
        if "tta4" in e:
            row("ensemble + TTA 4", e["tta4"], e["tta4_vs_first"])
    lines += ["", "Temperature fitted on the pooled out-of-fold logits (ECE before -> after):", ""]
    for d, r in rep["runs"].items():
        c = r["calibration"]
        lines.append(f"- {d}: T = {c['temperature']:.3f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}")
    return "\n".join(lines) + "\n"
