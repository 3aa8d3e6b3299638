"""Decoding strategies. Each is one step, `step(engine, states, cfg)`, over the requests still
running (one request is the one-row case); it returns each request's tokens that became final.
`decode` runs one request to its end, yielding its tokens as they become final; batching.py runs
many, refilling rows as requests finish."""

from __future__ import annotations

from typing import Iterator

from . import calm, free, full, static

STEPS = {"full": full.step, "static": static.step, "calm": calm.step, "free": free.step}


def done(state) -> bool:
    """Whether a request is finished: a stop reached and no stacked token left to settle."""
    return state.reached_stop() and not state.pending


def decode(engine, state, cfg) -> Iterator[list[int]]:
    step = STEPS[cfg.strategy]
    while not done(state):
        new = step(engine, [state], cfg)[id(state)]
        if new:
            yield new
