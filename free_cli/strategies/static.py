"""`static`: every token exits at the same layer; the layers after it never run."""

from __future__ import annotations

from typing import Iterator


def decode(engine, state, cfg) -> Iterator[list[int]]:
    """The shallow model alone: layers [0, exit_layer) and the exit there, prompt included."""
    while not state.reached_stop():
        _, logits = engine.shallow(state, cfg.exit_layer)
        token = int(logits.argmax(-1))
        state.append(token, cfg.exit_layer)
        state.final = len(state.tokens)
        yield [token]
