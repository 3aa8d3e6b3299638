"""`free calibrate`: a threshold per dataset, fitted offline and stored."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..decoding.config import DecodeConfig
from ..errors import FreeError
from .app import app
from .options import ConfidenceOpt, DeviceOpt, DtypeOpt, ExitLayerOpt, FitOpt, MaxNewOpt, ModelOpt, PriorsOpt, StoreOpt, ThreadsOpt, ZetaOpt, _progress, estimator_config, reported_errors, use_threads, warn_precision


@app.command()
def calibrate(
    input: Annotated[str, typer.Argument(help="JSONL calibration records (same fields and tasks as generate).", metavar="CALIB.jsonl")],
    dataset: Annotated[str, typer.Option("--dataset", help="Name the threshold is stored under.")],
    method: Annotated[str, typer.Option("--method", help="bmm: FREE's Beta-mixture estimator | ltt: Learn-then-Test, a threshold with a guarantee.")] = "bmm",
    model: ModelOpt = None,
    exit_layer: ExitLayerOpt = None,
    confidence: ConfidenceOpt = "softmax",
    limit: Annotated[int, typer.Option("--limit", help="Use the first N records.")] = 100,
    max_new_tokens: MaxNewOpt = 64,
    zeta: ZetaOpt = 0.4,
    priors: PriorsOpt = "equal",
    fit_method: FitOpt = "mle",
    delta: Annotated[float, typer.Option("--delta", help="ltt: δ, the tolerated mean distance from the full model's outputs.")] = 0.1,
    epsilon: Annotated[float, typer.Option("--epsilon", help="ltt: ε, the allowed probability that the risk exceeds δ.")] = 0.05,
    distance_kind: Annotated[str, typer.Option("--distance", help="ltt: per-sample distance: rougeL (1 - ROUGE-L) | mismatch (outputs differ).")] = "rougeL",
    p_value: Annotated[str, typer.Option("--p-value", help="ltt: hb (Hoeffding-Bentkus) | hoeffding.")] = "hb",
    grid: Annotated[Optional[str], typer.Option("--grid", help="ltt: thresholds to test, comma-separated (tested from the highest down).")] = None,
    threshold_store: StoreOpt = None,
    task: Annotated[str, typer.Option("--task", help="As for generate.")] = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table on stderr.")] = False,
) -> None:
    """Fit a confidence threshold for a dataset offline and store it.

    Runs the model over calibration records with no token exiting, observing at every token the
    shallow model's confidence and whether the deep model agreed. `--method bmm` fits FREE's
    Beta mixture; `--method ltt` certifies the lowest threshold whose mean distance from the full
    model's outputs stays within δ with probability at least 1 − ε. Prints a table (threshold,
    exited share, agreement, estimated speedup) on stderr and the result as JSON on stdout; the
    threshold is stored for `free generate --dataset NAME`. Exit code 1 when no threshold is found."""
    from ..records.job import calibrate_job
    from ..thresholds.calibrate import LttOptions, format_table

    with reported_errors():
        ltt = LttOptions.parse(delta, epsilon, distance_kind, p_value, grid)
        cfg = DecodeConfig(strategy="free", exit_layer=exit_layer, confidence=confidence, max_new_tokens=max_new_tokens)
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        say = (lambda line: None) if quiet else (lambda line: typer.echo(f"free calibrate: {line}", err=True))
        show = not quiet and sys.stderr.isatty()
        found = calibrate_job(
            input, dataset, cfg, method, estimator_config(zeta, 0.03, 0.9, priors, fit_method), ltt, model=model, dtype=dtype,
            device=device, limit=limit, task=task, store=threshold_store, say=say, bars=lambda total: _progress(show, total),
        )  # fmt: skip
        typer.echo(json.dumps(found.result, ensure_ascii=False))
        if not quiet:
            typer.echo(format_table(found.result["table"], found.threshold), err=True)
        if found.entry is None:
            raise FreeError(found.failure)
