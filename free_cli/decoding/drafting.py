"""Drafts that cost nothing, and when to verify them: prompt lookup and a cost model.

`--draft lookup` proposes the continuation of the longest recent n-gram of the prompt and the text
so far found earlier in them (prompt lookup decoding, Saxena 2023; transformers'
`prompt_lookup_num_tokens`): outputs that copy their inputs (summaries, answers, edits) are
drafted without running any layer. The synchronized pass verifies the drafts like stacked tokens:
the deep model's prediction at each position keeps the draft or replaces it, and every cache is
rewound past the first replaced one, so the output is the full model's.

How many tokens to draft comes from the cost model (Leviathan et al. 2023, section 3.4): with a
per-token acceptance rate α, k drafts yield (1 - α^(k+1)) / (1 - α) tokens for one pass over k + 1
rows, whose cost c(k + 1) is measured on the device (costs.py). The length maximizing tokens per
unit of cost is chosen each round; when no length beats a plain step (k = 0), nothing is drafted.
α is estimated per record from its own verified drafts, by the length of the n-gram that matched,
starting from a prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DRAFTS = ("exit", "lookup", "auto")
# Marks a lookup draft in `DecodeState.drafts` (where an exit's sampled token keeps the
# distribution it was drawn from): it was proposed, not sampled.
LOOKUP = "lookup"
# A match of n tokens starts with this acceptance until the record's own drafts tell (measured on
# SAMSum and XSum validation records with the default model: docs/benchmarks.md).
PRIOR_ALPHA = {1: 0.3, 2: 0.5, 3: 0.6}
PRIOR_WEIGHT = 4.0  # the prior counts as this many verified draft tokens


def lookup(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list[int], int]:
    """Prompt lookup over `tokens` (prompt and text so far): for n from `max_ngram` down to
    `min_ngram`, the last n tokens' most recent earlier occurrence, and the (up to) k tokens that
    followed it. Returns (draft, n), or ([], 0) when no suffix occurs earlier."""
    if k < 1 or len(tokens) < 2:
        return [], 0
    ids = np.asarray(tokens)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        # windows starting at 0 .. len - n - 1: every occurrence but the suffix itself, each with
        # at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist(), n
    return [], 0


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round with k drafts yields when each is accepted with probability α, given the
    ones before it: the accepted drafts plus the deep model's own token after them."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def draft_length(costs: Sequence[float], alpha: float, most: int) -> int:
    """The number of drafts in [0, most] that maximizes expected tokens per unit of cost, where
    `costs[r - 1]` is the cost of a pass over r rows (wider passes extrapolated from the last two);
    0 (a plain step) wins ties."""
    best, best_rate = 0, 1.0 / pass_cost(costs, 1)
    for k in range(1, most + 1):
        rate = expected_tokens(alpha, k) / pass_cost(costs, k + 1)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


def pass_cost(costs: Sequence[float], rows: int) -> float:
    if rows <= len(costs):
        return costs[rows - 1]
    slope = costs[-1] - costs[-2] if len(costs) > 1 else costs[-1]
    return costs[-1] + slope * (rows - len(costs))


@dataclass
class Acceptance:
    """One record's verified drafts by the length of the n-gram that proposed them: accepted
    tokens and rejections (a round that kept all its drafts has none), for α = accepted / (accepted
    + rejections), the maximum-likelihood rate of a geometric run, shrunk toward the prior."""

    accepted: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, int] = field(default_factory=dict)

    def alpha(self, n: int) -> float:
        n = min(n, max(PRIOR_ALPHA))
        a, r = self.accepted.get(n, 0), self.rejected.get(n, 0)
        return (a + PRIOR_WEIGHT * PRIOR_ALPHA[n]) / (a + r + PRIOR_WEIGHT)

    def observe(self, n: int, accepted: int, rejected: bool) -> None:
        n = min(n, max(PRIOR_ALPHA))
        self.accepted[n] = self.accepted.get(n, 0) + accepted
        self.rejected[n] = self.rejected.get(n, 0) + int(rejected)


def propose(tokens: Sequence[int], acceptance: Acceptance, costs: Sequence[float], most: int, max_ngram: int = 3) -> tuple[list[int], int]:
    """This round's lookup drafts for a record whose text so far is `tokens`: as many as pay by
    the cost model, at most `most`; ([], 0) when none do. Returns (draft, n-gram length)."""
    draft, n = lookup(tokens, most, max_ngram)
    if not draft:
        return [], 0
    k = draft_length(costs, acceptance.alpha(n), len(draft))
    return draft[:k], n if k else 0
