"""Training over processes and nodes with torch.distributed, as torchrun launches it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment): gloo on CPU, NCCL on CUDA,
the trainable module wrapped in DistributedDataParallel.

The examples are split in fixed chunks of `--batch-size` consecutive examples, and rank r owns the
chunks c with c mod N = r: it computes their cached features (exit-only) and their self targets,
and trains on them. A global micro-batch (the same indices whatever the world size) is split by
ownership, each rank's loss weighted by its share of the micro-batch's loss positions, so that the
gradients DDP averages are those of the one-process loss over the whole micro-batch. Rank 0 alone
evaluates, logs, checkpoints and exports; a checkpoint holds the global state (the same on every
rank), so a run resumes with any world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    chunk: int = 1  # examples per ownership chunk (the batch size)

    @classmethod
    def from_env(cls, chunk: int = 1, env=os.environ) -> "World":
        size = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        if not 0 <= rank < size:
            raise ConfigError(f"RANK={rank} does not lie in [0, WORLD_SIZE={size})")
        return cls(rank, size, local, chunk)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """A rank's device: its own GPU (LOCAL_RANK) when CUDA is asked for or automatic."""
        if self.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def start(self, device: torch.device) -> None:
        """Joins the process group (gloo on CPU, NCCL on CUDA), once."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def owns(self, index: int) -> bool:
        """Whether this rank owns example `index`: its chunk's number modulo the world size."""
        return (index // self.chunk) % self.size == self.rank

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as DDP trains it (itself in one process)."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
