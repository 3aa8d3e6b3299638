"""Offline threshold calibration (`free calibrate`): run the model over calibration prompts,
observe every token's shallow confidence and whether the deep model agreed, and fit a threshold
with the Beta-mixture estimator, or certify one with Learn-then-Test."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from ..decoding.config import DecodeConfig
from ..decoding.costs import StepCosts, decoding_steps, median_seconds
from ..decoding.engine import Engine
from .ltt import LttResult, learn_then_test
from ..errors import ConfigError
from ..metrics import DISTANCES, distance
from .estimator import EstimatorConfig, fit

TABLE_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
LTT_GRID = (0.99, 0.975, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class Observation:
    """What one pass over the calibration prompts saw, with no token exiting."""

    pairs: list[tuple[float, bool]]  # every generated token's (shallow confidence, agreed)
    outputs: list[str]  # the full model's outputs
    seconds: float


def observe(engine: Engine, prompts: list[list[int]], cfg: DecodeConfig, progress=None) -> Observation:
    """Lossless decoding with a threshold above every confidence: the full model's output, with a
    synchronized pass checking the shallow prediction at every token."""
    cfg = replace(cfg, strategy="free", lossless=True, threshold=math.inf)
    pairs, outputs, began = [], [], time.perf_counter()
    for prompt in prompts:
        result = engine.generate(prompt, cfg)
        pairs += result.pairs
        outputs.append(result.text)
        if progress is not None:
            progress.update(1)
    return Observation(pairs, outputs, time.perf_counter() - began)


def step_costs(engine: Engine, prompt: list[int], cfg: DecodeConfig, repeats: int = 7) -> StepCosts:
    """The step costs after a real calibration prompt."""
    return StepCosts(*(median_seconds(engine, f, repeats) for f in decoding_steps(engine, prompt, cfg)))


def threshold_table(pairs, costs: StepCosts, thresholds) -> list[dict]:
    """For each threshold: the share of tokens that would exit, how often those agree with the
    deep model, and the estimated speedup of lossy `free`."""
    conf = np.asarray([c for c, _ in pairs], dtype=float)
    agreed = np.asarray([a for _, a in pairs], dtype=bool)
    rows = []
    for t in thresholds:
        exits = conf >= t
        share = float(exits.mean()) if conf.size else 0.0
        rows.append({
            "threshold": float(t),
            "exited_share": share,
            "agreement": float(agreed[exits].mean()) if exits.any() else None,
            "estimated_speedup": costs.free_speedup(share),
        })  # fmt: skip
    return rows


def calibrate_ltt(
    engine: Engine,
    prompts: list[list[int]],
    observation: Observation,
    cfg: DecodeConfig,
    *,
    delta: float,
    epsilon: float,
    kind: str = "rougeL",
    p_value: str = "hb",
    grid=LTT_GRID,
    progress=None,
) -> LttResult:
    """Learn-then-Test over `grid`: at each threshold, lossy `free` runs on every calibration
    prompt and each output's distance from the full model's output is one loss."""

    def losses(threshold: float) -> list[float]:
        run = replace(cfg, strategy="free", lossless=False, threshold=threshold)
        values = []
        for prompt, full in zip(prompts, observation.outputs):
            values.append(distance(kind, engine.generate(prompt, run).text, full))
            if progress is not None:
                progress.update(1)
        return values

    return learn_then_test(grid, losses, delta=delta, epsilon=epsilon, p_value=p_value)


def format_table(rows: list[dict], fitted: float | None = None) -> str:
    head = f"{'threshold':>10} {'exited':>8} {'agreement':>10} {'est. speedup':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        agreement = f"{100 * r['agreement']:.1f}%" if r["agreement"] is not None else "-"
        mark = "  <- fitted" if fitted is not None and math.isclose(r["threshold"], fitted) else ""
        lines.append(
            f"{r['threshold']:>10.4f} {100 * r['exited_share']:>7.1f}% {agreement:>10} {r['estimated_speedup']:>12.2f}x{mark}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class LttOptions:
    """Learn-then-Test's settings: the tolerated mean distance δ, the allowed probability ε that
    the risk exceeds it, the per-sample distance, the p-value and the thresholds tested."""

    delta: float = 0.1
    epsilon: float = 0.05
    distance: str = "rougeL"
    p_value: str = "hb"
    grid: tuple = LTT_GRID

    @classmethod
    def parse(cls, delta: float, epsilon: float, distance: str, p_value: str, grid: str | None) -> "LttOptions":
        if distance not in DISTANCES:
            raise ConfigError(f"--distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        try:
            values = tuple(float(x) for x in grid.split(",")) if grid else LTT_GRID
        except ValueError:
            raise ConfigError(f"--grid must be comma-separated numbers, got {grid!r}") from None
        return cls(delta, epsilon, distance, p_value, values)


@dataclass
class Calibration:
    """A calibration's outcome: the threshold found (None when none), the JSON result, the store
    entry to write (None when nothing can be stored) and, then, why."""

    threshold: float | None
    result: dict
    entry: dict | None
    failure: str


def calibrate(engine: Engine, prompts, cfg: DecodeConfig, dataset: str, method: str, estimator: EstimatorConfig, ltt: LttOptions = LttOptions(), bars=None) -> Calibration:
    """`free calibrate`: observe the prompts with no token exiting, then fit FREE's Beta mixture
    (`bmm`) or certify a threshold by Learn-then-Test (`ltt`). `bars(total)` gives a progress
    context for each pass."""
    from .store import bmm_entry, ltt_entry

    bars = bars or (lambda total: contextlib.nullcontext())
    with bars(len(prompts)) as bar:
        seen = observe(engine, prompts, cfg, progress=bar)
    costs = step_costs(engine, prompts[0], cfg)
    known_as = engine.store_name(cfg.exit_layer)
    result = {"dataset": dataset, "model": known_as, "exit_layer": cfg.exit_layer, "confidence": cfg.confidence, "method": method, "pairs": len(seen.pairs)}
    if method == "bmm":
        found = fit(seen.pairs, estimator)
        result |= {"threshold": found.threshold, "fit": found.to_dict()}
        entry = bmm_entry(known_as, dataset, cfg.exit_layer, cfg.confidence, found) if found.threshold is not None else None
        why = f"the Beta-mixture fit found no threshold (status {found.status})"
    else:
        with bars(None) as bar:
            found = calibrate_ltt(engine, prompts, seen, cfg, delta=ltt.delta, epsilon=ltt.epsilon, kind=ltt.distance, p_value=ltt.p_value, grid=list(ltt.grid), progress=bar)
        result |= {"threshold": found.threshold, "ltt": found.to_dict(), "distance": ltt.distance}
        entry = ltt_entry(known_as, dataset, cfg.exit_layer, cfg.confidence, found, ltt.distance) if found.certified else None
        why = f"no threshold can be certified: at the highest threshold tested the risk bound fails (δ={ltt.delta}, ε={ltt.epsilon})"
    thresholds = sorted({*TABLE_THRESHOLDS, *([found.threshold] if found.threshold is not None else [])})
    result["table"] = threshold_table(seen.pairs, costs, thresholds)
    result["step_seconds"] = vars(costs)
    return Calibration(found.threshold, result, entry, why)
