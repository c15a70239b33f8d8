"""Batch inference: ONE pipeline, two backends (PyTorch checkpoint, ONNX Runtime model).

Modules: backends (the Backend contract; TorchBackend, OnnxBackend) · inputs (folders -> InputItems) · render (annotated
PNG, writers) · pipeline (run_pipeline) · summary · report (report.html) · shard (--shard K/N and the merge) ·
split_report. The names below are re-exported here (loaded on first use), so `from cxrkit.inference import run_pipeline` is the public API.

    model = cxrkit.load()                       # the Python API (api.py): the shipped ONNX model, wherever
    model.predict("x.png")                      # it is installed; one Prediction per image

The batch pipeline underneath:

    backend = TorchBackend("model_checkpoints/best_covid_model.pth")        # or
    backend = OnnxBackend("models/covid_multitask.onnx")                   # + <model>.onnx.meta.json
    items = gather_inputs(data_dir="DIR", class_names=backend.class_names)
    summary = run_pipeline(backend, items, "out/preds", PipelineOptions(batch_size=16, tta=1))

A backend meets the `Backend` protocol (backends.py): model_file, meta (cxrkit.core.model_meta.ModelMeta)
and its shorthands preset, class_names, img_size,
temperature and calibration_problem, lung_area_range, describe(), explainer() (Grad-CAM) and
`forward(x) -> (seg_prob (B,1,S,S), cls_logits (B,C))` on float32 numpy arrays (x: (B,3,S,S) from
`cxrkit.core.model_input.to_model_input_np`), which is what `cxrkit.core.tta.tta_predict` runs; so
preprocessing (cxrkit.core.decode), TTA, calibration (softmax(logits / T)), metrics and every output
file are shared by both backends. TorchBackend converts to / from torch on its device internally.

No torch on the ONNX path: this package imports neither torch nor MONAI (nor cxrkit.core.checkpoint /
cxrkit.core.model / cxrkit.training.export, which do) at module level. ONNX Runtime inference on a CPU (--tta 1,
no Grad-CAM) thus never loads them: importing torch alone costs ~1.5 s, nearly half of a whole
run over 48 images. TorchBackend, Grad-CAM and --tta > 1 (the warps) import torch when used.

Overlap: images are decoded by a thread pool ahead of the model (OpenCV / pydicom release the GIL
for the heavy parts), the model runs in the calling thread, and a writer thread draws and writes the
annotated PNGs / masks / Grad-CAM maps while the next batch is computed. The CSV and summary.json
are written at the end, atomically (tmp file + os.replace); so is every PNG / .npy.

Reliability: a run owns its save_dir (cxrkit.core.outdir: lock, manifest, --overwrite, per-process temp
names; outputs are never gathered as inputs), the ONNX meta must match its graph, and inputs the
model cannot judge get `quality_flags` (cxrkit.core.quality) or a plain skip reason (cxrkit.core.decode).

Research software: not for diagnosis.
"""
from __future__ import annotations

import importlib

# The public names, loaded on first use (PEP 562): importing one submodule (the report, say) does not
# load the pipeline, and `import cxrkit.inference` alone loads nothing heavy.
_EXPORTS = {
    **dict.fromkeys(["CxrkitError", "InferenceError"], "..core.errors"),
    **dict.fromkeys(["Model", "Prediction", "load"], ".api"),
    **dict.fromkeys(["Backend", "OnnxBackend", "TorchBackend", "physical_cores", "resolve_providers"], ".backends"),
    **dict.fromkeys(["GradCamExplainer"], "..core.gradcam"),
    **dict.fromkeys(["InputItem", "assign_output_stems", "gather_inputs"], ".inputs"),
    **dict.fromkeys(["PipelineOptions", "planned_outputs", "run_pipeline"], ".pipeline"),
    **dict.fromkeys(["PredictionRow"], ".rows"),
    **dict.fromkeys(["DISCLAIMER", "display_image", "normalise_cam", "render_annotation", "write_csv_atomic", "write_npy", "write_png"], ".render"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
