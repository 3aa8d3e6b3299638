"""`free bench`: every contender side by side on the same prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..decoding.config import DecodeConfig
from ..errors import ConfigError
from .app import app
from .options import DeviceOpt, DtypeOpt, ExitLayerOpt, MaxNewOpt, ModelOpt, PruneKOpt, SeedOpt, ThreadsOpt, TopKOpt, TopPOpt, _progress, reported_errors, use_threads, warn_precision


@app.command()
def bench(
    input: Annotated[str, typer.Argument(help="JSONL prompts (same fields and tasks as generate).", metavar="INPUT.jsonl")],
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Use the first N records.")] = 20,
    thresholds: Annotated[Optional[list[float]], typer.Option("--threshold", "-t", help="free thresholds to run (repeatable); calm runs at the first.")] = None,
    exit_layer: ExitLayerOpt = None,
    max_new_tokens: MaxNewOpt = 64,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed passes over the prompts.")] = 1,
    prune: Annotated[Optional[list[str]], typer.Option("--prune", help="Add rows with unembedding pruning (repeatable): context (free and lossless at each threshold) | fixed | decaying | adaptive (calm).")] = None,
    prune_k: PruneKOpt = 1024,
    lossless_at: Annotated[Optional[list[float]], typer.Option("--lossless-at", help="Lossless rows only at these thresholds (repeatable; default: at every --threshold).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Leave out rows of a kind (repeatable): generate | hf-lookup | static | calm | free | auto | lossless | hf-early-exit.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="Quality metric against the records' references (repeatable; default by task, as for score).")] = None,
    reference_field: Annotated[Optional[str], typer.Option("--reference-field", help="The reference field (default: detected as for score); none: no quality columns.")] = None,
    confidence: Annotated[Optional[list[str]], typer.Option("--confidence", help="Add calm, free and lossless rows at the first threshold with this confidence measure (repeatable; the other rows use softmax).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Also write bench.jsonl, bench.md and a quality-versus-latency plot bench.png here.")] = None,
    task: Annotated[str, typer.Option("--task", help="As for generate.")] = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Above 0: add sampling rows (full, free and lossless free at the first threshold) at this temperature.")] = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    drafts: Annotated[Optional[list[str]], typer.Option("--draft", help="Lossless rows drafted by each of these (repeatable): exit (at each threshold) | lookup | auto (at the first). Default: all three.")] = None,
    lookup_k: Annotated[Optional[list[int]], typer.Option("--lookup-k", help="transformers' prompt lookup rows drafting K tokens a round (repeatable; default 3 and 10).")] = None,
    baseline_dtype: Annotated[Optional[list[str]], typer.Option("--baseline-dtype", help="transformers' rows in these precisions (repeatable: bf16 | fp16 | fp32; default: each precision the policy computes in).")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="For every lossless output that differs from full, print where and why (near-tie, fp32 check).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table on stderr.")] = False,
) -> None:
    """Speed and quality side by side, in one process, on the same prompts, model, precision, device.

    Rows: full (our loop), transformers' generate and its prompt lookup (each K) in each baseline
    precision, static, calm, free at each threshold, free with the adaptive threshold, lossless
    free with each draft, and transformers' self-speculative early exit (assistant_early_exit=L_s).
    One JSON object per row on stdout and a table on stderr: tokens/s, speedup against the fastest
    full baseline, speedup of the decoding phase (after the first token) against our full loop,
    lookup drafts kept per verification, exited share, mean layers per token, outputs equal to
    full, ROUGE-L against full, quality against the references, peak memory (per row on CUDA; the
    process's peak resident memory on CPU)."""
    from ..decoding.precision import DTYPES
    from ..evaluation.bench import bench_job
    from ..evaluation.contenders import Plan
    from ..evaluation.report import table

    with reported_errors():
        wrong = [d for d in baseline_dtype or () if d not in DTYPES]
        if wrong:
            raise ConfigError(f"--baseline-dtype {wrong[0]!r}: choose from {', '.join(DTYPES)}")
        sampling = DecodeConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) if temperature > 0 else None
        plan = Plan(
            max_new_tokens, exit_layer, tuple(thresholds or [0.9]), tuple(skip or ()), tuple(prune or ()), prune_k, tuple(confidence or ()),
            sampling, tuple(lossless_at) if lossless_at else None, tuple(drafts or Plan.drafts), tuple(lookup_k or Plan.lookup_k),
            tuple(DTYPES[d] for d in baseline_dtype) if baseline_dtype else None,
        ).check()  # fmt: skip
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        say = (lambda line: None) if quiet else (lambda line: typer.echo(f"free bench: {line}", err=True))
        show = not quiet and sys.stderr.isatty()
        done = bench_job(input, plan, model=model, dtype=dtype, device=device, limit=limit, task=task, reference_field=reference_field,
                         metrics=metric, repeats=repeats, say=say, progress=lambda total: _progress(show, total))  # fmt: skip
        for row in done.rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        if not quiet:
            typer.echo(table(done.rows) + "\n" + done.header.rsplit(" · ", 1)[-1], err=True)
        if out_dir is not None:
            say(f"wrote {', '.join(str(p) for p in done.write(out_dir))}")
        for case in done.mismatches() if explain else ():
            typer.echo(json.dumps({"mismatch": case}), err=True)
