"""Learn-then-Test calibration of the exit threshold (CALM, Schuster et al. 2022; Angelopoulos et
al. 2021), giving a threshold with a stated guarantee.

Notation follows the "Early Exit LLMs" report's constraint P(E[D(Y_early, Y_full)] ≤ δ) ≥ 1 − ε:
D is a per-sample distance between the early-exit output and the full model's output, bounded in
[0, 1] (1 − ROUGE-L, or whether the outputs differ at all); δ is the tolerated risk; ε the allowed
probability of failing it, over the draw of the calibration set.

Each candidate threshold λ gets the null hypothesis H_λ: R(λ) > δ, where R is the expected
distance. Its p-value comes from the per-sample losses (Hoeffding, or Hoeffding-Bentkus, which is
tighter). Fixed-sequence testing walks the thresholds from the highest (safest) down, rejecting
nulls while p ≤ ε, and stops at the first it cannot reject; the lowest rejected λ is returned. No
multiplicity correction is needed for a fixed sequence. The guarantee holds for new inputs drawn
like the calibration set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from ..errors import ConfigError


def hoeffding_p(risk: float, n: int, delta: float) -> float:
    """P-value of H: R > δ from a mean loss `risk` over n samples in [0, 1] (Hoeffding)."""
    return math.exp(-2.0 * n * max(delta - risk, 0.0) ** 2)


def hoeffding_bentkus_p(risk: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value (Bates et al. 2021): the smaller of the KL form of Hoeffding's
    bound and Bentkus' binomial bound."""
    r = min(risk, delta)
    kl = _bernoulli_kl(r, delta)
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * stats.binom.cdf(math.ceil(n * risk), n, delta)
    return min(1.0, hoeffding, bentkus)


def _bernoulli_kl(a: float, b: float) -> float:
    def term(x, y):
        return 0.0 if x == 0 else x * math.log(x / y)

    return term(a, b) + term(1 - a, 1 - b)


P_VALUES = {"hoeffding": hoeffding_p, "hb": hoeffding_bentkus_p}


@dataclass
class Step:
    threshold: float
    risk: float  # mean loss on the calibration samples
    p_value: float
    rejected: bool  # H_λ: R(λ) > δ rejected, so λ is certified


@dataclass
class LttResult:
    threshold: float | None  # the lowest certified threshold; None when none can be certified
    delta: float
    epsilon: float
    samples: int
    p_value: str
    steps: list[Step] = field(default_factory=list)

    @property
    def certified(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "samples": self.samples,
            "p_value": self.p_value,
            "steps": [vars(s) for s in self.steps],
        }


def learn_then_test(
    thresholds: Sequence[float],
    losses: Callable[[float], Sequence[float]],
    *,
    delta: float,
    epsilon: float,
    p_value: str = "hb",
) -> LttResult:
    """Fixed-sequence testing over `thresholds` (tested from the highest down). `losses(λ)`
    returns the per-sample losses in [0, 1] at λ; it is called only for the thresholds tested."""
    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise ConfigError(f"δ and ε must lie in (0, 1), got δ={delta}, ε={epsilon}")
    if p_value not in P_VALUES:
        raise ConfigError(f"unknown p-value {p_value!r}; choose one of {', '.join(P_VALUES)}")
    result = LttResult(None, delta, epsilon, 0, p_value)
    for threshold in sorted(set(thresholds), reverse=True):
        values = np.asarray(losses(threshold), dtype=float)
        if values.size == 0 or values.min() < 0 or values.max() > 1:
            raise ConfigError("Learn-then-Test needs at least one loss, each in [0, 1]")
        result.samples = int(values.size)
        risk = float(values.mean())
        p = P_VALUES[p_value](risk, values.size, delta)
        step = Step(threshold, risk, p, p <= epsilon)
        result.steps.append(step)
        if not step.rejected:
            break
        result.threshold = threshold
    return result
