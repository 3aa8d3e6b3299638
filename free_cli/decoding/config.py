"""Decoding options, validated once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from .confidence import MEASURES
from .drafting import DRAFTS
from ..errors import ConfigError
from .pruning import PER_LAYER, SCHEDULES
from .sampling import Sampling

STRATEGIES = ("full", "static", "calm", "free")


@dataclass(frozen=True)
class DecodeConfig:
    """How one request is decoded. Greedy throughout.

    Notation follows the FREE paper: L layers in all, the shallow model is the first L_s of them
    (`exit_layer`), λ the confidence threshold."""

    strategy: str = "free"
    # L_s for `free`, the fixed exit for `static`. None: the checkpoint's, else round(L / 4).
    exit_layer: int | None = None
    # λ: a token exits when its confidence is at least this (above 1: never).
    threshold: float = 0.9
    # Which confidence measure decides exits (see confidence.py).
    confidence: str = "softmax"
    # `free` only: verify every stacked token against the deep model; output equals `full`.
    lossless: bool = False
    # `free` only: what the synchronized pass verifies (drafting.py). `exit`: tokens the shallow
    # exit is confident of (FREE). `lookup`: continuations of n-grams found earlier in the prompt
    # and output, as many as pay by the cost model; the exit is not used. `auto`: lookup where it
    # pays, else the exit while it pays, else plain steps. None: auto with lossless, else exit.
    draft: str | None = None
    draft_tokens: int = 10  # lookup: at most this many drafts a round
    draft_ngram: int = 3  # lookup: the longest n-gram matched
    # `free` only: force a synchronized pass once this many tokens are stacked (None: no limit).
    max_stack: int | None = None
    # `free` without `lossless`: run the deep layers over a trailing stack when generation ends,
    # which yields its (confidence, agreed) pairs and leaves every layer's cache complete. Off,
    # the trailing stack is dropped from the cache instead and its tokens are left unverified.
    sync_at_end: bool = False
    # `calm`: the first layer (1-based depth) allowed to exit.
    min_exit_layer: int = 1
    # `calm`: CALM's decaying threshold λ_t = clip(0.9 λ + 0.1 exp(-τ t / N)); None keeps λ.
    decay_tau: float | None = None
    # Unembedding pruning (see pruning.py): none | fixed | decaying | adaptive (calm) | context (free),
    # or auto: context for lossless `free` (exact there, and cheaper), none otherwise.
    prune: str = "auto"
    prune_k: int = 1024  # candidates kept (fixed, the start of decaying and adaptive, context's deep top k)
    prune_floor: int = 32  # decaying and adaptive never keep fewer
    prune_decay: float = 0.5  # decaying: k_i = max(floor, k e^(-decay i))
    max_new_tokens: int = 128
    # Token ids that end generation; None: the model's EOS ids.
    stop_ids: tuple[int, ...] | None = None
    # Sampling (sampling.py): temperature 0 is greedy; top-k 0 and top-p 1 keep every token. Each
    # request draws from its own generator, seeded from `seed` and the request's key.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @cached_property  # read on every token
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)

    def check(self) -> None:
        """The checks that need no model."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.confidence not in MEASURES:
            raise ConfigError(f"unknown confidence {self.confidence!r}; choose one of {', '.join(MEASURES)}")
        if self.lossless and self.strategy != "free":
            raise ConfigError("--lossless applies to --strategy free only")
        if self.draft is not None and self.draft not in DRAFTS:
            raise ConfigError(f"unknown draft {self.draft!r}; choose one of {', '.join(DRAFTS)}")
        if self.draft not in (None, "exit") and self.strategy != "free":
            raise ConfigError("--draft applies to --strategy free only")
        if self.draft_tokens < 1 or self.draft_ngram < 1:
            raise ConfigError("--draft-tokens and --draft-ngram must be at least 1")
        if not self.threshold >= 0.0:  # also rejects NaN; above 1 nothing exits
            raise ConfigError(f"threshold must be a number >= 0, got {self.threshold}")
        if self.prune not in SCHEDULES and self.prune != "auto":
            raise ConfigError(f"unknown pruning {self.prune!r}; choose one of auto, {', '.join(SCHEDULES)}")
        if self.prune in PER_LAYER and self.strategy != "calm":
            raise ConfigError(f"--prune {self.prune} applies to --strategy calm (per-layer exits); free uses --prune context")
        if self.prune == "context" and self.strategy != "free":
            raise ConfigError("--prune context applies to --strategy free")
        if self.prune_k < 1 or self.prune_floor < 1 or not self.prune_decay >= 0:
            raise ConfigError("--prune-k and --prune-floor must be at least 1 and --prune-decay at least 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_stack is not None and self.max_stack < 1:
            raise ConfigError(f"max stack must be at least 1, got {self.max_stack}")
        if not self.temperature >= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be at least 0, --top-k at least 0 and --top-p in (0, 1]")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ConfigError(f"exit layer must be at least 1, got {self.exit_layer}")

    def resolved(self, num_layers: int, default_exit_layer: int | None = None) -> "DecodeConfig":
        """Checks every option against a model of `num_layers` layers and fills defaults."""
        self.check()
        exit_layer = self.exit_layer or default_exit_layer or max(1, round(num_layers / 4))
        if self.strategy in ("free", "static") and not 1 <= exit_layer < num_layers:
            raise ConfigError(f"exit layer must lie in [1, {num_layers - 1}] for a model of {num_layers} layers, got {exit_layer}")
        if self.strategy == "calm" and not 1 <= self.min_exit_layer < num_layers:
            raise ConfigError(f"min exit layer must lie in [1, {num_layers - 1}], got {self.min_exit_layer}")
        prune = self.prune if self.prune != "auto" else "context" if self.strategy == "free" and self.lossless else "none"
        draft = self.draft or ("auto" if self.lossless else "exit")
        return replace(self, exit_layer=exit_layer, prune=prune, draft=draft)

    def describe(self) -> str:
        """One line for logs, e.g. `free+lossless L_s=8 λ=0.9 softmax`."""
        parts = [self.strategy + ("+lossless" if self.lossless else "")]
        if self.strategy in ("free", "static"):
            parts.append(f"L_s={self.exit_layer}")
        if self.strategy == "free" and self.draft not in (None, "exit"):
            parts.append(f"draft {self.draft} ≤{self.draft_tokens}")
        if self.strategy == "calm":
            parts.append(f"min exit layer {self.min_exit_layer}")
        if self.strategy in ("free", "calm"):
            parts += [f"λ={self.threshold:g}", self.confidence]
        if self.prune != "none":
            parts.append(f"prune {self.prune} k={self.prune_k}")
        if not self.sampling.greedy:
            parts.append(f"sampling T={self.temperature:g} top-k {self.top_k or 'all'} top-p {self.top_p:g} seed {self.seed}")
        return " ".join(parts)
