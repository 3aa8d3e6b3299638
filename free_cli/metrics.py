"""Text metrics, one implementation each: ROUGE (rouge-score, Porter stemming, as reported),
BLEU and chrF (sacrebleu), SQuAD exact match and F1 (official normalization); consistency with the
full model's outputs; per-sample distances for Learn-then-Test. Scales follow each metric's usual
report: ROUGE and consistency in [0, 1], BLEU, chrF and SQuAD in [0, 100]."""

from __future__ import annotations

import collections
import re
import string
from functools import lru_cache

from .errors import ConfigError

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRICS = ROUGE + ("bleu", "chrf", "exact_match", "f1")
PERCENT = ("bleu", "chrf", "exact_match", "f1")  # reported in [0, 100]
DEFAULT_METRICS = {  # by the reference field's kind
    "summarization": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "qa": ("exact_match", "f1"),
    "translation": ("bleu", "chrf"),
    "generic": ("rougeL",),
}


@lru_cache(maxsize=8)
def _scorer(kinds: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction against one reference (the ROUGE `rouge` reports)."""
    return _scorer(("rougeL",)).score(reference, prediction)["rougeL"].fmeasure


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 answer normalization: lower case, no punctuation, no articles,
    single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, golds: list[str]) -> float:
    return max(float(squad_normalize(prediction) == squad_normalize(g)) for g in golds)


def squad_f1(prediction: str, golds: list[str]) -> float:
    def f1(gold: str) -> float:
        p, g = squad_normalize(prediction).split(), squad_normalize(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(g) for g in golds)


def _sentences(text: str) -> str:
    """ROUGE-Lsum's input: one sentence a line (split after . ! ? and at existing newlines)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s)


def rouge(predictions: list[str], references: list[list[str]], kinds) -> dict[str, float]:
    """Mean ROUGE F1 per kind (rouge-score, Porter stemming), the best reference per sample."""
    kinds = list(kinds)
    scorer = _scorer(tuple(kinds))
    sums = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, references):
        if "rougeLsum" in kinds:
            pred, refs = _sentences(pred), [_sentences(r) for r in refs]
        scores = scorer.score_multi(refs, pred)
        for k in kinds:
            sums[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: sums[k] / n for k in kinds}


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference slot. Samples with fewer references repeat
    their first, which changes neither clipped counts nor the closest reference length."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]


def bleu(predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(predictions, _reference_streams(references))
    return score.score, str(metric.get_signature())


def chrf(predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score(predictions, _reference_streams(references))
    return score.score, str(metric.get_signature())


def evaluate(predictions: list[str], references: list[list[str]], metrics) -> tuple[dict[str, float], dict[str, str]]:
    """The chosen metrics over aligned predictions and reference lists; sacrebleu's signatures."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    out, signatures = {}, {}
    kinds = [m for m in metrics if m in ROUGE]
    if kinds:
        out.update(rouge(predictions, references, kinds))
    for name, fn in (("bleu", bleu), ("chrf", chrf)):
        if name in metrics:
            out[name], signatures[name] = fn(predictions, references)
    n = max(len(predictions), 1)
    if "exact_match" in metrics:
        out["exact_match"] = 100 * sum(squad_exact(p, r) for p, r in zip(predictions, references)) / n
    if "f1" in metrics:
        out["f1"] = 100 * sum(squad_f1(p, r) for p, r in zip(predictions, references)) / n
    return {m: out[m] for m in metrics}, signatures


def consistency(outputs: list[str], full: list[str]) -> dict[str, float]:
    """What early exit must preserve: the share of outputs equal to the full model's, and their
    mean ROUGE-L F1 against it (two empty outputs count as equal)."""
    n = max(len(outputs), 1)
    same = sum(a == b for a, b in zip(outputs, full))
    similar = sum(1.0 if not a.strip() and not b.strip() else rouge_l(a, b) for a, b in zip(outputs, full))
    return {"exact_match_full": same / n, "rougeL_full": similar / n}


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
