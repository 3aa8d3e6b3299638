"""The `free` command line: a thin layer over the library. Library errors become one
`Error: ...` line on stderr and exit code 1; stdout carries data only."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .config import DecodeConfig
from .errors import ConfigError, FreeError, InputError, OutputError

app = typer.Typer(
    name="free",
    help="Early-exit decoding for language models: FREE shallow-deep decoding, CALM baselines, lossless mode.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"free {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Early-exit decoding for language models (FREE, CALM, lossless)."""


@contextlib.contextmanager
def reported_errors():
    """Turns library errors into one stderr line and exit 1; Ctrl-C into exit 130."""
    try:
        yield
    except FreeError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted; every record written so far is complete.", err=True)
        raise typer.Exit(130) from None


# Option bundles shared by the commands that decode.
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory, .gguf file or Hugging Face id (default: the embedded SmolLM2-135M-Instruct)."),
]
StrategyOpt = Annotated[str, typer.Option("--strategy", "-s", help="full | static | calm | free.")]
LosslessOpt = Annotated[bool, typer.Option("--lossless", help="free: check every early-exited token against the deep model; output equals full.")]
ExitLayerOpt = Annotated[Optional[int], typer.Option("--exit-layer", help="L_s: layers in the shallow model (free) or the fixed exit (static). Default: the checkpoint's, else L/4.")]
ThresholdOpt = Annotated[str, typer.Option("--threshold", "-t", help="Confidence threshold λ in [0, 1] (above 1: never exit).")]
ConfidenceOpt = Annotated[str, typer.Option("--confidence", help="Exit confidence: softmax (top-1 probability) | margin (top-1 minus top-2).")]
MinExitOpt = Annotated[int, typer.Option("--min-exit-layer", help="calm: the first layer allowed to exit.")]
DecayOpt = Annotated[Optional[float], typer.Option("--decay-tau", help="calm: decay the threshold with position, CALM's τ.")]
MaxStackOpt = Annotated[Optional[int], typer.Option("--max-stack", help="free: run the deep layers once this many tokens are stacked.")]
SyncEndOpt = Annotated[bool, typer.Option("--sync-at-end", help="free: run the deep layers over a trailing stack when generation ends.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per record.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="bf16 | fp16 | fp32.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")]


def decode_config(strategy, lossless, exit_layer, threshold, confidence, min_exit_layer, decay_tau, max_stack, sync_at_end, max_new_tokens) -> DecodeConfig:
    try:
        value = float(threshold)
    except ValueError:
        raise ConfigError(f"--threshold must be a number, got {threshold!r}") from None
    cfg = DecodeConfig(
        strategy=strategy,
        lossless=lossless,
        exit_layer=exit_layer,
        threshold=value,
        confidence=confidence,
        min_exit_layer=min_exit_layer,
        decay_tau=decay_tau,
        max_stack=max_stack,
        sync_at_end=sync_at_end,
        max_new_tokens=max_new_tokens,
    )
    cfg.check()
    return cfg


@app.command()
def generate(
    input: Annotated[str, typer.Argument(help="JSONL input file, or - for stdin.", metavar="INPUT.jsonl|-")],
    model: ModelOpt = None,
    strategy: StrategyOpt = "free",
    lossless: LosslessOpt = False,
    exit_layer: ExitLayerOpt = None,
    threshold: ThresholdOpt = "0.9",
    confidence: ConfidenceOpt = "softmax",
    min_exit_layer: MinExitOpt = 1,
    decay_tau: DecayOpt = None,
    max_stack: MaxStackOpt = None,
    sync_at_end: SyncEndOpt = False,
    max_new_tokens: MaxNewOpt = 128,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "auto",
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
    from .batch import BatchOptions, run_batch
    from .loading import load_engine
    from .output import JsonlWriter
    from .prompts import TASKS, Fields
    from .records import count_records, read_records

    with reported_errors():
        cfg = decode_config(strategy, lossless, exit_layer, threshold, confidence, min_exit_layer, decay_tau, max_stack, sync_at_end, max_new_tokens)
        if on_error not in ("fail", "skip"):
            raise ConfigError(f"--on-error must be fail or skip, got {on_error!r}")
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if input != "-" and not Path(input).is_file():
            raise InputError(f"no such input file: {input}")
        if output is not None and output.exists() and output.stat().st_size and not (resume or overwrite):
            raise OutputError(f"{output} exists; pass --resume to continue it or --overwrite to replace it")
        if resume and output is None:
            raise OutputError("--resume needs --output FILE: output written to stdout cannot be resumed")
        options = BatchOptions(
            decode=cfg,
            task=task,
            fields=Fields(
                prompt=prompt_field, text=text_field, question=question_field, context=context_field,
                source=source_field, target_language=target_language, instruction=instruction_field,
            ),
            id_field=id_field,
            keep=tuple(keep or ()),
            on_error=on_error,
        )  # fmt: skip
        engine = load_engine(model, dtype=dtype, device=device)
        cfg = cfg.resolved(engine.num_layers, engine.default_exit_layer)
        if not quiet:
            typer.echo(f"free: {engine.describe()} · {cfg.describe()}", err=True)
        show = not quiet and sys.stderr.isatty()
        total = count_records(input) if input != "-" and show else None
        stream = sys.stdin.buffer if input == "-" else open(input, "rb")
        with stream, JsonlWriter(output, resume=resume, overwrite=overwrite) as writer, _progress(show, total) as bar:
            summary = run_batch(engine, read_records(stream), writer, options, progress=bar)
        if not quiet:
            typer.echo(summary.line(), err=True)


@app.command()
def bench(
    input: Annotated[str, typer.Argument(help="JSONL prompts (same fields and tasks as generate).", metavar="INPUT.jsonl")],
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Use the first N records.")] = 20,
    thresholds: Annotated[Optional[list[float]], typer.Option("--threshold", "-t", help="free thresholds to run (repeatable).")] = None,
    exit_layer: ExitLayerOpt = None,
    max_new_tokens: MaxNewOpt = 64,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed passes over the prompts.")] = 1,
    task: Annotated[str, typer.Option("--task", help="As for generate.")] = "auto",
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "auto",
    explain: Annotated[bool, typer.Option("--explain", help="For every lossless output that differs from full, print where and why (near-tie, fp32 check).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table on stderr.")] = False,
) -> None:
    """Time full (our loop), transformers' generate, free and lossless free on the same prompts.

    One process, one model, one precision and device for every row. Prints one JSON object per row
    on stdout and a table on stderr: tokens/s, speedup against the faster full baseline, exited
    share, mean layers per token, and how many outputs equal the full model's."""
    from .batch import Batch, BatchOptions
    from .bench import contenders, explain_mismatches, run_bench, table
    from .loading import load_engine
    from .records import read_records

    with reported_errors():
        if not Path(input).is_file():
            raise InputError(f"no such input file: {input}")
        engine = load_engine(model, dtype=dtype, device=device)
        rows = contenders(max_new_tokens, exit_layer, thresholds or [0.9])
        for row in rows:
            if row.config is not None:
                row.config.resolved(engine.num_layers, engine.default_exit_layer)
        batch = Batch(engine, BatchOptions(task=task))
        with open(input, "rb") as f:
            prompts = [batch.prompt_ids(r) for _, r in zip(range(limit), read_records(f))]
        if not quiet:
            typer.echo(f"free bench: {engine.describe()} · {len(prompts)} prompts · {len(rows)} rows", err=True)
        with _progress(not quiet and sys.stderr.isatty(), len(prompts) * repeats) as bar:
            results, outputs = run_bench(engine, prompts, rows, max_new_tokens=max_new_tokens, repeats=repeats, progress=bar)
        for row in results:
            typer.echo(json.dumps(row, ensure_ascii=False))
        if not quiet:
            typer.echo(table(results), err=True)
        if explain:
            for case in explain_mismatches(engine, prompts, outputs, rows):
                typer.echo(json.dumps({"mismatch": case}), err=True)


@contextlib.contextmanager
def _progress(show: bool, total: int | None):
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def main() -> None:
    app(prog_name="free")
