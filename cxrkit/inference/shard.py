"""Sharded inference on a cluster scheduler: `--shard K/N` on either inference CLI, then one merge.

    python run_onnx_inference.py --data_dir ARCHIVE --num_samples 0 --outputs csv --shard 3/16 --save_dir out/s3
    cxrkit-merge out/s0 out/s1 ... out/s15 --out out/all          # or: python -m cxrkit merge ...

Shard rule: an input belongs to shard K of N when int(sha256(relative path)) mod N == K, where the
relative path is the one the run names it by (relative to --data_dir, POSIX separators; for a
file given with --images its name, for a folder given with --images "<folder name>/<path inside>").
So the same files land in the same shard on every machine, whatever order the file system lists
them in, and each of the N runs lists the inputs itself (no file list to distribute).
--num_samples picks its random subset BEFORE sharding, and output names are assigned over the whole
list, so the N shards together are exactly the single run's inputs, named as the single run names them.

Each shard's summary.json carries a "shard" block (index, count, the number of inputs of the whole
run, and the position of each of its inputs in the whole run's order). `merge` checks that the N
folders are the N shards of one run (same model, classes, options and inputs; every index once),
then writes predictions.csv (the single run's rows, in its order), summary.json (counts, skipped
files, quality flags and metrics recomputed over all rows: the classification metrics and their
intervals from the CSV's probabilities, exactly as a single run computes them; the segmentation
means weighted by shard; throughput summed over shards) and report.html (thumbnails only for the
images it shows: copied from a shard's thumbs/, else made from the source file).

A shard that gets no inputs (small runs, many shards) still writes an empty predictions.csv and a
summary.json, so the merge always finds N folders. Torch-free, like the ONNX path.
"""
from __future__ import annotations

import copy
import shutil
import csv
import hashlib
import json
import logging
from collections import defaultdict, deque
from pathlib import Path

from ..core.errors import InferenceError
from ..core.ood import not_judged

log = logging.getLogger("cxrkit")

SHARD_KEY = "sha256 of the input's relative path (POSIX separators), as an integer, mod N"
# summary.json keys that must agree between the shards of one run
_SAME = ("class_names", "img_size", "backend", "temperature", "calibrated", "tta", "inputs")
# and keys of the "shard" block: the model's identity (file, SHA-256, ...) and the run's options (the OOD
# threshold, TTA, outputs, Grad-CAM)
_SAME_IN_SHARD = ("model", "options")


# ------------------------------------------------------------------------------------ sharding
def parse_shard(spec) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise InferenceError(f"--shard {spec!r}: expected K/N, e.g. 0/4 (shards are numbered 0 to N-1)") from None
    if n < 1 or not 0 <= k < n:
        raise InferenceError(f"--shard {spec}: need N >= 1 and 0 <= K < N (shards are numbered 0 to N-1, as SLURM "
                             f"array and Kubernetes completion indices are)")
    return k, n


def shard_of(rel: str, n: int) -> int:
    """The shard (0..n-1) of an input named `rel`: stable across machines, processes and Python versions."""
    key = Path(str(rel)).as_posix().encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % n


def select_shard(items: list, k: int, n: int, model: dict | None = None,
                 options: dict | None = None) -> tuple[list, dict]:
    """The items of shard k of n (in their order) and the summary.json "shard" block for them. model: the
    model's identity (incl. its SHA-256); options: what the run was asked to do; the merge checks that both
    agree across the shards."""
    picked = [(i, it) for i, it in enumerate(items) if shard_of(it.rel, n) == k]
    block = {"index": k, "count": n, "key": SHARD_KEY, "n_inputs_all": len(items), "model": model,
             **({"options": options} if options is not None else {}),
             "inputs": [[i, str(it.path)] for i, it in picked]}
    log.info("shard %d/%d: %d of %d inputs", k, n, len(picked), len(items))
    return [it for _, it in picked], block


