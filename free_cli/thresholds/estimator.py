"""FREE's adaptive threshold estimator (Bae et al., 2023, section on the adaptive threshold).

Synchronized parallel decoding sees the shallow and the deep prediction at the same positions, so
every shallow prediction comes with a label: did it agree with the deep model? The estimator fits
one Beta distribution to the confidences of agreeing predictions and one to the others, and picks
the threshold where the posterior probability of agreement,

    P(agree | c) = π₁ f₁(c) / (π₁ f₁(c) + π₀ f₀(c)),

reaches ζ. Priors π are equal (as in the paper) or the observed agreement rate.

Where the paper and its code are loose, this module is explicit:
- each Beta is fitted by maximum likelihood (scipy) or by moments, on confidences clipped into
  (0, 1); a class with no spread (a point mass) gets a narrow unimodal Beta at that point;
- the threshold is found by a fine grid and root finding, and it is the start of the highest
  interval of confidences over which the posterior stays at or above ζ (the same as "the smallest
  confidence whose posterior clears ζ" when the posterior rises with confidence, and safe when it
  does not). The posterior is judged up to the largest confidence observed, not beyond: there the
  fitted tails extrapolate without data;
- degenerate inputs give a status instead of a silent constant (see `Fit.status`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

from ..errors import ConfigError


@dataclass(frozen=True)
class EstimatorConfig:
    zeta: float = 0.4  # ζ: the posterior probability of agreement a threshold must reach (paper: 0.4)
    update_fraction: float = 0.03  # T: refit after this share of the records (paper: 3%)
    initial: float = 0.9  # the threshold before the first fit
    low: float = 0.0  # the search range for the threshold
    high: float = 1.0
    priors: str = "equal"  # equal (paper) | empirical
    fit: str = "mle"  # mle | moments
    min_pairs: int = 20  # fewer pairs than this: no fit
    grid: int = 4001  # points of the grid that brackets the crossing before root finding

    def check(self) -> None:
        if not 0.0 < self.zeta < 1.0:
            raise ConfigError(f"ζ must lie in (0, 1), got {self.zeta}")
        if not 0.0 < self.update_fraction <= 1.0:
            raise ConfigError(f"the update fraction must lie in (0, 1], got {self.update_fraction}")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ConfigError(f"the search range must satisfy 0 <= low < high <= 1, got [{self.low}, {self.high}]")
        if self.priors not in ("equal", "empirical"):
            raise ConfigError(f"priors must be equal or empirical, got {self.priors!r}")
        if self.fit not in ("mle", "moments"):
            raise ConfigError(f"the fit must be mle or moments, got {self.fit!r}")


EPS = 1e-6  # confidences are clipped into [EPS, 1 - EPS] before fitting
MIN_VARIANCE = 1e-6


@dataclass
class Fit:
    """The outcome of one fit.

    status:
      fitted        both classes fitted; `threshold` is where the posterior reaches ζ
      everywhere    fitted, and the posterior is at least ζ over the whole range: threshold = low
      all_agreed    no disagreement among the pairs: threshold = low
      unreachable   fitted, but the posterior is below ζ at the top of the range (or at the
                    largest confidence observed, if lower): no threshold
      none_agreed   no agreement among the pairs: no threshold
      insufficient  fewer than `min_pairs` pairs: no threshold
    """

    status: str
    threshold: float | None
    pairs: int
    agreed: int
    zeta: float
    agree_beta: tuple[float, float] | None = None  # (α, β) of confidences that agreed
    disagree_beta: tuple[float, float] | None = None
    prior_agree: float | None = None

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "threshold": self.threshold,
            "pairs": self.pairs,
            "agreed": self.agreed,
            "zeta": self.zeta,
            "agree_beta": list(self.agree_beta) if self.agree_beta else None,
            "disagree_beta": list(self.disagree_beta) if self.disagree_beta else None,
            "prior_agree": self.prior_agree,
        }

    def posterior(self, c) -> np.ndarray:
        """P(agree | confidence c) under the fitted model."""
        c = np.clip(np.asarray(c, dtype=float), EPS, 1 - EPS)
        log1 = math.log(self.prior_agree) + stats.beta.logpdf(c, *self.agree_beta)
        log0 = math.log(1 - self.prior_agree) + stats.beta.logpdf(c, *self.disagree_beta)
        return special.expit(log1 - log0)


def fit_beta(x: np.ndarray, method: str = "mle") -> tuple[float, float]:
    """(α, β) of a Beta distribution for samples in (0, 1)."""
    mean, var = float(np.mean(x)), float(np.var(x))
    if var < MIN_VARIANCE:
        return _point(mean)
    if len(x) < 3 or method == "moments":
        return _moments(mean, var)
    try:
        a, b, _, _ = stats.beta.fit(x, floc=0, fscale=1)
    except Exception:  # scipy's optimizer can fail on extreme samples; moments always exist
        return _moments(mean, var)
    if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
        return _moments(mean, var)
    return float(a), float(b)


def _point(mean: float) -> tuple[float, float]:
    """A narrow unimodal Beta (α, β >= 2) with its mean at a point mass's value."""
    mean = min(max(mean, EPS), 1 - EPS)
    concentration = max(1e4, 2.0 / min(mean, 1.0 - mean))
    return mean * concentration, (1.0 - mean) * concentration


