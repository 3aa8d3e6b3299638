"""Choosing tokens: greedy, or sampling with temperature, top-k and top-p, and the speculative
acceptance rule that keeps lossless mode exact when sampling.

Every request samples from its own `torch.Generator`, seeded from the run's seed and the record's
id (`request_seed`), so a record gets the same tokens however the run is batched, sharded or
resumed. The exit's confidence is always measured on its raw logits: temperature and truncation
change which token is drawn, not how sure the exit is.

Lossless sampling (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): a stacked token
x was drawn from the shallow model's distribution p (after temperature and truncation); the deep
pass gives the full model's distribution q at the same position. x is kept with probability
min(1, q(x) / p(x)); otherwise the token is drawn from the normalized residual max(0, q - p) and
the rest of the stack is discarded. Each kept or redrawn token is then distributed exactly as q,
so the output is distributed as the full model's sampling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def request_seed(seed: int, key) -> int:
    """A request's seed from the run's seed and the record's id."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def distribution(logits: Tensor, s: Sampling) -> Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) restricted to the top k and to
    the smallest set of top tokens whose probability reaches p, renormalized. (..., V) -> (..., V)."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = logits.softmax(-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= s.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: Tensor, g: torch.Generator) -> int:
    """One token from a distribution (V,)."""
    return int(torch.multinomial(probs, 1, generator=g))


def choose(logits: Tensor, s: Sampling, g: torch.Generator | None, subset=None, vocab: int = 0) -> tuple[int, Tensor | None]:
    """The token for one position's logits (V,), or (k,) over a pruning `subset` (mapped back to
    full-vocabulary ids): the argmax when greedy, else a draw from `distribution`, which is
    returned too, over the whole vocabulary of size `vocab` when a subset is given."""
    if s.greedy:
        token = int(logits.argmax(-1))
        return (int(subset.ids[token]) if subset is not None else token), None
    probs = distribution(logits, s)
    token = draw(probs, g)
    if subset is None:
        return token, probs
    return int(subset.ids[token]), probs.new_zeros(vocab).scatter(0, subset.ids, probs)


def point_mass(token: int, like: Tensor) -> Tensor:
    """The distribution of a token proposed without sampling (a lookup draft): all its mass on
    `token`, over the vocabulary of `like` (..., V). Speculative sampling then keeps it with
    probability q(token) and otherwise draws from q without it."""
    return torch.zeros(like.shape[-1], dtype=torch.float32, device=like.device).index_fill_(0, torch.tensor(token, device=like.device), 1.0)


def verify(token: int, draft: Tensor, target: Tensor, g: torch.Generator) -> int | None:
    """Speculative sampling's rule for a token drawn from `draft` (V,), checked against `target`
    (V,): None when it is kept, else the token drawn from the normalized residual in its place."""
    p, q = float(draft[token]), float(target[token])
    if p <= q or float(torch.rand((), generator=g, device=target.device)) < q / p:
        return None
    residual = (target - draft).clamp_min(0.0)
    total = float(residual.sum())
    return draw(residual / total, g) if total > 0 else draw(target, g)
