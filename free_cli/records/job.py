"""The commands that run a model over records, as library calls: `free generate` (GenerateJob:
`check` refuses what can be refused before a model loads; `run` loads it, picks the threshold
(given, stored for the dataset, or learned while generating), and streams the records through it
into the output, a shard's part under torchrun merged by the rank that finishes last) and
`free calibrate` (calibrate_job)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..decoding.batching import check as check_batching
from ..decoding.config import DecodeConfig
from ..decoding.loading import load_engine
from ..errors import ConfigError, InputError
from ..paths import home
from ..thresholds.calibrate import Calibration, LttOptions, calibrate
from ..thresholds.estimator import EstimatorConfig
from ..thresholds.store import ThresholdStore, choose_threshold, default_store_path
from .input import count_records, read_records
from .output import JsonlWriter, check_output
from .shards import Shard
from .stream import BatchOptions, Summary, load_prompts, run_batch


@dataclass
class GenerateJob:
    input: str  # a JSONL file, or - for stdin
    output: Path | None  # None: stdout
    options: BatchOptions  # its `decode` holds the given threshold, or the default
    auto: bool = False  # --threshold auto: learn it while generating
    given: bool = False  # a threshold was given on the command line
    estimator: EstimatorConfig | None = None
    initial: float = 0.9  # auto: before the first fit, when none is stored
    update_every: int | None = None
    dataset: str | None = None
    store: Path | None = None
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    resume: bool = False
    overwrite: bool = False

    def check(self) -> "GenerateJob":
        """What needs no model: the options, the input, the output, the shard."""
        check_batching(None, self.options.decode, self.batch_size)
        if self.update_every is not None and self.update_every < 1:
            raise ConfigError(f"--update-every must be at least 1, got {self.update_every}")
        if self.input != "-" and not Path(self.input).is_file():
            raise InputError(f"no such input file: {self.input}")
        check_output(self.output, resume=self.resume, overwrite=self.overwrite, source=self.input)
        shard = Shard.from_env()
        if shard is not None:
            shard.check(self.output)
        return self

    def run(self, say: Callable[[str], None] = lambda line: None, progress=None, show: bool = False) -> Summary | None:
        """Generates every record into the output; None when a resumed sharded run finds the output
        already merged. `say` gets the notices (the threshold chosen, the model), `progress(total)`
        opens a progress bar (or yields None), shown when `show`."""
        shard = Shard.from_env()
        if shard is not None and self.resume and shard.complete(self.output):
            say(f"{self.output} is complete: every rank's part was merged into it")
            return None
        engine = load_engine(self.model, dtype=self.dtype, device=shard.device(self.device) if shard else self.device)
        cfg = self.options.decode.resolved(engine.num_layers, engine.default_exit_layer)
        check_batching(engine, cfg, self.batch_size)
        total = count_records(self.input) if self.input != "-" and (show or self.auto) else None
        total = shard.share(total) if shard is not None else total
        store = ThresholdStore(self.store or default_store_path(engine.source_dir, home()))
        if self.auto and self.dataset:
            store.check_writable()  # each refit is stored
        chosen = choose_threshold(engine, cfg, store, self.dataset, given=self.given, auto=self.auto, estimator_cfg=self.estimator, initial=self.initial, every=self.update_every, total=total)
        if chosen.stored is not None:
            e = chosen.stored
            say(f"threshold {e['threshold']:.4g} stored for dataset {self.dataset!r} ({e['method']}, {e['fitted_at']}) in {store.path}")
        elif self.dataset and not self.given and not self.auto and cfg.strategy in ("free", "calm"):
            say(f"no threshold stored for dataset {self.dataset!r} ({engine.store_name(cfg.exit_layer)}, L_s={cfg.exit_layer}, {cfg.confidence}) in {store.path}; using λ={chosen.decode.threshold:g} (free calibrate fits one)")
        say(f"{engine.describe()} · {chosen.decode.describe()}{' (auto)' if self.auto else ''}")
        stream = sys.stdin.buffer if self.input == "-" else open(self.input, "rb")
        records, written = (read_records(stream), self.output) if shard is None else (shard.take(read_records(stream)), shard.part(self.output))
        with stream, JsonlWriter(written, resume=self.resume, overwrite=self.overwrite, source=self.input) as writer, progress(total) as bar:
            summary = run_batch(engine, records, writer, replace(self.options, decode=chosen.decode), progress=bar, estimator=chosen.estimator, on_fit=chosen.on_fit, batch_size=self.batch_size)
        summary.shard = shard
        if shard is not None and shard.finish(self.output):
            summary.merged = True
        return summary


def calibrate_job(
    input: str, dataset: str, cfg: DecodeConfig, method: str, estimator: EstimatorConfig, ltt: LttOptions, *, model: str | None = None,
    dtype: str = "auto", device: str = "auto", limit: int = 100, task: str = "auto", store: Path | None = None,
    say: Callable[[str], None] = lambda line: None, bars=None,
) -> Calibration:
    """`free calibrate`: checks what it can before loading the model (a store that cannot be read
    or written fails before the run, not after), observes the first `limit` records of `input`,
    fits or certifies the threshold and stores it; the result's `stored` names the store. A fitted
    threshold estimated slower than full on this device is said."""
    if method not in ("bmm", "ltt"):
        raise ConfigError(f"--method must be bmm or ltt, got {method!r}")
    if not Path(input).is_file():
        raise InputError(f"no such input file: {input}")
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    cfg.check()
    engine = load_engine(model, dtype=dtype, device=device)
    cfg = cfg.resolved(engine.num_layers, engine.default_exit_layer)
    thresholds = ThresholdStore(store or default_store_path(engine.source_dir, home()))
    thresholds.entries()  # a corrupt store fails now, not after the calibration run
    thresholds.check_writable()  # so does one that cannot be written
    _, prompts = load_prompts(engine, input, limit, task)
    say(f"{engine.describe()} · L_s={cfg.exit_layer} {cfg.confidence} · {len(prompts)} prompts · {method}")
    found = calibrate(engine, prompts, cfg, dataset, method, estimator, ltt, bars=bars)
    if found.entry is None:
        return found
    found.result["stored"] = str(thresholds.path)
    thresholds.put(found.entry)
    say(f"threshold {found.threshold:.4g} stored for dataset {dataset!r} in {thresholds.path}")
    row = next((r for r in found.result["table"] if r["threshold"] == found.threshold), None)
    if row is not None and row["estimated_speedup"] < 1:
        say(
            f"warning: at λ={found.threshold:.4g} {100 * row['exited_share']:.0f}% of tokens exit, and free is estimated at "
            f"{row['estimated_speedup']:.2f}x of full on this device: slower. Lossless --draft lookup or auto verifies drafts only where they pay."
        )
    return found
