"""cxrkit: multi-task chest X-ray classification + lung segmentation (research software only).

The four top-level scripts (model_arch.py, export_to_onnx.py, run_model_pth_inference.py,
run_onnx_inference.py) are thin argparse front ends over this package. From Python:

    import cxrkit
    model = cxrkit.load()              # the shipped ONNX model (cxrkit.inference.api)
    print(model.predict("x.png"))      # class, calibrated probabilities, flags, lung mask
"""
__version__ = "0.4.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    """`cxrkit.load` on first use (PEP 562): `import cxrkit` alone loads nothing heavy."""
    if name == "load":
        from .inference.api import load
        globals()["load"] = load
        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
