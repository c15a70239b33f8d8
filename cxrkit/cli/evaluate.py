"""model_arch.py --evaluate: score a checkpoint on the test split of its split file (optionally after
--calibrate), write test_results/ and test_report/, and the --shortcut_check / --tta_eval reports."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..core.checkpoint import model_from_checkpoint
from ..core.device import amp_dtype_for, pick_device
from ..core.errors import DataError, UsageError
from ..core.io_utils import write_json_atomic
from ..core.tta import MAX_TTA
from ..inference.split_report import write_split_report
from ..training.data import load_data
from ..training.diagnostics import shortcut_check, tta_report
from ..training.evaluate import evaluate_checkpoint
from ..training.finalize import finalize
from ..training.split import load_or_make_split

log = logging.getLogger("cxrkit")


def evaluate_from_args(args) -> None:
    """Holds --output_dir like a run (cxrkit.core.outdir): refused while a training holds it; the earlier
    run's files are kept, and what the evaluation wrote joins its manifest, so a later --overwrite
    training removes them too (see _evaluate)."""
    from ..core.outdir import claim_save_dir
    out = Path(args.output_dir)
    claim = claim_save_dir(out, False, flag="--output_dir", tool="cxrkit evaluate", keep_earlier=True,
                           keep_flag="--evaluate")
    with claim:
        _evaluate(args)
        written = [p.relative_to(out).as_posix() for sub in ("test_results", "test_report")
                   for p in sorted((out / sub).rglob("*")) if p.is_file()]
        ck = Path(args.evaluate).resolve()
        if args.calibrate and out.resolve() in ck.parents:  # --calibrate rewrote the checkpoint
            written.append(ck.relative_to(out.resolve()).as_posix())
        claim.plan(written)
        claim.finish()


def _evaluate(args) -> None:
    """model_arch.py --evaluate: score a checkpoint on the test split of its split file (optionally
    after --calibrate), write test_results/ and test_report/, and the --shortcut_check / --tta_eval
    reports. args: model_arch.py's argparse Namespace."""
    try:
        tta_ns = [int(n) for n in args.tta_eval.split(",") if n.strip()]
    except ValueError:
        raise UsageError(f"--tta_eval {args.tta_eval!r}: give comma-separated view counts, e.g. 1,4,8") from None
    if any(not 1 <= n <= MAX_TTA for n in tta_ns):
        raise UsageError(f"--tta_eval {args.tta_eval!r}: each view count must be between 1 and {MAX_TTA}")
    device = pick_device(args.device)
    model, ck = model_from_checkpoint(args.evaluate)
    model.to(device)
    out = Path(args.output_dir)
    data = load_data(args.data_dir, ck["img_size"], Path(args.cache_dir or out / "cache"), args.workers, 0, 1,
                     not args.quiet, args.source_rule)
    if data.classes != ck["class_names"]:
        raise DataError(f"{args.data_dir} has classes {data.classes} but {args.evaluate} was trained on "
                        f"{ck['class_names']}; point --data_dir at matching class folders")
    split_p = Path(args.split_file) if args.split_file else out / "split.json"
    if not split_p.is_file():
        log.warning("%s not found: making a new split with --seed %d (it only matches the training split "
                    "if the checkpoint was trained on this data with this seed)", split_p, args.seed)
    split = load_or_make_split(data, split_p, args.val_frac, args.test_frac, args.seed, args.dup_threshold)
    if args.holdout_source:
        from ..training.sources import holdout
        split = holdout(split, data.sources, args.holdout_source)
    amp = amp_dtype_for(device, args.amp)
    res_dir = out / "test_results"
    if args.calibrate:
        finalize(args.evaluate, data, split["train"], split["val"], split["test"], res_dir, device, amp,
                 args.prior_correction)
        model, ck = model_from_checkpoint(args.evaluate)
        model.to(device)
    else:
        evaluate_checkpoint(model, ck, data, split["test"], res_dir, device, amp)
    if not args.no_report:
        # <output_dir>/test_report/report.html, beside test_results/
        write_split_report(args.evaluate, data, split["test"], out / "test_report", device,
                           progress=not args.quiet, extra_inputs={"split_file": str(split_p)})
    if (args.shortcut_check or tta_ns) and len(split["test"]) == 0:
        log.warning("the test split is empty: no shortcut check or TTA report")
        return
    if args.shortcut_check:
        r = shortcut_check(model, data, split["test"], ck["class_names"], device, res_dir / "shortcut_check.json",
                           amp_dtype=amp, ck=ck, val_idx=split["val"])
        print("shortcut check (test) accuracy | " + " | ".join(f"{k} {r[k]['accuracy']:.4f}"
                                                                for k in ("original", "lungs_only", "lungs_removed"))
              + f" | Grad-CAM mass in lungs {r['cam_mass_in_lungs']['mean']:.3f} (lung area "
                f"{r['cam_mass_in_lungs']['lung_area_share_mean']:.3f})")
    if tta_ns:
        rows = tta_report(model, data, split["test"], ck["class_names"], device, tta_ns, amp_dtype=amp)
        write_json_atomic(res_dir / "tta_report.json", {"device": str(device), "rows": rows})
        print(json.dumps(rows, indent=1))
