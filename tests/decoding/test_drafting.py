"""Lookup drafts and the cost model (drafting.py), and lossless decoding that verifies them:
hand-worked lookups and draft lengths, then equality with `full` on tiny models, one request at a
time and in batches, and speculative sampling over lookup drafts distributed as full sampling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from free_cli import DecodeConfig, Engine
from free_cli.decoding.batching import generate_rows
from free_cli.decoding.costs import StepCosts
from free_cli.decoding.drafting import PRIOR_ALPHA, Acceptance, draft_length, expected_tokens, lookup, propose
from free_cli.decoding.sampling import Sampling, distribution
from free_cli.decoding.strategies.free import EXIT_PROBE, lookup_drafts

from conftest import FLAT, VOCAB, make_model, repeating_prompts


# ----------------------------------------------------------------------------- lookup
def test_lookup_takes_the_longest_suffix_found_earlier():
    """The suffix (7, 8, 9) occurs once before, followed by 1, 2; its shorter suffixes occur
    elsewhere with other continuations, which the longest match overrides."""
    tokens = [9, 5, 8, 9, 4, 7, 8, 9, 1, 2, 3, 7, 8, 9]
    assert lookup(tokens, k=2, max_ngram=3) == ([1, 2], 3)
    assert lookup(tokens, k=5, max_ngram=3) == ([1, 2, 3, 7, 8], 3)
    assert lookup(tokens, k=2, max_ngram=1) == ([1, 2], 1)  # 9's most recent earlier occurrence
    assert lookup(tokens, k=1, max_ngram=2) == ([1], 2)


def test_lookup_takes_the_most_recent_occurrence():
    tokens = [4, 5, 1, 4, 5, 2, 4, 5, 3, 0, 4, 5]
    assert lookup(tokens, k=1, max_ngram=2) == ([3], 2)  # of three (4, 5)s, the last before the suffix


def test_lookup_falls_back_to_shorter_ngrams_and_finds_none():
    assert lookup([1, 2, 3, 4, 3], k=3, max_ngram=3) == ([4, 3], 1)  # only (3,) occurs before
    assert lookup([1, 2, 3, 4, 5], k=3, max_ngram=3) == ([], 0)  # nothing repeats
    assert lookup([7], k=3) == ([], 0) and lookup([7, 7], k=0) == ([], 0)
    assert lookup([7, 7], k=3) == ([7], 1)  # the continuation may run into the suffix itself


def test_drafts_are_cut_after_a_stop_token():
    engine = Engine(make_model("llama"))
    engine.step_costs[2] = FLAT
    cfg = DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="lookup", max_new_tokens=20).resolved(engine.num_layers)
    state = engine.start([5, 6, 3, 7, 8, 5], cfg)
    state.stop_ids, state.fed = frozenset({3}), 6
    state.tokens.append(6)  # (5, 6) was followed by 3 (a stop token), 7, 8
    assert lookup_drafts(engine, state, cfg) == ([3], 2)


# ----------------------------------------------------------------------------- the cost model
def test_expected_tokens_by_hand():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 4) == 1.0


def test_nothing_is_drafted_when_passes_cost_much_and_drafts_are_seldom_kept():
    steep = [1.0 + 0.5 * r for r in range(16)]  # each row costs half a step more
    assert draft_length(steep, alpha=0.3, most=10) == 0
    assert draft_length(steep, alpha=0.1, most=10) == 0


def test_everything_is_drafted_when_passes_cost_the_same_and_drafts_are_kept():
    flat = [1.0] * 16
    assert draft_length(flat, alpha=0.9, most=10) == 10
    assert draft_length(flat, alpha=0.9, most=30) == 30  # wider than measured: extrapolated flat


def test_the_best_length_in_between():
    """Costs 1 + 0.2 (r - 1): with α = 0.5 the rate (1 - α^(k+1)) / (1 - α) / c(k + 1) is 1.25 at
    k = 1, 1.25 at k = 2 (1.75 / 1.4), 1.17 at k = 3: the shorter of the best wins."""
    costs = [1.0 + 0.2 * r for r in range(16)]
    assert draft_length(costs, alpha=0.5, most=8) == 1


def test_acceptance_starts_at_the_prior_and_follows_the_record():
    a = Acceptance()
    assert a.alpha(1) == pytest.approx(PRIOR_ALPHA[1]) and a.alpha(7) == pytest.approx(PRIOR_ALPHA[3])
    for _ in range(20):
        a.observe(2, accepted=0, rejected=True)
    assert a.alpha(2) < 0.1 and a.alpha(1) == pytest.approx(PRIOR_ALPHA[1])
    costs = [1.0 + 0.1 * r for r in range(16)]  # a row costs a tenth of a step
    assert propose([1, 2, 3, 1, 2], a, costs, most=4, max_ngram=2) == ([], 0)  # this record's 2-gram drafts fail
    # a fresh record: α = 0.5, rates 1.36, 1.46, 1.44 for one to three drafts
    assert propose([1, 2, 3, 1, 2], Acceptance(), costs, most=4, max_ngram=2) == ([3, 1], 2)


# ----------------------------------------------------------------------------- lossless equals full
def drafting_engine(family: str) -> Engine:
    engine = Engine(make_model(family, deep_scale=0.5, logit_scale=16.0))  # fp32
    engine.step_costs[2] = FLAT
    return engine


CASES = [
    DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="lookup", max_new_tokens=24),
    DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="auto", threshold=0.3, max_new_tokens=24),
    DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="auto", threshold=0.3, max_new_tokens=24, max_stack=2, prune="context", prune_k=8),
    DecodeConfig(strategy="free", exit_layer=2, draft="lookup", max_new_tokens=24),  # lossy: lookup drafts are verified all the same
]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lossless_lookup_and_auto_equal_full(family):
    """Every case on prompts that repeat a phrase: outputs and stop reasons equal `full`'s, with a
    stop token that appears in the prompts (drafts run up to it and past it) and with limits of
    new tokens that drafts run past."""
    engine = drafting_engine(family)
    ps = repeating_prompts(8, seed=1)
    stop = ps[0][2]
    kept = rejected = 0
    for limit in (24, 5):
        for stop_ids in (None, (stop,)):
            for p in ps:
                full = engine.generate(p, DecodeConfig(strategy="full", max_new_tokens=limit, stop_ids=stop_ids))
                for cfg in CASES:
                    out = engine.generate(p, replace(cfg, max_new_tokens=limit, stop_ids=stop_ids))
                    assert out.tokens == full.tokens, (p, cfg.describe(), limit, stop_ids)
                    assert out.stats["stop_reason"] == full.stats["stop_reason"]
                    kept += out.stats["accepted_drafts"]
                    rejected += out.stats["verifications"] - out.stats["empty_verifications"] < out.stats["verifications"]
    assert kept > 50 and rejected > 0  # drafts were kept, and some rounds kept none


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_drafting_equals_one_at_a_time(family):
    """Per-row drafts in continuous batching: each request's tokens, stats and pairs as alone."""
    engine = drafting_engine(family)
    ps = [p[: 9 + i % 10] for i, p in enumerate(repeating_prompts(7, seed=2))]  # ragged
    for cfg in CASES[:3]:
        cfg = replace(cfg, stop_ids=(ps[0][4],))
        alone = [engine.generate(p, cfg) for p in ps]
        for batch_size in (2, 4):
            together = dict(generate_rows(engine, [(i, p, cfg) for i, p in enumerate(ps)], batch_size))
            for i, a in enumerate(alone):
                b = together[i]
                assert b.tokens == a.tokens, (cfg.describe(), batch_size, i)
                keys = ("new_tokens", "deep_passes", "rejected", "verifications", "accepted_drafts", "head_macs_per_token", "stop_reason")
                assert {k: b.stats[k] for k in keys} == {k: a.stats[k] for k in keys}
                assert [y for _, y in b.pairs] == [y for _, y in a.pairs]


