"""Unembedding pruning: exit logits over a subset of the vocabulary.

On small models the LM head is a large share of the work (SmolLM2-135M: 49,152 x 576, the
multiply-adds of about seven of its 30 layers), and an exit decision pays for it at every exit.
A `Subset` holds the head's rows for some token ids, gathered once, so that each decision costs
k x d instead of V x d. Tokens chosen from a subset are mapped back to full-vocabulary ids.

Schedules (`--prune`):
- `fixed` (calm): at the minimum exit layer the full distribution is computed once; later layers
  of the same token score only its top k.
- `decaying` (calm): as fixed, then k shrinks layer by layer, k_i = max(floor, round(k e^(-decay i)))
  for the i-th layer after the first pruned one.
- `adaptive` (calm): the next layer keeps max(floor, ceil(k (1 - c))) of the current candidates,
  c the current layer's confidence: a confident layer narrows the field.
- `context` (free): the shallow exit scores the prompt's and generated tokens, the stop tokens,
  and the top k of the last synchronized pass's deep distribution. The deep layers always score
  the whole vocabulary, so agreement, the threshold's evidence and lossless checks are exact; a
  shallow exit whose argmax lies outside the set emits the best token inside it, which lossless
  mode rejects and lossy mode keeps (that loss is measured by `free bench`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCHEDULES = ("none", "fixed", "decaying", "adaptive", "context")
PER_LAYER = ("fixed", "decaying", "adaptive")


@dataclass(frozen=True)
class Subset:
    """The LM head restricted to `ids` (k,), full-vocabulary token ids in ascending order."""

    ids: Tensor
    weight: Tensor  # (k, d)
    bias: Tensor | None

    @classmethod
    def of(cls, lm_head: nn.Linear, ids: Tensor) -> "Subset":
        ids = torch.unique(ids.to(lm_head.weight.device))  # sorted: ties break like the full head
        bias = lm_head.bias[ids] if lm_head.bias is not None else None
        return cls(ids, lm_head.weight[ids], bias)

    def linear(self, normed: Tensor) -> Tensor:
        return nn.functional.linear(normed.to(self.weight.dtype), self.weight, self.bias)

    def narrow(self, positions: Tensor) -> "Subset":
        """The subset of this subset at `positions` (indices into `ids`)."""
        positions = torch.sort(positions).values
        bias = self.bias[positions] if self.bias is not None else None
        return Subset(self.ids[positions], self.weight[positions], bias)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def next_size(schedule: str, k: int, floor: int, decay: float, step: int, confidence: float, current: int) -> int:
    """How many candidates the next layer keeps (per-layer schedules), at most `current`."""
    if schedule == "fixed":
        size = k
    elif schedule == "decaying":
        size = max(floor, round(k * math.exp(-decay * step)))
    elif schedule == "adaptive":
        size = max(floor, math.ceil(k * (1.0 - confidence)))
    else:
        raise ValueError(f"no per-layer size for schedule {schedule!r}")
    return max(1, min(size, current))


def top(logits: Tensor, size: int) -> Tensor:
    """Indices of the `size` largest logits of one position (..., n) -> (size,)."""
    return logits.reshape(-1).float().topk(min(size, logits.shape[-1])).indices


def context_subset(lm_head: nn.Linear, tokens: list[int], stop_ids, deep_logits: Tensor, k: int) -> Subset:
    """`context` pruning's candidates: tokens seen so far, stop tokens, the deep top k."""
    seen = torch.tensor(sorted(set(tokens) | set(stop_ids)), dtype=torch.long, device=deep_logits.device)
    return Subset.of(lm_head, torch.cat((seen, top(deep_logits, k))))
