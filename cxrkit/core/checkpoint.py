"""Checkpoints are plain data (dicts, lists, numbers, strings, tensors), so
`torch.load(path, weights_only=True)` reads them; they carry everything needed to rebuild the
model: config, class names, image size, normalisation and the calibration temperature.
"""
from __future__ import annotations

import errno

from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .io_utils import atomic_path
from .model import CXRMultiTaskNet, build_model

FORMAT = "cxrkit-checkpoint-v1"


def atomic_torch_save(obj, path) -> None:
    """Write to a temp file in the same folder, then os.replace: a crash never leaves a torn file."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's writer reports a failed write (disk full) as a RuntimeError
            if isinstance(e.__cause__, OSError) or isinstance(e.__context__, OSError):
                raise (e.__cause__ or e.__context__) from None
            if "write" not in str(e).lower():
                raise
            raise OSError(errno.EIO, f"torch.save could not write the file ({' '.join(str(e).split())[:200]})",
                          str(tmp)) from None


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (DistributedDataParallel 'module.', torch.compile '_orig_mod.')."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):  # in any order: compile(DDP(m)) gives "_orig_mod.module."
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def make_checkpoint(model: torch.nn.Module | dict, cfg: ModelConfig, class_names, img_size: int, **extra) -> dict:
    """THE checkpoint layout (uncalibrated: temperature 1); `model`: the network, or its state dict
    (an ensemble's, assembled from its members'); `extra` adds or overrides entries."""
    if isinstance(model, dict):
        sd = model
    else:
        sd = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    ck = {"format": FORMAT, "model_config": cfg.to_dict(), "class_names": list(class_names),
          "img_size": int(img_size), "normalization": {"mean": list(cfg.mean), "std": list(cfg.std)},
          "temperature": 1.0, "state_dict": {k: v.detach().cpu() for k, v in clean_state_dict(sd).items()}}
    ck.update(extra)
    return ck


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with model_arch.py or pass --checkpoint)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint (an interrupted copy or download?); "
                              f"pass a file written by model_arch.py")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":  # torch's message advises weights_only=False: not for us
            raise CheckpointError(f"{path}: not a cxrkit checkpoint (torch cannot read it as plain data: corrupt, "
                                  f"or saved by another tool); pass a file written by model_arch.py") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]  # some errors have no message at all
        raise CheckpointError(f"{path}: not a readable cxrkit checkpoint (truncated, corrupt or another format; "
                              f"{type(e).__name__}{': ' + first if first else ''})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cxrkit checkpoint (no '{FORMAT}' format tag); "
                              f"retrain with model_arch.py")
    need = ("model_config", "class_names", "img_size", "state_dict")
    missing = [k for k in need if k not in ck]
    if missing or not isinstance(ck["state_dict"], dict):
        raise CheckpointError(f"{path}: incomplete cxrkit checkpoint (missing {', '.join(missing) or 'state_dict'}); "
                              f"retrain with model_arch.py")
    ck["state_dict"] = clean_state_dict(ck["state_dict"])
    return ck


def model_from_checkpoint(ck_or_path, map_location="cpu", where: str | None = None) -> tuple[CXRMultiTaskNet, dict]:
    """Rebuild the network from a checkpoint alone; returns (model in eval mode, checkpoint dict).
    where: the name errors give a checkpoint passed as a dict (default: its path, or "checkpoint")."""
    ck = load_checkpoint(ck_or_path, map_location) if not isinstance(ck_or_path, dict) else ck_or_path
    where = where or ("checkpoint" if isinstance(ck_or_path, dict) else str(ck_or_path))
    try:
        cfg = ModelConfig.from_dict(ck["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its model_config cannot be used ({type(e).__name__}: {e})") from None
    check_class_names(ck, cfg.num_classes, where)
    check_finite_weights(ck, where)
    model = build_model(cfg)
    try:
        model.load_state_dict(ck["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not match its own config ({str(e).splitlines()[0]})") from None
    if ck.get("ood"):  # the out-of-distribution gate's statistics (cxrkit.core.ood_head.fit_ood)
        from .ood_head import attach_ood
        attach_ood(model, ck["ood"])
    model.eval()
    return model, ck


def check_class_names(ck: dict, n_outputs: int, where: str = "checkpoint") -> None:
    """The class list must name every network output once, in order: a shorter list would silently
    drop a class from every prediction, a longer one invent one."""
    names = ck.get("class_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) and c for c in names):
        raise CheckpointError(f"{where}: class_names must be a list of names, got {names!r}")
    if len(names) != int(n_outputs):
        raise CheckpointError(f"{where}: lists {len(names)} class names {list(names)} but its network has "
                              f"{n_outputs} class outputs; the checkpoint was edited or is damaged: use the file "
                              f"model_arch.py wrote")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: class_names {list(names)} has duplicates")


def check_finite_weights(ck: dict, where: str = "checkpoint") -> None:
    """Every floating-point tensor of the state dict must be finite: a NaN / inf weight (a diverged
    run, a damaged file) makes every prediction NaN, which fails far from its cause."""
    for k, v in ck["state_dict"].items():
        if torch.is_tensor(v) and v.is_floating_point():
            bad = int(v.numel() - torch.isfinite(v).sum())
            if bad:
                raise CheckpointError(f"{where}: weight {k} has {bad} non-finite value(s) (NaN or inf): the training "
                                      f"diverged or the file is damaged; use another checkpoint or retrain")


def strip_for_release(ck: dict) -> dict:
    """Weights and metadata only (no optimizer / scheduler / scaler state)."""
    drop = {"optimizer", "scheduler", "scaler", "train_state_dict"}
    return {k: v for k, v in ck.items() if k not in drop}
