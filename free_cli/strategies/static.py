"""`static`: every token exits at the same layer; the layers after it never run."""

from __future__ import annotations

from typing import Iterator

from ..sampling import choose
from .rows import by_width


def decode(engine, state, cfg) -> Iterator[list[int]]:
    """The shallow model alone: layers [0, exit_layer) and the exit there, prompt included."""
    while not state.reached_stop():
        _, logits = engine.shallow(state, cfg.exit_layer)
        token, _ = choose(logits[0, -1], cfg.sampling, state.generator)
        state.append(token, cfg.exit_layer)
        yield state.settle()


def done(state) -> bool:
    return state.reached_stop()


def step_rows(engine, states, cfg) -> dict:
    """One token for every row of a batch from the shallow model alone."""
    new = {}
    for group in by_width(states):
        _, logits = engine.shallow_rows(group, cfg.exit_layer)
        for s, row_logits in zip(group, logits):
            token, _ = choose(row_logits[0, -1], cfg.sampling, s.generator)
            s.append(token, cfg.exit_layer)
            new[id(s)] = s.settle()
    return new
