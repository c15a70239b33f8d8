"""cxrkit: multi-task chest X-ray classification + lung segmentation (research software only).

The four top-level scripts (model_arch.py, export_to_onnx.py, run_model_pth_inference.py,
run_onnx_inference.py) are thin argparse front ends over this package.
"""
__version__ = "0.4.0"
