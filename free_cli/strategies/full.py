"""`full`: every token through all L layers: the model's own greedy decoding."""

from __future__ import annotations

from typing import Iterator

import torch

from ..sampling import choose
from .rows import by_width


def decode(engine, state, cfg) -> Iterator[list[int]]:
    """Greedy decoding through all layers and the model's own head. The first step feeds the
    whole prompt."""
    L = engine.num_layers
    while not state.reached_stop():
        hidden = engine.feed(state, L)  # (1, q, d)
        token, _ = choose(engine.logits(state, hidden[:, -1:])[0, -1], cfg.sampling, state.generator)
        state.append(token, L)
        yield state.settle()


def done(state) -> bool:
    return state.reached_stop()


def step_rows(engine, states, cfg) -> dict:
    """One token for every row of a batch: each row's unfed tokens through all layers, one head
    product for the rows' last positions."""
    L, new = engine.num_layers, {}
    for group in by_width(states):
        hidden = engine.feed_rows(group, L)
        logits = engine.logits(None, torch.cat([h[:, -1:] for h in hidden], dim=1))[0]
        for s, row in zip(group, logits):
            token, _ = choose(row, cfg.sampling, s.generator)
            s.head_rows += engine.vocab_size
            s.append(token, L)
            new[id(s)] = s.settle()
    return new
