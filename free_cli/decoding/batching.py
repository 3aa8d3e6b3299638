"""Continuous batching: several requests decoded together, a finished request's row refilled from
the input before the next step (`free generate --batch-size B`).

The rows share one `RaggedCache`; a strategy's step (strategies/, the same step that decodes one
request) advances every row by one step in as few passes as it can (a row's prompt is fed in its
own pass, every single-token row in one), and each row keeps its own `DecodeState`: its stops,
limits, exits, drafts, stacks and rewinds are its own, so a request decodes to the tokens it would
decode to alone (exactly in fp32; in bf16 where the row kernels run every pass, and up to
near-ties where a product over several rows rounds differently from one over a single row).

FREE under batching: every row runs the shallow layers each step; the rows that did not exit run
the deep layers together, each over its own stack, while the rows that exited wait for their next
step. A row's early exit so saves the deep layers for that row in that step, and the deep pass
shrinks to the rows that need it. Under CALM the rows run layer by layer together, and a row that
exits leaves the pass (its skipped layers get copied states): the pass narrows as rows exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .cache import RaggedCache
from .config import DecodeConfig
from .engine import Engine, Generation
from ..errors import ConfigError
from .state import DecodeState
from .stats import record_stats
from .strategies import STEPS, done


def check(engine: Engine, cfg: DecodeConfig, batch_size: int) -> None:
    """Refuses, before any work, what batched decoding does not do: encoder-decoders (their
    cross-attention caches are one request's) decode one record at a time."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size > 1 and engine is not None and engine.adapter.is_encoder_decoder:
        raise ConfigError("--batch-size applies to decoder-only models; encoder-decoders decode one record at a time")


@dataclass
class _Row:
    key: object
    state: DecodeState
    cfg: DecodeConfig
    began: float


def generate_rows(engine: Engine, jobs: Iterable[tuple], batch_size: int) -> Iterator[tuple[object, Generation]]:
    """Decodes `jobs` (key, prompt ids, options[, the record id that seeds its sampling; the key
    when absent]) with up to `batch_size` rows at a time, taking the next job into a row as soon
    as one finishes. Yields (key, Generation) in the order requests finish. A job's options may
    differ from another's (a threshold that moves, say): rows step together where theirs agree."""
    cache = RaggedCache(batch_size, engine.precision.cache if engine.precision.mixed else None)
    idle, active, jobs = list(range(batch_size))[::-1], {}, iter(jobs)
    while True:
        while idle:
            job = next(jobs, None)
            if job is None:
                break
            key, prompt, cfg = job[:3]
            cfg = cfg.resolved(engine.num_layers, engine.default_exit_layer)
            row = idle.pop()
            state = engine.start(prompt, cfg, job[3] if len(job) > 3 else key, cache=cache, row=row)
            active[row] = _Row(key, state, cfg, time.perf_counter())
        if not active:
            return
        groups: dict[DecodeConfig, list[DecodeState]] = {}
        for r in active.values():
            groups.setdefault(r.cfg, []).append(r.state)
        final: dict[int, list[int]] = {}
        with torch.inference_mode():
            for cfg, states in groups.items():
                final |= STEPS[cfg.strategy](engine, states, cfg)
        engine.device_sync()
        now = time.perf_counter()
        for row, r in list(active.items()):
            if final.get(id(r.state)) and r.state.prefill_s is None:
                r.state.prefill_s = now - r.began  # its first token
            if done(r.state):
                del active[row]
                idle.append(row)
                wall = time.perf_counter() - r.began
                tokens = r.state.generated
                yield r.key, Generation(tokens, engine.decode(tokens), record_stats(engine, r.state, r.cfg, wall), r.state.pairs)