def write_empty_shard(save_dir, backend, columns: list[str], extra: dict, overwrite: bool = False) -> dict:
    """A shard that got no inputs: an empty predictions.csv and a summary.json the merge accepts."""
    from .render import write_csv_atomic
    from .summary import empty_shard_summary
    from ..core.io_utils import write_json_atomic
    from ..core.outdir import claim_save_dir, job_identity
    save_dir = Path(save_dir)
    job = job_identity(backend.model_file, [], ["predictions.csv", "summary.json"], extra)
    claim = claim_save_dir(save_dir, overwrite, tool=f"cxrkit inference ({backend.name}), empty shard",
                           job=job).acquire()
    try:
        claim.plan(["predictions.csv", "summary.json"])
        write_csv_atomic(save_dir / "predictions.csv", columns, [])
        summary = empty_shard_summary(backend, extra)
        write_json_atomic(save_dir / "summary.json", summary)
        claim.finish()
    finally:
        claim.release()
    return summary


# --------------------------------------------------------------------------------------- merge
def _load(d: Path):
    """A shard folder's summary.json, predictions.csv header and rows, each checked against the others and
    against the folder's manifest before anything is merged (InferenceError naming the folder and file)."""
    s_path, c_path = d / "summary.json", d / "predictions.csv"
    if not s_path.is_file() or not c_path.is_file():
        raise InferenceError(f"{d}: no summary.json / predictions.csv (not a finished shard run)")
    _check_manifest_hashes(d, (s_path, c_path))
    try:
        summary = json.loads(s_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InferenceError(f"{s_path}: not a complete shard run's summary.json, cut short or edited "
                             f"({type(e).__name__}: {e}); rerun that shard") from None
    if not isinstance(summary, dict) or "shard" not in summary:
        raise InferenceError(f"{s_path}: has no \"shard\" block (a run without --shard K/N, or not a shard run's "
                             f"summary.json)")
    _check_shard_block(s_path, summary)
    try:
        with open(c_path, newline="", encoding="utf-8") as f:
            r = csv.DictReader(f)
            rows = list(r)
            header = list(r.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InferenceError(f"{c_path}: not a readable predictions.csv ({type(e).__name__}: {e})") from None
    _check_rows(c_path, summary, rows)
    return summary, header, rows


def _check_manifest_hashes(d: Path, paths) -> None:
    """Where the shard's manifest records a file's SHA-256, the file must still have it."""
    from ..core.io_utils import sha256_file
    from ..core.outdir import MANIFEST_NAME
    try:
        files = json.loads((d / MANIFEST_NAME).read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return  # no (readable) manifest: nothing recorded to check against
    for p in paths:
        want = (files.get(p.name) or {}).get("sha256") if isinstance(files, dict) else None
        if want and sha256_file(p) != want:
            raise InferenceError(f"{p}: changed since the shard run wrote it (its SHA-256 is not the one in "
                                 f"{d / MANIFEST_NAME}); rerun that shard")


def _check_shard_block(s_path: Path, summary: dict) -> None:
    b = summary["shard"]
    ok = (isinstance(b, dict) and all(isinstance(b.get(k), int) and not isinstance(b.get(k), bool)
                                      for k in ("index", "count", "n_inputs_all"))
          and isinstance(b.get("inputs"), list)
          and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], int) and isinstance(x[1], str)
                  for x in b["inputs"]))
    if not ok:
        raise InferenceError(f"{s_path}: not a complete shard run's summary.json: its \"shard\" block is not what a "
                             f"--shard K/N run writes (needs index, count, n_inputs_all and inputs); rerun that shard")
    if not isinstance(summary.get("class_names"), list) or not isinstance(summary.get("n_processed", 0), int):
        raise InferenceError(f"{s_path}: not a complete shard run's summary.json (no class_names / n_processed); "
                             f"rerun that shard")
    bad = _bad_merged_fields(summary)
    if bad:
        raise InferenceError(f"{s_path}: not a complete shard run's summary.json ({bad} is not what a shard run "
                             f"writes); rerun that shard")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad_merged_fields(summary: dict) -> str | None:
    """The first of the fields the merge adds up or reorders that is damaged (its name), else None: so a cut
    or edited summary.json is one line naming it, not a KeyError / TypeError deep in the merge."""
    if not isinstance(summary.get("n_inputs", 0), int):
        return "n_inputs"
    for key in ("skipped", "notes"):
        v = summary.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) and isinstance(x.get("path"), str) for x in v):
            return key
    if not isinstance(summary.get("mask_problems", []), list):
        return "mask_problems"
    seg = summary.get("segmentation")
    if seg is not None and not (isinstance(seg, dict) and isinstance(seg.get("n_masks"), int)
                                and all(_is_num(seg[k]) for k in ("mean_dice", "mean_iou", "mean_dice_model_input")
                                        if k in seg)):
        return "segmentation"
    for key in ("throughput", "quality"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            return key
    t = summary.get("throughput") or {}
    if not all(t.get(k) is None or _is_num(t[k]) for k in ("seconds", "model_seconds")):
        return "throughput"
    counts = (summary.get("quality") or {}).get("counts", {})
    if not isinstance(counts, dict) or not all(_is_num(v) for v in counts.values()):
        return "quality.counts"
    return None


def _check_rows(c_path: Path, summary: dict, rows: list) -> None:
    """Row count == n_processed, every row complete, its path one of the shard's inputs, listed once."""
    from collections import Counter
    names, left = summary["class_names"], Counter(p for _, p in summary["shard"]["inputs"])
    if len(rows) != summary.get("n_processed", 0):
        raise InferenceError(f"{c_path}: {len(rows)} rows, but its summary.json counts {summary.get('n_processed')} "
                             f"processed images (truncated or edited); rerun that shard")
    for i, r in enumerate(rows, 2):
        path = r.get("image_path")
        if None in r or any(v is None for v in r.values()):
            raise InferenceError(f"{c_path}: line {i} has {'too many' if None in r else 'too few'} fields "
                                 f"(cut or edited); rerun that shard")
        if left[path] < 1:
            why = "listed more often than it is an input" if path in left else "not one of the shard's inputs"
            raise InferenceError(f"{c_path}: line {i}: {path!r} is {why}; rerun that shard")
        cls = r.get("predicted_class") or r.get("unjudged_model_class")  # a not-judged row keeps its class there
        if cls not in names:
            raise InferenceError(f"{c_path}: line {i}: predicted_class {r.get('predicted_class')!r} is not a model "
                                 f"class; rerun that shard")
        left[path] -= 1


def _check(dirs, loaded) -> int:
    counts = {s["shard"]["count"] for s, _, _ in loaded}
    if len(counts) != 1:
        raise InferenceError(f"the folders come from runs with different shard counts N: {sorted(counts)}")
    n = counts.pop()
    seen = defaultdict(list)
    for d, (s, _, _) in zip(dirs, loaded):
        seen[s["shard"]["index"]].append(str(d))
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    if dup:
        raise InferenceError("shard given twice: " + "; ".join(f"{k}/{n} in {', '.join(v)}" for k, v in dup.items()))
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise InferenceError(f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)}: give all {n} shard folders")
    ref_dir, (ref, ref_header, _) = dirs[0], loaded[0]
    for d, (s, header, _) in zip(dirs, loaded):
        pairs = [("n_inputs_all", s["shard"].get("n_inputs_all"), ref["shard"].get("n_inputs_all"))]
        pairs += [(k, s.get(k), ref.get(k)) for k in _SAME]
        pairs += [(f"shard.{k}", s["shard"].get(k), ref["shard"].get(k)) for k in _SAME_IN_SHARD]
        for key, a, b in pairs:
            if a != b:
                raise InferenceError(f"{d} and {ref_dir} are not shards of one run: {key} differs ({a!r} vs {b!r})")
        if header != ref_header:
            raise InferenceError(f"{d} and {ref_dir} have different predictions.csv columns")
    return n


