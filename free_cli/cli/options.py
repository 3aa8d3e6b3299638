"""What the commands share: option bundles, error reporting, threads, progress bars, and the
decoding options checked before any model loads."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..decoding.config import DecodeConfig
from ..errors import ConfigError, FreeError


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
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the model's work (default: OMP_NUM_THREADS when set, else the cores this process may use, divided among the local ranks of a torchrun launch).")]


def use_threads(threads: int | None) -> int:
    """Sets PyTorch's CPU threads: `threads`, else OMP_NUM_THREADS when set, else the cores this
    process may run on divided among the processes torchrun started on this node
    (LOCAL_WORLD_SIZE). Returns the number."""
    import torch

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
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


def estimator_config(zeta, update_fraction, initial, priors, fit):
    """The Beta-mixture estimator's options, checked."""
    from ..thresholds.estimator import EstimatorConfig

    cfg = EstimatorConfig(zeta=zeta, update_fraction=update_fraction, initial=initial, priors=priors, fit=fit)
    cfg.check()
    return cfg



@contextlib.contextmanager
def _progress(show: bool, total: int | None):
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar
