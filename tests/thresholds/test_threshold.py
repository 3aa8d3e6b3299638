"""The Beta-mixture threshold estimator and Learn-then-Test calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from free_cli.thresholds.ltt import hoeffding_bentkus_p, hoeffding_p, learn_then_test
from free_cli.thresholds.estimator import EstimatorConfig, OnlineEstimator, fit, update_every

AGREE, DISAGREE = (8.0, 2.0), (2.0, 5.0)


def sample_pairs(n_agree: int, n_disagree: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = stats.beta.rvs(*AGREE, size=n_agree, random_state=rng)
    d = stats.beta.rvs(*DISAGREE, size=n_disagree, random_state=rng)
    return [(c, True) for c in a] + [(c, False) for c in d]


def analytic_crossing(prior: float, zeta: float = 0.4) -> float:
    def posterior(c):
        num = prior * stats.beta.pdf(c, *AGREE)
        return num / (num + (1 - prior) * stats.beta.pdf(c, *DISAGREE))

    return optimize.brentq(lambda c: posterior(c) - zeta, 0.05, 0.95)


@pytest.mark.parametrize("method", ["mle", "moments"])
@pytest.mark.parametrize("priors", ["equal", "empirical"])
def test_fit_recovers_known_mixture(method, priors):
    pairs = sample_pairs(6000, 4000)
    result = fit(pairs, EstimatorConfig(priors=priors, fit=method))
    assert result.status == "fitted"
    for got, true in zip(result.agree_beta + result.disagree_beta, AGREE + DISAGREE):
        assert got == pytest.approx(true, rel=0.08)
    prior = 0.5 if priors == "equal" else 0.6
    assert result.prior_agree == pytest.approx(prior)
    assert result.threshold == pytest.approx(analytic_crossing(prior), abs=0.01)
    # The threshold is a root of the fitted posterior, found to precision, not a grid point.
    assert float(result.posterior(result.threshold)) == pytest.approx(0.4, abs=1e-6)


def test_higher_zeta_gives_a_higher_threshold():
    pairs = sample_pairs(3000, 3000)
    low, high = fit(pairs, EstimatorConfig(zeta=0.3)), fit(pairs, EstimatorConfig(zeta=0.8))
    assert low.threshold < high.threshold
    assert high.threshold == pytest.approx(analytic_crossing(0.5, 0.8), abs=0.01)


def test_degenerate_inputs_give_defined_results():
    cfg = EstimatorConfig(low=0.1)
    few = fit([(0.9, True)] * 5, cfg)
    assert (few.status, few.threshold) == ("insufficient", None)
    everyone = fit([(c, True) for c in np.linspace(0.2, 1.0, 50)], cfg)
    assert (everyone.status, everyone.threshold) == ("all_agreed", 0.1)
    nobody = fit([(c, False) for c in np.linspace(0.2, 1.0, 50)], cfg)
    assert (nobody.status, nobody.threshold) == ("none_agreed", None)
    # No spread at all in either class: a narrow Beta at each point; the threshold falls between.
    points = fit([(0.95, True)] * 40 + [(0.4, False)] * 40)
    assert points.status == "fitted" and 0.4 < points.threshold < 0.95
    # Confidences at exactly 0 and 1 are clipped into (0, 1): finite parameters, a threshold.
    edges = fit([(1.0, True)] * 40 + [(0.0, False)] * 20 + [(0.6, False)] * 20)
    assert edges.status == "fitted" and all(map(math.isfinite, edges.agree_beta + edges.disagree_beta))
    assert 0.6 < edges.threshold < 1.0
    # Agreement only at low confidence: no confidence reaches ζ, and that is said.
    inverted = fit(sample_pairs(0, 0) + [(c, True) for c in np.linspace(0.05, 0.3, 40)] + [(c, False) for c in np.linspace(0.6, 1.0, 40)])
    assert (inverted.status, inverted.threshold) == ("unreachable", None)


def test_online_estimator_refits_every_t_records():
    pairs = sample_pairs(600, 400, seed=1)
    rng = np.random.default_rng(2)
    rng.shuffle(pairs)
    est = OnlineEstimator(EstimatorConfig(), update_every=5, threshold=0.9)
    fits = []
    for i in range(20):  # 20 records of 50 pairs
        result = est.observe(pairs[50 * i : 50 * (i + 1)])
        if result is not None:
            fits.append((est.records, result.threshold))
    assert [n for n, _ in fits] == [5, 10, 15, 20]
    assert est.threshold == fits[-1][1] == pytest.approx(analytic_crossing(0.5), abs=0.03)
    # A fit without a threshold keeps the current one.
    stuck = OnlineEstimator(EstimatorConfig(), update_every=1, threshold=0.7)
    assert stuck.observe([(0.5, False)] * 30).status == "none_agreed" and stuck.threshold == 0.7


def test_update_frequency_is_a_share_of_the_records():
    cfg = EstimatorConfig()
    assert update_every(cfg, 1000) == 30 and update_every(cfg, 10) == 1 and update_every(cfg, None) == 10


# ---------------------------------------------------------------- Learn-then-Test


def test_p_values_by_hand():
    assert hoeffding_p(0.0, 100, 0.1) == pytest.approx(math.exp(-2.0))
    assert hoeffding_p(0.2, 100, 0.1) == 1.0  # the empirical risk exceeds δ: no evidence
    # Hoeffding-Bentkus: zero losses out of 100 at δ = 0.1: min(exp(-n KL(0, 0.1)), e·0.9^100).
    assert hoeffding_bentkus_p(0.0, 100, 0.1) == pytest.approx(min(0.9**100, math.e * 0.9**100))
    assert hoeffding_bentkus_p(0.05, 400, 0.1) <= hoeffding_p(0.05, 400, 0.1)


def risk_curve(threshold: float) -> float:
    """A known risk: the expected distance grows as the threshold falls."""
    return 0.4 * (1.0 - threshold)


GRID = [0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4]


def bernoulli_losses(n: int, rng):
    return lambda threshold: (rng.random(n) < risk_curve(threshold)).astype(float)


def test_ltt_certifies_a_threshold_whose_risk_holds():
    rng = np.random.default_rng(0)
    calls = []
    losses = bernoulli_losses(2000, rng)
    result = learn_then_test(GRID, lambda t: calls.append(t) or losses(t), delta=0.1, epsilon=0.05)
    assert result.certified and risk_curve(result.threshold) <= 0.1
    assert result.threshold == 0.8  # risk 0.08 at 0.8, 0.1 at 0.75: the lowest that can hold
    # Fixed-sequence testing goes down from the top and stops at the first failure.
    assert calls == GRID[: len(result.steps)] and not result.steps[-1].rejected


def test_ltt_guarantee_holds_over_calibration_draws():
    """Across many calibration sets, the returned threshold's true risk exceeds δ in at most an ε
    share of them."""
    rng = np.random.default_rng(1)
    failures = trials = 0
    for _ in range(300):
        result = learn_then_test(GRID, bernoulli_losses(150, rng), delta=0.1, epsilon=0.1)
        trials += 1
        failures += result.certified and risk_curve(result.threshold) > 0.1
    assert failures / trials <= 0.1


def test_ltt_refuses_when_nothing_can_be_certified():
    rng = np.random.default_rng(2)
    result = learn_then_test(GRID, bernoulli_losses(500, rng), delta=0.001, epsilon=0.05)
    assert result.threshold is None and not result.certified
    assert len(result.steps) == 1 and not result.steps[0].rejected
