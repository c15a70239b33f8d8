"""Every default lives here, in one commented place: the model presets, the training recipe
(TrainConfig), inference (InferConfig), export (ExportConfig) and the shipped files' paths.

`ModelConfig` fully describes a network; it is stored in each checkpoint as a plain dict, so a
checkpoint rebuilds its model with no architecture flags. `PRESETS` are the variants compared in
docs/TRAINING.md's variant table; `seed` is the original specification, kept selectable.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

# Images are fed as RGB float32 in [0, 1]; normalisation with these statistics happens INSIDE the
# network (and so inside the ONNX graph); they are stored in every checkpoint and ONNX meta. 0.5/0.5
# maps [0,1] to [-1,1]: symmetric around zero, and exactly what the EfficientNet-Lite weights expect.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

# The class order of the COVID-19 Radiography Database folders (sorted). The real order of a model
# always comes from its checkpoint; this is only used by the synthetic-data generator.
DEFAULT_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

# A pixel is lung where the predicted lung probability is above this (masks, Dice / IoU, lung area,
# outlines; cxrkit.core.model_input.lung_mask applies it at any size).
LUNG_THRESHOLD = 0.5


@dataclass
class ModelConfig:
    preset: str = "seed"
    in_channels: int = 3
    num_classes: int = 4
    backbone: str = "monai_unet"  # "monai_unet" (from scratch) or "lite0" (EfficientNet-Lite0 encoder)
    pretrained: bool = False      # lite0: start the encoder from ImageNet weights (training only)
    decoder_channels: tuple = (96, 48, 32, 24)  # lite0: U-Net decoder widths at strides 16, 8, 4, 2
    # MONAI UNet backbone
    channels: tuple = (32, 64, 128, 256, 512)
    strides: tuple = (2, 2, 2, 2)
    features: int = 64            # UNet output channels = width of the full-resolution feature map
    num_res_units: int = 2
    norm: str = "batch"
    dropout: float = 0.1
    # input normalisation, applied inside the network so every caller feeds RGB in [0, 1]
    mean: tuple = DEFAULT_MEAN
    std: tuple = DEFAULT_STD
    # then, optionally, each film's own mean and spread removed (per-image z-score; issue 22's intensity
    # standardisation lever, --input_zscore): a film's exposure and processing no longer set its input range
    input_zscore: bool = False
    # issue 22 levers (b)/(e), lite0 only: the class is read from a square crop around the PREDICTED lungs by a
    # second EfficientNet-Lite0 ("crop"), optionally with everything outside the dilated predicted lungs set to
    # the crop's mean grey ("crop_mask", lungs-only input); one graph, so the ONNX export carries it
    lung_focus: str = "off"       # one of LUNG_FOCUS_MODES
    focus_margin: float = 0.10    # the crop's half-side = (1 + margin) x the lungs' larger half-extent
    focus_size: int = 0           # the crop's side in pixels (0: the input's)
    # classification head
    cls_source: str = "top"       # "top": GAP of the full-res map (seed); "multiscale": GAP of every
                                  # encoder level + bottleneck + top map, concatenated
    cls_hidden: tuple = (256, 128)
    cls_dropout: tuple = (0.5, 0.3, 0.2)
    # segmentation head: conv features -> seg_hidden (BN, ReLU) -> 1
    seg_hidden: int = 32
    # > 1: an ensemble of this many networks of this config, averaged inside the model (and so inside
    # the ONNX graph); built from trained members by `python -m cxrkit ensemble`, never trained as one
    ensemble_size: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}: checkpoint from a newer version?")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


PRESETS = {
    # the original specification: 64-channel full-resolution top, classification from it
    "seed": dict(),
    # same encoder, classification from pooled multi-scale features, thinner top and seg head
    "seed_ms": dict(features=32, cls_source="multiscale", seg_hidden=16),
    # half-width backbone, multi-scale classification
    "small": dict(channels=(16, 32, 64, 128, 256), features=16, cls_source="multiscale", seg_hidden=16),
    # quarter-width backbone
    "tiny": dict(channels=(8, 16, 32, 64, 128), features=8, cls_source="multiscale", seg_hidden=8,
                 cls_hidden=(128, 64)),
    # ImageNet-pretrained EfficientNet-Lite0 encoder + U-Net decoder of MONAI UpCat blocks; the classifier is the usual
    # dropout + linear on the encoder's pooled 1280-ch head (what ImageNet fine-tuning expects)
    "lite0": dict(backbone="lite0", pretrained=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                  cls_hidden=(), cls_dropout=(0.3,), seg_hidden=16),
}


def make_config(preset: str = "lite0", num_classes: int = 4, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown --arch '{preset}'; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update(overrides)
    return ModelConfig(preset=preset, num_classes=num_classes, **kw)


OUTSIDE_LUNG_FILLS = ("noise", "blur", "constant")
LUNG_FOCUS_MODES = ("off", "crop", "crop_mask")  # ModelConfig.lung_focus


@dataclass
class TrainConfig:
    """Training recipe defaults (model_arch.py's argparse reads its defaults from here). They are
    the shipped model's CPU recipe (README, "Train"; docs/TRAINING.md), so a bare `model_arch.py --data_dir D` reproduces it."""
    arch: str = "lite0"
    num_epochs: int = 20
    batch_size: int = 32
    img_size: int = 128           # 128 px: 37 train img/s on 2 CPU cores for lite0; 160 px costs 2x
    lr: float = 1e-3              # AdamW; cosine decay with a short linear warm-up
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    seg_weight: float = 1.0       # total = seg_weight * (Dice + BCE) + cls_weight * CE
    cls_weight: float = 2.0
    patience: int = 15            # early stopping on the validation score; 0 disables
    seed: int = 42
    workers: int = 2
    val_frac: float = 0.15
    test_frac: float = 0.15
    dup_threshold: float = 0.985  # 32-px correlation above which two images are near-duplicates
    # sources (cxrkit.training.sources): each image's source is its data root's name, plus the first
    # group of source_rule (a regex on "<root name>/<path>"); holdout_source trains without one source and
    # tests on it; balance_sources draws every source of a class equally often
    source_rule: str = ""
    holdout_source: str = ""
    balance_sources: bool = False
    grad_clip: float = 5.0
    ema_decay: float = 0.998      # weight EMA (validated and shipped); 0 disables
    # augmentation (applied to image and mask together; no horizontal flips, see data.py)
    aug_rotate_deg: float = 10.0
    aug_scale: float = 0.10
    aug_shift: float = 0.06
    aug_brightness: float = 0.10
    aug_contrast: float = 0.15
    # other sites' look (data.scanner_look): CLAHE on this share of the images, gamma in [1/(1+g), 1+g]
    aug_clahe: float = 0.0
    aug_gamma: float = 0.0
    # ... and on this share, one random intensity shift of cxrkit.training.shifts (noise, blur, sharpen,
    # JPEG, down-up sampling, contrast, gamma, burned-in text) at a random level in [0, 0.7]
    aug_shifts: float = 0.0
    # MixStyle (issue 22 lever g, cxrkit.training.mixstyle): on this share of the batches, the early
    # encoder blocks' feature statistics are mixed across films with a Beta(alpha, alpha) weight
    mixstyle: float = 0.0
    mixstyle_alpha: float = 0.1
    # outside-lung randomisation (data.outside_lung_randomise): probability per masked sample, fill,
    # and the dilation margin as a fraction of the image size (4 px at 128 px)
    outside_lung_aug: float = 0.75  # chosen by the rule in scripts/outside_lung_table.py (docs/TRAINING.md)
    outside_lung_fill: str = "noise"  # one of OUTSIDE_LUNG_FILLS
    outside_lung_margin: float = 0.03
    # fine-tuning: the pretrained encoder learns at lr * encoder_lr_mult (new decoder/heads at lr)
    encoder_lr_mult: float = 0.3
    channels_last: bool = True    # NHWC: 1.6x faster lite0 training on a 2-core Xeon (AVX-512), see docs/SPEED.md
    # k-fold cross-validation (cxrkit/cv.py): 0 = the usual train/val/test split. With folds = K, fold k
    # trains on the other K-1 folds and holds fold k out; fold "all" trains on every image. The fold
    # assignment follows fold_seed (not seed), so runs of several seeds hold out the same images.
    folds: int = 0
    fold: str = ""
    fold_seed: int = 0
    # start: ImageNet encoder weights (lite0; None = the preset's choice, resolved into the checkpoint's
    # recipe), or every weight from a checkpoint of the same config and classes (fresh optimizer)
    pretrained: bool | None = None
    init_from: str | None = None
    # distillation (issue 26 lever c, cxrkit.training.losses): the classification loss is, for this share,
    # T^2 x KL(teacher || student) at temperature T on the same augmented batch (the rest: the labels'
    # cross-entropy); the teacher is a checkpoint of the same classes and input size (an ensemble, say),
    # read without its prior correction. Segmentation still learns from the masks.
    teacher: str | None = None
    distill_alpha: float = 1.0
    distill_temperature: float = 1.0
    input_zscore: bool = False     # ModelConfig.input_zscore (issue 22 lever c)
    lung_focus: str = "off"        # ModelConfig.lung_focus, focus_margin, focus_size (issue 22 levers b, e)
    focus_margin: float = 0.10
    focus_size: int = 0
    prior_correction: bool = True  # after training: classifier bias -= log(class weight) (cxrkit.training.calibration)

    @classmethod
    def from_args(cls, ns) -> "TrainConfig":
        """The recipe from model_arch.py's parsed arguments (flags carry the field names)."""
        return _from_namespace(cls, ns)


@dataclass
class RunOptions:
    """Where and how one training run executes: not part of the recipe (never in the checkpoint)."""
    data_dir: str | list = "demo_data"  # one root or several; default: the synthetic set made by `make demo`
    output_dir: str = "."
    cache_dir: str | None = None  # None: <output_dir>/cache
    device: str = "auto"          # auto, cpu, cuda or cuda:N
    amp: str = "auto"             # auto: on for CUDA (bf16 where supported), off on CPU
    resume: bool = False
    overwrite: bool = False
    max_minutes: float = 0        # 0: no limit
    stop_after_epoch: int = 0     # tests: simulated interruption after this epoch
    quiet: bool = False

    @classmethod
    def from_args(cls, ns) -> "RunOptions":
        return _from_namespace(cls, ns)


def _from_namespace(cls, ns):
    """cls built from the namespace's attributes of its field names, and only those."""
    given = vars(ns)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------ shipped files, inference, export
DISCLAIMER = "Research use only - not for diagnosis."  # on every overlay, report and summary.json

CHECKPOINT_PATH = "model_checkpoints/best_covid_model.pth"  # the shipped checkpoint (paths relative to the repo)
ONNX_PATH = "models/covid_multitask.onnx"                   # the shipped ONNX model (+ .meta.json beside it)


@dataclass
class InferConfig:
    """Defaults of the two inference CLIs (cxrkit/inference/cli.py reads them)."""
    num_samples: int = 0          # 0 = every image; N > 0 = a random N (a quick look)
    seed: int = 42                # for --num_samples
    batch_size: int = 16          # images per model call (ONNX Runtime is at its throughput plateau by 16)
    tta: int = 1                  # views; more views: docs/FIGURES.md, "Calibration, TTA and shortcut figures"
    workers: int = min(4, os.cpu_count() or 1)  # image decoders (threads or processes)
    decode: str = "auto"          # auto: worker processes for archives of full-size films, else threads
    device: str = "auto"          # PyTorch backend: auto, cpu, cuda or cuda:N


@dataclass
class ExportConfig:
    """Defaults of export_to_onnx.py."""
    opset: int = 17               # the TorchScript exporter's; the dynamo fallback needs >= 18
    exporter: str = "auto"        # TorchScript first, torch.export-based if that fails
    device: str = "cpu"           # device the model is traced on
