"""Confidence measures for exit decisions, computed on the model's device in torch.

`measure(name, engine)` resolves a measure once per request; calling the `Measure` it returns
gives an exit's token and its confidence with one host sync. The token is always the exit's own
argmax (over the full vocabulary, or over a pruning subset and mapped back to full-vocabulary
ids); the measures differ only in how sure they say it is:

- `softmax`: the top-1 probability (FREE's measure).
- `margin`: top-1 minus top-2 probability (CALM's softmax response).
- `state`: hidden-state saturation, the cosine similarity of the exit layer's state with the
  previous layer's (CALM), clipped at 0.
- `meta`: CALM's learned classifier (`free train --method meta`), the probability that the exit
  agrees with the last layer.
- `contrastive`: weighted contrast with an earlier layer (the amateur, at half the exit's depth)
  over the plausible set {x : p(x) >= α' max p}, α' = α (1 - max p) / (1 + decay ℓ) as in the
  "Early Exit LLMs" report: the contrastive distribution softmax(log p_exit - log p_amateur) over
  that set, read at the exit's token.
- `jsd`: the same contrast with the amateur chosen as the earlier layer m whose distribution is
  farthest from the exit's in Jensen-Shannon divergence, discounted by the distance ℓ - m.

The contrastive measures score the plausible set within the exit's top `CONTRAST_TOP` tokens, so
each amateur layer costs CONTRAST_TOP rows of the LM head, not the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

MEASURES = ("softmax", "margin", "state", "meta", "contrastive", "jsd")
NEEDS_STATES = frozenset({"state", "meta", "contrastive", "jsd"})  # look at earlier layers' states
CONTRAST_TOP = 64
CONTRAST_ALPHA = 0.1
CONTRAST_DECAY = 0.1


def softmax_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 probability (the softmax response used by FREE)."""
    probs = torch.softmax(logits.float(), dim=-1)
    conf, token = probs.max(dim=-1)
    return conf, token


