"""`static`: every token exits at the same layer; the layers after it never run."""

from __future__ import annotations

from ..sampling import choose
from .rows import by_width


def step(engine, states, cfg) -> dict[int, list[int]]:
    """One token for every request from the shallow model alone: layers [0, exit_layer) and the
    exit there, prompt included."""
    new = {}
    for group in by_width(states):
        for s, logits in zip(group, engine.shallow(group, cfg.exit_layer).logits):
            token, _ = choose(logits[0, -1], cfg.sampling, s.generator)
            s.append(token, cfg.exit_layer)
            new[id(s)] = s.settle()
    return new
