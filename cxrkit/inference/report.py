"""Batch report: one self-contained `report.html` beside predictions.csv and summary.json.

    from cxrkit.inference.report import model_info, write_report
    write_report(save_dir, summary, rows, model=model_info(backend))

One renderer serves every run: cxrkit.inference.run_pipeline calls it after summary.json is written
(both inference CLIs; `--no_report` turns it off), and `model_arch.py --evaluate` runs that same
pipeline over the test split into <output_dir>/test_report/ (cxrkit.training.evaluate.write_split_report).
This module renders only: it runs no model, and the confidence intervals it shows are computed by
cxrkit.core.metrics (confidence_intervals) into summary.json.

The page has inline CSS and a few lines of vanilla JS (gallery filters; both in
cxrkit.inference.report_assets), loads nothing from the network, and links only to files under save_dir by
relative path (annotated/, thumbs/, predictions.csv, summary.json), so the folder can be zipped and
opened anywhere. Its first screen
holds the run header, accuracy and macro-F1 with 95% confidence intervals, lung Dice / IoU, the
confusion matrix, the per-class table and the start of the gallery, which puts the misclassified
images first, then the rest by ascending confidence, up to GALLERY_CAP thumbnails. Every number the
page shows from summary.json carries `data-key` (its path in summary.json) and `data-value` (the
exact value) so tests can check the page against the file.

Thumbnails (THUMB_HEIGHT px JPEGs under thumbs/, lung outline drawn) are written by the pipeline's
writer thread through write_thumbnail, never scaled down from the full PNGs by the browser.

The ONNX inference path imports it, so it stays torch-free on import (why: cxrkit/inference/__init__.py;
tests/test_inference.py enforces it), and it imports nothing of the inference pipeline
(tests/test_report.py checks both).

Research software: not for diagnosis.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..core import shift_check
from .summary import in_training_line
from ..core.config import DISCLAIMER
from ..core.io_utils import write_bytes_atomic
from .report_assets import CSS as _CSS, JS as _JS
from .thumbs import GALLERY_CAP, gallery_order, is_error, thumb_relpath

log = logging.getLogger("cxrkit")

REPORT_NAME = "report.html"


# ---------------------------------------------------------------------------------------- model
def _provenance(p: dict | None) -> str:
    """cxrkit version, the model's SHA-256 (short, full in the tooltip) and the command line (tooltip)."""
    if not p:
        return "-"
    sha = p.get("model_sha256") or ""
    return (f'cxrkit {_e(p.get("cxrkit_version", "?"))} &middot; model <span title="{_e(sha)}">'
            f'sha256 {_e(sha[:12])}</span> &middot; <span title="{_e(p.get("command", ""))}">command</span>')


def model_info(backend) -> dict:
    """File, preset, input size and calibration of an inference backend (a cxrkit.inference.Backend;
    for the report header)."""
    return {"file": str(backend.model_file), "preset": backend.preset, "img_size": int(backend.img_size),
            "temperature": float(backend.temperature)}


# -------------------------------------------------------------------------------------- gallery
def row_flags(row: dict) -> list[str]:
    """Quality flags of a predictions row (a list, or a string separated by ';' '|' or ',')."""
    v = row.get("quality_flags", row.get("flags", ""))
    if not v:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v if str(x).strip()]
    for sep in ("|", ","):
        v = str(v).replace(sep, ";")
    return [s.strip() for s in str(v).split(";") if s.strip()]


# ------------------------------------------------------------------------------------ rendering
_ESC = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"})


def _e(s) -> str:
    """HTML-escaped text or attribute value (html.escape(quote=True); the html module's import pulls
    in html.entities, a few ms of start-up on the ONNX path)."""
    return str(s).translate(_ESC)


def _href(rel: str) -> str:
    return _e(quote(str(rel).replace(os.sep, "/"), safe="/._-()+~"))


