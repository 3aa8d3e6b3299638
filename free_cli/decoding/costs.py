"""What decoding passes cost on this device, measured: the cost model of drafting (drafting.py)
and calibration's speed estimates are built from these figures.

`measured(engine, exit_layer)` times, once per model, precision and device, a full pass (every
layer and the head) over 1 to 16 rows after a 128-token context, a shallow step (layers
[0, L_s), the exit and its decision) and the deep layers over a stack of two; the figures are
cached on the engine and in `free`'s home (costs/), so later runs read them (about 3 s to measure).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from . import confidence
from .config import DecodeConfig
from .pruning import Subset
from ..paths import home

ROWS = (1, 2, 3, 4, 6, 8, 12, 16)  # pass widths timed; others are interpolated
CONTEXT = 128  # positions cached before the timed passes


@dataclass(frozen=True)
class StepCosts:
    """Median seconds on this device: a full step (every layer and the head); the shallow model
    with its exit decision; the deep layers and head over two positions; and, when measured, a full
    pass over r rows for r = 1, 2, ... (`rows[r - 1]`)."""

    full: float
    shallow: float
    deep: float
    rows: tuple[float, ...] = ()

    def free_speedup(self, exited: float) -> float:
        """Estimated speedup of lossy `free` over `full` when a share `exited` of tokens exits."""
        return self.full / (self.shallow + (1.0 - exited) * self.deep)

    def exit_break_even(self) -> float:
        """The share of tokens that must exit (and be kept) for the exit to pay: each token pays a
        shallow step, and each that does not exit a deep pass."""
        return max(0.0, 1.0 - (self.full - self.shallow) / self.deep)

    def relative_rows(self) -> list[float]:
        """c(r) / c(1) for r = 1 .. len(rows): the draft cost model's input."""
        return [c / self.rows[0] for c in self.rows]


def decoding_steps(engine, prompt: list[int], cfg: DecodeConfig, subset=None, positions: int = 2, rows: int = 1) -> tuple[Callable, Callable, Callable]:
    """Three decoding steps after `prompt`, each leaving the caches as it found them, to be timed:
    a full pass over `rows` rows (every layer and the head); a shallow step (layers [0, L_s), the
    exit, its head over a pruning `subset` if given (a `Subset`, or a number of head rows), and the
    exit decision); the deep layers and head over `positions` positions, as a synchronized pass
    over a stack."""
    L, L_s, measure = engine.num_layers, cfg.exit_layer, confidence.measure(cfg.confidence, engine)
    if isinstance(subset, int):
        subset = Subset.of(engine.adapter.lm_head, torch.arange(subset, device=engine.device))
    state = engine.start(prompt, replace(cfg, strategy="full"))
    with torch.inference_mode():
        hidden = engine.shallow([state], L_s).hidden  # the prompt through every slot, an exit's included
        engine.run([state], hidden, L_s, L, [0])
    n = state.fed
    block = torch.zeros(1, positions, engine.adapter.hidden_size, device=engine.device, dtype=engine.dtype)

    @torch.inference_mode()
    def full():
        state.tokens.extend([prompt[-1]] * rows)
        hidden = engine.feed([state], L)[0]
        engine.logits(state, hidden).argmax(-1).tolist()
        del state.tokens[n:]
        state.fed = n
        engine.truncate_cache(state, n, range(L))

    @torch.inference_mode()
    def shallow():
        state.tokens.append(prompt[-1])
        state.candidates = subset
        out = engine.shallow([state], L_s, collect=measure.needs_states)
        measure(out.logits[0], state, subset, out.states[0] if out.states else None, L_s)
        state.tokens.pop()
        state.fed, state.candidates = n, None
        engine.truncate_cache(state, n, engine.slots_through(L_s))

    @torch.inference_mode()
    def deep():
        hidden = engine.run([state], [block], L_s, L, [n])[0]
        engine.logits(state, hidden).argmax(-1).tolist()
        engine.truncate_cache(state, n, range(L_s, L))

    return full, shallow, deep


def median_seconds(engine, step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        engine.device_sync()
        began = time.perf_counter()
        step()
        engine.device_sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(engine, exit_layer: int, repeats: int = 7) -> StepCosts:
    """Times the steps on a synthetic context (token ids cycling through the vocabulary): every
    step once per round, in turn, so that drift of the machine hits all alike, and the median of
    `repeats` rounds. A wider pass never costs less than a narrower one (noise can say otherwise):
    the full passes' costs are made non-decreasing in the rows."""
    vocab = engine.vocab_size
    prompt = [(7 * i + 11) % vocab for i in range(CONTEXT)]
    cfg = DecodeConfig(strategy="free", max_new_tokens=1).resolved(engine.num_layers, exit_layer)
    _, shallow, deep = decoding_steps(engine, prompt, cfg)
    steps = [decoding_steps(engine, prompt, cfg, rows=r)[0] for r in ROWS] + [shallow, deep]
    for step in steps:
        step()  # warm-up
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            engine.device_sync()
            began = time.perf_counter()
            step()
            engine.device_sync()
            times[i].append(time.perf_counter() - began)
    medians = [statistics.median(t) for t in times]
    rows = list(itertools.accumulate(medians[: len(ROWS)], max))  # non-decreasing in the rows
    every = [_interpolate(rows, r) for r in range(1, ROWS[-1] + 1)]
    return StepCosts(every[0], medians[-2], medians[-1], tuple(every))


def _interpolate(timed: list[float], r: int) -> float:
    i = next(i for i, w in enumerate(ROWS) if w >= r)
    if ROWS[i] == r:
        return timed[i]
    lo, hi = ROWS[i - 1], ROWS[i]
    return timed[i - 1] + (timed[i] - timed[i - 1]) * (r - lo) / (hi - lo)


def measured(engine, exit_layer: int) -> StepCosts:
    """The engine's step costs at shallow depth `exit_layer`: from the engine, else from the cache
    file, else measured now and cached."""
    known = engine.step_costs.get(exit_layer)
    if known is not None:
        return known
    path = home() / "costs" / f"{_key(engine, exit_layer)}.json"
    try:
        data = json.loads(path.read_text())
        costs = StepCosts(data["full"], data["shallow"], data["deep"], tuple(data["rows"]))
    except (OSError, ValueError, KeyError, TypeError):
        costs = measure(engine, exit_layer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(asdict(costs)))
            os.replace(scratch, path)
        except OSError:
            pass  # a read-only home: measured again next time
    engine.step_costs[exit_layer] = costs
    return costs


def _key(engine, exit_layer: int) -> str:
    """What the figures depend on: the model and its exit, the precision policy, the device and
    this machine's CPU, the threads, torch's version."""
    shape = f"{engine.num_layers}x{engine.adapter.hidden_size}x{engine.vocab_size}"
    parts = [
        engine.store_name(exit_layer), shape, str(exit_layer), engine.precision.describe(), str(engine.device),
        platform.processor() or platform.machine(), _cpu_model(), str(torch.get_num_threads()), torch.__version__,
    ]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
