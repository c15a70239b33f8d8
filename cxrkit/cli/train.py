"""Train and evaluate the multi-task chest X-ray model (classification + lung segmentation).

  python model_arch.py --data_dir DATA --num_epochs 100 --batch_size 16
  torchrun --nproc_per_node=2 model_arch.py --data_dir DATA ...          # DistributedDataParallel
  python model_arch.py --data_dir DATA --evaluate model_checkpoints/best_covid_model.pth \
      [--shortcut_check] [--tta_eval 1,4,8]

Research software: not for diagnosis.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..core.config import LUNG_FOCUS_MODES, OUTSIDE_LUNG_FILLS, PRESETS, RunOptions, TrainConfig, make_config
from ..core.io_utils import HelpFormatter
from .common import run_command

D, R = TrainConfig(), RunOptions()  # every default; the flags carry their field names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", nargs="+", default=R.data_dir, metavar="DIR",
                   help="database root(s): <Class>/images/* with <Class>/masks/*, or <Class>/*; a prebuilt cache "
                        "folder also works. Several roots train together, each image's source being its root's "
                        "name (e.g. ../shared/data/cxr4 ../shared/data/db_extra). The default is the synthetic "
                        "set made by `make demo`")
    g.add_argument("--source_rule", default=D.source_rule, metavar="REGEX",
                   help="finer sources: the first group this regex captures from '<root name>/<path>' is added to "
                        "the root's name, e.g. '^[^/]+/([^/]+)/' = one source per class folder of each root")
    g.add_argument("--holdout_source", default=D.holdout_source, metavar="NAME",
                   help="train and validate without this source's images and test on all of them (a new-hospital "
                        "proxy); the names are listed at the start of training")
    g.add_argument("--balance_sources", action="store_true", default=D.balance_sources,
                   help="draw every source of a class equally often per epoch (with replacement)")
    g.add_argument("--output_dir", default=R.output_dir, help="holds model_checkpoints/, test_results/, split.json, cache/")
    g.add_argument("--cache_dir", default=R.cache_dir, help="decoded-image cache (default: <output_dir>/cache)")
    g.add_argument("--img_size", type=int, default=D.img_size, help="square input size in pixels")
    g.add_argument("--val_frac", type=float, default=D.val_frac,
                   help="share of each class held out for validation (model selection, temperature, the gate)")
    g.add_argument("--test_frac", type=float, default=D.test_frac,
                   help="share of each class held out for the test report (never used to select anything)")
    g.add_argument("--dup_threshold", type=float, default=D.dup_threshold,
                   help="32-px thumbnail correlation above which images are near-duplicates (same split side)")
    g.add_argument("--workers", type=int, default=D.workers, help="decode processes and DataLoader workers")
    g.add_argument("--folds", type=int, default=D.folds, metavar="K",
                   help="k-fold cross-validation (0: the usual train/val/test split); with --fold")
    g.add_argument("--fold", default=D.fold, metavar="k|all",
                   help="with --folds K: train on the other folds, hold fold k out (monitored only: the last epoch "
                        "is kept) and write test_results/oof_predictions.npz; 'all' trains on every image. "
                        "Pool the folds with `python -m cxrkit cv RUN_DIR`")
    g.add_argument("--fold_seed", type=int, default=D.fold_seed,
                   help="seed of the fold assignment (kept apart from --seed so every seed holds out the same images)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=D.arch, choices=sorted(PRESETS),
                   help="model preset (see cxrkit/config.py); lite0 is the shipped one")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=D.pretrained,
                   help="lite0: start the encoder from ImageNet weights (the preset's default: yes); "
                        "--no-pretrained is the from-scratch ablation")
    g.add_argument("--input_zscore", action="store_true", default=D.input_zscore,
                   help="standardise each film inside the network (its own mean and spread removed): the intensity "
                        "standardisation lever of docs/new_hospital/levers_cross_pool.md")
    g.add_argument("--lung_focus", choices=LUNG_FOCUS_MODES, default=D.lung_focus,
                   help="lite0: classify a square crop around the predicted lungs with a second encoder (crop), and "
                        "with everything outside the predicted lungs greyed (crop_mask): issue 22's lung-ROI levers")
    g.add_argument("--focus_margin", type=float, default=D.focus_margin,
                   help="with --lung_focus: crop half-side = (1 + margin) x the lungs' larger half-extent")
    g.add_argument("--focus_size", type=int, default=D.focus_size,
                   help="with --lung_focus: crop side in pixels (0: --img_size)")
    g.add_argument("--init_from", metavar="CHECKPOINT", default=D.init_from,
                   help="fine-tune: start from this checkpoint's weights (same --arch and classes; fresh optimizer)")
    g.add_argument("--teacher", metavar="CHECKPOINT", default=D.teacher,
                   help="distil: the classifier also learns this checkpoint's class probabilities (an ensemble, say; "
                        "same classes and --img_size) on every augmented batch")
    g.add_argument("--distill_alpha", type=float, default=D.distill_alpha, metavar="A",
                   help="with --teacher: share of the classification loss that matches the teacher (rest: the labels)")
    g.add_argument("--distill_temperature", type=float, default=D.distill_temperature, metavar="T",
                   help="with --teacher: both sides' probabilities at temperature T (loss scaled by T^2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_epochs", type=int, default=D.num_epochs)
    g.add_argument("--batch_size", type=int, default=D.batch_size, help="per process")
    g.add_argument("--lr", type=float, default=D.lr, help="AdamW peak learning rate (cosine schedule)")
    g.add_argument("--encoder_lr_mult", type=float, default=D.encoder_lr_mult,
                   help="a pretrained encoder learns at lr x this (decoder and heads at lr)")
    g.add_argument("--weight_decay", type=float, default=D.weight_decay)
    g.add_argument("--warmup_epochs", type=int, default=D.warmup_epochs)
    g.add_argument("--seg_weight", type=float, default=D.seg_weight, help="weight of Dice + BCE")
    g.add_argument("--cls_weight", type=float, default=D.cls_weight, help="weight of class-weighted CE")
    g.add_argument("--grad_clip", type=float, default=D.grad_clip)
    g.add_argument("--prior_correction", action=argparse.BooleanOptionalAction, default=D.prior_correction,
                   help="after training, offset the classifier bias by -log(class weight) so probabilities follow "
                        "the training prior again (undoes the loss's class weighting at inference)")
    g.add_argument("--ema_decay", type=float, default=D.ema_decay,
                   help="EMA of weights, validated and shipped (0: off); warm-up min(d, (1+t)/(10+t))")
    g.add_argument("--patience", type=int, default=D.patience, help="early-stopping patience in epochs (0: off)")
    g.add_argument("--seed", type=int, default=D.seed, help="split, shuffling, augmentation and init")
    g = p.add_argument_group("augmentation (image and mask together; never flipped)")
    for k in ("aug_rotate_deg", "aug_scale", "aug_shift", "aug_brightness", "aug_contrast"):
        g.add_argument(f"--{k}", type=float, default=getattr(D, k))
    g.add_argument("--aug_clahe", type=float, default=D.aug_clahe, metavar="P",
                   help="probability per training image of CLAHE (another site's contrast processing; 0: off)")
    g.add_argument("--aug_gamma", type=float, default=D.aug_gamma, metavar="G",
                   help="random gamma in [1/(1+G), 1+G] per training image (exposure, detector curve; 0: off)")
    g.add_argument("--aug_shifts", type=float, default=D.aug_shifts, metavar="P",
                   help="probability per training image of one random scanner-like intensity shift (noise, blur, "
                        "sharpen, JPEG, down-up sampling, contrast, gamma, burned-in text; level up to 0.7; 0: off)")
    g.add_argument("--mixstyle", type=float, default=D.mixstyle, metavar="P",
                   help="probability per training batch of MixStyle: the early encoder blocks' per-channel feature "
                        "statistics mixed across films, so a source's look stops being a cue (0: off)")
    g.add_argument("--mixstyle_alpha", type=float, default=D.mixstyle_alpha, metavar="A",
                   help="with --mixstyle: the mixing weight is drawn from Beta(A, A)")
    g.add_argument("--outside_lung_aug", type=float, default=D.outside_lung_aug, metavar="P",
                   help="probability per masked training image of replacing everything outside the (dilated) lung "
                        "mask by --outside_lung_fill: pushes the classifier towards lung content (0: off)")
    g.add_argument("--outside_lung_fill", default=D.outside_lung_fill, choices=OUTSIDE_LUNG_FILLS,
                   help="noise: the image's own mean/std; blur: heavy box blur; constant: the image's mean")
    g.add_argument("--outside_lung_margin", type=float, default=D.outside_lung_margin,
                   help="lung-mask dilation as a fraction of the image size")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=R.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=D.channels_last,
                   help="NHWC memory format (lite0 trains 1.6x faster on a 2-core Xeon; measure on other CPUs)")
    g.add_argument("--amp", default=R.amp, choices=["auto", "on", "off"],
                   help="mixed precision; auto = on for CUDA (bf16 where supported), off on CPU")
    g.add_argument("--resume", action="store_true", help="continue from <output_dir>/model_checkpoints/last_checkpoint.pth")
    g.add_argument("--overwrite", action="store_true",
                   help="allow replacing an existing <output_dir>/model_checkpoints/best_covid_model.pth")
    g.add_argument("--max_minutes", type=float, default=R.max_minutes, help="stop cleanly after this much training (0: no limit)")
    g.add_argument("--stop_after_epoch", type=int, default=R.stop_after_epoch, help=argparse.SUPPRESS)  # tests: simulated interrupt
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("evaluation only")
    g.add_argument("--evaluate", metavar="CHECKPOINT", default=None,
                   help="skip training: evaluate CHECKPOINT on the test split of <output_dir>/split.json "
                        "(<output_dir>/test_results/, and test_report/report.html with the annotated images)")
    g.add_argument("--shortcut_check", action="store_true",
                   help="with --evaluate: also classify with lungs only / lungs removed (test_results/shortcut_check.json)")
    g.add_argument("--split_file", default=None, help="with --evaluate: split JSON to use (default <output_dir>/split.json)")
    g.add_argument("--calibrate", action="store_true",
                   help="with --evaluate: (re)fit the prior correction and temperature on the validation split and "
                        "write them into CHECKPOINT (atomically) before evaluating")
    g.add_argument("--no_report", action="store_true",
                   help="with --evaluate: skip <output_dir>/test_report/ (the HTML report with annotated test images)")
    g.add_argument("--tta_eval", default="", help="with --evaluate: comma list of TTA view counts to compare, e.g. 1,4,8")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Flag values that would fail later with a traceback, or do nothing at all, refused up front (UsageError)."""
    from ..core.errors import UsageError
    from ..core.io_utils import MAX_BATCH_SIZE
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch_size must be between 1 and {MAX_BATCH_SIZE}, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0 = decode and load in the main process), got {args.workers}")
    if args.evaluate:
        return
    if args.num_epochs < 1:
        raise UsageError(f"--num_epochs {args.num_epochs}: nothing would be trained or written; give 1 or more")
    if args.folds or args.fold:  # k-fold flags, checked before the data is read (training.train.load_split too)
        from ..training.cv import parse_fold
        if not args.folds:
            raise UsageError(f"--fold {args.fold} needs --folds K (the number of folds)")
        try:
            parse_fold(str(args.fold), args.folds)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not 0 <= args.mixstyle <= 1:
        raise UsageError(f"--mixstyle is a probability per batch, between 0 and 1; got {args.mixstyle}")
    if args.mixstyle > 0 and args.mixstyle_alpha <= 0:
        raise UsageError(f"--mixstyle_alpha must be > 0 (the Beta(A, A) mixing weight), got {args.mixstyle_alpha}")
    if not 0 <= args.distill_alpha <= 1:
        raise UsageError(f"--distill_alpha is a share of the classification loss, between 0 and 1; got {args.distill_alpha}")
    if not (math.isfinite(args.distill_temperature) and args.distill_temperature > 0):
        raise UsageError(f"--distill_temperature must be a number > 0, got {args.distill_temperature}")
    if not args.teacher and (args.distill_alpha, args.distill_temperature) != (D.distill_alpha, D.distill_temperature):
        raise UsageError("--distill_alpha and --distill_temperature need --teacher CHECKPOINT (the model to distil from)")
    if args.teacher and not Path(args.teacher).is_file():
        raise UsageError(f"--teacher {args.teacher}: no such file; pass a cxrkit checkpoint (.pth)")
    from ..core.model import check_img_size
    check_img_size(make_config(args.arch), args.img_size)  # the one size rule (also export's)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        check_args(args)
        if args.evaluate:
            from .evaluate import evaluate_from_args
            evaluate_from_args(args)
        else:
            from ..training.train import train
            train(TrainConfig.from_args(args), RunOptions.from_args(args))

    return run_command(body, interrupted="interrupted: the last completed epoch is saved; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