def _moments(mean: float, var: float) -> tuple[float, float]:
    """Method of moments. The variance is capped at half its largest possible value, so that
    α + β >= 1 and samples piled at both ends still give a proper Beta."""
    mean = min(max(mean, EPS), 1 - EPS)
    var = min(var, 0.5 * mean * (1 - mean))
    common = mean * (1 - mean) / var - 1
    return mean * common, (1 - mean) * common


def fit(pairs, cfg: EstimatorConfig = EstimatorConfig()) -> Fit:
    """Fits the two-Beta model to (confidence, agreed) pairs and finds the threshold."""
    arr = np.asarray([(c, a) for c, a in pairs], dtype=float).reshape(-1, 2)
    conf, agreed = np.clip(arr[:, 0], EPS, 1 - EPS), arr[:, 1] > 0.5
    n, k = len(conf), int(agreed.sum())
    base = dict(pairs=n, agreed=k, zeta=cfg.zeta)
    if n < cfg.min_pairs:
        return Fit("insufficient", None, **base)
    if k == n:
        return Fit("all_agreed", cfg.low, **base)
    if k == 0:
        return Fit("none_agreed", None, **base)
    prior = 0.5 if cfg.priors == "equal" else k / n
    result = Fit(
        "fitted", None, **base,
        agree_beta=fit_beta(conf[agreed], cfg.fit),
        disagree_beta=fit_beta(conf[~agreed], cfg.fit),
        prior_agree=prior,
    )  # fmt: skip
    # Beta tails can disagree far from any data; judge the posterior where confidences were seen.
    high = max(min(cfg.high, float(conf.max())), cfg.low + 1e-9)
    result.status, result.threshold = crossing(result, cfg, high)
    return result


def crossing(model: Fit, cfg: EstimatorConfig, high: float) -> tuple[str, float | None]:
    """The start of the highest interval of [low, high] where the posterior is at least ζ."""
    grid = np.linspace(cfg.low, high, cfg.grid)
    below = model.posterior(grid) < cfg.zeta
    if below[-1]:
        return "unreachable", None
    if not below.any():
        return "everywhere", cfg.low
    i = int(np.nonzero(below)[0][-1])  # grid[i] below ζ, grid[i + 1] at or above
    root = optimize.brentq(lambda c: float(model.posterior(c)) - cfg.zeta, grid[i], grid[i + 1], xtol=1e-10)
    return "fitted", float(root)


@dataclass
class OnlineEstimator:
    """`--threshold auto`: holds the threshold used for the next records and refits it from every
    pair seen so far each time `update_every` records have been observed."""

    cfg: EstimatorConfig
    update_every: int
    threshold: float
    pairs: list = field(default_factory=list)
    records: int = 0
    last_fit: Fit | None = None

    def observe(self, pairs) -> Fit | None:
        """Adds one record's pairs; refits when an update is due and returns that fit."""
        self.pairs.extend(pairs)
        self.records += 1
        if self.records % self.update_every:
            return None
        self.last_fit = fit(self.pairs, self.cfg)
        if self.last_fit.threshold is not None:
            self.threshold = self.last_fit.threshold
        return self.last_fit


def update_every(cfg: EstimatorConfig, total_records: int | None, fallback: int = 10) -> int:
    """T in records: the paper's share of the data set when its size is known."""
    if total_records is None:
        return fallback
    return max(1, math.ceil(cfg.update_fraction * total_records))
