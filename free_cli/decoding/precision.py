"""The precision policy: which dtype and which matrix kernels each pass runs with.

A decoding pass is narrow (one new token: a decode step, a shallow step) or wide (a prompt, a
stack of early-exited tokens). On CPUs their best settings differ, measured on SmolLM2-135M with
2 cores (docs/benchmarks.md, "Precision"):

- oneDNN's matrix kernels pay a fixed cost per call that a one-row product does not amortize;
  ATen's own kernels run a 30-layer bf16 step in 35 ms where oneDNN takes 54 (the LM head 2.2 ms
  against 5.8), and from about four rows on oneDNN is faster. So narrow passes run with oneDNN
  off, wide ones with it on, in every precision.
- With native bf16 (AVX512-BF16 or AMX; CUDA GPUs from Ampere on) bf16 is the fastest precision
  for every pass. Without it, bf16 products with many rows are emulated and slow (a 300-token
  prefill 2.4 s against 0.6 s in fp32) while one-row steps still gain from half the bytes: wide
  passes run in fp32 and narrow ones in bf16, from two copies of the weights, with one KV cache
  kept in bf16.

- Passes of a few rows (steps, stacks, drafts to verify) run free's row kernel (kernels/) where
  bf16 is emulated or the precision is fp32: it reads each weight once per pass whatever the
  rows, where PyTorch's kernels cost about a step more per row. The mixed policy then keeps every
  pass of up to `kernels.MAX_ROWS` rows in bf16 and only prompts in fp32.

`--dtype auto` (the default) chooses by probing the device; an explicit `--dtype` runs every
pass in that precision (kernels are still chosen per pass: that changes no dtype).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import device as capability

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rows from which a pass is wide: oneDNN's kernels on, and without native bf16 fp32 instead.
ONEDNN_FROM_ROWS = 4
FP32_FROM_ROWS = 8


@dataclass(frozen=True)
class Precision:
    """Per pass: `narrow` for passes of fewer than `wide_from` rows, `wide` from there on; the
    KV cache holds `cache` whatever a pass computes in. On CPU, passes of at least `onednn_from`
    rows use oneDNN's matrix kernels and narrower ones ATen's."""

    narrow: torch.dtype
    wide: torch.dtype
    wide_from: int = FP32_FROM_ROWS
    onednn_from: int | None = ONEDNN_FROM_ROWS  # None: leave the kernel choice alone (CUDA)
    kernel_rows: int = 0  # passes of at most this many rows run free's row kernel (0: none)

    @property
    def cache(self) -> torch.dtype:
        return self.narrow

    @property
    def mixed(self) -> bool:
        return self.narrow != self.wide

    def dtype_for(self, rows: int) -> torch.dtype:
        return self.wide if rows >= self.wide_from else self.narrow

    @contextlib.contextmanager
    def kernels_for(self, rows: int):
        """oneDNN on or off for a pass of `rows` rows (CPU); restores the setting after."""
        if self.onednn_from is None:
            yield
            return
        wanted, before = rows >= self.onednn_from, torch.backends.mkldnn.enabled
        torch._C._set_mkldnn_enabled(wanted and before)  # never turns on what the user turned off
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(before)

    def describe(self) -> str:
        name = {v: k for k, v in DTYPES.items()}
        kernel = f", row kernel to {self.kernel_rows} rows" if self.kernel_rows else ""
        if not self.mixed:
            return name[self.narrow] + kernel
        return f"{name[self.narrow]} steps{kernel}, {name[self.wide]} from {self.wide_from} rows"


def same_precision(dtype: torch.dtype, device: torch.device) -> Precision:
    """Every pass in `dtype`, kernels chosen per pass on CPU."""
    if device.type != "cpu":
        return Precision(dtype, dtype, onednn_from=None)
    return Precision(dtype, dtype, onednn_from=ONEDNN_FROM_ROWS, kernel_rows=kernel_rows(dtype, device))


def kernel_rows(dtype: torch.dtype, device: torch.device) -> int:
    """The widest pass free's row kernel takes in `dtype` on `device`: on CPUs with AVX2, fp32
    passes and bf16 ones where bf16 is emulated (0 elsewhere, or where it cannot be built)."""
    from . import kernels

    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return 0
    if dtype == torch.bfloat16 and capability.native_bf16(device):
        return 0  # oneDNN's native bf16 kernels; the row kernel is not measured against them
    return kernels.MAX_ROWS if kernels.available() else 0


def resolve(name: str, device: torch.device) -> Precision:
    """The policy for `--dtype NAME` on `device`: auto probes the device's bf16 support."""
    if name == "auto":
        if capability.native_bf16(device):
            return same_precision(torch.bfloat16, device)
        if device.type == "cpu":
            rows = kernel_rows(torch.bfloat16, device)
            wide_from = rows + 1 if rows else FP32_FROM_ROWS
            return Precision(torch.bfloat16, torch.float32, wide_from=wide_from, onednn_from=ONEDNN_FROM_ROWS, kernel_rows=rows)
        return same_precision(torch.float32, device)  # GPUs without bf16
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
    return same_precision(DTYPES[name], device)
