"""Per-request decoding state: a small object passed through the decoding loop, never stored on
the model.

Positions index the decoder's tokens: `tokens[p]` sits at position p. Feeding `tokens[p]` through
the layers yields the prediction for `tokens[p + 1]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from .adapters import Request
from .drafting import Acceptance


@dataclass
class DecodeState:
    request: Request
    cache: object  # a transformers Cache
    tokens: list[int]  # the decoder's prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    num_layers: int  # L
    fed: int = 0  # positions the first layers have processed
    # FREE: positions the deep layers have processed, and the shallow model's output (1, q, d) for
    # positions [deep_len, fed), the stack the next synchronized pass runs the deep layers over.
    deep_len: int = 0
    pending: list[Tensor] = field(default_factory=list)
    # Per generated token: the depth its prediction came from and that exit's confidence (NaN for
    # tokens from the last layer).
    depths: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    # Sampling: per generated token, the distribution it was drawn from when it exited early (for
    # lossless mode's acceptance test), else None; and the request's own random generator.
    drafts: list = field(default_factory=list)
    generator: object = None
    # tokens[:final] are final; later tokens are stacked and not yet checked (lossless mode).
    final: int = 0
    # (confidence, agreed) for every shallow prediction a synchronized pass has checked.
    pairs: list[tuple[float, bool]] = field(default_factory=list)
    deep_passes: int = 0
    rejected: int = 0  # lossless: stacked tokens discarded after a disagreement
    head_rows: int = 0  # LM-head rows evaluated, summed over positions (compute of the head)
    candidates: object = None  # free with `context` pruning: the shallow exit's `Subset`
    # Drafting (drafting.py): where this round's lookup drafts start in `tokens` (None: no draft
    # awaits verification) and the length of the n-gram that proposed them; the record's
    # acceptance by n-gram length; verification rounds, drafts verified and kept, rounds that kept
    # none. `exit_off`: the exit no longer pays for this record (`--draft auto`).
    draft_from: int | None = None
    draft_ngram: int = 0
    acceptance: Acceptance = field(default_factory=Acceptance)
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    empty_verifications: int = 0
    exit_off: bool = False
    exit_checked: int = 0  # shallow predictions checked by a synchronized pass (`pairs`)
    exit_kept: int = 0  # of which exited and were kept
    prefill_s: float | None = None  # seconds to the first final token
    row: int | None = None  # batched decoding: the row this request holds in a shared `RaggedCache`
    stop_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def unfed(self) -> list[int]:
        return self.tokens[self.fed :]

    def append(self, token: int, depth: int, confidence: float = math.nan, draft=None) -> None:
        self.tokens.append(token)
        self.depths.append(depth)
        self.confidences.append(confidence)
        self.drafts.append(draft)

    def settle(self) -> list[int]:
        """Marks every token so far final; returns the ones that just became so."""
        new, self.final = self.tokens[self.final :], len(self.tokens)
        return new

    def truncate(self, length: int) -> None:
        """Drop tokens from index `length` on (their depths and confidences too)."""
        del self.tokens[length:]
        keep = max(0, length - self.prompt_len)
        del self.depths[keep:]
        del self.confidences[keep:]
        del self.drafts[keep:]

    def reached_stop(self) -> bool:
        """Whether the tokens so far end generation, setting `stop_reason`."""
        if len(self.tokens) > self.prompt_len and self.tokens[-1] in self.stop_ids:
            self.stop_reason = "stop_token"
        elif len(self.tokens) - self.prompt_len >= self.max_new_tokens:
            self.stop_reason = "max_new_tokens"
        else:
            self.stop_reason = None
        return self.stop_reason is not None
