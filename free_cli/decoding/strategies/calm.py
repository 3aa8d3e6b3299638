"""`calm`: CALM's per-token early exit (Schuster et al., 2022) with state copying.

Each token runs layer by layer; from the minimum exit layer on, the exit head's confidence is
compared with the threshold after every layer, and the first layer that clears it emits the token.
The skipped layers then get keys and values projected from the exiting layer's hidden state
(state copying), so later tokens can attend to this position at every depth. Every layer exits
through the shared final norm and LM head, as in CALM; trained exit modules are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import confidence
from ..pruning import PER_LAYER, Subset, next_size, top
from ..sampling import choose
from .full import step as full_step


def threshold_at(cfg, t: int) -> float:
    """CALM's decaying threshold λ_t = clip(0.9 λ + 0.1 exp(-τ t / N), 0, 1) for the t-th
    generated token of at most N; the constant λ when no τ is set."""
    if cfg.decay_tau is None:
        return cfg.threshold
    decayed = 0.9 * cfg.threshold + 0.1 * math.exp(-cfg.decay_tau * t / cfg.max_new_tokens)
    return min(1.0, max(0.0, decayed))


def step(engine, states, cfg) -> dict[int, list[int]]:
    """One token for every request. A request's prompt runs through every layer and its first
    token comes from the last (`full`'s step). The others' new tokens run layer by layer together
    over a context built once: from the minimum exit layer on, each layer's exit scores every row
    still in the pass (one head product, one host sync), and a row whose confidence clears its
    threshold emits its token there, gets keys and values copied into the layers it skips, and
    leaves the pass, which narrows as rows exit."""
    L = engine.num_layers
    first = [s for s in states if s.fed == 0]
    new = full_step(engine, first, cfg) if first else {}
    active = [s for s in states if s.fed > 0 and id(s) not in new]
    if not active:
        return new
    measure = confidence.measure(cfg.confidence, engine, cfg.min_exit_layer)
    starts = [s.fed for s in active]
    hidden = engine.embed(torch.tensor([[s.tokens[s.fed]] for s in active], device=engine.device))  # (b, 1, d)
    for s in active:
        s.fed += 1
    layers = engine.layers(active, hidden, starts)
    rows = [Row(s, hidden[i : i + 1]) for i, s in enumerate(active)]
    for depth in range(1, L + 1):
        hidden = layers.run(depth - 1, hidden)
        for i, r in enumerate(rows):
            r.record(hidden[i : i + 1], measure)
        if depth == L:  # the last layer: the model's own head for every row left
            for r, row_logits in zip(rows, head(engine, rows, hidden, pruned=False)):
                r.state.append(choose(row_logits[0, -1], cfg.sampling, r.state.generator)[0], L)
                new[id(r.state)] = r.state.settle()
            break
        if depth < cfg.min_exit_layer:
            continue
        logits = head(engine, rows, hidden)
        verdicts = measure.many([(row_logits, r.state, r.subset, r.states, depth) for r, row_logits in zip(rows, logits)])
        going, leaving = [], []
        for i, (r, row_logits, (token, conf)) in enumerate(zip(rows, logits, verdicts)):
            if conf < threshold_at(cfg, len(r.state.generated) + 1):
                r.narrow(cfg, engine, row_logits, conf)
                going.append(i)
                continue
            if not cfg.sampling.greedy:  # drawn from this layer's distribution
                token, _ = choose(row_logits[0, -1], cfg.sampling, r.state.generator, r.subset, engine.vocab_size)
            r.state.append(token, depth, conf)
            new[id(r.state)] = r.state.settle()
            leaving.append(i)
        if leaving:  # state copying: the layers they skip get keys and values from their state here
            layers.copy(leaving, hidden[leaving], depth, L)
        if not going:
            break
        layers.keep(going)
        hidden, rows = hidden[going], [rows[i] for i in going]
    return new


@dataclass
class Row:
    """A request in CALM's layer-by-layer pass: the candidates its next exit scores (per-layer
    pruning), how often they were narrowed, and the states its measure looks back at."""

    state: object
    embedded: Tensor
    subset: Subset | None = None
    pruned: int = 0
    states: list | None = None

    def record(self, hidden: Tensor, measure) -> None:
        """Keeps this layer's state for measures that look back (saturation, contrast, meta)."""
        if measure.needs_states:
            self.states = self.states or [self.embedded]
            self.states.append(hidden)

    def narrow(self, cfg, engine, logits: Tensor, conf: float) -> None:
        """Per-layer pruning: the candidates the next exit scores."""
        if cfg.prune not in PER_LAYER:
            return
        current = len(self.subset) if self.subset is not None else engine.vocab_size
        keep = top(logits, next_size(cfg.prune, cfg.prune_k, cfg.prune_floor, cfg.prune_decay, self.pruned, conf, current))
        self.subset = Subset.of(engine.adapter.lm_head, keep) if self.subset is None else self.subset.narrow(keep)
        self.pruned += 1


def head(engine, rows: list[Row], hidden: Tensor, pruned: bool = True) -> list[Tensor]:
    """Each row's exit logits (1, 1, V), or over its pruning subset (unless not `pruned`): one
    head product while no row has a subset."""
    if not pruned or all(r.subset is None for r in rows):
        logits = engine.logits(None, hidden.transpose(0, 1))[0]  # (b, V)
        for r in rows:
            r.state.head_rows += engine.vocab_size
        return [row[None, None] for row in logits]
    return [engine.logits(r.state, hidden[i : i + 1], r.subset) for i, r in enumerate(rows)]
