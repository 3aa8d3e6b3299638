"""`free score`: quality, consistency and speed of an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import reported_errors


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="JSONL outputs of free generate (id, output, stats).", metavar="PREDICTIONS.jsonl")],
    references: Annotated[Optional[Path], typer.Option("--references", "-r", help="JSONL file holding the references, joined by id (default: a field of the predictions, e.g. kept with generate --keep).")] = None,
    reference_field: Annotated[Optional[str], typer.Option("--reference-field", help="The reference field (default: the first of summary, answers, output, reference, references, target, en present).")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", help="The full model's outputs for the same ids: report exact-match rate and ROUGE-L against them.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="rouge1 | rouge2 | rougeL | rougeLsum | bleu | chrf | exact_match | f1 (repeatable). Default by reference field: ROUGE for summaries, EM/F1 for answers, BLEU/chrF for a language code.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="NAME=VALUE: exit 1 when that figure is below VALUE (repeatable), e.g. rougeL=0.40 or exact_match_full=0.95.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="stdout format: json | line (one line for people) | markdown | table.")] = "json",
    output_field: Annotated[str, typer.Option("--output-field", help="The generated text's field.")] = "output",
    id_field: Annotated[str, typer.Option("--id-field", help="The field records are joined on.")] = "id",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table on stderr.")] = False,
) -> None:
    """Score generated outputs: quality against references, consistency with the full model, speed.

    ROUGE (rouge-score, stemmed) and the consistency figures are in [0, 1]; BLEU and chrF
    (sacrebleu, signature printed) and SQuAD exact match and F1 (official normalization, best gold
    answer) in [0, 100]. Speed figures come from the stats `free generate` wrote. JSON on stdout,
    a table on stderr; with --fail-under, exit 1 when a figure falls short."""
    from ..evaluation.score import parse_bounds, render, score_file, shortfalls

    with reported_errors():
        bounds = parse_bounds(fail_under or [])
        scored = score_file(
            predictions, references=references, reference_field=reference_field, against=against,
            metrics=metric, output_field=output_field, id_field=id_field,
        )  # fmt: skip
        failed = shortfalls(scored, bounds)
        typer.echo(render(scored, fmt))
        if not quiet and fmt != "table":
            typer.echo(render(scored, "table"), err=True)
        for message in failed:
            typer.echo(f"free score: {message}", err=True)
        if failed:
            raise typer.Exit(1)
