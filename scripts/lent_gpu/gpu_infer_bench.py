#!/usr/bin/env python
"""LENT-GPU HELPER: CUDA inference figures for a checkpoint (docs/SPEED.md "GPU"): model-only throughput at
batch 1/16/64 on the GPU against the CPU, class agreement and the largest probability difference,
then whole-process run_model_pth_inference.py on a generated folder (SYNTHETIC images: speed only).

  python scripts/lent_gpu/gpu_infer_bench.py CHECKPOINT
"""
import subprocess
import sys
import time

import torch

from cxrkit.core.checkpoint import model_from_checkpoint
from cxrkit.core.model import predict


def timed(model, x, bs, dev, reps=3):
    out = []
    with torch.no_grad():
        for s in range(0, len(x), bs):  # warm-up (cuDNN picks kernels per shape)
            predict(model, x[s:s + bs].to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = [predict(model, x[s:s + bs].to(dev))[1].float().cpu() for s in range(0, len(x), bs)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return reps * len(x) / (time.perf_counter() - t0), torch.cat(out)


def main(ck_path):
    model, ck = model_from_checkpoint(ck_path)
    s = ck["img_size"]
    x = torch.rand(256, 3, s, s, generator=torch.Generator().manual_seed(0))
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; input {s} px, fp32")
    ips_cpu, ref = timed(model, x[:64], 16, torch.device("cpu"), reps=1)
    print(f"model only | cpu (this machine's cores) batch 16 | {ips_cpu:8.1f} img/s")
    gpu = model.to("cuda")
    for bs in (1, 16, 64):
        ips, lg = timed(gpu, x, bs, torch.device("cuda"))
        pr, pc = torch.softmax(lg[:64], 1), torch.softmax(ref, 1)
        print(f"model only | cuda batch {bs:2d} | {ips:8.1f} img/s | argmax agreement with cpu "
              f"{(pr.argmax(1) == pc.argmax(1)).float().mean():.4f} | max |p_cuda - p_cpu| {(pr - pc).abs().max():.2e}")
    subprocess.run([sys.executable, "-m", "cxrkit.training.synthetic", "--out", "/tmp/syn", "--per_class", "64"],
                   check=True, stdout=subprocess.DEVNULL)
    for bs, extra in ((16, []), (64, []), (64, ["--no_report"])):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "run_model_pth_inference.py", "--checkpoint", ck_path, "--device", "cuda",
                            "--data_dir", "/tmp/syn", "--num_samples", "0", "--batch_size", str(bs), "--quiet",
                            "--workers", "8", "--save_dir", f"/tmp/gpu_inf_{bs}{''.join(extra)}", "--overwrite",
                            *extra], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        print(f"whole process run_model_pth_inference.py | cuda batch {bs} {' '.join(extra)} | 256 images "
              f"| {256 / dt:.1f} img/s ({dt:.1f} s, rc {r.returncode}) {r.stderr.strip()[-200:] if r.returncode else ''}")


if __name__ == "__main__":
    main(sys.argv[1])
