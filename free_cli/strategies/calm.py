"""`calm`: CALM's per-token early exit (Schuster et al., 2022) with state copying.

Each token runs layer by layer; from the minimum exit layer on, the exit head's confidence is
compared with the threshold after every layer, and the first layer that clears it emits the token.
The skipped layers then get keys and values projected from the exiting layer's hidden state
(state copying), so later tokens can attend to this position at every depth. Every layer exits
through the shared final norm and LM head, as in CALM; trained exit modules are not used.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .. import confidence
from ..pruning import PER_LAYER, Subset, next_size, top
from ..sampling import choose


def threshold_at(cfg, t: int) -> float:
    """CALM's decaying threshold λ_t = clip(0.9 λ + 0.1 exp(-τ t / N), 0, 1) for the t-th
    generated token of at most N; the constant λ when no τ is set."""
    if cfg.decay_tau is None:
        return cfg.threshold
    decayed = 0.9 * cfg.threshold + 0.1 * math.exp(-cfg.decay_tau * t / cfg.max_new_tokens)
    return min(1.0, max(0.0, decayed))


def decode(engine, state, cfg) -> Iterator[list[int]]:
    L, measure = engine.num_layers, confidence.measure(cfg.confidence, engine, cfg.min_exit_layer)
    while not state.reached_stop():
        if state.fed == 0:  # the prompt runs through every layer; the first token comes from the last
            hidden = engine.feed(state, L)
            token, depth, conf = choose(engine.logits(state, hidden[:, -1:])[0, -1], cfg.sampling, state.generator)[0], L, math.nan
        else:
            token, depth, conf = step(engine, state, cfg, measure, threshold_at(cfg, len(state.generated) + 1))
        state.append(token, depth, conf)
        yield state.settle()


def step(engine, state, cfg, measure, threshold: float) -> tuple[int, int, float]:
    """One token through the layers until an exit clears `threshold` by the resolved confidence
    `measure`: (token, depth, confidence)."""
    L = engine.num_layers
    ids = torch.tensor([state.unfed()], device=engine.device)
    hidden = engine.embed(ids)  # (1, 1, d)
    ctx = engine.layer_context(state, hidden, state.fed, 0)  # state copying keeps all layers level
    state.fed += 1
    subset, pruned = None, 0  # per-layer pruning: the candidates the next exit scores
    states = [hidden] if measure.needs_states else None  # for measures that look back
    for i in range(L - 1):
        hidden = engine.run_layer(state, i, hidden, ctx)
        depth = i + 1
        if states is not None:
            states.append(hidden)
        if depth >= cfg.min_exit_layer:
            logits = engine.logits(state, hidden, subset)
            token, conf = measure(logits, state, subset, states, depth)
            if conf >= threshold:
                engine.copy_state(state, hidden, depth, L, ctx)
                if not cfg.sampling.greedy:  # drawn from this layer's distribution
                    token, _ = choose(logits[0, -1], cfg.sampling, state.generator, subset, engine.vocab_size)
                return token, depth, conf
            if cfg.prune in PER_LAYER:
                current = len(subset) if subset is not None else engine.vocab_size
                keep = top(logits, next_size(cfg.prune, cfg.prune_k, cfg.prune_floor, cfg.prune_decay, pruned, conf, current))
                subset = Subset.of(engine.adapter.lm_head, keep) if subset is None else subset.narrow(keep)
                pruned += 1
    hidden = engine.run_layer(state, L - 1, hidden, ctx)
    return choose(engine.logits(state, hidden)[0, -1], cfg.sampling, state.generator)[0], L, math.nan


def done(state) -> bool:
    return state.reached_stop()


def step_rows(engine, states, cfg) -> dict:
    """One token for every row of a batch. A row's prompt runs through every layer, alone, as one
    at a time; the other rows run layer by layer together, and each leaves the pass at the first
    layer whose exit clears its threshold (its skipped layers get copied states), so the pass
    narrows as rows exit: unlike FREE's, CALM's exits save compute inside a batch."""
    L, new = engine.num_layers, {}
    measure = confidence.measure(cfg.confidence, engine, cfg.min_exit_layer)  # per step: batches take only the exit-alone measures, free to resolve
    for s in (s for s in states if s.fed == 0):
        hidden = engine.feed_rows([s], L)[0]
        s.head_rows += engine.vocab_size
        s.append(choose(engine.logits(None, hidden[:, -1:])[0, -1], cfg.sampling, s.generator)[0], L)
        new[id(s)] = s.settle()
    active = [s for s in states if id(s) not in new]
    if not active:
        return new
    starts = [s.fed for s in active]
    hiddens = [engine.embed(torch.tensor([s.unfed()], device=engine.device)) for s in active]  # (1, 1, d) each
    for s in active:
        s.fed += 1
    for depth in range(1, L + 1):
        hiddens = engine.run_rows(active, hiddens, depth - 1, depth, starts)
        if depth < cfg.min_exit_layer:
            continue
        logits = engine.logits(None, torch.cat(hiddens, dim=1))[0]  # (b, V): one head product
        going = []
        for s, hidden, start, row_logits in zip(active, hiddens, starts, logits):
            s.head_rows += engine.vocab_size
            if depth == L:
                token, conf = choose(row_logits, cfg.sampling, s.generator)[0], math.nan
            else:
                token, conf = measure(row_logits[None, None], s)
                if conf < threshold_at(cfg, len(s.generated) + 1):
                    going.append((s, hidden, start))
                    continue
                engine.copy_rows([s], hidden, depth, L, [start])
                if not cfg.sampling.greedy:
                    token, _ = choose(row_logits, cfg.sampling, s.generator)
            s.append(token, depth, conf)
            new[id(s)] = s.settle()
        if not going:
            break
        active, hiddens, starts = (list(x) for x in zip(*going))
    return new