def _in_input_order(dirs, loaded) -> tuple[list, list, list, list]:
    """The shards' rows, skips, notes and mask problems, in the single run's input order."""
    rows, skipped, notes, mask_problems = [], [], [], []
    for d, (s, _, shard_rows) in zip(dirs, loaded):
        pos = defaultdict(deque)
        for i, p in s["shard"]["inputs"]:
            pos[p].append(i)

        def where(path, _pos=pos, _d=d):
            q = _pos.get(str(path))
            if not q:
                raise InferenceError(f"{_d}: {path} is not among the shard's inputs (summary.json edited?)")
            return q[0] if len(q) == 1 else q.popleft()
        rows += [(where(r["image_path"]), r) for r in shard_rows]
        skipped += [(where(x["path"]), x) for x in s.get("skipped", [])]
        notes += [(where(x["path"]), k, x) for k, x in enumerate(s.get("notes", []))]
        mask_problems += s.get("mask_problems", [])
    rows = [r for _, r in sorted(rows, key=lambda t: t[0])]
    skipped = [x for _, x in sorted(skipped, key=lambda t: t[0])]
    notes = [x for _, _, x in sorted(notes, key=lambda t: (t[0], t[1]))]
    return rows, skipped, notes, mask_problems


def _merge_metrics(summary: dict, loaded, rows: list, names: list) -> None:
    """summary's quality counts, classification and segmentation, recounted over every shard."""
    from .summary import classification_from_rows, in_training_block
    q = summary.get("quality")
    if isinstance(q, dict) and "counts" in q:
        q["counts"] = {c: sum((s.get("quality") or {}).get("counts", {}).get(c, 0) for s, _, _ in loaded)
                       for c in q["counts"]}
        q["n_flagged"] = sum(bool(r.get("quality_flags")) for r in rows)
        q["n_not_judged"] = sum(not_judged(r.get("quality_flags")) for r in rows)
    summary["classification"] = classification_from_rows(
        rows, names, bool((summary.get("in_training_set") or {}).get("in_metrics")))
    if "in_training_set" in summary:  # the shards' common setting; the count over the merged rows
        summary["in_training_set"] = in_training_block(rows, summary["in_training_set"].get("checked", False),
                                                       summary["in_training_set"].get("in_metrics", False))
    segs = [s["segmentation"] for s, _, _ in loaded if s.get("segmentation")]
    if segs:
        m = sum(g["n_masks"] for g in segs)
        seg = dict(segs[0])
        for key in ("mean_dice", "mean_iou", "mean_dice_model_input"):
            if all(key in g for g in segs):
                seg[key] = sum(g[key] * g["n_masks"] for g in segs) / m
        seg["n_masks"] = m
        summary["segmentation"] = seg
    else:
        summary["segmentation"] = None


