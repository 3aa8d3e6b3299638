"""`static`: every token exits at the same layer; the layers after it never run."""

from __future__ import annotations

from typing import Iterator

from . import full


def decode(engine, state, cfg) -> Iterator[list[int]]:
    """The shallow model alone: layers [0, exit_layer) and the exit head, prompt included."""
    yield from full.decode(engine, state, cfg, depth=cfg.exit_layer)
