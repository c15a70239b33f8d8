"""report.html (cxrkit.inference.report): the page parses, every link exists, its numbers equal summary.json,
errors come first, the thumbnail cap holds, the confidence intervals, --no_report,
model_arch.py --evaluate, and a headless-Chromium rendering check (skipped without Chromium)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
import pytest

from cxrkit.core import metrics
from cxrkit.inference import report as rp
from cxrkit.inference.thumbs import THUMB_HEIGHT, write_thumbnail
from cxrkit.core.metrics import classification_metrics

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
BLOCK = {"div", "section", "table", "figure", "p", "ul", "ol", "h1", "h2", "h3", "header", "footer", "main"}


# ------------------------------------------------------------------------------------ page parsing
class Page(HTMLParser):
    """Parses a report and records what the tests check: tag-balance errors (every non-void element
    closed explicitly, in order; no block element inside a <p>, which a browser would restructure),
    every href/src, every data-key number with its shown text, the gallery figures in page order,
    and the text of each section."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.links, self.numbers, self.figures = [], [], [], [], []
        self.ids, self.section_text, self.scripts = set(), {}, 0
        self._num = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {[t for t, _ in self.stack]}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in BLOCK and any(t == "p" for t, _ in self.stack):
            self.errors.append(f"<{tag}> inside <p> at {self.getpos()}")
        if tag not in VOID:
            self.stack.append((tag, a))
        for k in ("href", "src"):
            if a.get(k):
                self.links.append(a[k])
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if "data-key" in a:
            self._num = [a["data-key"], a["data-value"], ""]
            self.numbers.append(self._num)
        if tag == "figure":
            self.figures.append(a)
        if tag == "script":
            self.scripts += 1
            if a.get("src"):
                self.errors.append("external script")

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:
            self.errors.append(f"self-closed <{tag}/>")
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"</{tag}> closes a void element")
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} does not close {self.stack[-1:] or 'anything'}")
            return
        _, a = self.stack.pop()
        if "data-key" in a:
            self._num = None

    def handle_data(self, data):
        if self._num is not None:
            self._num[2] += data
        for t, a in self.stack:
            if t == "section" and "id" in a:
                self.section_text[a["id"]] = self.section_text.get(a["id"], "") + data


def parse(path_or_text) -> Page:
    text = path_or_text.read_text(encoding="utf-8") if isinstance(path_or_text, Path) else path_or_text
    assert text.startswith("<!DOCTYPE html>")
    page = Page(text)
    assert page.errors == [], page.errors
    assert page.scripts <= 1  # a little inline JS, at most
    return page


def lookup(summary: dict, key: str):
    v = summary
    for part in key.split("/"):
        v = v[int(part)] if isinstance(v, list) else v[part]
    return v


def assert_links_exist(page: Page, save_dir: Path):
    assert page.links
    for link in page.links:
        u = urlsplit(link)
        assert not u.scheme and not u.netloc, f"not a relative link: {link}"
        rel = unquote(u.path)
        assert not rel.startswith("/") and ".." not in Path(rel).parts, link
        assert (save_dir / rel).is_file(), f"{link} -> {save_dir / rel} missing"


def assert_numbers_match(page: Page, summary: dict):
    """Every number the page shows from summary.json is that exact value, and its text is it rounded."""
    assert page.numbers
    for key, value, text in page.numbers:
        want = lookup(summary, key)
        assert json.loads(value) == want, (key, value, want)
        text = text.strip()
        if want is None:
            assert text == "-"
        elif isinstance(want, int):
            assert text == str(want), (key, text, want)
        else:
            decimals = len(text.split(".")[1]) if "." in text else 0
            assert abs(float(text) - want) <= 0.5 * 10 ** -decimals + 1e-12, (key, text, want)


