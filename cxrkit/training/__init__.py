"""Training: data and splits, the training loop, finishing (calibration, gate), evaluation and
studies, cross-validation, the ensemble builder, export to ONNX, the synthetic demo data.

Imports only cxrkit.core (tests/core/test_layers.py enforces it); the commands that drive it are in
cxrkit.cli.
"""
