"""The core: what both wings stand on (config, errors, files and folders, decoding and the model's
input, the network and its checkpoint, metrics, TTA, quality checks and the gate, Grad-CAM).

Imports neither cxrkit.training nor cxrkit.inference (tests/core/test_layers.py enforces it), and
nothing here imports torch at module level except model / encoders / ood_head / checkpoint, which
the ONNX path never loads.
"""
