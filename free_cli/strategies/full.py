"""`full`: every token through all L layers: the model's own greedy decoding."""

from __future__ import annotations

from typing import Iterator


def decode(engine, state, cfg) -> Iterator[list[int]]:
    """Greedy decoding through all layers and the model's own head. The first step feeds the
    whole prompt."""
    L = engine.num_layers
    while not state.reached_stop():
        hidden = engine.feed(state, L)  # (1, q, d)
        token = int(engine.logits(state, hidden[:, -1:]).argmax(-1))
        state.append(token, L)
        state.final = len(state.tokens)
        yield [token]
