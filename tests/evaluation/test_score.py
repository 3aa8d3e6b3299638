"""`free score`: metric values computed by hand, joining by id, consistency, speed, --fail-under."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from free_cli.cli import app
from free_cli.errors import InputError
from free_cli.evaluation.score import speed
from free_cli.metrics import bleu, consistency, evaluate, rouge, squad_exact, squad_f1, squad_normalize

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_rouge_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 each way.
    # Bigrams in common: "the cat", "on the", "the mat": 3 of 5 each way.
    got = rouge(["the cat sat on the mat"], [["the cat is on the mat"]], ["rouge1", "rouge2", "rougeL"])
    assert got["rouge1"] == pytest.approx(5 / 6)
    assert got["rouge2"] == pytest.approx(3 / 5)
    assert got["rougeL"] == pytest.approx(5 / 6)
    # The best of several references counts; stemming makes "sitting"/"sits" one token stem.
    assert rouge(["cats"], [["dog", "cat"]], ["rouge1"])["rouge1"] == pytest.approx(1.0)


def test_rouge_lsum_splits_sentences():
    # Summary-level LCS over sentences: order of sentences does not matter, unlike rougeL.
    pred, ref = "Bob left. Anna came.", "Anna came. Bob left."
    got = rouge([pred], [[ref]], ["rougeL", "rougeLsum"])
    assert got["rougeLsum"] == pytest.approx(1.0)
    assert got["rougeL"] < 0.7


def test_bleu_by_hand():
    # Candidate of 7 words against a 6-word reference it contains: brevity penalty 1; n-gram
    # precisions 6/7, 5/6, 4/5, 3/4; BLEU = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** (1/4).
    score, signature = bleu(["the cat sat on the mat today"], [["the cat sat on the mat"]])
    assert score == pytest.approx(100 * (3 / 7) ** 0.25, abs=1e-6)
    assert signature.startswith("nrefs:1|case:mixed")
    # A shorter candidate is penalized: BP = exp(1 - r/c) with r = 7, c = 6, all precisions 1.
    short, _ = bleu(["the cat sat on the mat"], [["the cat sat on the mat today"]])
    assert short == pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-6)


def test_squad_normalization_and_f1():
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_exact("An apple.", ["apple"]) == 1.0
    assert squad_exact("the Apple", ["pear", "APPLE"]) == 1.0
    assert squad_exact("apples", ["apple"]) == 0.0
    # "the big red apple" -> [big, red, apple] vs [red, apple]: P = 2/3, R = 1, F1 = 0.8.
    assert squad_f1("the big red apple", ["Red apple."]) == pytest.approx(0.8)
    assert squad_f1("the big red apple", ["Red apple.", "a big red apple"]) == pytest.approx(1.0)
    assert squad_f1("nothing", ["Red apple."]) == 0.0
    got, _ = evaluate(["the big red apple", "Denver Broncos"], [["red apple"], ["The Denver Broncos"]], ["exact_match", "f1"])
    assert got == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0)}


def test_consistency_and_speed_by_hand():
    got = consistency(["a b c d", "same", ""], ["a b x d", "same", " "])
    assert got["exact_match_full"] == pytest.approx(1 / 3)
    # ROUGE-L of "a b c d" vs "a b x d": LCS 3 of 4 -> 0.75; equal texts 1; two empty outputs 1.
    assert got["rougeL_full"] == pytest.approx((0.75 + 1 + 1) / 3)
    stats = [
        {"new_tokens": 10, "wall_time_s": 1.0, "exited_share": 0.5, "mean_layers": 4.0},
        {"new_tokens": 30, "wall_time_s": 1.0, "exited_share": 0.1, "mean_layers": 8.0},
    ]
    s = speed(stats)
    assert s["tokens_per_s"] == pytest.approx(20.0)
    assert s["exited_share"] == pytest.approx((5 + 3) / 40)
    assert s["mean_layers"] == pytest.approx((40 + 240) / 40)


def test_speed_sums_counts_and_reads_older_shares():
    new = {"new_tokens": 10, "wall_time_s": 1.0, "exited_tokens": 5, "layers_run": 40, "exited_share": 0.9}  # the count wins
    old = {"new_tokens": 30, "wall_time_s": 1.0, "exited_share": 0.1, "mean_layers": 8.0}  # written before counts
    s = speed([new, old])
    assert s["exited_share"] == pytest.approx((5 + 3) / 40) and s["mean_layers"] == pytest.approx((40 + 240) / 40)


@pytest.fixture
def files(write_jsonl):
    stats = {"new_tokens": 6, "wall_time_s": 0.5, "exited_share": 0.5, "mean_layers": 3.0}
    preds = write_jsonl("preds.jsonl", [
        {"id": "a", "output": "the cat sat on the mat", "stats": stats},
        {"id": "b", "output": "hello world", "stats": stats},
    ])  # fmt: skip
    refs = write_jsonl("refs.jsonl", [
        {"id": "b", "summary": "hello world"},
        {"id": "a", "summary": "the cat is on the mat"},
        {"id": "c", "summary": "never predicted"},
    ])  # fmt: skip
    full = write_jsonl("full.jsonl", [{"id": "a", "output": "the cat sat on the mat"}, {"id": "b", "output": "hi world"}])
    return preds, refs, full


def test_score_joins_references_by_id(files):
    preds, refs, full = files
    result = invoke("score", preds, "--references", refs, "--against", full, "-q")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["reference_field"] == "summary"
    assert out["metrics"]["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    assert out["consistency"]["exact_match_full"] == pytest.approx(0.5)
    assert out["speed"]["tokens_per_s"] == pytest.approx(12.0)
    assert set(out["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


@pytest.mark.parametrize("bounds, code", [
    ("rougeL=0.9", 0), ("rougeL=0.92", 1), ("exact_match_full=0.5", 0), ("exact_match_full=0.51", 1),
    ("rougeL=0.9 exact_match_full=0.51", 1), ("rougeL=0.9 tokens_per_s=12", 0), ("tokens_per_s=13", 1),
])  # fmt: skip
def test_fail_under(files, bounds, code):
    preds, refs, full = files  # rougeL = 0.9167, exact_match_full = 0.5, tokens_per_s = 12
    args = [a for b in bounds.split() for a in ("--fail-under", b)]
    result = invoke("score", preds, "-r", refs, "--against", full, "-q", *args)
    assert result.exit_code == code, result.stderr
    assert ("below" in result.stderr) == bool(code)
    assert json.loads(result.stdout)["metrics"]["rougeL"] > 0.9  # the figures are printed either way


def test_fail_under_names_unknown_figures(files):
    preds, refs, full = files
    bad = invoke("score", preds, "-r", refs, "-q", "--fail-under", "bleu=10")
    assert bad.exit_code == 1 and "'bleu', which was not computed" in bad.stderr
    assert "NAME=VALUE" in invoke("score", preds, "-r", refs, "--fail-under", "rougeL").stderr


def test_id_mismatches_are_named(files, write_jsonl):
    preds, refs, full = files
    missing = write_jsonl("few.jsonl", [{"id": "a", "summary": "x"}])
    result = invoke("score", preds, "-r", missing)
    assert result.exit_code == 1 and "id 'b' has no record" in result.stderr and "line 2" in result.stderr
    dup = write_jsonl("dup.jsonl", [{"id": "a", "output": "x"}, {"id": "b", "output": "y"}, {"id": "a", "output": "z"}])
    result = invoke("score", dup, "-r", refs)
    assert result.exit_code == 1 and "duplicate id 'a' (also on line 1)" in result.stderr and "line 3" in result.stderr
    result = invoke("score", preds, "-r", refs, "--against", write_jsonl("full1.jsonl", [{"id": "a", "output": "x"}]))
    assert result.exit_code == 1 and "id 'b' has no record" in result.stderr


def test_references_in_the_records_and_task_defaults(write_jsonl):
    qa = write_jsonl("qa.jsonl", [
        {"id": 1, "output": "The Denver Broncos.", "answers": ["Denver Broncos", "Broncos"]},
        {"id": 2, "output": "in 2016", "answers": {"text": ["2016"], "answer_start": [3]}},
    ])  # fmt: skip
    out = json.loads(invoke("score", qa, "-q").stdout)
    assert out["metrics"]["exact_match"] == pytest.approx(50.0)
    assert out["metrics"]["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    mt = write_jsonl("mt.jsonl", [{"id": 1, "output": "the cat sat on the mat today", "de": "x", "en": "the cat sat on the mat"}])
    result = invoke("score", mt, "--metric", "bleu", "--metric", "chrf")
    out = json.loads(result.stdout)
    assert out["metrics"]["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25)
    assert "nrefs:1" in out["signatures"]["chrf"] and "bleu: nrefs:1" in result.stderr


def test_error_records_are_reported_apart_and_formats(write_jsonl):
    """An error record (generate --on-error skip) is counted, not scored as an empty output."""
    rows = write_jsonl("p.jsonl", [{"id": 1, "output": "a b", "summary": "a b"}, {"id": 2, "error": "line 2: bad", "summary": "a b"}])
    out = json.loads(invoke("score", rows, "-q").stdout)
    assert out["errors"] == 1 and out["records"] == 1 and out["metrics"]["rougeL"] == pytest.approx(1.0)
    md = invoke("score", rows, "--format", "markdown", "-q").stdout
    assert "| rougeL | 1.0000 |" in md and "1 error records left out" in md
    assert "rougeL" in invoke("score", rows, "--format", "table").stdout
    only = write_jsonl("e.jsonl", [{"id": 2, "error": {"message": "bad"}}])
    failed = invoke("score", only, "-q")
    assert failed.exit_code == 1 and "all 1 records are error records" in failed.stderr


def test_bad_reference_is_an_input_error(write_jsonl):
    rows = write_jsonl("p.jsonl", [{"id": 1, "output": "a", "summary": 3}])
    result = invoke("score", rows)
    assert result.exit_code == 1 and "line 1, field 'summary'" in result.stderr
    with pytest.raises(InputError):
        from free_cli.evaluation.score import reference_texts

        reference_texts([], 1, "answers")