def synthetic_rows(n: int, n_err: int, seed: int = 0, labelled: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.26, 1.0, n)
    err = np.zeros(n, bool)
    err[rng.choice(n, n_err, replace=False)] = True
    rows = []
    for i in range(n):
        pred = CLASSES[i % 4]
        true = CLASSES[(i + 1) % 4] if err[i] else pred
        rows.append({"image_path": f"/data/{true}/images/img {i} (copy).png", "predicted_class": pred,
                     "confidence": f"{conf[i]:.6f}", "true_class": true if labelled else "",
                     "correct": str(int(not err[i])) if labelled else "", "dice": "",
                     "annotated_png": f"annotated/img_{i}.png"})
    return rows


def synthetic_summary(rows: list[dict]) -> dict:
    labelled = [r for r in rows if r["true_class"]]
    s = {"n_inputs": len(rows) + 1, "n_processed": len(rows), "n_skipped": 1,
         "skipped": [{"path": "/data/COVID/images/bad <1>.png", "reason": "not an image"}],
         "backend": "onnxruntime", "backend_info": {"providers": ["CPUExecutionProvider"]},
         "class_names": CLASSES, "img_size": 128, "calibrated": True, "temperature": 1.5, "tta": 1,
         "throughput": {"seconds": 2.0, "images_per_second": len(rows) / 2.0},
         "predicted_counts": {c: sum(r["predicted_class"] == c for r in rows) for c in CLASSES},
         "classification": None, "segmentation": None, "inputs": {"data_dir": "/data"}}
    if labelled:
        y = np.array([CLASSES.index(r["true_class"]) for r in labelled])
        p = np.array([CLASSES.index(r["predicted_class"]) for r in labelled])
        m = classification_metrics(y, np.eye(4)[p], CLASSES)
        m["n_labelled"] = len(y)
        m.update(metrics.confidence_intervals(y, p, 4))
        s["classification"] = m
    return s


