"""`full`: every token through all L layers: the model's own greedy decoding."""

from __future__ import annotations

from typing import Iterator


def decode(engine, state, cfg, depth: int | None = None) -> Iterator[list[int]]:
    """Greedy decoding through layers [0, depth) and the head at `depth` (all L layers and the
    model's own head by default). The first step feeds the whole prompt."""
    depth = depth or engine.num_layers
    while not state.reached_stop():
        hidden = engine.feed(state, depth)  # (1, q, d)
        token = int(engine.logits_at(hidden[:, -1:], depth).argmax(-1))
        state.append(token, depth)
        state.final = len(state.tokens)
        yield [token]
