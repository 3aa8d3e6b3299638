"""`free generate`: one output record per input record, in input order."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import ConfidenceOpt, DatasetOpt, DecayOpt, DeviceOpt, DraftNgramOpt, DraftOpt, DraftTokensOpt, DtypeOpt, ExitLayerOpt, LosslessOpt, MaxNewOpt, MaxStackOpt, MinExitOpt, ModelOpt, PriorsOpt, PruneDecayOpt, PruneFloorOpt, PruneKOpt, PruneOpt, SeedOpt, StoreOpt, StrategyOpt, SyncEndOpt, TemperatureOpt, ThreadsOpt, ThresholdOpt, TopKOpt, TopPOpt, ZetaOpt, _progress, decode_config, estimator_config, reported_errors, use_threads, warn_precision


@app.command()
def generate(
    input: Annotated[str, typer.Argument(help="JSONL input file, or - for stdin.", metavar="INPUT.jsonl|-")],
    model: ModelOpt = None,
    strategy: StrategyOpt = "free",
    lossless: LosslessOpt = False,
    exit_layer: ExitLayerOpt = None,
    threshold: ThresholdOpt = None,
    dataset: DatasetOpt = None,
    threshold_store: StoreOpt = None,
    zeta: ZetaOpt = 0.4,
    update_every: Annotated[Optional[int], typer.Option("--update-every", help="auto: refit every N records (default: 3% of the input's records, or 10 on stdin).")] = None,
    initial_threshold: Annotated[float, typer.Option("--initial-threshold", help="auto: the threshold before the first fit, when none is stored.")] = 0.9,
    priors: PriorsOpt = "equal",
    confidence: ConfidenceOpt = "softmax",
    min_exit_layer: MinExitOpt = 1,
    decay_tau: DecayOpt = None,
    max_stack: MaxStackOpt = None,
    sync_at_end: SyncEndOpt = False,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = 10,
    draft_ngram: DraftNgramOpt = 3,
    prune: PruneOpt = "auto",
    prune_k: PruneKOpt = 1024,
    prune_floor: PruneFloorOpt = 32,
    prune_decay: PruneDecayOpt = 0.5,
    max_new_tokens: MaxNewOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Decode up to B records together, a finished record's row refilled from the input; outputs stay in input order.")] = 1,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write records here instead of stdout.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted --output file after its last complete record.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    on_error: Annotated[str, typer.Option("--on-error", help="fail: stop at the first bad record (exit 1) | skip: write an error record in its place.")] = "fail",
    task: Annotated[str, typer.Option("--task", help="auto | prompt | summarization | qa | translation | instruction.")] = "auto",
    prompt_field: Annotated[str, typer.Option("--prompt-field", help="Field holding a ready prompt.")] = "prompt",
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="summarization: the text field (default: dialogue, document, article or text).")] = None,
    question_field: Annotated[str, typer.Option("--question-field", help="qa: the question field.")] = "question",
    context_field: Annotated[str, typer.Option("--context-field", help="qa: the context field.")] = "context",
    source_field: Annotated[Optional[str], typer.Option("--source-field", help="translation: the source field, a language code such as de (default: the non-target code field).")] = None,
    target_language: Annotated[str, typer.Option("--target-language", help="translation: the target language code.")] = "en",
    instruction_field: Annotated[str, typer.Option("--instruction-field", help="instruction: the instruction field (with an optional 'input' field).")] = "instruction",
    id_field: Annotated[str, typer.Option("--id-field", help="Field copied to each output's id (default: id; the line number when absent).")] = "id",
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="Copy this input field into the output (repeatable), e.g. a reference.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")] = False,
) -> None:
    """Generate one output record per JSONL input record, in input order.

    Each output line holds the record's id, the generated text (`output`) and `stats`. Progress and
    a summary go to stderr."""
    from ..records.job import GenerateJob
    from ..records.prompts import Fields
    from ..records.stream import BatchOptions

    with reported_errors():
        cfg, auto = decode_config(
            strategy, lossless, exit_layer, threshold, confidence, min_exit_layer, decay_tau, max_stack, sync_at_end,
            max_new_tokens, prune=prune, prune_k=prune_k, prune_floor=prune_floor, prune_decay=prune_decay,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, draft=draft, draft_tokens=draft_tokens, draft_ngram=draft_ngram,
        )  # fmt: skip
        fields = Fields(
            prompt=prompt_field, text=text_field, question=question_field, context=context_field,
            source=source_field, target_language=target_language, instruction=instruction_field,
        )  # fmt: skip
        options = BatchOptions(decode=cfg, task=task, fields=fields, id_field=id_field, keep=tuple(keep or ()), on_error=on_error).check()
        job = GenerateJob(
            input, output, options, auto, threshold not in (None, "auto"), estimator_config(zeta, 0.03, initial_threshold, priors, "mle"),
            initial_threshold, update_every, dataset, threshold_store, model, dtype, device, batch_size, resume, overwrite,
        ).check()  # fmt: skip
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        show = not quiet and sys.stderr.isatty()
        summary = job.run(say=lambda line: quiet or typer.echo(f"free: {line}", err=True), progress=lambda total: _progress(show, total), show=show)
        if summary is not None and not quiet:
            typer.echo(summary.line(), err=True)
