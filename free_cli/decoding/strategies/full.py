"""`full`: every token through all L layers: the model's own greedy decoding."""

from __future__ import annotations

import torch

from ..sampling import choose
from .rows import by_width


def step(engine, states, cfg) -> dict[int, list[int]]:
    """One token for every request: its tokens not yet fed (the prompt at first) through all
    layers, one head product for the requests' last positions."""
    L, new = engine.num_layers, {}
    for group in by_width(states):
        hidden = engine.feed(group, L)
        logits = engine.logits(None, torch.cat([h[:, -1:] for h in hidden], dim=1))[0]
        for s, row in zip(group, logits):
            token, _ = choose(row, cfg.sampling, s.generator)
            s.head_rows += engine.vocab_size
            s.append(token, L)
            new[id(s)] = s.settle()
    return new