def _num(key: str, value, text: str) -> str:
    """A number from summary.json: shown as `text`, exact value and its summary path as attributes."""
    return f'<span data-key="{_e(key)}" data-value="{_e(json.dumps(value))}">{_e(text)}</span>'


def _f3(x) -> str:
    return "-" if x is None else f"{float(x):.3f}"


def _header(summary: dict, model: dict | None, generated: str) -> str:
    s, model = summary, model or {}
    info = s.get("backend_info") or {}
    backend = s.get("backend", info.get("backend", "?"))
    provs = info.get("providers")
    if provs:
        backend += " (" + ", ".join(str(p).replace("ExecutionProvider", "") for p in provs) + ")"
    elif info.get("device"):
        backend += f" ({info['device']})"
    mfile = model.get("file") or info.get("onnx_path") or info.get("checkpoint") or "?"
    preset = model.get("preset")
    size = model.get("img_size") or s.get("img_size")
    mdesc = f"{Path(str(mfile)).name}" + (f", preset {preset}" if preset else "") + (f", {size} px" if size else "")
    t = s.get("temperature", model.get("temperature"))
    if s.get("calibrated") and t is not None and abs(float(t) - 1.0) > 1e-12:
        cal = f"softmax(logits / T), T = {float(t):.3g}"
    else:
        cal = "none (T = 1)"
    if int(s.get("tta", 1) or 1) > 1:
        cal += f"; TTA {int(s['tta'])} views"
    inp = s.get("inputs") or {}
    if inp.get("split"):
        src = f"{inp['split']} split of {inp.get('data_dir', '?')}"
    elif inp.get("data_dir"):
        src = str(inp["data_dir"])
    elif inp.get("images"):
        src = f"{len(inp['images'])} files/folders given"
    else:
        src = "?"
    thr = s.get("throughput") or {}
    ips, secs = thr.get("images_per_second"), thr.get("seconds")
    n_flag = (s.get("quality") or {}).get("n_flagged")
    flagged = f', {_num("quality/n_flagged", n_flag, str(n_flag))} quality-flagged' if n_flag else ""
    items = [
        ("Model", f'<span title="{_e(mfile)}">{_e(mdesc)}</span>'),
        ("Calibration", _e(cal)),
        ("Provenance", _provenance(s.get("provenance"))),
        ("Backend", _e(backend)),
        ("Inputs", f'<span title="{_e(src)}">{_e(src if len(src) <= 60 else "..." + src[-57:])}</span>'),
        ("Images", f'{_num("n_inputs", s.get("n_inputs"), str(s.get("n_inputs")))} in, '
                   f'{_num("n_processed", s.get("n_processed"), str(s.get("n_processed")))} processed, '
                   f'{_num("n_skipped", s.get("n_skipped"), str(s.get("n_skipped")))} skipped{flagged}'),
        ("Throughput", (_num("throughput/images_per_second", ips, f"{ips:.1f}") + " img/s ("
                        + _num("throughput/seconds", secs, f"{secs:.1f}") + " s)") if ips and secs else "-"),
        ("Date", _e(generated)),
    ]
    meta = "".join(f"<span><b>{k}</b>{v}</span>" for k, v in items)
    heading = f"{str(inp['split']).capitalize()} split report" if inp.get("split") else "Batch report"
    title = f"{_e(heading)} <small>{_e(s.get('n_processed', 0))} images &middot; {_e(s.get('backend', ''))}</small>"
    shift = shift_check.warning_line(s.get("shift_check"))  # the run-level shift warning leads when it fires
    shift_html = f'<p class="shift warn" id="shift-warning">{_e(shift)}</p>' if shift else ""
    seen = in_training_line(s.get("in_training_set"))  # figures on training images are no test: said first
    shift_html += f'<p class="shift warn" id="in-training">{_e(seen)}</p>' if seen else ""
    return (f'<header><h1>{title}</h1>{shift_html}<p class="meta">{meta}<span class="warn">{_e(DISCLAIMER)}</span>'
            f"</p></header>")


