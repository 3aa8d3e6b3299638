"""`free`: FREE's shallow-deep module with synchronized parallel decoding (Bae, Ko, Yun, EMNLP 2023).

Every token first runs the shallow model: layers [0, L_s) and the exit head. A token whose
confidence clears λ is emitted and stacked: the deep layers [L_s, L) have not run on its position.
The next token that does not exit runs the deep layers once, in parallel, over every stacked
position plus its own (`synchronize`). The deep layers so get real keys and values for the stacked
positions instead of copied ones, and their predictions at those positions are checked against the
tokens the shallow model emitted, giving the (confidence, agreed) pairs of the threshold estimator.

The prompt is stacked too: it runs through the shallow layers first and through the deep layers
with the first synchronized pass, so with λ = 0 the deep layers never run (the shallow model
alone) and with λ above every confidence the output is the full model's.

Lossless mode (beyond the paper) accepts stacked tokens only once the deep prediction at their
position agrees. At the first disagreement it keeps the deep token, discards the rest of the stack
and rewinds every layer's cache to that position. The output then equals `full` greedy output.

A generation that ends on stacked tokens (an early-exited stop token included) is closed
deliberately: lossless mode, or `sync_at_end`, runs the deep layers over the stack, verifying it
(and resuming generation after a rejection); otherwise the stack is dropped from the shallow
layers' cache so that every layer holds the same positions.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..confidence import NEEDS_STATES, decide
from ..pruning import context_subset


def decode(engine, state, cfg) -> Iterator[list[int]]:
    L_s = cfg.exit_layer
    while not (state.reached_stop() and not state.pending):
        if state.reached_stop():  # ends on stacked tokens
            yield from close_stack(engine, state, cfg)
            continue
        subset = state.candidates  # context pruning's candidates, once a deep pass has set them
        states = [] if cfg.confidence in NEEDS_STATES else None
        hidden, logits = engine.shallow(state, L_s, subset, states)  # (1, q, d): the unfed token, or the prompt at first
        state.pending.append(hidden)
        token, conf = decide(logits, cfg.confidence, subset, engine=engine, states=states, depth=L_s, state=state)
        if conf >= cfg.threshold and not stack_full(state, cfg):
            state.append(token, L_s, conf)
            if not cfg.lossless:
                state.final = len(state.tokens)
                yield [token]
        else:
            yield from synchronize(engine, state, cfg, shallow=(token, conf))


def stacked(state) -> int:
    """Tokens emitted since the deep layers last predicted one."""
    return len(state.tokens) - max(state.deep_len + 1, state.prompt_len)


def stack_full(state, cfg) -> bool:
    return cfg.max_stack is not None and stacked(state) >= cfg.max_stack


def synchronize(engine, state, cfg, shallow: tuple[int, float] | None = None) -> Iterator[list[int]]:
    """Runs the deep layers once over every pending position and checks each stacked token against
    the deep prediction at the position before it. `shallow` is the current token's own shallow
    (token, confidence) when it did not exit; the deep prediction at its position is emitted."""
    L, start = engine.num_layers, state.deep_len
    first = max(start, state.prompt_len - 1)  # positions before it predict prompt tokens: no head
    hidden = torch.cat(state.pending, dim=1)  # (1, k, d): positions start .. fed-1 at L_s
    hidden = engine.run_layers(state, hidden, cfg.exit_layer, L, start)[:, first - start :]
    logits = engine.logits(state, hidden)[0]
    deep = logits.argmax(-1).tolist()  # deep predictions, one host sync
    state.pending.clear()
    state.deep_len = state.fed
    state.deep_passes += 1
    for p, predicted in enumerate(deep, start=first):
        if p + 1 == len(state.tokens):  # the current token: its successor comes from the deep model
            token, conf = shallow
            state.pairs.append((conf, token == predicted))
            state.append(predicted, L)
            break
        agreed = predicted == state.tokens[p + 1]
        state.pairs.append((state.confidences[p + 1 - state.prompt_len], agreed))
        if cfg.lossless and not agreed:
            rewind(engine, state, p, predicted)
            break
    if cfg.prune == "context":  # candidates from the deep distribution that gave the last token
        state.candidates = context_subset(engine.adapter.lm_head, state.tokens, state.stop_ids, logits[p - first], cfg.prune_k)
    new, state.final = state.tokens[state.final :], len(state.tokens)
    if new:
        yield new


def rewind(engine, state, p: int, token: int) -> None:
    """Lossless mode: the deep model disagrees at position p. Keep its token at p + 1, discard the
    later stacked tokens, and crop every layer's cache back to positions [0, p]."""
    state.rejected += len(state.tokens) - (p + 1)
    state.truncate(p + 1)
    state.append(token, engine.num_layers)
    engine.truncate_cache(state, p + 1)
    state.fed = state.deep_len = p + 1


def close_stack(engine, state, cfg) -> Iterator[list[int]]:
    """Generation reached a stop on stacked tokens: check them, or drop them from the cache."""
    if cfg.lossless or cfg.sync_at_end:
        yield from synchronize(engine, state, cfg)
        return
    state.pending.clear()
    engine.truncate_cache(state, state.deep_len, engine.slots_through(cfg.exit_layer))
    state.fed = state.deep_len
