"""The inference pipeline (PyTorch backend) over one split of a cached data set: model_arch.py
--evaluate's <output_dir>/test_report/, exactly as the inference CLIs write a folder."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backends import TorchBackend
from .inputs import InputItem, assign_output_stems
from .pipeline import PipelineOptions, run_pipeline
from .report import REPORT_NAME
from ..core.decode import mask_for_image

log = logging.getLogger("cxrkit")


def write_split_report(checkpoint, data, indices, save_dir, device=None, *, split_name: str = "test",
                       batch_size: int = 16, workers: int | None = None, progress: bool = True,
                       extra_inputs: dict | None = None) -> dict | None:
    """The inference pipeline (PyTorch backend) over one split of a cached data set, from its
    original image files: annotated/, thumbs/, predictions.csv, summary.json and report.html in
    save_dir, exactly as the inference CLIs write them. `data`: a CachedData (cxrkit.training.data: any object with root, paths, labels, classes); returns
    the summary, or None (with a warning) when the split is empty or its files are not reachable
    (a prebuilt cache folder given as --data_dir holds no image files)."""
    idx = [int(i) for i in np.asarray(indices).ravel()]
    if not idx:
        log.warning("the %s split is empty: no report", split_name)
        return None
    root = Path(data.root) if getattr(data, "root", "") else None
    items = []
    for i in idx:
        p = (root / data.paths[i]) if root is not None else Path(data.paths[i])
        items.append(InputItem(path=p, rel=str(data.paths[i]), true_class=data.classes[int(data.labels[i])],
                               mask_path=mask_for_image(p) if p.is_file() else None))
    if not any(it.path.is_file() for it in items):
        log.warning("no %s report: its image files are not under %s (a prebuilt cache folder holds none); "
                    "pass the data folder as --data_dir", split_name, root)
        return None
    assign_output_stems(items)
    backend = TorchBackend(checkpoint, None if device is None else str(device))
    # the folder belongs to this evaluation (like test_results/): a re-run replaces the last one's files
    inputs = {"split": split_name, "data_dir": str(root), "n_images": len(items), **(extra_inputs or {})}
    summary = run_pipeline(backend, items, save_dir, PipelineOptions(
        batch_size=batch_size, workers=workers, progress=progress, extra_summary={"inputs": inputs}, overwrite=True))
    print(f"{split_name} report: {Path(save_dir) / REPORT_NAME}", flush=True)
    return summary
