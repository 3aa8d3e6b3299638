"""Confidence measures for exit decisions, computed on the model's device.

Each measure maps exit logits (..., V) to (confidence, token), both tensors of shape (...). The
host reads them once per exit decision (`decide`).
"""

from __future__ import annotations

import torch
from torch import Tensor


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


MEASURES = {"softmax": softmax_max, "margin": softmax_margin}


def decide(logits: Tensor, measure: str, subset=None) -> tuple[int, float]:
    """Token and confidence for one position's logits (1, 1, V), or (1, 1, k) over a pruning
    `subset` (the token is mapped back to its full-vocabulary id), with one host sync."""
    conf, token = MEASURES[measure](logits[0, -1])
    if subset is not None:
        token = subset.ids[token]
    token_f, conf_f = torch.stack((token.double(), conf.double())).tolist()
    return int(token_f), conf_f
