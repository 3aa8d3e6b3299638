"""free's CPU kernels for passes of few rows (rows.cpp), built once per machine, and the layers
that use them.

On CPUs without native bf16, PyTorch multiplies a few rows by a bf16 matrix at about 12 ms per row
on SmolLM2-135M (emulated bf16 products), and its fp32 kernels for 2-16 rows read the weights at a
third of the memory's speed: a pass over a stack of k tokens then costs 1.5-3x a one-token step.
The linear kernel reads each weight once per pass for up to eight rows at a time, so such a pass
costs little more than one row. The attention kernel attends each query row alone. Both compute
every row to the bits it would have alone, so a verification pass over k tokens reproduces k
single steps exactly, in bf16 too (SDPA does not: it lays out one query and several differently;
docs/benchmarks.md, "The row kernels").

It is compiled on first use with the machine's C++ compiler through `torch.utils.cpp_extension`
(about a minute, once; cached under torch's extensions directory, `TORCH_EXTENSIONS_DIR`). Where it
cannot be (no compiler, not an x86 CPU with AVX2 and FMA, `FREE_KERNELS=aten`), linear layers run
PyTorch's own kernels, with one notice on stderr.

Processes that start at once (a torchrun job, test workers) build it once: one builds, the others
wait. torch's own guard is a lock file that a process killed mid-build leaves behind, and every
later process would wait on it forever; so the build runs under an OS lock (`build_lock`), which
dies with its holder, and a lock file found under it is such a leftover and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor, nn

from .. import device

SOURCE = Path(__file__).with_name("rows.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
CPU_FLAGS = frozenset({"avx2", "fma"})
# Passes of up to this many rows run the kernel (wider ones: prompts, through PyTorch's GEMMs,
# which win from about here on; docs/benchmarks.md).
MAX_ROWS = 32


def enabled() -> bool:
    """Whether the kernel may be used: `FREE_KERNELS` is not `aten` and the CPU has AVX2 and FMA."""
    if os.environ.get("FREE_KERNELS", "auto") == "aten":
        return False
    return CPU_FLAGS <= device.cpu_flags()


@lru_cache(maxsize=1)
def extension():
    """The compiled kernel, or None where it cannot be had (said once on stderr)."""
    if not enabled():
        return None
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    name = f"free_rows_{digest}"
    bin_dir = str(Path(sys.executable).parent)  # the environment's ninja, active or not
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    build = Path(root) / name
    if not any(build.glob(f"{name}*.so")):
        print("free: building the row kernel for this CPU (once, about a minute)", file=sys.stderr, flush=True)
    try:
        build.mkdir(parents=True, exist_ok=True)
        with build_lock(build):
            return cpp_extension.load(
                name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False
            )
    except Exception as e:  # no compiler or ninja, a failed build: PyTorch's kernels do the work
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"free: the row kernel could not be built ({first}); passes use PyTorch's kernels", file=sys.stderr)
        return None


@contextlib.contextmanager
def build_lock(build: Path):
    """Hold the build folder's OS lock (one process at a time; released when its holder exits,
    killed or not). Under it no other process of ours is building, so torch's lock file, if there
    is one, was left by a process killed while it built: it is removed, or torch would wait on it
    forever."""
    with FileLock(build / "free.lock"):
        (build / "lock").unlink(missing_ok=True)  # torch.utils.cpp_extension's FileBaton
        yield


def available() -> bool:
    return enabled() and extension() is not None


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight.T (+ bias) through the kernel: weight (N, K) contiguous, bf16 or fp32,
    x in its dtype; (..., N) in that dtype."""
    return extension().linear_rows(x, weight, bias)


_bypassed = False


@contextlib.contextmanager
def bypassed():
    """Every layer runs PyTorch's own kernels inside (transformers' `generate` as a baseline)."""
    global _bypassed
    before, _bypassed = _bypassed, True
    try:
        yield
    finally:
        _bypassed = before


class RowsLinear(nn.Linear):
    """An `nn.Linear` whose passes of at most `max_rows` rows run the row kernel (CPU inference);
    anything else (more rows, gradients, another dtype or device) runs `F.linear`."""

    max_rows: int = MAX_ROWS

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            not _bypassed
            and x.numel() <= self.max_rows * self.in_features
            and x.dtype == w.dtype
            and w.dtype in (torch.bfloat16, torch.float32)
            and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return linear_rows(x, w if w.is_contiguous() else w.contiguous(), self.bias)
        return nn.functional.linear(x, w, self.bias)


ATTENTION = "free_rows"  # the name of the attention function in transformers' registry


def attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function interface: queries (b, h, q, d), keys and values
    (b, h_kv, T, d) -> ((b, q, h, d), None). Passes of at most `module.free_max_rows` query rows
    with a boolean mask (or one row and none) run the attention kernel; anything else, and every
    option it does not take (dropout, soft-capping, sinks, weights returned), transformers' SDPA."""
    plain = dropout == 0.0 and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    rows = query.shape[2]
    mask_ok = (attention_mask is None and rows == 1) or (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.stride(-1) == 1)
    if (
        not _bypassed
        and plain
        and mask_ok
        and rows <= getattr(module, "free_max_rows", 0)
        and query.dtype in (torch.bfloat16, torch.float32)
        and query.device.type == "cpu"
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and not kwargs.get("output_attentions", False)
        and not (torch.is_grad_enabled() and query.requires_grad)
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return extension().attention_rows(query, key.to(query.dtype), value.to(query.dtype), attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@lru_cache(maxsize=1)
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # wider passes build SDPA's masks


def route(module: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Lets passes of up to `max_rows` rows through `module` run the kernels: every plain
    `nn.Linear`, and the self-attention of decoder layers that take transformers' attention
    functions (those with `q_proj`; the modules stay in place, with their parameters). Returns how
    many modules now do; a no-op where the kernels are not available."""
    if not available():
        return 0
    _register()
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear or type(m) is RowsLinear:
            m.__class__, m.max_rows = RowsLinear, max_rows
            count += 1
        elif hasattr(m, "q_proj") and hasattr(getattr(m, "config", None), "_attn_implementation"):
            m.free_max_rows = max_rows
            m.config._attn_implementation = ATTENTION
            count += 1
    return count
