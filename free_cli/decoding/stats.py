"""Per-record stats as counts, and one tally of them. Each record `generate` writes counts its new
tokens, the tokens an exit emitted before the last layer, the layers run and the LM head's
multiply-adds; sums over records (the `generate` summary, `bench`, `score`) add the counts, and
the per-token shares are derived from them here, in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

# (count, its share per new token): stats written by older versions carry only the share.
COUNTS = (("exited_tokens", "exited_share"), ("layers_run", "mean_layers"), ("head_macs", "head_macs_per_token"))


@dataclass
class Tally:
    """Stats summed over records. A count given as None was not measured (bench's rows for
    transformers' `generate`), and its sum stays None."""

    new_tokens: int = 0
    exited_tokens: float | None = 0  # tokens emitted by an exit before the last layer
    layers_run: float | None = 0  # layers run over all tokens, a trained exit's own layers included
    head_macs: float | None = 0  # LM-head multiply-adds: vocabulary rows scored × hidden size
    rejected: int = 0  # lossless: stacked tokens the deep model did not keep
    wall_time_s: float = 0.0
    records: int = 0
    prefill_s: float | None = 0.0  # seconds to each record's first token; None where one is unknown
    # lookup drafts (drafting.py): verification rounds, drafts verified, drafts kept, rounds that kept none
    verifications: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    empty_verifications: int = 0

    @classmethod
    def of(cls, stats: Iterable[dict]) -> Tally:
        tally = cls()
        for s in stats:
            tally.add(s)
        return tally

    def add(self, stats: dict) -> None:
        """Adds one record's stats; a count it lacks (an older file) is its share × new_tokens."""
        n = stats.get("new_tokens", 0)
        self.new_tokens += n
        self.records += 1
        self.rejected += stats.get("rejected", 0)
        self.wall_time_s += stats.get("wall_time_s", 0.0)
        prefill = stats.get("prefill_s")
        self.prefill_s = None if prefill is None or self.prefill_s is None else self.prefill_s + prefill
        for count in ("verifications", "drafted_tokens", "accepted_drafts", "empty_verifications"):
            setattr(self, count, getattr(self, count) + (stats.get(count) or 0))
        for count, share in COUNTS:
            value, total = stats[count] if count in stats else stats.get(share, 0.0) * n, getattr(self, count)
            setattr(self, count, None if value is None or total is None else total + value)

    def per_token(self, count: float | None) -> float | None:
        return None if count is None else count / self.new_tokens if self.new_tokens else 0.0

    @property
    def exited_share(self) -> float | None:
        return self.per_token(self.exited_tokens)

    @property
    def mean_layers(self) -> float | None:
        return self.per_token(self.layers_run)

    @property
    def head_macs_per_token(self) -> float | None:
        return self.per_token(self.head_macs)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after each record's first, per second after it: the decoding phase alone."""
        if self.prefill_s is None or self.wall_time_s <= self.prefill_s:
            return None
        return (self.new_tokens - self.records) / (self.wall_time_s - self.prefill_s)

    @property
    def accepted_per_verification(self) -> float | None:
        return self.accepted_drafts / self.verifications if self.verifications else None

    @property
    def empty_share(self) -> float | None:
        """The share of verification rounds that kept no draft."""
        return self.empty_verifications / self.verifications if self.verifications else None


def record_stats(engine, state, cfg, wall: float) -> dict:
    """One record's stats, as `generate` writes them: counts, and the shares derived from them."""
    n = len(state.generated)
    counts = {
        "new_tokens": n,
        "exited_tokens": sum(d < engine.num_layers for d in state.depths),
        "layers_run": sum(d + (len(engine.exit_modules[d].layers) if d in engine.exit_modules else 0) for d in state.depths),
        "head_macs": state.head_rows * engine.adapter.hidden_size,
    }
    tally = Tally.of([counts])
    return counts | {
        "exited_share": tally.exited_share,
        "mean_layers": tally.mean_layers,
        "num_layers": engine.num_layers,
        "deep_passes": state.deep_passes,
        "rejected": state.rejected,
        "verifications": state.verifications,
        "drafted_tokens": state.drafted,
        "accepted_drafts": state.accepted,
        "empty_verifications": state.empty_verifications,
        "wall_time_s": wall,
        "prefill_s": state.prefill_s,
        "tokens_per_s": n / wall if wall > 0 else math.inf,
        "head_macs_per_token": tally.head_macs_per_token,
        "strategy": cfg.strategy + ("+lossless" if cfg.lossless else ""),
        "draft": cfg.draft if cfg.strategy == "free" else None,
        "exit_layer": cfg.exit_layer if cfg.strategy in ("free", "static") else None,
        "threshold": cfg.threshold if cfg.strategy in ("free", "calm") else None,
        "stop_reason": state.stop_reason,
    }

