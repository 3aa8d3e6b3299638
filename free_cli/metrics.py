"""Text metrics and per-sample distances between outputs."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def _rouge_scorer(kind: str, stem: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=stem)


def rouge_l(prediction: str, reference: str, stem: bool = False) -> float:
    """ROUGE-L F1 (rouge-score)."""
    return _rouge_scorer("rougeL", stem).score(reference, prediction)["rougeL"].fmeasure


def distance(kind: str, early: str, full: str) -> float:
    """A per-sample distance in [0, 1] between an early-exit output and the full model's:
    `rougeL`: 1 − ROUGE-L F1 (two empty outputs are at distance 0); `mismatch`: 0 if the texts are
    equal, else 1."""
    if kind == "mismatch":
        return float(early != full)
    if kind == "rougeL":
        if not early.strip() and not full.strip():
            return 0.0
        return 1.0 - rouge_l(early, full)
    raise ValueError(f"unknown distance {kind!r}")


DISTANCES = ("rougeL", "mismatch")