def test_lossless_sampling_over_lookup_drafts_is_distributed_as_full_sampling():
    """The second token is a lookup draft whenever the first occurs in the prompt, which holds
    every token: speculative sampling keeps it with probability q(x) and otherwise draws from q
    without it. 3,000 draws of the first two tokens against the exact distribution of the full
    model's sampling, chi-square at 0.1% each (fixed seeds: a fixed outcome)."""
    model = make_model("llama", deep_scale=0.3, logit_scale=3.0)
    engine = Engine(model)
    engine.step_costs[2] = FLAT
    g = torch.Generator().manual_seed(4)
    prompt = (torch.randperm(VOCAB - 4, generator=g) + 4).tolist()
    s = Sampling(0.9, top_k=16)
    with torch.no_grad():
        first = distribution(model(torch.tensor([prompt])).logits[0, -1], s)
        second = distribution(model(torch.tensor([prompt + [t] for t in range(VOCAB)])).logits[:, -1], s)
    exact = first[:, None] * second  # (V, V)
    cfg = DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="lookup", max_new_tokens=2, temperature=0.9, top_k=16, seed=5)
    n = 3000
    counts, verified, kept = torch.zeros(2, VOCAB), 0, 0
    draws = dict(generate_rows(engine, ((i, prompt, cfg) for i in range(n)), 64))  # each request its own generator
    for i in range(n):
        out = draws[i]
        for j, token in enumerate(out.tokens[:2]):
            counts[j, token] += 1
        verified += out.stats["drafted_tokens"]
        kept += out.stats["accepted_drafts"]
    assert verified > n / 2 and 0 < kept < verified  # drafted often, kept sometimes, not always
    for observed, expected in ((counts[0], exact.sum(1)), (counts[1], exact.sum(0))):
        assert observed[expected == 0].sum() == 0
        keep = n * expected >= 5
        obs, exp = observed[keep], n * expected[keep]
        if n * expected[~keep].sum() >= 5:
            obs, exp = torch.cat([obs, observed[~keep].sum(0, keepdim=True)]), torch.cat([exp, n * expected[~keep].sum(0, keepdim=True)])
        assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_auto_stops_using_an_exit_that_does_not_pay():
    """Passes whose every row costs a step (no lookup draft pays). With a shallow step as dear as
    a full one no share of exits pays: `auto` decodes with the exit until EXIT_PROBE predictions
    are checked, then takes plain steps. With a cheap one the exit always pays and stays."""
    engine = drafting_engine("llama")
    steep = tuple(float(r) for r in range(1, 17))
    cfg = DecodeConfig(strategy="free", exit_layer=2, lossless=True, draft="auto", threshold=0.9, max_new_tokens=24)
    p = repeating_prompts(1, seed=2)[0]  # an exit seldom confident: its predictions are checked at once
    full = engine.generate(p, DecodeConfig(strategy="full", max_new_tokens=24)).tokens
    for shallow, predictions in ((1.0, EXIT_PROBE), (0.1, 24)):
        engine.step_costs[2] = StepCosts(full=1.0, shallow=shallow, deep=0.6, rows=steep)
        out = engine.generate(p, cfg)
        assert out.tokens == full and out.stats["verifications"] == 0
        assert len(out.pairs) == predictions