def _cm_colour(frac: float, diag: bool) -> str:
    r, g, b = (46, 140, 60) if diag else (208, 52, 44)
    a = 0.08 + 0.82 * float(np.clip(frac, 0, 1)) if frac > 0 else 0.0
    fg = "#fff" if a > 0.55 else "#1d2127"
    return f"background:rgba({r},{g},{b},{a:.3f});color:{fg}"


def _metrics(summary: dict) -> str:
    c, names = summary.get("classification"), list(summary.get("class_names") or [])
    cards = _cards(c, summary.get("segmentation"))
    parts = [f'<div class="cards">{"".join(cards)}</div>'] if cards else []
    parts += [_confusion(c, names), _per_class(c, names)] if c else [_predicted_counts(summary, names)]
    return f'<section class="row" id="metrics">{"".join(parts)}</section>'


def _cards(c: dict | None, seg: dict | None) -> list[str]:
    cards = []
    if c:
        n = c.get("n_labelled", "?")
        for key, label, ci_key, how in (("accuracy", "Accuracy", "accuracy_ci95", "Wilson"),
                                        ("macro_f1", "Macro-F1", "macro_f1_ci95", "bootstrap")):
            ci = c.get(ci_key)
            ci_s = ("95% CI " + _num(f"classification/{ci_key}/0", ci[0], _f3(ci[0])) + " &ndash; "
                    + _num(f"classification/{ci_key}/1", ci[1], _f3(ci[1])) + f" ({how})") if ci else "no CI"
            cards.append(f'<div class="card"><div class="lbl">{label}</div><div class="big">'
                         f'{_num("classification/" + key, c[key], _f3(c[key]))}</div><div class="ci">{ci_s}</div>'
                         f'<div class="n">{_num("classification/n_labelled", n, str(n))} labelled images judged'
                         + (f' ({c["n_not_judged_left_out"]} not judged, left out)' if c.get("n_not_judged_left_out")
                            else "") + '</div></div>')
        u = c.get("unflagged") or {}
        if u.get("accuracy") is not None:
            cards.append('<div class="card"><div class="lbl">Unflagged images only</div><div class="big">'
                         + _num("classification/unflagged/accuracy", u["accuracy"], _f3(u["accuracy"]))
                         + '</div><div class="ci">accuracy &middot; macro-F1 '
                         + _num("classification/unflagged/macro_f1", u["macro_f1"], _f3(u["macro_f1"]))
                         + f'</div><div class="n">{_num("classification/unflagged/n", u["n"], str(u["n"]))} '
                           f'images without a quality flag</div></div>')
    if seg:
        dice, iou, nm = seg["mean_dice"], seg["mean_iou"], seg["n_masks"]
        cards.append('<div class="card"><div class="lbl">Lung segmentation</div><div class="big">Dice '
                     + _num("segmentation/mean_dice", dice, _f3(dice)) + '</div><div class="ci">IoU '
                     + _num("segmentation/mean_iou", iou, _f3(iou))
                     + f' &middot; {_num("segmentation/n_masks", nm, str(nm))} masks</div></div>')
    return cards


def _confusion(c: dict, names: list) -> str:
    cm = np.asarray(c["confusion_matrix"])
    head = "".join(f'<th class="cl" title="{_e(nm)}">{_e(nm).replace("_", "_<wbr>")}</th>' for nm in names)
    body = []
    for i, nm in enumerate(names):
        tot = int(cm[i].sum())
        cells = []
        for j in range(len(names)):
            v = int(cm[i, j])
            frac = v / tot if tot else 0.0
            cells.append(f'<td style="{_cm_colour(frac, i == j)}" title="true {_e(nm)}, predicted '
                         f'{_e(names[j])}: {v} of {tot} ({frac * 100:.0f}%)">'
                         f'{_num(f"classification/confusion_matrix/{i}/{j}", v, str(v))}'
                         f'<div class="ci">{frac * 100:.0f}%</div></td>')  # the row-normalised share
        body.append(f'<tr><th class="l rl">{_e(nm)}</th>{"".join(cells)}</tr>')
    return ('<div class="panel cm"><h2>Confusion matrix <small>(counts; % of the true class)</small></h2><table><tr><th class="ax l">true &darr; / '
                 f'predicted &rarr;</th>{head}</tr>{"".join(body)}</table></div>')


