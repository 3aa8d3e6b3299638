"""The accept, exit and reject logic of `free` and `calm`, driven through the real engine by a stub
model with fixed logits per position (stub.py), against expectations worked out by hand.

Throughout, L = 4 and L_s = 2; a table's k-th entry is what that exit predicts for the k-th new
token, an int being that token at probability 0.99 and None uniform logits (token 0, 1/16)."""

from __future__ import annotations

import math

import pytest

from stub import EOS, PROMPT, V, cached, decode, stub_engine

L, L_s = 4, 2
DEEP = [10, 11, 12, 13, 14, 15]
# Confident and right for the first three tokens, confident and wrong (9, not 13) for the fourth,
# unsure for the fifth, confident and right for the sixth.
SHALLOW = [10, 11, 12, 9, (4, 0.3), 15]


def free(tables, **options):
    engine = stub_engine(tables, L)
    state = decode(engine, **{"strategy": "free", "exit_layer": L_s, "threshold": 0.9, "max_new_tokens": 6, "prune": "none", "draft": "exit", **options})
    return engine, state


def pairs(state):
    return [(round(c, 4), agreed) for c, agreed in state.pairs]


def test_lossless_rejects_the_first_contradicted_token_and_resumes():
    """Tokens 1-4 stack; the fifth is unsure, so one deep pass checks the stack: 1-3 agree, the
    fourth is replaced by the deep token and the unsure fifth is dropped with it. The fifth then
    comes from the deep layers (a second pass), the sixth stacks and the pass that closes the
    generation accepts it."""
    engine, state = free({L_s: SHALLOW, L: DEEP}, lossless=True)
    assert state.generated == DEEP
    assert state.rejected == 1 and state.deep_passes == 3
    assert state.depths == [L_s, L_s, L_s, L, L, L_s]
    assert pairs(state) == [(0.99, True)] * 3 + [(0.99, False), (0.3, False), (0.99, True)]
    assert cached(engine, state) == [PROMPT + DEEP[:5]] * L  # every layer, the rejected positions cropped


@pytest.mark.parametrize("sync_at_end", [False, True])
def test_lossy_keeps_the_shallow_tokens(sync_at_end):
    """Without lossless mode the wrong fourth token stays; the unsure fifth comes from the one deep
    pass. The trailing stack (the sixth) is dropped from the shallow layers' cache, or with
    `sync_at_end` checked by a last deep pass."""
    engine, state = free({L_s: SHALLOW, L: DEEP}, sync_at_end=sync_at_end)
    assert state.generated == [10, 11, 12, 9, 14, 15]
    assert state.rejected == 0 and state.deep_passes == 1 + sync_at_end
    assert state.depths == [L_s, L_s, L_s, L_s, L, L_s]
    assert pairs(state) == [(0.99, True)] * 3 + [(0.99, False), (0.3, False)] + [(0.99, True)] * sync_at_end
    assert cached(engine, state) == [PROMPT + state.generated[: 4 + sync_at_end]] * L


def test_threshold_extremes():
    """λ above every confidence: the deep model's tokens, one deep pass each, every shallow
    prediction checked. λ = 0: the shallow model's tokens and no deep pass."""
    _, never = free({L_s: SHALLOW, L: DEEP}, threshold=1.01)
    assert never.generated == DEEP and never.deep_passes == 6 and never.depths == [L] * 6
    assert pairs(never) == [(0.99, True)] * 3 + [(0.99, False), (0.3, False), (0.99, True)]
    _, always = free({L_s: SHALLOW, L: DEEP}, threshold=0.0)
    assert always.generated == [10, 11, 12, 9, 4, 15] and always.deep_passes == 0 and always.depths == [L_s] * 6
    assert always.pairs == []


def test_max_stack_forces_a_synchronized_pass():
    """With at most two stacked tokens the third and sixth run the deep layers although confident,
    and the deep token replaces their wrong shallow one."""
    engine, state = free({L_s: [10, 11, 9, 13, 14, 9], L: DEEP}, max_stack=2)
    assert state.generated == DEEP
    assert state.deep_passes == 2 and state.depths == [L_s, L_s, L, L_s, L_s, L]
    assert pairs(state) == [(0.99, True), (0.99, True), (0.99, False)] * 2
    assert cached(engine, state) == [PROMPT + DEEP[:5]] * L


