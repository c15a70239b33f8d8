"""What this CPU is and which fast paths it has: the model name and instruction-set flags (Linux
/proc/cpuinfo), read once. Benchmarks print them beside every figure; the ONNX backend picks its
precision from them (cxrkit.inference.backends.choose_precision). Torch-free."""
from __future__ import annotations

import functools
import platform

# BF16 matrix work at full speed: AMX tiles (Intel Sapphire Rapids and later) or AVX-512 BF16 (also AMD
# Zen 4). Without either, OpenVINO emulates BF16 and is slower than FP32, so the fast path is off.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# the flags worth printing beside a speed figure (what the fast paths and the kernels key on)
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                  "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo, read once per process (empty where there is none: no flags known, so no fast path is
    assumed)."""
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(f)
    except OSError:
        return ()


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    for line in _cpuinfo_lines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "model name" and model in ("", platform.machine(), platform.processor()):
            model = v.strip()
        elif k in ("flags", "Features") and not flags:
            flags = frozenset(v.split())
    return model, flags


def cores_of(allowed: set) -> int | None:
    """Physical cores among the logical CPUs `allowed` (hyper-threads counted once); None where cpuinfo does
    not say which core each CPU is."""
    cores, cur, complete = set(), {}, True
    for line in list(_cpuinfo_lines()) + [""]:
        if not line.strip():
            if "processor" in cur and cur["processor"] in allowed:
                if "core id" not in cur:
                    complete = False
                cores.add((cur.get("physical id"), cur.get("core id")))
            cur = {}
            continue
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "processor" and v.isdigit():
            cur["processor"] = int(v)
        elif k in ("physical id", "core id"):
            cur[k] = v
    return len(cores) if cores and complete else None


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset:
    return _cpuinfo()[1]


def bf16_flags(flags=None) -> list[str]:
    """The BF16 flags this CPU has (empty: no fast BF16)."""
    have = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in have]


def describe() -> dict:
    """The CPU as a benchmark row or summary.json records it."""
    return {"model": cpu_model(), "flags": [f for f in REPORTED_FLAGS if f in cpu_flags()]}