def _merge_dicom_out(summary: dict, loaded) -> None:
    """--dicom_out: the shards' counts added up and their failures listed (the files stay in the shards)."""
    blocks = [s["dicom_out"] for s, _, _ in loaded if isinstance(s.get("dicom_out"), dict)]
    if not blocks:
        summary.pop("dicom_out", None)
        return
    out = dict(blocks[0])
    for key in ("written", "seg_written", "sr_written", "skipped_not_dicom", "n_failed"):
        out[key] = sum(int(b.get(key) or 0) for b in blocks)
    out["failed"] = [f for b in blocks for f in (b.get("failed") or [])]
    out["folder"] = "dicom/ in each shard folder"
    summary["dicom_out"] = out


def _check_out_not_a_shard(out: Path, dirs) -> None:
    """--out must not be one of the shard folders (the merge would replace that shard's files)."""
    for d in dirs:
        if out.resolve() == d.resolve():
            raise InferenceError(f"--out {out} is one of the shard folders; choose another folder for the merge")


def merge(dirs, out_dir, *, overwrite: bool = False, report: bool = True) -> dict:
    """Combine the N shard folders of one run into out_dir (predictions.csv, summary.json,
    report.html) as a single run over the same inputs writes them; returns the summary."""
    from .summary import predicted_counts
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise InferenceError("no shard folders given")
    loaded = [_load(d) for d in dirs]
    order = sorted(range(len(dirs)), key=lambda i: loaded[i][0]["shard"]["index"])
    dirs, loaded = [dirs[i] for i in order], [loaded[i] for i in order]
    n = _check(dirs, loaded)
    full = [x for x in loaded if not x[0].get("empty_shard")] or loaded
    tmpl, header = copy.deepcopy(full[0][0]), full[0][1]
    names = list(tmpl["class_names"])

    rows, skipped, notes, mask_problems = _in_input_order(dirs, loaded)
    n_inputs = sum(s.get("n_inputs", 0) for s, _, _ in loaded)
    if n_inputs != tmpl["shard"]["n_inputs_all"]:
        raise InferenceError(f"the {n} shards hold {n_inputs} inputs, the run had {tmpl['shard']['n_inputs_all']}")

    summary = tmpl
    model = summary["shard"].get("model")
    summary.pop("shard")
    summary.pop("empty_shard", None)
    summary.update({"n_inputs": n_inputs, "n_processed": len(rows), "n_skipped": len(skipped), "skipped": skipped,
                    "notes": notes, **predicted_counts(rows, names)})
    if mask_problems:
        summary["mask_problems"] = mask_problems
    _merge_metrics(summary, loaded, rows, names)
    thr = [s.get("throughput") or {} for s, _, _ in loaded]
    secs = sum(t.get("seconds") or 0.0 for t in thr)
    summary["throughput"] = {"seconds": secs, "images_per_second": len(rows) / secs if secs > 0 else None,
                             "model_seconds": sum(t.get("model_seconds") or 0.0 for t in thr),
                             "note": f"summed over the {n} shards (each one's own wall clock), so images_per_second "
                                     f"is per process, not the cluster's"}
    summary["merged_from"] = [str(d) for d in dirs]
    from .summary import provenance  # the merge's own: its command line and date, the shards' model
    summary["provenance"] = provenance((summary.get("provenance") or {}).get("model_file") or "")
    _merge_dicom_out(summary, loaded)
    tiles = _merge_lowest_dice(summary, loaded, dirs, rows) if report else []
    if not report and summary.get("segmentation"):
        summary["segmentation"].pop("lowest_dice", None)
    if "outputs" in summary:
        summary["outputs"] = {**summary["outputs"], "report": "report.html (thumbnails in thumbs/)" if report else None,
                              "note": "annotated/, masks/, cams/ and dicom/ (when written) stay in the shard "
                                      "folders"}

    _write_merged(Path(out_dir), dirs, header, rows, summary, model, report, overwrite, tiles)
    return summary