def test_an_early_exited_stop_token():
    """The shallow model stops after two tokens. Lossy, generation ends there; lossless, the deep
    model rejects the stop token, generation resumes and ends at the deep model's own stop."""
    deep = [10, 11, 12, 13, EOS]
    _, lossy = free({L_s: [10, 11, EOS], L: deep}, max_new_tokens=10)
    assert lossy.generated == [10, 11, EOS] and lossy.deep_passes == 0 and lossy.stop_reason == "stop_token"
    engine, state = free({L_s: [10, 11, EOS], L: deep}, max_new_tokens=10, lossless=True)
    assert state.generated == deep and state.stop_reason == "stop_token"
    assert state.rejected == 1 and state.deep_passes == 3 and state.depths == [L_s, L_s, L, L, L]
    unsure = round(1 / V, 4)  # no shallow entry: uniform logits, token 0
    assert pairs(state) == [(0.99, True), (0.99, True), (0.99, False), (unsure, False), (unsure, False)]
    assert cached(engine, state) == [PROMPT + deep[:4]] * L


def test_lossless_context_pruning_keeps_the_same_decisions():
    """Lossless mode's default (`context` pruning) scores the shallow exit over a subset after the
    first deep pass: with every token a candidate, the decisions are those of the full head."""
    engine = stub_engine({L_s: SHALLOW, L: DEEP}, L)
    state = decode(engine, strategy="free", exit_layer=L_s, threshold=0.9, max_new_tokens=6, lossless=True, prune_k=V, draft="exit")
    assert state.generated == DEEP and state.rejected == 1 and state.deep_passes == 3
    assert state.candidates is not None and len(state.candidates) == V


@pytest.mark.parametrize("min_exit_layer", [1, 3])
def test_calm_exits_at_the_first_layer_that_clears_the_threshold(min_exit_layer):
    """The first token comes from the prompt's pass through every layer. The second clears λ at
    layer 2 (layer 1 is unsure at 0.5), the third at layer 3, the fourth nowhere. A minimum exit
    layer of 3 ignores layer 2. Skipped layers get the exiting state copied: every layer's cache
    holds every position."""
    tables = {1: [None, (4, 0.5)], 2: [None, 8], 3: [None, None, 12], L: [10, 11, 12, 13]}
    engine = stub_engine(tables, L)
    state = decode(engine, strategy="calm", threshold=0.9, min_exit_layer=min_exit_layer, max_new_tokens=4)
    if min_exit_layer == 1:
        assert state.generated == [10, 8, 12, 13] and state.depths == [L, 2, 3, L]
    else:
        assert state.generated == [10, 11, 12, 13] and state.depths == [L, L, 3, L]
    exited = [round(c, 4) for c in state.confidences if not math.isnan(c)]
    assert exited == [0.99] * (2 if min_exit_layer == 1 else 1)
    assert cached(engine, state) == [PROMPT + state.generated[:3]] * L


def test_lookup_rounds_keep_what_the_deep_model_predicts():
    """The deep model continues the prompt's pattern (5, 6, 7): after the first token (5, from the
    prompt's pass), lookup finds 5 at position 0 and drafts what followed it, (6, 7, 5); the pass
    over the last token and the drafts keeps all three and adds the deep token after them (6). One
    token is left: the next round matches (7, 5, 6) and drafts (7), kept, with no token after it
    (the limit).
    Then with a deep model that breaks the pattern at its third token, the first round keeps (6)
    and replaces 7 by 9: every layer's cache is cropped back past the replaced draft."""
    from conftest import FLAT

    engine = stub_engine({L: [5, 6, 7, 5, 6, 7]}, L)
    engine.step_costs[L_s] = FLAT
    state = decode(engine, strategy="free", exit_layer=L_s, lossless=True, draft="lookup", max_new_tokens=6, prune="none")
    assert state.generated == [5, 6, 7, 5, 6, 7] and state.deep_passes == 3
    assert (state.verifications, state.drafted, state.accepted, state.empty_verifications) == (2, 4, 4, 0)
    assert state.acceptance.accepted == {1: 3, 3: 1} and state.acceptance.rejected == {1: 0, 3: 0}
    assert cached(engine, state) == [PROMPT + [5, 6, 7, 5, 6, 7]] * L  # the last draft was fed too

    engine = stub_engine({L: [5, 6, 9, 8, 8, 8]}, L)
    engine.step_costs[L_s] = FLAT
    state = decode(engine, strategy="free", exit_layer=L_s, lossless=True, draft="lookup", max_new_tokens=3, prune="none")
    assert state.generated == [5, 6, 9] and state.rejected == 0  # lookup drafts are not the exit's rejections
    assert (state.verifications, state.drafted, state.accepted) == (1, 2, 1)
    assert state.acceptance.rejected == {1: 1}
    assert cached(engine, state) == [PROMPT + [5, 6]] * L
