"""The `free` command line: a thin layer over the library. Library errors become one
`Error: ...` line on stderr and exit code 1; stdout carries data only."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .config import DecodeConfig
from .errors import ConfigError, FreeError, InputError
from .shards import Shard

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
    except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
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
ExitLayerOpt = Annotated[Optional[int], typer.Option("--exit-layer", help="L_s: layers in the shallow model (free) or the fixed exit (static). Default: the trained exit's (15 on the default model), else L/4.")]
ThresholdOpt = Annotated[Optional[str], typer.Option("--threshold", "-t", help="Confidence threshold λ in [0, 1] (above 1: never exit), or auto: learn it while generating (free). Default: the stored threshold for --dataset, else 0.9.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="Dataset name under which thresholds are stored and looked up.")]
StoreOpt = Annotated[Optional[Path], typer.Option("--threshold-store", help="The threshold store file (default: free_thresholds.json in the model's directory, else in free's home).")]
ZetaOpt = Annotated[float, typer.Option("--zeta", help="ζ: the posterior probability of agreement the threshold must reach.")]
PriorsOpt = Annotated[str, typer.Option("--priors", help="Class priors of the Beta mixture: equal (paper) | empirical.")]
FitOpt = Annotated[str, typer.Option("--fit", help="How each Beta is fitted: mle | moments.")]
ConfidenceOpt = Annotated[str, typer.Option("--confidence", help="Exit confidence: softmax (top-1 probability) | margin (top-1 minus top-2) | state (cosine of consecutive layers' states) | meta (free train --method meta's classifier) | contrastive (weighted contrast with the layer at half depth) | jsd (contrast with the layer of largest distance-discounted Jensen-Shannon divergence).")]
MinExitOpt = Annotated[int, typer.Option("--min-exit-layer", help="calm: the first layer allowed to exit.")]
DecayOpt = Annotated[Optional[float], typer.Option("--decay-tau", help="calm: decay the threshold with position, CALM's τ.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", help="free: what the synchronized pass verifies: exit (tokens the shallow exit is confident of, FREE) | lookup (continuations of n-grams found earlier in the prompt and output, as many as pay; the exit unused) | auto (lookup where it pays, else the exit while it pays, else plain steps). Default: auto with --lossless, else exit.")]
DraftTokensOpt = Annotated[int, typer.Option("--draft-tokens", help="lookup: at most this many drafts a round (fewer where the cost model says they do not pay).")]
DraftNgramOpt = Annotated[int, typer.Option("--draft-ngram", help="lookup: the longest n-gram matched (shorter ones are tried after it).")]
MaxStackOpt = Annotated[Optional[int], typer.Option("--max-stack", help="free: run the deep layers once this many tokens are stacked.")]
SyncEndOpt = Annotated[bool, typer.Option("--sync-at-end", help="free: run the deep layers over a trailing stack when generation ends.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per record.")]
PruneOpt = Annotated[str, typer.Option("--prune", help="Unembedding pruning: auto (context with --lossless, where it is exact, else none) | none | fixed | decaying | adaptive (calm: top-k carried from layer to layer) | context (free: the shallow exit scores seen tokens and the last deep pass's top k).")]
PruneKOpt = Annotated[int, typer.Option("--prune-k", help="Candidates kept: fixed's k, decaying's and adaptive's start, context's deep top k.")]
PruneFloorOpt = Annotated[int, typer.Option("--prune-floor", help="decaying, adaptive: never fewer candidates than this.")]
PruneDecayOpt = Annotated[float, typer.Option("--prune-decay", help="decaying: k_i = max(floor, k exp(-decay i)) at the i-th pruned layer.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens only (0: all).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Sample from the smallest set of most likely tokens whose probability reaches p.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed; each record draws from a generator seeded by it and the record's id, so batching, shards and resume give the same output.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto: the precision policy (bf16 where the device computes it natively; else bf16 steps and fp32 prefills and stacks) | bf16 | fp16 | fp32: every pass in that precision.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the model's work (default: the cores this process may use, divided among the local ranks of a torchrun launch).")]


def use_threads(threads: int | None) -> int:
    """Sets PyTorch's CPU threads: `threads`, or the cores this process may run on divided among
    the processes torchrun started on this node (LOCAL_WORLD_SIZE). Returns the number."""
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)
    return threads


def warn_precision(dtype: str, device: str, quiet: bool) -> None:
    """fp16 on a CPU is computed by emulation: say so (it runs at under half the speed of auto)."""
    if dtype == "fp16" and device in ("cpu", "auto") and not quiet:
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            typer.echo("free: warning: --dtype fp16 on a CPU is emulated and slow (under half the speed of --dtype auto); auto picks bf16 or fp32 per pass", err=True)


def decode_config(strategy, lossless, exit_layer, threshold, confidence, min_exit_layer, decay_tau, max_stack, sync_at_end, max_new_tokens, **extra) -> tuple[DecodeConfig, bool]:
    """The decoding options, checked before any model loads, and whether the threshold is `auto`."""
    auto = threshold == "auto"
    if auto and strategy != "free":
        raise ConfigError("--threshold auto needs --strategy free: the estimator learns from its synchronized passes")
    try:
        value = DecodeConfig.threshold if threshold is None or auto else float(threshold)
    except ValueError:
        raise ConfigError(f"--threshold must be a number or auto, got {threshold!r}") from None
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
        **extra,
    )
    cfg.check()
    return cfg, auto


def estimator_config(zeta, update_fraction, initial, priors, fit) -> "EstimatorConfig":
    from .threshold import EstimatorConfig

    cfg = EstimatorConfig(zeta=zeta, update_fraction=update_fraction, initial=initial, priors=priors, fit=fit)
    cfg.check()
    return cfg


def open_store(engine, path: Optional[Path]):
    from .loading import home
    from .store import ThresholdStore, default_store_path

    return ThresholdStore(path or default_store_path(engine.source_dir, home()))


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
    from .batch import BatchOptions, run_batch
    from .batching import check as check_batching
    from .loading import load_engine
    from .output import JsonlWriter, check_output
    from .prompts import Fields
    from .records import count_records, read_records
    from .store import choose_threshold

    with reported_errors():
        cfg, auto = decode_config(
            strategy, lossless, exit_layer, threshold, confidence, min_exit_layer, decay_tau, max_stack, sync_at_end,
            max_new_tokens, prune=prune, prune_k=prune_k, prune_floor=prune_floor, prune_decay=prune_decay,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, draft=draft, draft_tokens=draft_tokens, draft_ngram=draft_ngram,
        )  # fmt: skip
        check_batching(None, cfg, batch_size)
        est_cfg = estimator_config(zeta, 0.03, initial_threshold, priors, "mle")
        if update_every is not None and update_every < 1:
            raise ConfigError(f"--update-every must be at least 1, got {update_every}")
        fields = Fields(
            prompt=prompt_field, text=text_field, question=question_field, context=context_field,
            source=source_field, target_language=target_language, instruction=instruction_field,
        )  # fmt: skip
        options = BatchOptions(decode=cfg, task=task, fields=fields, id_field=id_field, keep=tuple(keep or ()), on_error=on_error).check()
        if input != "-" and not Path(input).is_file():
            raise InputError(f"no such input file: {input}")
        check_output(output, resume=resume, overwrite=overwrite, source=input)
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        shard = Shard.from_env()
        if shard is not None:
            shard.check(output)
            if resume and shard.complete(output):
                typer.echo(f"free generate: {output} is complete: every rank's part was merged into it", err=True)
                return
            device = shard.device(device)
        engine = load_engine(model, dtype=dtype, device=device)
        cfg = cfg.resolved(engine.num_layers, engine.default_exit_layer)
        check_batching(engine, cfg, batch_size)
        show = not quiet and sys.stderr.isatty()
        total = count_records(input) if input != "-" and (show or auto) else None
        total = shard.share(total) if shard is not None else total
        store = open_store(engine, threshold_store)
        if auto and dataset:
            store.check_writable()  # each refit is stored
        chosen = choose_threshold(engine, cfg, store, dataset, given=threshold not in (None, "auto"), auto=auto, estimator_cfg=est_cfg, initial=initial_threshold, every=update_every, total=total)
        if not quiet:
            if chosen.stored is not None:
                typer.echo(f"free: threshold {chosen.stored['threshold']:.4g} stored for dataset {dataset!r} ({chosen.stored['method']}, {chosen.stored['fitted_at']}) in {store.path}", err=True)
            elif dataset and threshold is None and cfg.strategy in ("free", "calm"):
                typer.echo(f"free: no threshold stored for dataset {dataset!r} ({engine.store_name(cfg.exit_layer)}, L_s={cfg.exit_layer}, {cfg.confidence}) in {store.path}; using λ={chosen.decode.threshold:g} (free calibrate fits one)", err=True)
            typer.echo(f"free: {engine.describe()} · {chosen.decode.describe()}{' (auto)' if auto else ''}", err=True)
        stream = sys.stdin.buffer if input == "-" else open(input, "rb")
        records, written = (read_records(stream), output) if shard is None else (shard.take(read_records(stream)), shard.part(output))
        with stream, JsonlWriter(written, resume=resume, overwrite=overwrite, source=input) as writer, _progress(show, total) as bar:
            summary = run_batch(engine, records, writer, replace(options, decode=chosen.decode), progress=bar, estimator=chosen.estimator, on_fit=chosen.on_fit, batch_size=batch_size)
        if not quiet:
            typer.echo(summary.line() + (f" · rank {shard.rank} of {shard.world}" if shard else ""), err=True)
        if shard is not None and shard.finish(output) and not quiet:
            typer.echo(f"free generate: merged {shard.world} parts into {output}", err=True)


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
    from .batch import load_prompts
    from .bench import KINDS, Plan, contenders, explain_mismatches, peak_rss_mb, run_bench, table, write_report
    from .drafting import DRAFTS
    from .loading import load_engine
    from .precision import DTYPES
    from .score import references_of

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


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="JSONL outputs of free generate (id, output, stats).", metavar="PREDICTIONS.jsonl")],
    references: Annotated[Optional[Path], typer.Option("--references", "-r", help="JSONL file holding the references, joined by id (default: a field of the predictions, e.g. kept with generate --keep).")] = None,
    reference_field: Annotated[Optional[str], typer.Option("--reference-field", help="The reference field (default: the first of summary, answers, output, reference, references, target, en present).")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", help="The full model's outputs for the same ids: report exact-match rate and ROUGE-L against them.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="rouge1 | rouge2 | rougeL | rougeLsum | bleu | chrf | exact_match | f1 (repeatable). Default by reference field: ROUGE for summaries, EM/F1 for answers, BLEU/chrF for a language code.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="NAME=VALUE: exit 1 when that figure is below VALUE (repeatable), e.g. rougeL=0.40 or exact_match_full=0.95.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="stdout format: json | markdown | table.")] = "json",
    output_field: Annotated[str, typer.Option("--output-field", help="The generated text's field.")] = "output",
    id_field: Annotated[str, typer.Option("--id-field", help="The field records are joined on.")] = "id",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table on stderr.")] = False,
) -> None:
    """Score generated outputs: quality against references, consistency with the full model, speed.

    ROUGE (rouge-score, stemmed) and the consistency figures are in [0, 1]; BLEU and chrF
    (sacrebleu, signature printed) and SQuAD exact match and F1 (official normalization, best gold
    answer) in [0, 100]. Speed figures come from the stats `free generate` wrote. JSON on stdout,
    a table on stderr; with --fail-under, exit 1 when a figure falls short."""
    from .score import parse_bounds, render, score_file, shortfalls

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
    from .batch import load_prompts
    from .calibrate import LttOptions, calibrate as run_calibration, format_table
    from .loading import load_engine

    with reported_errors():
        if method not in ("bmm", "ltt"):
            raise ConfigError(f"--method must be bmm or ltt, got {method!r}")
        ltt = LttOptions.parse(delta, epsilon, distance_kind, p_value, grid)
        est_cfg = estimator_config(zeta, 0.03, 0.9, priors, fit_method)
        if not Path(input).is_file():
            raise InputError(f"no such input file: {input}")
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        cfg = DecodeConfig(strategy="free", exit_layer=exit_layer, confidence=confidence, max_new_tokens=max_new_tokens)
        cfg.check()
        use_threads(threads)
        warn_precision(dtype, device, quiet)
        engine = load_engine(model, dtype=dtype, device=device)
        cfg = cfg.resolved(engine.num_layers, engine.default_exit_layer)
        store = open_store(engine, threshold_store)
        store.entries()  # a corrupt store fails now, not after the calibration run
        store.check_writable()  # so does one that cannot be written
        _, prompts = load_prompts(engine, input, limit, task)
        if not quiet:
            typer.echo(f"free calibrate: {engine.describe()} · L_s={cfg.exit_layer} {confidence} · {len(prompts)} prompts · {method}", err=True)
        show = not quiet and sys.stderr.isatty()
        found = run_calibration(engine, prompts, cfg, dataset, method, est_cfg, ltt, bars=lambda total: _progress(show, total))
        if found.entry is not None:
            found.result["stored"] = str(store.path)
            store.put(found.entry)
        typer.echo(json.dumps(found.result, ensure_ascii=False))
        if not quiet:
            typer.echo(format_table(found.result["table"], found.threshold), err=True)
        if found.entry is None:
            raise FreeError(found.failure)
        if not quiet:
            typer.echo(f"free calibrate: threshold {found.threshold:.4g} stored for dataset {dataset!r} in {store.path}", err=True)
            row = next((r for r in found.result["table"] if r["threshold"] == found.threshold), None)
            if row is not None and row["estimated_speedup"] < 1:
                typer.echo(
                    f"free calibrate: warning: at λ={found.threshold:.4g} {100 * row['exited_share']:.0f}% of tokens exit, and free is estimated at "
                    f"{row['estimated_speedup']:.2f}x of full on this device: slower. Lossless --draft lookup or auto verifies drafts only where they pay.",
                    err=True,
                )


@app.command()
def train(
    data: Annotated[list[str], typer.Argument(help="JSONL training files (or hf:NAME[:SPLIT] data sets), same fields and tasks as generate.", metavar="DATA.jsonl...")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for checkpoints, the log and the trained exit or model.")],
    method: Annotated[str, typer.Option("--method", help="exit-only (frozen model, trained exit module) | shallow-deep (FREE) | calm | meta (CALM's confidence classifier).")] = "exit-only",
    model: ModelOpt = None,
    exit_layer: Annotated[Optional[int], typer.Option("--exit-layer", help="L_s: the layers before the exit to train (default: round(L / 4); 8 of SmolLM2's 30).")] = None,
    exit_layers: Annotated[int, typer.Option("--exit-layers", help="exit-only: decoder layers in the exit module.")] = 1,
    init_from: Annotated[str, typer.Option("--init-from", help="exit-only: the exit's layers start as copies of the layers after L_s (next), of the model's last layers, which already feed the final norm (last), or of layers N, N+1, ...")] = "next",
    prompt_positions: Annotated[int, typer.Option("--prompt-positions", help="exit-only: also distill the deep model's predictions at up to N prompt positions per training example (drawn by the seed); held-out agreement stays on target tokens.")] = 0,
    kd: Annotated[str, typer.Option("--kd", help="shallow-deep: layerwise distillation mapping: none | last | uniform | dyna.")] = "dyna",
    alpha: Annotated[float, typer.Option("--alpha", help="shallow-deep: weight of the distillation loss.")] = 1.0,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="shallow-deep, calm: train low-rank adapters of this rank on every linear layer (peft) instead of the whole model; the checkpoint holds only them.")] = 0,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="The adapters' alpha (default: 2 x rank).")] = None,
    freeze_embeddings: Annotated[bool, typer.Option("--freeze-embeddings", help="shallow-deep, calm: keep the (tied) embeddings as they are.")] = False,
    detach_prompt: Annotated[bool, typer.Option("--detach-prompt", help="shallow-deep, calm, meta: read the prompt without gradients (a forward pass only); the loss and its gradients cover the target positions.")] = False,
    targets: Annotated[str, typer.Option("--targets", help="reference: the records' target field | self: the model's own greedy outputs (generated once).")] = "reference",
    target_field: Annotated[Optional[str], typer.Option("--target-field", help="The reference field (default by task: summary, answers, output, the target language).")] = None,
    self_max_new_tokens: Annotated[int, typer.Option("--self-max-new-tokens", help="--targets self: tokens generated per record.")] = 64,
    task: Annotated[str, typer.Option("--task", help="As for generate.")] = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N records of each source.")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Leave out examples longer than this (prompt and target tokens).")] = 1024,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training examples.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine | linear | constant, after a linear warm-up.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Share of the steps spent warming up.")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data order and initialization.")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="Autocast dtype of the forward passes: fp32 | bf16 (weights stay fp32).")] = "fp32",
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="Precision of the saved exit or model: fp32 | bf16 (half the size).")] = "fp32",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Evaluate on the first --max-eval records of this file (a validation split) instead of holding out a share of the training data.")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of the examples held out for evaluation.")] = 0.05,
    max_eval: Annotated[int, typer.Option("--max-eval", help="At most this many held-out examples.")] = 200,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps.")] = 100,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 100,
    data_name: Annotated[Optional[str], typer.Option("--data-name", help="Name of the training data, recorded in the checkpoint (default: the files' names).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")] = False,
) -> None:
    """Train the shallow model's exit and write a checkpoint directory.

    The directory works with `free generate --model DIR`: for exit-only, the exit's weights, its
    config (L_s, method, training data, a pointer to the base model) and the tokenizer; for the
    other methods, the whole model as transformers saves it, with the same small config. Evaluates
    the shallow exit's agreement with the deep model on held-out examples every --eval-every steps
    and logs to DIR/train_log.jsonl."""
    from .train import TrainConfig, TrainData, save_dtype as parse_save_dtype, train_job

    with reported_errors():
        sources = TrainData(
            tuple(data), targets=targets, target_field=target_field, self_max_new_tokens=self_max_new_tokens, task=task, limit=limit,
            max_length=max_length, eval_data=eval_data, eval_fraction=eval_fraction, max_eval=max_eval, name=data_name,
        ).check()  # fmt: skip
        weights_dtype = parse_save_dtype(save_dtype)
        cfg = TrainConfig(
            method=method, exit_layer=exit_layer, exit_layers=exit_layers, init_from=init_from, prompt_positions=prompt_positions, kd=kd, alpha=alpha,
            lora_rank=lora_rank, lora_alpha=lora_alpha, freeze_embeddings=freeze_embeddings, detach_prompt=detach_prompt, steps=steps,
            epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule, warmup=warmup,
            seed=seed, dtype=dtype, eval_every=eval_every, save_every=save_every,
        )  # fmt: skip
        use_threads(threads)
        show = not quiet and sys.stderr.isatty()
        say = None if quiet else lambda line: typer.echo(f"free train: {line}", err=True)
        done = train_job(model, cfg, sources, output, device=device, save_as=weights_dtype, resume=resume, say=say, progress=lambda total: _progress(show, total))
        if not quiet:
            last = f"held-out agreement {done.final_eval['eval_agreement']:.3f}" if done.final_eval else "no held-out examples"
            typer.echo(f"free train: {done.steps} steps in {done.seconds:.0f} s · {last} · wrote {output}", err=True)


@app.command()
def models() -> None:
    """List the models shipped in the package, for --model NAME: one JSON object per model on
    stdout (name, base model, L_s, method, training data, the command that trained it and its time,
    size on disk), a table on stderr."""
    from .loading import shipped_models

    rows = shipped_models()
    for row in rows:
        typer.echo(json.dumps(row, ensure_ascii=False))
    for row in rows:
        typer.echo(f"{row['name']}: {row['base_model']} fine-tuned ({row['method']}) on {row['data']}, L_s={row['exit_layer']}, {row['size_mb']:.0f} MB; trained in {row.get('train_minutes', '?')} min", err=True)


@app.command()
def convert(
    gguf: Annotated[Path, typer.Argument(help="A GGUF model file.", metavar="MODEL.gguf")],
    output: Annotated[Path, typer.Argument(help="New directory for the safetensors copy and tokenizer.", metavar="DIR")],
) -> None:
    """Dequantize a GGUF model once to a plain safetensors directory (fp32) that loads in seconds.

    Loading a GGUF file dequantizes it on every run (minutes for larger vocabularies); the
    converted directory works with every command's --model."""
    from .loading import convert_gguf

    with reported_errors():
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise InputError(f"{gguf}: not a .gguf file")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ConfigError(f"{output} exists and is not empty; choose a new directory")
        convert_gguf(gguf.resolve(), output, name=gguf.stem)
        typer.echo(f"free convert: wrote {output}", err=True)


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
