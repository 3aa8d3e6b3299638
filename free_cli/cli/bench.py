"""`free bench`: every contender side by side on the same prompts."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..decoding.config import DecodeConfig
from ..errors import ConfigError, InputError
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
    from ..records.stream import load_prompts
    from ..evaluation.bench import KINDS, Plan, contenders, explain_mismatches, peak_rss_mb, run_bench, table, write_report
    from ..decoding.drafting import DRAFTS
    from ..decoding.loading import load_engine
    from ..decoding.precision import DTYPES
    from ..evaluation.score import references_of

    with reported_errors():
        if not Path(input).is_file():
            raise InputError(f"no such input file: {input}")
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        bad = [k for k in skip or () if k not in KINDS or k == "full"]
        if bad:
            raise ConfigError(f"--skip {bad[0]!r}: choose from {', '.join(KINDS[1:])}")
        for name, given, allowed in (("--draft", drafts, DRAFTS), ("--baseline-dtype", baseline_dtype, tuple(DTYPES))):
            wrong = [x for x in given or () if x not in allowed]
            if wrong:
                raise ConfigError(f"{name} {wrong[0]!r}: choose from {', '.join(allowed)}")
        if any(k < 1 for k in lookup_k or ()):
            raise ConfigError("--lookup-k must be at least 1")
        sampling = DecodeConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) if temperature > 0 else None
        if sampling is not None:
            sampling.check()
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        engine = load_engine(model, dtype=dtype, device=device)
        computes_in = tuple(dict.fromkeys((engine.precision.narrow, engine.precision.wide)))
        plan = Plan(
            max_new_tokens, exit_layer, tuple(thresholds or [0.9]), tuple(skip or ()), tuple(prune or ()), prune_k, tuple(confidence or ()),
            sampling, tuple(lossless_at) if lossless_at else None, tuple(drafts or DRAFTS), tuple(lookup_k or (3, 10)),
            tuple(DTYPES[d] for d in baseline_dtype) if baseline_dtype else computes_in,
        )  # fmt: skip
        rows = contenders(plan, engine.adapter.is_encoder_decoder)
        rows = [replace(r, config=r.config.resolved(engine.num_layers, engine.default_exit_layer)) if r.config else r for r in rows]
        records, prompts = load_prompts(engine, input, limit, task)
        references, metrics = references_of(records, reference_field, metric)
        if not quiet:
            typer.echo(f"free bench: {engine.describe()} · {len(prompts)} prompts · {len(rows)} rows", err=True)
        with _progress(not quiet and sys.stderr.isatty(), len(prompts) * repeats) as bar:
            results, outputs = run_bench(engine, prompts, rows, max_new_tokens=max_new_tokens, repeats=repeats, references=references, metrics=metrics, progress=bar)
        for row in results:
            typer.echo(json.dumps(row, ensure_ascii=False))
        peak = f"process peak RSS {peak_rss_mb():.0f} MB"  # CPU has no per-row allocator figure
        if not quiet:
            typer.echo(table(results) + f"\n{peak}", err=True)
        if out_dir is not None:
            source = Path(input).resolve()
            header = f"{source.parent.name}/{source.name}, {len(prompts)} prompts, {max_new_tokens} new tokens · {engine.describe()} · {peak}"
            paths = write_report(out_dir, results, header)
            if not quiet:
                typer.echo(f"free bench: wrote {', '.join(str(p) for p in paths)}", err=True)
        if explain:
            for case in explain_mismatches(engine, prompts, outputs, rows):
                typer.echo(json.dumps({"mismatch": case}), err=True)
