"""The commands: one module per command, each a parser and a `main(argv) -> exit code` over the
library, all failing the same way (common.run_command). The umbrella `cxrkit COMMAND ...`
(cxrkit.cli.main) and the four top-level scripts are thin doors onto these.

    train (model_arch.py)      evaluate (model_arch.py --evaluate)    export (export_to_onnx.py)
    infer_onnx / infer_pth (run_onnx_inference.py / run_model_pth_inference.py)
    merge (shards)   cv (pool k-fold runs)   ensemble (build one)   synth (SYNTHETIC demo data)
"""
