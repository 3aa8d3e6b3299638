"""Unembedding pruning: subsets of the LM head, schedules by hand, equality with the unpruned
decoders when nothing is pruned, full-vocabulary ids, head compute, and lossless exactness."""

from __future__ import annotations

import math

import pytest
import torch

from free_cli import DecodeConfig, Engine
from free_cli.decoding.confidence import measure
from free_cli.errors import ConfigError
from free_cli.decoding.pruning import Subset, next_size
from free_cli.decoding.strategies import free as free_strategy

from conftest import VOCAB, make_model, prompts

N = 20


def run(engine, prompt, **kw):
    return engine.generate(prompt, DecodeConfig(max_new_tokens=kw.pop("max_new_tokens", N), **kw))


def test_measures_map_subset_positions_to_vocabulary_ids():
    head = torch.nn.Linear(4, 50, bias=False)
    subset = Subset.of(head, torch.tensor([40, 3, 10, 3]))
    assert subset.ids.tolist() == [3, 10, 40] and torch.equal(subset.weight, head.weight[[3, 10, 40]])
    logits = torch.tensor([[[5.0, 2.0, 1.0]]])  # over ids 3, 10, 40
    token, conf = measure("softmax")(logits, None, subset)
    assert token == 3
    assert conf == pytest.approx(math.exp(5) / (math.exp(5) + math.exp(2) + math.exp(1)))
    token, margin = measure("margin")(torch.tensor([[[0.0, 0.0, math.log(3)]]]), None, subset)
    assert token == 40 and margin == pytest.approx(3 / 5 - 1 / 5)  # probabilities 1/5, 1/5, 3/5
    narrowed = subset.narrow(torch.tensor([2, 0]))
    assert narrowed.ids.tolist() == [3, 40] and torch.equal(narrowed.weight, head.weight[[3, 40]])


@pytest.mark.parametrize("family", ["llama", "gemma3", "t5"])
def test_subset_head_is_the_full_heads_columns(family):
    """Softcapping (Gemma 3) and T5's output scaling apply to pruned logits as to full ones."""
    engine = Engine(make_model(family))
    hidden = torch.randn(1, 3, engine.adapter.hidden_size)
    ids = torch.tensor([5, 17, 33, 60])
    full = engine.adapter.logits(hidden)
    pruned = engine.adapter.logits(hidden, Subset.of(engine.adapter.lm_head, ids))
    torch.testing.assert_close(pruned, full[..., ids])


def test_schedules_by_hand():
    assert next_size("fixed", 100, 8, 0.5, 3, 0.9, 1000) == 100
    assert next_size("fixed", 100, 8, 0.5, 0, 0.9, 60) == 60  # never more than the current set
    assert next_size("decaying", 1000, 8, 0.5, 2, 0.0, 5000) == round(1000 * math.exp(-1))  # 368
    assert next_size("decaying", 1000, 300, 0.5, 4, 0.0, 5000) == 300  # the floor
    assert next_size("adaptive", 1000, 8, 0.5, 0, 0.75, 5000) == 250
    assert next_size("adaptive", 1000, 8, 0.5, 0, 0.999, 5000) == 8


def test_pruning_to_the_whole_vocabulary_changes_nothing():
    engine = Engine(make_model("llama", deep_scale=0.3))
    for prompt in prompts(3, seed=7):
        calm = run(engine, prompt, strategy="calm", threshold=0.8)
        for schedule, extra in (("fixed", {}), ("decaying", {"prune_decay": 0.0})):
            pruned = run(engine, prompt, strategy="calm", threshold=0.8, prune=schedule, prune_k=VOCAB, **extra)
            assert pruned.tokens == calm.tokens and pruned.stats["mean_layers"] == calm.stats["mean_layers"]
        free = run(engine, prompt, strategy="free", exit_layer=2, threshold=0.6, sync_at_end=True)
        pruned = run(engine, prompt, strategy="free", exit_layer=2, threshold=0.6, sync_at_end=True, prune="context", prune_k=VOCAB)
        assert pruned.tokens == free.tokens
        assert [c for c, _ in pruned.pairs] == pytest.approx([c for c, _ in free.pairs], abs=1e-6)