def _per_class(c: dict, names: list) -> str:
    """One-vs-rest figures per class: sensitivity, specificity, PPV, NPV (Wilson 95% intervals), F1, AUC."""
    cols = (("recall", "sensitivity"), ("specificity", "specificity"), ("precision", "PPV"), ("npv", "NPV"))
    rows = []
    for nm in names:
        pc = c["per_class"][nm]
        k = f"classification/per_class/{nm}"
        cells = []
        for m, _ in cols:
            ci = pc.get(f"{m}_ci95")
            ci_s = f'<div class="ci">{_f3(ci[0])}&ndash;{_f3(ci[1])}</div>' if ci else ""
            cells.append(f"<td>{_num(f'{k}/{m}', pc.get(m), _f3(pc.get(m)))}{ci_s}</td>")
        rows.append(f'<tr><td class="l">{_e(nm)}</td>' + "".join(cells)
                    + f"<td>{_num(k + '/f1', pc['f1'], _f3(pc['f1']))}</td>"
                    + f"<td>{_num(k + '/support', pc['support'], str(pc['support']))}</td>"
                    + f"<td>{_num(k + '/roc_auc', pc.get('roc_auc'), _f3(pc.get('roc_auc')))}</td></tr>")
    head = "".join(f"<th>{label}</th>" for _, label in cols)
    return ('<div class="panel pc"><h2>Per class (one vs rest, 95% intervals)</h2><table><tr><th class="l">class</th>'
            f'{head}<th>F1</th><th>support</th><th>ROC-AUC</th></tr>{"".join(rows)}</table></div>')


