"""What the device computes natively: the CPU's feature flags and bf16 support (the precision
policy and the row kernels decide by them)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

# /proc/cpuinfo flags of CPUs with bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & BF16_CPU_FLAGS)
    return False


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: bf16 is then taken
    as emulated, the choice that is never much slower)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()
