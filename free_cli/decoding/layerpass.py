"""CALM's pass: one new position of each request through the layers one at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import RaggedCache
from .state import DecodeState


class LayerPass:
    """CALM's pass: one new position of each request through the layers one at a time, with the
    pass's context (masks, positions) built once; a row that exits leaves it (`keep`), which
    narrows the context by index, and gets the layers it skips copied (`copy`)."""

    def __init__(self, engine, states: list[DecodeState], hidden: Tensor, starts: list[int]):
        self.engine, self.states, self.starts = engine, list(states), list(starts)
        self.own = len(states) == 1 and not isinstance(states[0].cache, RaggedCache)
        self.cache = states[0].cache
        adapter = engine.adapter_of(hidden)
        if self.own:
            self.ctx = adapter.layer_context(hidden, starts[0], self.cache, 0, states[0].request)
        else:
            self.ctx = adapter.ragged_context(hidden, starts, 0)

    def _begin(self) -> None:
        if not self.own:
            self.cache.begin_pass([s.row for s in self.states], self.starts)

    def run(self, i: int, hidden: Tensor) -> Tensor:
        """Layer i over the rows still in the pass: (b, 1, d) -> (b, 1, d)."""
        self._begin()
        with self.engine.precision.kernels_for(hidden.shape[0]):
            return self.engine.adapter_of(hidden).run_layer(i, hidden, self.ctx, self.cache)

    def copy(self, index: list[int], hidden: Tensor, start: int, stop: int) -> None:
        """CALM's state copying for the rows at `index` (of those in the pass), whose states
        `hidden` (n, 1, d) exit after layer `start`: layers [start, stop) get keys and values
        projected from them."""
        sub = self.narrowed(index)
        sub._begin()
        adapter = self.engine.adapter_of(hidden)
        with self.engine.precision.kernels_for(hidden.shape[0]):
            for i in range(start, stop):
                adapter.project_kv(i, hidden, sub.ctx, self.cache)

    def keep(self, index: list[int]) -> None:
        """Only the rows at `index` go on."""
        narrowed = self.narrowed(index)
        self.states, self.starts, self.ctx = narrowed.states, narrowed.starts, narrowed.ctx

    def narrowed(self, index: list[int]) -> "LayerPass":
        if index == list(range(len(self.states))):
            return self
        sub = object.__new__(LayerPass)
        sub.engine, sub.own, sub.cache = self.engine, self.own, self.cache
        sub.states, sub.starts = [self.states[i] for i in index], [self.starts[i] for i in index]
        picks = torch.tensor(index, device=self.engine.device)
        sub.ctx = self.ctx.rows(picks, max(sub.starts) + 1)
        return sub