def _histogram_svg(values, lo_mark=None, hi_mark=None, bins: int = 30, label: str = "") -> str:
    """A small inline SVG histogram; dashed red lines at the model's reference limits (None: none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return '<p class="note">no values</p>'
    marks = [m for m in (lo_mark, hi_mark) if m is not None]
    a, b = float(min(v.min(), *marks)), float(max(v.max(), *marks))
    b = b if b > a else a + 1.0
    counts, edges = np.histogram(v, bins=bins, range=(a, b))
    w, h, top = 320, 90, max(1, int(counts.max()))
    bw = w / bins
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{h - c / top * h:.1f}" width="{bw - 1:.1f}" height="{c / top * h:.1f}" '
                   f'fill="#6b8fb5"><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {c}</title></rect>'
                   for i, c in enumerate(counts))
    lines = "".join(f'<line x1="{(m - a) / (b - a) * w:.1f}" x2="{(m - a) / (b - a) * w:.1f}" y1="0" y2="{h}" '
                    f'stroke="#c0392b" stroke-dasharray="4 3"><title>model limit {m:.3g}</title></line>' for m in marks)
    return (f'<svg viewBox="0 -4 {w} {h + 18}" width="{w}" height="{h + 18}" role="img" aria-label="{_e(label)}">'
            f'{bars}{lines}<text x="0" y="{h + 14}" font-size="10">{a:.3g}</text>'
            f'<text x="{w}" y="{h + 14}" font-size="10" text-anchor="end">{b:.3g}</text></svg>')


def _distributions(summary: dict, rows: list[dict]) -> str:
    """This run's ood_score and lung-area distributions against the model's own limits (the gate's
    threshold; the training lung-area range)."""
    def num(r, k):
        try:
            return float(r.get(k))
        except (TypeError, ValueError):
            return None
    q = summary.get("quality") or {}
    thr = (q.get("ood") or {}).get("threshold")
    rng = q.get("lung_area_range") or {}
    parts = []
    scores = [num(r, "ood_score") for r in rows]
    if any(x is not None for x in scores):
        parts.append('<div class="panel"><h2>Out-of-distribution score</h2>'
                     + _histogram_svg(scores, None, thr, label="ood_score histogram")
                     + f'<p class="note">dashed: the gate\'s threshold {_f3(thr)}; above it an image is not judged</p></div>')
    areas = [num(r, "lung_area_fraction") for r in rows]
    if any(x is not None for x in areas):
        parts.append('<div class="panel"><h2>Predicted lung area</h2>'
                     + _histogram_svg(areas, rng.get("low"), rng.get("high"), label="lung area histogram")
                     + f'<p class="note">dashed: the training range {_f3(rng.get("low"))}&ndash;{_f3(rng.get("high"))} '
                       f'(outside: lung_area_out_of_range)</p></div>')
    parts += _roc_and_calibration(summary, rows)
    return f'<section class="row" id="distributions">{"".join(parts)}</section>' if parts else ""


_ROC_COLOURS = ("#c0392b", "#2e7d32", "#1f5fa8", "#8e44ad", "#b9770e", "#555555")


def _labelled(summary: dict, rows: list[dict]):
    """(true class index, calibrated probabilities) of the judged labelled rows, what the metrics score."""
    from ..core.ood import not_judged
    names = list(summary.get("class_names") or [])
    y, p = [], []
    for r in rows:
        if r.get("true_class") in names and not not_judged(r.get("quality_flags")):
            try:
                p.append([float(r[f"prob_{c}"]) for c in names])
            except (KeyError, TypeError, ValueError):
                continue
            y.append(names.index(r["true_class"]))
    return names, np.asarray(y, np.int64), np.asarray(p, np.float64).reshape(-1, len(names))


def _roc_and_calibration(summary: dict, rows: list[dict]) -> list[str]:
    """ROC curves per class (one vs rest) and a reliability diagram with ECE and Brier score."""
    from ..core.metrics import expected_calibration_error
    names, y, p = _labelled(summary, rows)
    if len(y) < 2:
        return []
    w = h = 200
    curves, legend = [], []
    for j, nm in enumerate(names):
        pos = y == j
        if not pos.any() or pos.all():
            continue
        order = np.argsort(-p[:, j], kind="stable")
        tpr = np.concatenate([[0], np.cumsum(pos[order]) / pos.sum()])
        fpr = np.concatenate([[0], np.cumsum(~pos[order]) / (~pos).sum()])
        pts = " ".join(f"{x * w:.1f},{h - t * h:.1f}" for x, t in zip(fpr, tpr))
        col = _ROC_COLOURS[j % len(_ROC_COLOURS)]
        curves.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.5"></polyline>')
        legend.append(f'<span style="color:{col}">&#9632; {_e(nm)}</span>')
    roc = (f'<div class="panel"><h2>ROC curves (one vs rest)</h2><svg viewBox="-2 -2 {w + 4} {h + 4}" width="{w}" '
           f'height="{h}" role="img" aria-label="ROC curves"><rect x="0" y="0" width="{w}" height="{h}" fill="none" '
           f'stroke="#999"></rect><line x1="0" y1="{h}" x2="{w}" y2="0" stroke="#bbb" stroke-dasharray="3 3"></line>'
           f'{"".join(curves)}</svg><p class="note">{" ".join(legend)} &middot; x: 1 - specificity, y: '
           f'sensitivity</p></div>')
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    ece, _ = expected_calibration_error(y, p)
    brier = float(np.mean(np.sum((p - np.eye(len(names))[y]) ** 2, axis=1)))
    edges = np.linspace(0, 1, 11)
    dots = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            cx, cy, n = conf[m].mean(), correct[m].mean(), int(m.sum())
            dots.append(f'<circle cx="{cx * w:.1f}" cy="{h - cy * h:.1f}" r="{2 + min(6, n ** 0.5 / 2):.1f}" '
                        f'fill="#1f5fa8"><title>confidence {lo:.1f}-{hi:.1f}: {n} images, accuracy {cy:.2f}</title></circle>')
    cal = (f'<div class="panel"><h2>Calibration</h2><svg viewBox="-2 -2 {w + 4} {h + 4}" width="{w}" height="{h}" '
           f'role="img" aria-label="reliability diagram"><rect x="0" y="0" width="{w}" height="{h}" fill="none" '
           f'stroke="#999"></rect><line x1="0" y1="{h}" x2="{w}" y2="0" stroke="#bbb" stroke-dasharray="3 3"></line>'
           f'{"".join(dots)}</svg><p class="note">x: confidence, y: accuracy (judged labelled images, '
           f'n = {len(y)}) &middot; ECE {ece:.3f} &middot; Brier {brier:.3f}</p></div>')
    return [roc, cal]


def _predicted_counts(summary: dict, names: list) -> str:
    counts = summary.get("predicted_counts") or {}
    rows = "".join(f'<tr><td class="l">{_e(k)}</td><td>{_num("predicted_counts/" + k, v, str(v))}</td></tr>'
                   for k, v in counts.items())
    nj = summary.get("n_not_judged")
    if nj:
        rows += (f'<tr><td class="l"><i>not judged</i> (no class given)</td>'
                 f'<td>{_num("n_not_judged", nj, str(nj))}</td></tr>')
    return ('<div class="panel pc"><h2>Predicted classes</h2><table><tr><th class="l">class</th>'
                 f'<th>images</th></tr>{rows}</table><p class="note">No true classes known: put images in '
                 f'folders named after the model classes ({_e(", ".join(names))}) to get accuracy, '
                 f'F1 and a confusion matrix.</p></div>')


def _figure(row: dict, base_dir: Path | None) -> str:
    ann = str(row.get("annotated_png") or "")
    stem = Path(ann).stem if ann else ""
    thumb = row.get("thumb") or (thumb_relpath(stem) if stem else "")
    if base_dir is not None:  # link only to files that are there
        ann = ann if ann and (base_dir / ann).is_file() else ""
        thumb = thumb if thumb and (base_dir / thumb).is_file() else ""
    from ..core.ood import OOD_REASON
    pred, tc = str(row.get("predicted_class", "")), str(row.get("true_class") or "")
    conf = float(row.get("confidence") or 0.0)
    why = [OOD_REASON[f] for f in row_flags(row) if f in OOD_REASON]  # a gated image: not judged
    err = is_error(row)
    name = Path(str(row.get("image_path", ""))).name
    src = thumb or ann
    img = (f'<img src="{_href(src)}" alt="{_e(name)}" loading="lazy" width="160" height="160">' if src
           else '<span class="ph">no image</span>')
    if ann:
        img = f'<a href="{_href(ann)}" target="_blank" title="open the annotated image">{img}</a>'
    if not tc:
        truth = '<span class="fn">true class unknown</span>'
    elif err:
        truth = f'<span class="bad">&#10007; true {_e(tc)}</span>'
    else:
        truth = f'<span class="ok">&#10003; true {_e(tc)}</span>'
    flags = "".join(f'<span class="flag">{_e(f)}</span>' for f in row_flags(row))
    dice = row.get("dice")
    extra = f" &middot; Dice {float(dice):.2f}" if dice not in (None, "") else ""
    if why:  # the reason leads; no class, no bar (the model's output is only in the CSV's unjudged_* columns)
        if tc:
            truth = f'<span class="fn">true {_e(tc)}</span>'
        head = (f'<div title="{_e(", ".join(why))}"><span class="bad">NOT JUDGED: {_e(", ".join(why))}</span></div>'
                f'<div class="fn">no class given</div>')
    else:
        head = (f'<div><span class="p">{_e(pred)}</span> {conf * 100:.1f}%</div>'
                f'<div class="bar"><i style="width:{conf * 100:.1f}%"></i></div>')
    return (f'<figure class="g{" err" if err else ""}" data-pred="{_e(pred)}" data-true="{_e(tc)}" '
            f'data-err="{int(err)}" data-conf="{conf:.6f}">{img}'
            f'<figcaption title="{_e(row.get("image_path", ""))}">{head}'
            f'<div>{truth}</div>' + (f"<div>{flags}</div>" if flags else "")
            + f'<div class="fn">{_e(name)}{extra}</div></figcaption></figure>')


def _worst_dice(summary: dict, base_dir: Path | None) -> str:
    """The lowest-Dice images with the ground-truth (green) and predicted (yellow) lung outlines."""
    worst = (summary.get("segmentation") or {}).get("lowest_dice") or []
    if not worst:
        return ""
    figs = []
    for w in worst:
        tile = str(w.get("tile") or "")
        if base_dir is not None and tile and not (base_dir / tile).is_file():
            tile = ""
        name = Path(str(w.get("image_path", ""))).name
        img = (f'<img src="{_href(tile)}" alt="{_e(name)}" loading="lazy">' if tile
               else '<span class="ph">no image</span>')
        figs.append(f'<div class="wd">{img}<div title="{_e(w.get("image_path", ""))}">Dice {float(w["dice"]):.3f}'
                    f'</div><div class="fn">{_e(name)}</div></div>')
    return (f'<section id="worst-dice"><h2>Lowest Dice <span class="note">&middot; the {len(worst)} images whose '
            f'predicted lungs match their masks least; outlines: <b style="color:#50dc50">ground truth</b>, '
            f'<b style="color:#ffe600">prediction</b></span></h2><div class="grid">{"".join(figs)}</div></section>')


def _gallery(summary: dict, rows: list[dict], cap: int, base_dir: Path | None) -> str:
    if not rows:
        return '<section id="gallery"><h2>Images</h2><p class="note">No image was processed.</p></section>'
    ordered = gallery_order(rows)
    shown = ordered[:max(0, int(cap))]
    n_err = sum(is_error(r) for r in rows)
    left = len(ordered) - len(shown)
    names = list(summary.get("class_names") or [])
    opts = "".join(f'<option value="{_e(n)}">{_e(n)}</option>' for n in names)
    has_truth = any(r.get("true_class") for r in rows)
    filters = (f'<label>predicted <select id="f-pred"><option value="">all</option>{opts}</select></label>'
               + (f'<label>true <select id="f-true"><option value="">all</option>{opts}</select></label>'
                  f'<label><input type="checkbox" id="f-err"> errors only</label>' if has_truth else "")
               + f'<span id="f-count" class="note">{len(shown)} of {len(shown)} shown</span>')
    if left:
        note = (f'<p class="note" id="cap-note">Showing the {len(shown)} most informative of {len(ordered)} images '
                f'(cap {int(cap)}): {_e(left)} left out, the most confident '
                f'{"correct ones" if n_err <= len(shown) else "ones"}. Every image is in '
                f'<a href="predictions.csv">predictions.csv</a> and annotated/.</p>')
    else:
        note = ""
    how = (f"{n_err} misclassified first, then by ascending confidence" if has_truth
           else "by ascending confidence (no true classes known)")
    figs = "".join(_figure(r, base_dir) for r in shown)
    return (f'<section id="gallery"><h2>Images <span class="note">&middot; {_e(how)}; click for the annotated '
            f'image</span></h2><div class="filters">{filters}</div>{note}<div class="grid" id="grid">{figs}</div>'
            f"</section>")


def _not_judged(rows: list[dict]) -> str:
    """Images the out-of-distribution gate set aside (cxrkit.core.ood), with the reason in words."""
    from ..core.ood import OOD_REASON
    lst = [(r, [OOD_REASON[f] for f in row_flags(r) if f in OOD_REASON]) for r in rows]
    lst = [(r, why) for r, why in lst if why]
    out = [f'<section id="not-judged" class="panel" style="margin-top:12px"><h2>Not judged ({len(lst)})</h2>']
    if lst:
        body = "".join(f'<tr><td>{_e(r.get("image_path", ""))}</td><td>{_e(", ".join(why))}</td>'
                       f'<td>{_e(r.get("ood_score", ""))}</td><td>'
                       f'{_e(r.get("unjudged_model_class") or r.get("predicted_class", ""))} '
                       f'(unjudged_model_class in predictions.csv, not to be read)</td></tr>' for r, why in lst)
        out.append('<table class="sk"><tr><th>file</th><th>reason</th><th>ood_score</th><th>model output</th></tr>'
                   f"{body}</table>")
    else:
        out.append('<p class="note">None: every image looked like a frontal chest X-ray.</p>')
    out.append("</section>")
    return "".join(out)


def _problems(summary: dict) -> str:
    """A Grad-CAM checkpoint mismatch (when allowed), skipped inputs (always listed, possibly 'none') and
    ground-truth masks that were not scored (unreadable or empty; when any)."""
    out = []
    mismatch = (summary.get("gradcam") or {}).get("checkpoint_mismatch")
    if mismatch:
        out.append('<section id="gradcam-mismatch" class="panel" style="margin-top:12px"><h2>Grad-CAM warning</h2>'
                   f'<p class="note">{_e(mismatch)}: the Grad-CAM maps need not explain these predictions.</p>'
                   "</section>")
    for key, title in (("skipped", "Skipped files"), ("mask_problems", "Ground-truth masks not scored")):
        lst = summary.get(key) or []
        if not lst and key != "skipped":
            continue
        out.append(f'<section id="{key.replace("_", "-")}" class="panel" style="margin-top:12px">'
                   f"<h2>{title} ({len(lst)})</h2>")
        if lst:
            body = "".join(f'<tr><td>{_e(x.get("path", ""))}</td><td>{_e(x.get("reason", ""))}</td></tr>'
                           for x in lst)
            out.append(f'<table class="sk"><tr><th>file</th><th>reason</th></tr>{body}</table>')
        else:
            out.append('<p class="note">None: every input was decoded.</p>')
        out.append("</section>")
    return "".join(out)


def render_report(summary: dict, rows: list[dict], *, model: dict | None = None, cap: int = GALLERY_CAP,
                  base_dir=None, generated: str | None = None) -> str:
    """The report page as a string.

    summary: the run's summary.json dict; rows: predictions.csv rows (dicts with image_path,
    predicted_class, confidence, true_class, correct, annotated_png; optional dice and
    quality_flags); model: model_info(backend); base_dir: when given, the gallery links only to
    files that exist under it."""
    base = Path(base_dir) if base_dir is not None else None
    if generated is None:
        generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    title = f"cxrkit report: {summary.get('n_processed', 0)} images, {summary.get('backend', '')}"
    files = " &middot; ".join(f'<a href="{_href(f)}">{_e(f)}</a>' for f in ("predictions.csv", "summary.json")
                              if base is None or (base / f).is_file())
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + _header(summary, model, generated) + "\n<main>\n" + _metrics(summary) + "\n"
            + _not_judged(rows) + "\n" + _distributions(summary, rows) + "\n" + _worst_dice(summary, base) + "\n"
            + _gallery(summary, rows, cap, base) + "\n" + _problems(summary)
            + "\n</main>\n"
            + f"<footer>Files: {files} &middot; annotated/ (full images) &middot; thumbs/. "
              f"{_e(summary.get('note', DISCLAIMER))}</footer>\n"
            + f"<script>{_JS}</script>\n</body>\n</html>\n")


def write_report(save_dir, summary: dict, rows: list[dict], *, model: dict | None = None,
                 cap: int = GALLERY_CAP) -> Path:
    """Write <save_dir>/report.html (atomically); returns its path."""
    save_dir = Path(save_dir)
    page = render_report(summary, rows, model=model, cap=cap, base_dir=save_dir)
    path = save_dir / REPORT_NAME
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