# -------------------------------------------------------------------------- confidence intervals
def test_report_module_renders_only():
    """No import circle: cxrkit.inference.report renders; importing it (a fresh interpreter) loads neither the
    inference pipeline nor torch / MONAI, and the interval maths lives in cxrkit.core.metrics."""
    import subprocess
    import sys
    probe = ("import json, sys; import cxrkit.inference.report; print(json.dumps(sorted(m for m in sys.modules "
             "if m in ('cxrkit.inference.pipeline', 'cxrkit.inference.backends') or m.split('.')[0] in ('torch', 'monai') "
             "or m in ('cxrkit.training.evaluate', 'cxrkit.core.model', 'cxrkit.core.checkpoint'))))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert not hasattr(rp, "write_split_report") and not hasattr(rp, "confidence_intervals")


def test_wilson_interval():
    lo, hi = metrics.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert metrics.wilson_interval(0, 10)[0] == 0.0 and metrics.wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert metrics.wilson_interval(10, 10)[1] == 1.0
    for k, n in ((1, 3), (37, 48), (700, 1000)):
        lo, hi = metrics.wilson_interval(k, n)
        assert 0 <= lo < k / n < hi <= 1
    assert metrics.wilson_interval(700, 1000)[1] - metrics.wilson_interval(700, 1000)[0] < 0.06


def test_bootstrap_macro_f1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 never predicted: still counted (present in y_true), F1 0
    cm = np.bincount(y * 4 + p, minlength=16).reshape(4, 4)
    ref = classification_metrics(y, np.eye(4)[p], CLASSES)["macro_f1"]
    assert metrics.macro_f1_from_confusion(cm) == pytest.approx(ref, abs=1e-12)
    from sklearn.metrics import f1_score  # the one definition (cxrkit.core.metrics) agrees with scikit-learn
    assert metrics.macro_f1_from_confusion(cm) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    a = metrics.bootstrap_macro_f1(y, p, 4)
    assert a == metrics.bootstrap_macro_f1(y, p, 4)                 # seeded: reproducible
    assert a != metrics.bootstrap_macro_f1(y, p, 4, seed=5)
    assert a[0] < ref < a[1] and a[1] - a[0] < 0.3
    # a class absent from both y and the predictions does not count (as scikit-learn)
    y2, p2 = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    cm2 = np.bincount(y2 * 4 + p2, minlength=16).reshape(4, 4)
    assert metrics.macro_f1_from_confusion(cm2) == pytest.approx(
        classification_metrics(y2, np.eye(4)[p2], CLASSES)["macro_f1"])
    # a big run is resampled in chunks (bounded memory) and gives a narrow interval
    yb = rng.integers(0, 4, 20000)
    lo, hi = metrics.bootstrap_macro_f1(yb, np.where(rng.random(20000) < 0.8, yb, 0), 4, n_resamples=200)
    assert 0 < hi - lo < 0.03


# ------------------------------------------------------------------------ rendering, no model
def test_gallery_errors_first_and_cap_holds():
    rows = synthetic_rows(1000, 150)
    page = parse(rp.render_report(synthetic_summary(rows), rows, cap=300))
    figs = page.figures
    assert len(figs) == 300
    err = [f["data-err"] for f in figs]
    assert err == ["1"] * 150 + ["0"] * 150                     # every error, first
    conf = [float(f["data-conf"]) for f in figs]
    assert conf[:150] == sorted(conf[:150]) and conf[150:] == sorted(conf[150:])
    # the correct ones shown are the least confident correct ones
    correct_conf = sorted(float(r["confidence"]) for r in rows if r["correct"] == "1")
    assert conf[150:] == pytest.approx(correct_conf[:150], abs=1e-6)
    note = page.section_text["gallery"]
    assert "300 most informative of 1000" in note and "700 left out" in note
    # more errors than the cap: the gallery is errors only, still capped
    page = parse(rp.render_report(synthetic_summary(rows), rows, cap=100))
    assert len(page.figures) == 100 and {f["data-err"] for f in page.figures} == {"1"}
    # under the cap: everything, no note
    few = rows[:40]
    page = parse(rp.render_report(synthetic_summary(few), few, cap=300))
    assert len(page.figures) == 40 and "left out" not in page.section_text["gallery"]


def test_render_escapes_and_unlabelled_runs():
    rows = synthetic_rows(20, 0, labelled=False)
    rows[0]["image_path"] = '/data/<script>alert("x")</script> & co.png'
    rows[1]["quality_flags"] = "low contrast;rotated"
    text = rp.render_report(synthetic_summary(rows), rows)
    page = parse(text)
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    assert "bad &lt;1&gt;.png" in text                             # skipped file names escaped too
    assert "No true classes known" in page.section_text["metrics"]
    assert "f-err" not in page.ids and "f-true" not in page.ids   # no truth filters without truth
    assert "low contrast" in page.section_text["gallery"] and "rotated" in page.section_text["gallery"]
    conf = [float(f["data-conf"]) for f in page.figures]
    assert conf == sorted(conf) and {f["data-err"] for f in page.figures} == {"0"}
    assert_numbers_match(page, synthetic_summary(rows))


def test_thumbnail_is_small(tmp_path):
    gray = (np.random.default_rng(0).random((512, 600)) * 255).astype(np.uint8)
    seg = np.zeros((64, 64), np.float32)
    seg[16:48, 10:28] = 1
    write_thumbnail(tmp_path / "t.jpg", gray, seg)
    t = cv2.imread(str(tmp_path / "t.jpg"))
    assert t.shape[0] == THUMB_HEIGHT and t.shape[1] == round(600 * THUMB_HEIGHT / 512)
    assert not (tmp_path / "t.jpg.tmp").exists()


# ------------------------------------------------------------------- both CLIs, tiny real model
@pytest.fixture(scope="module")
def report_runs(tiny_model, cxr_eval_dir, tmp_path_factory):
    from cxrkit.cli import infer_pth as pth_cli
    from cxrkit.cli import infer_onnx as onnx_cli
    out = tmp_path_factory.mktemp("report_runs")
    common = ["--data_dir", str(cxr_eval_dir), "--num_samples", "0", "--batch_size", "5", "--quiet"]
    rc = [onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--save_dir", str(out / "onnx")] + common),
          pth_cli.main(["--checkpoint", str(tiny_model.checkpoint), "--device", "cpu",
                        "--save_dir", str(out / "pth")] + common),
          onnx_cli.main(["--onnx_path", str(tiny_model.onnx), "--save_dir", str(out / "off"), "--no_report"]
                        + common)]
    assert rc == [0, 0, 0]
    return out


def _load(d: Path):
    with open(d / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return json.loads((d / "summary.json").read_text()), rows, parse(d / "report.html")


@pytest.mark.parametrize("which", ["onnx", "pth"])
def test_report_parses_and_links_exist(report_runs, which):
    d = report_runs / which
    summary, rows, page = _load(d)
    assert summary["outputs"]["report"].startswith("report.html")
    assert_links_exist(page, d)
    assert len(page.figures) == len(rows) == 12
    # each gallery item opens the annotated PNG of its row; thumbnails are small JPEGs
    assert sorted(l for l in page.links if l.startswith("annotated/")) == sorted(r["annotated_png"] for r in rows)
    thumbs = sorted(t for t in (d / "thumbs").iterdir() if t.is_file())
    assert len(thumbs) == 12 and all(t.suffix == ".jpg" for t in thumbs)
    # the lowest-Dice tiles (true and predicted outlines), lowest first, one per input with a mask up to 12
    worst = summary["segmentation"]["lowest_dice"]
    dices = sorted(float(r["dice"]) for r in rows if r.get("dice"))
    assert [w["dice"] for w in worst] == pytest.approx(dices[:len(worst)], abs=1e-6) and len(worst) == min(12, len(dices))
    assert all((d / w["tile"]).is_file() for w in worst) and "worst-dice" in (d / "report.html").read_text()
    assert all(cv2.imread(str(t)).shape[0] == THUMB_HEIGHT for t in thumbs)
    assert all(t.stat().st_size < 30_000 for t in thumbs)
    assert sorted(l for l in page.links if l.startswith("thumbs/")) == sorted(f"thumbs/{t.name}" for t in thumbs)
    # self-contained: nothing fetched from the network
    text = (d / "report.html").read_text()
    assert "http://" not in text and "https://" not in text and "@import" not in text


@pytest.mark.parametrize("which", ["onnx", "pth"])
def test_report_numbers_equal_summary(report_runs, which):
    summary, rows, page = _load(report_runs / which)
    assert_numbers_match(page, summary)
    keys = {k for k, _, _ in page.numbers}
    c = summary["classification"]
    must = {"classification/accuracy", "classification/macro_f1", "n_inputs", "n_processed", "n_skipped",
            "segmentation/mean_dice", "segmentation/mean_iou",
            *(f"classification/{m}_ci95/{i}" for m in ("accuracy", "macro_f1") for i in (0, 1)),
            *(f"classification/confusion_matrix/{i}/{j}" for i in range(4) for j in range(4)),
            *(f"classification/per_class/{n}/{m}" for n in CLASSES for m in ("precision", "recall", "f1", "support"))}
    assert must <= keys, must - keys
    # the intervals in summary.json are those of the predictions in predictions.csv
    y = np.array([CLASSES.index(r["true_class"]) for r in rows])
    p = np.array([CLASSES.index(r["predicted_class"]) for r in rows])
    ci = metrics.confidence_intervals(y, p, 4)
    assert c["accuracy_ci95"] == ci["accuracy_ci95"] and c["macro_f1_ci95"] == ci["macro_f1_ci95"]
    assert c["accuracy_ci95"][0] <= c["accuracy"] <= c["accuracy_ci95"][1]
    assert c["macro_f1_ci95"][0] <= c["macro_f1"] <= c["macro_f1_ci95"][1]


def test_report_errors_first_and_skipped_listed(report_runs):
    summary, rows, page = _load(report_runs / "onnx")
    n_err = sum(r["correct"] == "0" for r in rows)
    err = [f["data-err"] for f in page.figures]
    assert err == ["1"] * n_err + ["0"] * (12 - n_err)
    conf = [float(f["data-conf"]) for f in page.figures]
    assert conf[:n_err] == sorted(conf[:n_err]) and conf[n_err:] == sorted(conf[n_err:])
    sk = page.section_text["skipped"]
    assert "(1)" in sk and "corrupt_scan.png" in sk and summary["skipped"][0]["reason"] in sk


def test_no_report_flag(report_runs):
    d = report_runs / "off"
    s = json.loads((d / "summary.json").read_text())
    assert (d / "predictions.csv").is_file() and s["n_processed"] == 12
    assert not (d / "report.html").exists() and not (d / "thumbs").exists()
    assert s["outputs"]["report"] is None
    assert "accuracy_ci95" in s["classification"]  # the intervals do not depend on the report


# ------------------------------------------------------------------------ model_arch.py --evaluate
def test_evaluate_writes_the_same_report(tiny_model, tmp_path):
    from cxrkit.cli import train as model_arch
    split = tiny_model.root / "train_out" / "split.json"
    assert split.is_file()
    argv = ["--data_dir", str(tiny_model.train_data), "--output_dir", str(tmp_path), "--evaluate",
            str(tiny_model.checkpoint), "--split_file", str(split), "--workers", "0", "--quiet", "--device", "cpu"]
    assert model_arch.main(argv) == 0
    assert model_arch.main(argv) == 0  # a second evaluation replaces the first one's report
    d = tmp_path / "test_report"
    summary, rows, page = _load(d)
    assert_links_exist(page, d)
    assert_numbers_match(page, summary)
    test_idx = json.loads(split.read_text())["test"]
    cls = json.loads((tmp_path / "test_results" / "classification_report.json").read_text())
    assert summary["inputs"]["split"] == "test" and summary["n_processed"] == len(test_idx) == cls["n_images"]
    assert summary["backend"] == "pytorch" and len(page.figures) == len(rows) == len(test_idx)
    # the same images and preprocessing as test_results/: the same accuracy (one near-tie may flip)
    assert abs(summary["classification"]["accuracy"] - cls["accuracy"]) <= 1 / len(test_idx) + 1e-9


# ------------------------------------------------------------------------- headless Chromium
def _chromium(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _console_lines(stderr: str) -> list[str]:
    """Console messages (the page logs nothing, so any is a failure) and uncaught JS errors."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (Debian package `chromium`): "
                                                    f"no headless rendering check")
@pytest.mark.slow
def test_report_renders_in_chromium(report_runs, tmp_path):
    page = report_runs / "onnx" / "report.html"
    shot = tmp_path / "shot.png"
    r = _chromium(["--hide-scrollbars", "--window-size=1280,900", f"--screenshot={shot}", page.as_uri()],
                  tmp_path / "profile1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console_lines(r.stderr) == [], _console_lines(r.stderr)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (900, 1280)
    assert img.std() > 10  # not a blank page
    # the script ran to its end (it marks <body data-ready="1">) and the DOM kept every gallery item
    r = _chromium(["--dump-dom", page.as_uri()], tmp_path / "profile2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console_lines(r.stderr) == [], _console_lines(r.stderr)
    assert 'data-ready="1"' in r.stdout
    assert r.stdout.count("<figure") == 12 and "12 of 12 shown" in r.stdout
    shutil.rmtree(tmp_path / "profile1", ignore_errors=True)
    shutil.rmtree(tmp_path / "profile2", ignore_errors=True)
