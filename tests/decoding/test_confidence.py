"""Confidence measures on hand-built inputs, and every measure in the decoders: lossless output
still equals full, and calm exits where its measure says."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from free_cli import DecodeConfig, Engine
from free_cli.decoding import confidence
from free_cli.decoding.confidence import MEASURES, MetaClassifier, amateur_depths, contrast, jensen_shannon, saturation

from conftest import make_model, prompts

log = lambda xs: torch.log(torch.tensor(xs, dtype=torch.float32))  # noqa: E731


def test_state_saturation_and_jsd_by_hand():
    assert float(saturation(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))) == pytest.approx(1 / math.sqrt(2))
    assert float(jensen_shannon(log([1.0, 0.0]), log([0.0, 1.0]))) == pytest.approx(math.log(2))
    assert float(jensen_shannon(log([0.3, 0.7]), log([0.3, 0.7]))) == pytest.approx(0.0, abs=1e-7)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); KL(p||m) = 1/2 ln(2/3) + 1/2 ln 2, KL(q||m) = ln(4/3).
    expected = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2)) + 0.5 * math.log(4 / 3)
    assert float(jensen_shannon(log([0.5, 0.5]), log([1.0, 0.0]))) == pytest.approx(expected)


def test_weighted_contrast_by_hand():
    # Everything plausible (α' = 0.1 * 0.5 = 0.05 of the top): softmax(log p_exit - log p_amateur)
    # = (0.5/0.25, 0.3/0.5, 0.2/0.25) normalized: 2 / 3.4 at the exit's token.
    got = contrast(log([0.5, 0.3, 0.2]), log([[0.25, 0.5, 0.25]]), depth=0, amateur_depths=[0], choose=False)
    assert float(got) == pytest.approx(2 / 3.4)
    # α = 0.5: α' = 0.5 * 0.2 = 0.1, so only tokens with p >= 0.08 are plausible: the first two.
    # Renormalized over them, exit (0.8, 0.15)/0.95 and amateur (1/3, 2/3): 2.4 / (2.4 + 0.225).
    got = contrast(log([0.8, 0.15, 0.05]), log([[0.25, 0.5, 0.25]]), depth=0, amateur_depths=[0], choose=False, alpha=0.5)
    assert float(got) == pytest.approx(2.4 / 2.625)
    # The decay over depth shrinks α': at depth 10 with decay 0.1, α' halves and all three count.
    wide = contrast(log([0.8, 0.15, 0.05]), log([[0.25, 0.5, 0.25]]), depth=10, amateur_depths=[0], choose=False, alpha=0.5, decay=0.1)
    assert float(wide) == pytest.approx(3.2 / (3.2 + 0.3 + 0.2))


def test_jsd_picks_the_layer_of_largest_discounted_divergence():
    exit_logp = log([0.6, 0.3, 0.1])
    same, far = log([0.6, 0.3, 0.1]), log([0.1, 0.3, 0.6])
    amateurs = torch.stack((far, same))  # depths 0 and 3, exit at 4
    got = contrast(exit_logp, amateurs, depth=4, amateur_depths=[0, 3], choose=True)
    assert float(got) == pytest.approx(float(contrast(exit_logp, far[None], 4, [0], False)))
    # Discounting by distance: a layer 1 below with a smaller divergence can still win.
    near = log([0.3, 0.3, 0.4])
    j_far, j_near = float(jensen_shannon(exit_logp, far)), float(jensen_shannon(exit_logp, near))
    assert j_near < j_far and j_near / 1 > j_far / 4
    got = contrast(exit_logp, torch.stack((far, near)), depth=4, amateur_depths=[0, 3], choose=True)
    assert float(got) == pytest.approx(float(contrast(exit_logp, near[None], 4, [3], False)))
    assert amateur_depths("contrastive", 9) == [4]
    assert amateur_depths("jsd", 5) == [0, 1, 2, 3, 4] and amateur_depths("jsd", 9, min_exit_layer=4) == [0, 1, 2, 3]


def test_measures_that_look_back_by_hand():
    engine = Engine(make_model("llama"))
    d = engine.adapter.hidden_size
    states = [torch.randn(1, 1, d) for _ in range(4)]
    logits = torch.randn(1, 1, 64)
    token, conf = confidence.measure("state", engine)(logits, None, None, states, 3)
    assert token == int(logits.argmax()) and conf == pytest.approx(max(0.0, float(saturation(states[3][0, 0], states[2][0, 0]))), abs=1e-6)
    engine.meta = MetaClassifier(d, engine.num_layers)
    with torch.no_grad():
        engine.meta.linear.weight.fill_(0.01)
        engine.meta.linear.bias.fill_(-0.2)
        engine.meta.layer_bias.weight[3] = 0.5
    normed = engine.adapter.norm(states[3][0]).detach()
    expected = 1 / (1 + math.exp(-(0.01 * float(normed.sum()) - 0.2 + 0.5)))
    assert confidence.measure("meta", engine)(logits, None, None, states, 3)[1] == pytest.approx(expected, abs=1e-6)
    counted = SimpleNamespace(head_rows=0)  # the contrastive measures count their head rows, always
    confidence.measure("contrastive", engine)(logits, counted, None, states, 3)
    confidence.measure("jsd", engine)(logits, counted, None, states, 3)
    assert counted.head_rows == (1 + 3) * 64  # amateurs at depth 1, then 0-2, over the exit's top 64


@pytest.mark.parametrize("measure", MEASURES)
def test_lossless_equals_full_with_every_measure(measure):
    engine = Engine(make_model("llama", deep_scale=0.5, logit_scale=16.0))
    torch.manual_seed(0)
    engine.meta = MetaClassifier(engine.adapter.hidden_size, engine.num_layers)
    exited = 0
    for prompt in prompts(3, seed=11):
        full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=24))
        for threshold in (0.0, 0.5, 0.9):
            for prune in ("none", "context"):
                cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=threshold, lossless=True, confidence=measure, prune=prune, prune_k=4, max_new_tokens=24)
                out = engine.generate(prompt, cfg)
                assert out.tokens == full.tokens, (measure, threshold, prune)
                exited += out.stats["exited_share"] > 0
    assert exited


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("prune", ["none", "fixed", "decaying", "adaptive"])
def test_calm_with_every_measure_and_pruning(measure, prune):
    engine = Engine(make_model("llama", deep_scale=0.3))
    torch.manual_seed(0)
    engine.meta = MetaClassifier(engine.adapter.hidden_size, engine.num_layers)
    prompt = prompts(1, seed=12)[0]
    full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=12))
    never = engine.generate(prompt, DecodeConfig(strategy="calm", threshold=1.5, confidence=measure, prune=prune, prune_k=8, max_new_tokens=12))
    assert never.tokens == full.tokens and never.stats["exited_share"] == 0.0
    always = engine.generate(prompt, DecodeConfig(strategy="calm", threshold=0.0, confidence=measure, prune=prune, prune_k=8, max_new_tokens=12))
    n = always.stats["new_tokens"]  # the first token comes from the prompt's full pass, later ones exit at layer 1
    assert always.stats["mean_layers"] == pytest.approx((engine.num_layers + n - 1) / n)
