"""The rows of `free bench`: which contenders run, with which options (`Plan`), checked before
any model loads."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..decoding.config import DecodeConfig
from ..decoding.drafting import DRAFTS
from ..errors import ConfigError

FULL = "full"
KINDS = ("full", "generate", "static", "calm", "free", "auto", "lossless", "sampling", "hf-early-exit", "hf-lookup")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # one of KINDS
    config: DecodeConfig | None = None  # None: transformers' own `generate`
    dtype: torch.dtype | None = None  # transformers' rows: the precision it runs in
    lookup: int | None = None  # transformers' prompt lookup: tokens drafted a round


@dataclass(frozen=True)
class Plan:
    """Which rows a benchmark runs (free bench's options): see `contenders`."""

    max_new_tokens: int = 64
    exit_layer: int | None = None
    thresholds: tuple[float, ...] = (0.9,)
    skip: tuple[str, ...] = ()
    prune: tuple[str, ...] = ()
    prune_k: int = 1024
    measures: tuple[str, ...] = ()
    sampling: DecodeConfig | None = None
    lossless_at: tuple[float, ...] | None = None
    drafts: tuple[str, ...] = ("exit", "lookup", "auto")  # lossless rows: each draft
    lookup_k: tuple[int, ...] = (3, 10)  # transformers' prompt lookup rows: each K
    baseline_dtypes: tuple[torch.dtype, ...] | None = None  # transformers' rows: each precision (None: each the engine computes in)

    def check(self) -> "Plan":
        """Options that need no model: row kinds, drafts, K, sampling."""
        bad = [k for k in self.skip if k not in KINDS or k == "full"]
        if bad:
            raise ConfigError(f"--skip {bad[0]!r}: choose from {', '.join(KINDS[1:])}")
        wrong = [d for d in self.drafts if d not in DRAFTS]
        if wrong:
            raise ConfigError(f"--draft {wrong[0]!r}: choose from {', '.join(DRAFTS)}")
        if any(k < 1 for k in self.lookup_k):
            raise ConfigError("--lookup-k must be at least 1")
        if self.sampling is not None:
            self.sampling.check()
        return self


def contenders(plan: Plan, encoder_decoder: bool = False, computes_in: tuple[torch.dtype, ...] = (torch.float32,)) -> list[Contender]:
    """The rows of a benchmark: our full loop; transformers' `generate` and its prompt lookup at
    each K, in each baseline precision; static, calm, free at each threshold, free with the
    adaptive threshold; lossless free with each draft (the exit's at each threshold, lookup, auto
    at the first); transformers' self-speculative early exit (decoder-only models); less the kinds
    in `skip`. transformers' rows run in the plan's precisions, else in each of `computes_in`.
    Each schedule in `prune` adds pruned rows: `context` to free and lossless free, a
    per-layer one to calm. Each confidence measure in `measures` other than softmax adds calm, free
    and lossless free rows with that measure at the first threshold. `lossless_at` limits the
    lossless rows drafted by the exit to those thresholds."""
    base = DecodeConfig(max_new_tokens=plan.max_new_tokens, exit_layer=plan.exit_layer, prune="none")  # pruned rows are added by name
    thresholds, first = plan.thresholds, plan.thresholds[0]
    rows = [Contender(FULL, "full", replace(base, strategy="full"))]
    baselines = plan.baseline_dtypes or computes_in
    for dtype in baselines:
        name = DTYPE_NAMES[dtype]
        rows.append(Contender(f"transformers generate {name}", "generate", dtype=dtype))
        if not encoder_decoder:
            rows += [Contender(f"transformers lookup K={k} {name}", "hf-lookup", dtype=dtype, lookup=k) for k in plan.lookup_k]
    rows.append(Contender("static", "static", replace(base, strategy="static")))
    rows.append(Contender(f"calm λ={first:g}", "calm", replace(base, strategy="calm", threshold=first)))
    rows += [Contender(f"free λ={t:g}", "free", replace(base, strategy="free", threshold=t, draft="exit")) for t in thresholds]
    rows.append(Contender("free λ=auto", "auto", replace(base, strategy="free", sync_at_end=True, draft="exit")))
    checked = [t for t in thresholds if plan.lossless_at is None or t in plan.lossless_at]
    lossless = replace(base, strategy="free", lossless=True)
    if "exit" in plan.drafts:
        rows += [Contender(f"free lossless λ={t:g}", "lossless", replace(lossless, threshold=t, draft="exit")) for t in checked]
    if "lookup" in plan.drafts:
        rows.append(Contender("free lossless lookup", "lossless", replace(lossless, draft="lookup")))
    if "auto" in plan.drafts:
        rows.append(Contender(f"free lossless auto λ={first:g}", "lossless", replace(lossless, threshold=first, draft="auto")))
    for schedule in plan.prune:
        pruned = replace(base, prune=schedule, prune_k=plan.prune_k)
        if schedule == "context":
            rows += [Contender(f"free λ={t:g} +context", "free", replace(pruned, strategy="free", threshold=t, draft="exit")) for t in thresholds]
            if "exit" in plan.drafts:
                rows += [Contender(f"free lossless λ={t:g} +context", "lossless", replace(pruned, strategy="free", threshold=t, lossless=True, draft="exit")) for t in checked]
        else:
            rows.append(Contender(f"calm λ={first:g} +{schedule}", "calm", replace(pruned, strategy="calm", threshold=first)))
    for measure in (m for m in plan.measures if m != "softmax"):
        measured = replace(base, confidence=measure, threshold=first)
        rows.append(Contender(f"calm λ={first:g} [{measure}]", "calm", replace(measured, strategy="calm")))
        rows.append(Contender(f"free λ={first:g} [{measure}]", "free", replace(measured, strategy="free", draft="exit")))
        rows.append(Contender(f"free lossless λ={first:g} [{measure}]", "lossless", replace(measured, strategy="free", lossless=True, draft="exit")))
    if plan.sampling is not None:  # sampling rows: the options' temperature, top-k, top-p and seed
        s = plan.sampling
        drawn = replace(base, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, threshold=first)
        label = f"T={s.temperature:g}"
        rows.append(Contender(f"full {label}", "sampling", replace(drawn, strategy="full")))
        rows.append(Contender(f"free λ={first:g} {label}", "sampling", replace(drawn, strategy="free", draft="exit")))
        rows.append(Contender(f"free lossless λ={first:g} {label}", "sampling", replace(drawn, strategy="free", lossless=True, draft="exit")))
    if not encoder_decoder:
        rows.append(Contender("hf assistant_early_exit", "hf-early-exit", replace(base, strategy="static"), dtype=baselines[0]))
    unique = {r.name: r for r in reversed(rows)}  # an option given twice (-t 0.7 -t 0.7) runs once: rows are keyed by name
    return [r for r in rows if unique[r.name] is r and (r.kind not in plan.skip or r.kind == "full")]