def _merge_lowest_dice(summary: dict, loaded, dirs, rows: list) -> list[tuple[Path, str]]:
    """The lowest-Dice tiles of the whole run: each shard kept its own lowest WORST_DICE_N, so the lowest
    of their union are the run's (ties in input order, as a single run breaks them). Sets
    summary["segmentation"]["lowest_dice"]; returns the (shard tile, merged tile) copies to make."""
    from .thumbs import WORST_DICE_N, worst_dice_relpath
    order = {r["image_path"]: i for i, r in enumerate(rows)}
    found = [(float(w["dice"]), order.get(w["image_path"], len(order)), d, w) for d, (s, _, _) in zip(dirs, loaded)
             for w in ((s.get("segmentation") or {}).get("lowest_dice") or [])]
    found.sort(key=lambda t: (t[0], t[1]))
    if not found or not summary.get("segmentation"):
        return []
    copies, entries = [], []
    for rank, (dice, _, d, w) in enumerate(found[:WORST_DICE_N]):
        rel = worst_dice_relpath(rank)
        copies.append((Path(d) / w["tile"], rel))
        entries.append({"image_path": w["image_path"], "dice": dice, "tile": rel})
    summary["segmentation"]["lowest_dice"] = entries
    return copies


def _write_merged(out: Path, dirs, header, rows, summary, model, report: bool, overwrite: bool,
                  tiles=()) -> None:
    """Claim --out for everything the merge writes (checked before it writes), then write it."""
    from .render import write_csv_atomic
    from ..core.io_utils import write_json_atomic
    from ..core.outdir import claim_save_dir
    from .report import REPORT_NAME, write_report
    from .thumbs import gallery_thumb_relpaths, write_gallery_thumbnails
    _check_out_not_a_shard(out, dirs)
    claim = claim_save_dir(out, overwrite, flag="--out", tool="cxrkit merge")
    claim.plan(["predictions.csv", "summary.json"]  # everything the merge writes: checked before it writes
               + ([REPORT_NAME] + gallery_thumb_relpaths(rows) + [rel for _, rel in tiles] if report else []))
    claim.acquire()
    try:
        write_csv_atomic(out / "predictions.csv", header, rows)
        write_json_atomic(out / "summary.json", summary)
        if report:
            write_gallery_thumbnails(out, rows, thumb_dirs=dirs)
            for src, rel in tiles:  # a tile a shard lost is left out (the report shows "no image")
                if src.is_file():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, out / rel)
            write_report(out, summary, rows, model=model)
        claim.finish()
    finally:
        claim.release()