def softmax_margin(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 minus top-2 probability (CALM's softmax response)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(2, dim=-1)
    return top[..., 0] - top[..., 1], idx[..., 0]


def saturation(state: Tensor, previous: Tensor) -> Tensor:
    """Cosine similarity of two hidden states (d,)."""
    return nn.functional.cosine_similarity(state.float(), previous.float(), dim=-1)


def jensen_shannon(logp: Tensor, logq: Tensor) -> Tensor:
    """JSD between distributions given as log-probabilities over the same support (..., n)."""
    m = torch.logsumexp(torch.stack((logp, logq)), dim=0) - math.log(2)
    kl = lambda a: torch.where(a > -math.inf, a.exp() * (a - m), torch.zeros_like(a)).sum(-1)  # noqa: E731
    return 0.5 * kl(logp) + 0.5 * kl(logq)


def contrast(exit_logp: Tensor, amateur_logits: Tensor, depth: int, amateur_depths: list[int], choose: bool, alpha: float = CONTRAST_ALPHA, decay: float = CONTRAST_DECAY) -> Tensor:
    """The contrastive confidence of the exit's token, exit_logp[0] (log-probabilities of the
    exit's top tokens in descending order, (K,)), against amateur logits over the same tokens
    (M, K) from layers `amateur_depths`. With `choose` the amateur is the layer of largest JSD
    from the exit divided by the layer distance; otherwise the first."""
    pmax = exit_logp[0].exp()
    alpha_eff = alpha * (1.0 - pmax) / (1.0 + decay * depth)
    plausible = exit_logp >= torch.log(alpha_eff.clamp_min(0.0)) + exit_logp[0]
    masked = lambda x: torch.log_softmax(x.float().masked_fill(~plausible, -math.inf), dim=-1)  # noqa: E731
    expert, amateurs = masked(exit_logp), masked(amateur_logits)
    pick = 0
    if choose and len(amateur_depths) > 1:
        distance = torch.tensor([depth - m for m in amateur_depths], dtype=torch.float32, device=expert.device)
        pick = int(torch.argmax(jensen_shannon(expert.expand_as(amateurs), amateurs) / distance))
    lcd = torch.log_softmax((expert - amateurs[pick]).masked_fill(~plausible, -math.inf), dim=-1)
    return lcd[0].exp()


def amateur_depths(measure: str, depth: int, min_exit_layer: int = 1) -> list[int]:
    """Earlier depths a contrastive measure compares against (0: the embeddings). `jsd` looks at
    the layers below the minimum exit layer when one is set, else at every earlier layer."""
    if measure == "contrastive":
        return [depth // 2]
    stop = min(depth, min_exit_layer) if min_exit_layer > 1 else depth
    return list(range(stop))


def measure(name: str, engine=None, min_exit_layer: int = 1) -> Measure:
    """Resolves the measure `name` once per request, before decoding, so each position's call does
    no dispatch. The measures in NEEDS_STATES need the `engine` (its adapters, and `meta`'s
    classifier); `min_exit_layer` is calm's, which bounds the layers `jsd` compares against."""
    score = {
        "softmax": lambda row, *_: softmax_max(row),
        "margin": lambda row, *_: softmax_margin(row),
        "state": _saturation,
        "meta": partial(_meta, engine),
        "contrastive": partial(_contrastive, engine, name, min_exit_layer),
        "jsd": partial(_contrastive, engine, name, min_exit_layer),
    }[name]
    return Measure(name, score)


@dataclass(frozen=True)
class Measure:
    """A resolved confidence measure. `needs_states`: whether a call needs `states`, the last
    position's hidden state after the embeddings (index 0) and after each layer up to the exit."""

    name: str
    score: Callable  # (row (V,) or (k,), subset, states, depth, state) -> (confidence, token), tensors

    @property
    def needs_states(self) -> bool:
        return self.name in NEEDS_STATES

    def __call__(self, logits: Tensor, state, subset=None, states=None, depth: int = 0) -> tuple[int, float]:
        """Token and confidence for one position's logits (1, 1, V), or (1, 1, k) over a pruning
        `subset` (the token is mapped back to its full-vocabulary id), from the exit at `depth`,
        with one host sync. LM-head rows the measure evaluates are counted in the decoding `state`."""
        return self.many([(logits, state, subset, states, depth)])[0]

    def many(self, positions: list[tuple]) -> list[tuple[int, float]]:
        """`__call__` for several requests' positions, each (logits, state, subset, states,
        depth), with one host sync for them all."""
        if not positions:
            return []
        scored = []
        for logits, state, subset, states, depth in positions:
            conf, token = self.score(logits[0, -1], subset, states, depth, state)
            scored.append(torch.stack(((subset.ids[token] if subset is not None else token).double(), conf.double())))
        return [(int(token), conf) for token, conf in torch.stack(scored).tolist()]


def _saturation(row: Tensor, subset, states, depth: int, state) -> tuple[Tensor, Tensor]:
    return saturation(states[depth][0, -1], states[depth - 1][0, -1]).clamp_min(0.0), row.argmax(-1)


def _meta(engine, row: Tensor, subset, states, depth: int, state) -> tuple[Tensor, Tensor]:
    if getattr(engine, "meta", None) is None:
        from ..errors import ConfigError

        raise ConfigError("--confidence meta needs a classifier: load a directory written by free train --method meta")
    normed = engine.adapter_of(states[depth]).norm(states[depth][0, -1:])
    return torch.sigmoid(engine.meta(normed.float(), depth))[0], row.argmax(-1)


def _contrastive(engine, name: str, min_exit_layer: int, row: Tensor, subset, states, depth: int, state) -> tuple[Tensor, Tensor]:
    """`contrastive` and `jsd`: the exit's top tokens against earlier layers' heads over them."""
    token = row.argmax(-1)
    logp, top = torch.log_softmax(row.float(), dim=-1).topk(min(CONTRAST_TOP, row.shape[-1]))
    ids = top if subset is None else subset.ids[top]
    depths = amateur_depths(name, depth, min_exit_layer)
    earlier = torch.cat([states[m][0, -1:] for m in depths])  # (M, d)
    adapter = engine.adapter_of(earlier)
    head = adapter.lm_head
    rows = _Rows(head.weight[ids], head.bias[ids] if head.bias is not None else None)
    amateur = adapter.head(adapter.norm(earlier), rows)  # (M, K)
    state.head_rows += len(depths) * len(ids)
    return contrast(logp, amateur, depth, depths, choose=name == "jsd"), token


class _Rows:
    """LM-head rows in a given order (the contrastive measures keep the exit's ranking)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias = weight, bias

    def linear(self, normed: Tensor) -> Tensor:
        return nn.functional.linear(normed, self.weight, self.bias)

    def __len__(self) -> int:
        return self.weight.shape[0]


class MetaClassifier(nn.Module):
    """CALM's learned confidence: P(layer l's exit agrees with the last layer) from the layer's
    normalized hidden state and the layer's index. `free train --method meta` writes it as
    `meta.safetensors`."""

    FILE = "meta.safetensors"

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.layer_bias = nn.Embedding(num_layers + 1, 1)
        nn.init.zeros_(self.layer_bias.weight)

    def forward(self, normed: Tensor, layer: int) -> Tensor:
        """Agreement logits for normalized states (N, d) of layer `layer`: (N,)."""
        return self.linear(normed).squeeze(-1) + self.layer_bias.weight[layer]

    @classmethod
    def load(cls, path, device) -> "MetaClassifier":
        tensors = load_file(str(path), device=str(device))
        module = cls(tensors["linear.weight"].shape[1], tensors["layer_bias.weight"].shape[0] - 1)
        module.load_state_dict(tensors)
        return module.to(device).eval()