def test_context_pruning_emits_candidates_and_saves_head_compute(monkeypatch):
    engine = Engine(make_model("llama", deep_scale=0.3))
    sets = []
    original = free_strategy.context_subset

    def spy(*args):
        sets.append(original(*args))
        return sets[-1]

    monkeypatch.setattr(free_strategy, "context_subset", spy)
    d, checked = engine.adapter.hidden_size, 0
    for prompt in prompts(4, seed=8):
        full = run(engine, prompt, strategy="full")
        assert full.stats["head_macs_per_token"] == VOCAB * d  # one full head per token, by hand
        unpruned = run(engine, prompt, strategy="free", exit_layer=2, threshold=0.0, max_stack=2)
        sets.clear()
        out = run(engine, prompt, strategy="free", exit_layer=2, threshold=0.0, max_stack=2, prune="context", prune_k=4)
        assert sets and out.stats["head_macs_per_token"] < unpruned.stats["head_macs_per_token"]
        # Each early-exited token after the first synchronized pass lies in the candidates then.
        depths = engine_depths(engine, prompt)
        assert len(depths) == len(out.tokens)
        for token in out.tokens:
            assert 0 <= token < VOCAB
        union = set().union(*(s.ids.tolist() for s in sets))
        exited = [t for t, dep in zip(out.tokens, depths) if dep == 2]
        checked += len(exited)
        assert set(exited[1:]) <= union | set(exited[:1])
    assert checked


def engine_depths(engine, prompt):
    cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=0.0, max_stack=2, prune="context", prune_k=4, max_new_tokens=N)
    state = engine.start(prompt, cfg)
    for _ in engine.stream(state, cfg):
        pass
    return state.depths


@pytest.mark.parametrize("confidence", ["softmax", "margin"])
@pytest.mark.parametrize("prune_k", [1, 4, VOCAB])
def test_lossless_with_pruning_equals_full(confidence, prune_k):
    engine = Engine(make_model("llama", deep_scale=0.5, logit_scale=16.0))
    rejected = 0
    for prompt in prompts(4, seed=9):
        full = run(engine, prompt, strategy="full", max_new_tokens=30)
        for threshold in (0.0, 0.5, 0.9):
            out = run(engine, prompt, strategy="free", exit_layer=2, threshold=threshold, lossless=True,
                      confidence=confidence, prune="context", prune_k=prune_k, max_new_tokens=30)  # fmt: skip
            assert out.tokens == full.tokens, (threshold, prune_k)
            rejected += out.stats["rejected"]
    assert rejected  # the check had something to reject


def test_pruning_options_are_checked():
    with pytest.raises(ConfigError, match="applies to --strategy calm"):
        DecodeConfig(strategy="free", prune="fixed").check()
    with pytest.raises(ConfigError, match="applies to --strategy free"):
        DecodeConfig(strategy="calm", prune="context").check()
    with pytest.raises(ConfigError, match="unknown pruning"):
        DecodeConfig(strategy="calm", prune="topk").check()


def test_lossless_free_prunes_to_the_context_unless_told_otherwise():
    resolved = lambda **kw: DecodeConfig(**kw).resolved(6).prune  # noqa: E731
    assert resolved(strategy="free", lossless=True) == "context"
    assert [resolved(strategy=s) for s in ("free", "full", "static", "calm")] == ["none"] * 4
    assert resolved(strategy="free", lossless=True, prune="none") == "none"
    engine = Engine(make_model("llama", deep_scale=0.5, logit_scale=16.0))
    for prompt in prompts(2, seed=11):
        kw = dict(strategy="free", exit_layer=2, threshold=0.5, lossless=True, prune_k=4)  # k below the vocabulary
        default, context, whole = run(engine, prompt, **kw), run(engine, prompt, **kw, prune="context"), run(engine, prompt, **kw, prune="none")
        assert default.tokens == context.tokens == whole.tokens
        assert default.stats["head_macs_per_token"] == context.stats["head_macs_per_token"] < whole.stats["head_macs_per_token"]
