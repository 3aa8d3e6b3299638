"""Training losses: FREE's shallow-deep objective with layerwise distillation, CALM's depth-weighted
objective, distillation of an exit onto the deep model, and CALM's consistency classifier.

Callers select the target positions first (the loss is on target tokens only), so every loss here
takes N positions: logits (N, V), labels (N,), hidden states (N, d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (N, V) against next tokens (N,)."""
    return F.cross_entropy(logits.float(), labels)


def soft_ce(student_logits: Tensor, teacher_ids: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cross-entropy of the student's distribution (N, V) against the teacher's, restricted to the
    teacher's top-k tokens `teacher_ids` (N, k) with their logits (N, k), renormalized. Minimizing
    it matches the student to the teacher (KL up to the teacher's entropy)."""
    log_q = student_logits.float().log_softmax(-1).gather(-1, teacher_ids)
    p = teacher_logits.float().softmax(-1)
    return -(p * log_q).sum(-1).mean()


def shallow_deep_loss(shallow_ce: Tensor, deep_ce: Tensor, L_s: int, L: int) -> Tensor:
    """FREE's objective (eq. 1): (L_s · CE_shallow + L · CE_deep) / (L_s + L)."""
    return (L_s * shallow_ce + L * deep_ce) / (L_s + L)


def calm_loss(layer_ces: list[Tensor]) -> Tensor:
    """CALM's objective: the exits' cross-entropies averaged with weights growing with depth,
    w_l = l / Σ_j j for l = 1 .. L."""
    weights = torch.arange(1, len(layer_ces) + 1, dtype=torch.float32, device=layer_ces[0].device)
    return (weights * torch.stack(layer_ces)).sum() / weights.sum()


# ---------------------------------------------------------------- layerwise distillation


def layer_mapping(kind: str, L_s: int, L: int, costs: Tensor | None = None) -> list[tuple[int, int]]:
    """Pairs (deep layer j, shallow layer i), 1-based depths, for the distillation loss.

    Deep layers are L_s+1 .. L (the layers the shallow model lacks); shallow layers 1 .. L_s.
    - `last`: the last shallow layer learns the last deep layer's states.
    - `uniform`: deep layers spread evenly over shallow layers, the last onto the last.
    - `dyna`: each deep layer goes to the shallow layer closest to it in MSE, under a monotone
      alignment (a deeper layer never maps to a shallower one), found by dynamic programming over
      `costs` (L - L_s, L_s), costs[j, i] = MSE(deep layer L_s+1+j, shallow layer 1+i).
    """
    deep = list(range(L_s + 1, L + 1))
    if kind == "none":
        return []
    if kind == "last":
        return [(L, L_s)]
    if kind == "uniform":
        return [(j, max(1, -(-(j - L_s) * L_s // (L - L_s)))) for j in deep]
    if kind == "dyna":
        if costs is None:
            raise ValueError("the dynamic mapping needs the cost matrix")
        return [(L_s + 1 + j, 1 + i) for j, i in enumerate(monotone_alignment(costs))]
    raise ValueError(f"unknown layer mapping {kind!r}")


def monotone_alignment(costs: Tensor) -> list[int]:
    """For a cost matrix (n, m), the non-decreasing map j -> i(j) minimizing Σ_j costs[j, i(j)]."""
    n, m = costs.shape
    c = costs.detach().double().cpu()
    best = c[0].clone()  # best[i]: the lowest total for rows 0..j with row j on column i
    back = []
    for j in range(1, n):
        prefix, arg = torch.cummin(best, dim=0)  # the best predecessor column <= i
        best = c[j] + prefix
        back.append(arg)
    path = [int(best.argmin())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def distillation_loss(states: list[Tensor], L_s: int, kind: str) -> Tensor:
    """Layerwise distillation from deep to shallow hidden states, the deep ones detached.
    `states[l]` is layer l's output at the target positions (index 0: the embeddings), (N, d)."""
    L = len(states) - 1
    if kind == "none":
        return states[0].new_zeros(())

    def mse(j: int, i: int) -> Tensor:
        return (states[i].float() - states[j].detach().float()).pow(2).mean()

    costs = None
    if kind == "dyna":
        with torch.no_grad():
            costs = torch.stack([torch.stack([mse(j, i) for i in range(1, L_s + 1)]) for j in range(L_s + 1, L + 1)])
    pairs = layer_mapping(kind, L_s, L, costs)
    return torch.stack([mse(j, i) for j, i in pairs]).mean()
