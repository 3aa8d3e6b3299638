"""`free generate` as a library: stream records through an engine, in input order, one output
record per input record."""

from __future__ import annotations

import json

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..decoding.config import DecodeConfig
from ..decoding.engine import Engine, Generation
from ..errors import ConfigError, InputError, OutputError
from .output import JsonlWriter
from .prompts import TASKS, Fields, Template, choose_template, render
from .input import Record, read_records
from ..decoding.stats import Tally
from ..thresholds.estimator import Fit, OnlineEstimator


@dataclass(frozen=True)
class BatchOptions:
    decode: DecodeConfig = DecodeConfig()
    task: str = "auto"
    fields: Fields = Fields()
    id_field: str = "id"
    keep: tuple[str, ...] = ()  # input fields copied into each output record
    on_error: str = "fail"  # fail | skip

    def check(self) -> "BatchOptions":
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"--on-error must be fail or skip, got {self.on_error!r}")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        return self


@dataclass
class Summary:
    records: int = 0
    errors: int = 0
    skipped: int = 0  # records already in the output (resume)
    tally: Tally = field(default_factory=Tally)  # the decoded records' stats, summed
    wall_s: float = 0.0
    num_layers: int = 0
    trajectory: list = field(default_factory=list)  # --threshold auto: (records, threshold, status)
    batched: bool = False  # records decoded together: their times overlap, the rate is over the wall time
    began: float = field(default_factory=time.perf_counter)
    shard: object = None  # the rank's `Shard` under torchrun
    merged: bool = False  # this rank merged every part into the output

    def add(self, stats: dict) -> None:
        self.tally.add(stats)
        self.num_layers = stats["num_layers"]

    def rate(self) -> float:
        """Generated tokens per second: over the generation time of each record, or over the
        wall time when records decode together."""
        seconds = (self.wall_s or time.perf_counter() - self.began) if self.batched else self.tally.wall_time_s
        return self.tally.new_tokens / seconds if seconds else 0.0

    def line(self) -> str:
        t, rate = self.tally, self.rate()
        parts = [
            f"{self.records} records",
            f"{self.errors} errors",
            f"{t.new_tokens} tokens",
            f"{rate:.1f} tok/s",
            f"exited {100 * t.exited_share:.0f}%",
            f"mean layers {t.mean_layers:.1f}/{self.num_layers}",
            f"{self.wall_s:.1f} s",
        ]
        if self.trajectory:
            first, last = self.trajectory[0][1], self.trajectory[-1][1]
            parts.append(f"λ {first:.3g}→{last:.3g} ({len(self.trajectory) - 1} refits, last {self.trajectory[-1][2]})")
        if self.skipped:
            parts.insert(0, f"resumed after {self.skipped}")
        if self.shard is not None:
            parts.append(f"rank {self.shard.rank} of {self.shard.world}" + (f"; merged {self.shard.world} parts" if self.merged else ""))
        return "free generate: " + " · ".join(parts)


def prompt_style(engine: Engine) -> str:
    if engine.adapter.is_encoder_decoder:
        return "t5"
    tokenizer = engine.tokenizer
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def tokenize(engine: Engine, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, list):
        encoded = engine.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(engine.tokenizer(prompt)["input_ids"])


class Batch:
    """Holds what stays fixed across the records of one stream (the template, chosen from the
    first good record) and turns each record into one output object."""

    def __init__(self, engine: Engine, options: BatchOptions):
        self.engine, self.options = engine, options
        self.style = prompt_style(engine)
        self.template: Template | None = None

    def record_id(self, record: Record):
        if record.data is not None and self.options.id_field in record.data:
            return record.data[self.options.id_field]
        return record.line

    def prompt_ids(self, record: Record) -> list[int]:
        """The token ids of one record's prompt; raises `InputError` for a bad record."""
        if record.error is not None:
            raise record.error
        if self.template is None:
            self.template = choose_template(self.options.task, record.data, self.options.fields, record.line)
        return tokenize(self.engine, render(self.template, record.data, record.line, self.style))

    def request(self, record: Record, cfg: DecodeConfig | None = None) -> tuple[list[int], DecodeConfig]:
        """One record's prompt ids and decoding options (its token budget fitted to the model's
        context); raises `InputError` for a bad record, a missing `--keep` field included."""
        ids = self.prompt_ids(record)
        for name in self.options.keep:
            if name not in record.data:
                raise InputError("missing field (asked for with --keep)", line=record.line, field=name)
        return ids, self._fit_context(cfg or self.options.decode, len(ids), record.line)

    def output(self, record: Record, result: Generation) -> dict:
        """A record's output: its id, the text, the stats, the input line it came from and the
        fields to keep. A budget the model's context cut short is its stop reason."""
        stats = result.stats
        if stats.get("stop_reason") == "max_new_tokens" and stats["new_tokens"] < self.options.decode.max_new_tokens:
            stats = stats | {"stop_reason": "context_limit"}
        out = {"id": self.record_id(record), "output": result.text, "stats": stats, "input": self.source(record)}
        return out | {name: record.data[name] for name in self.options.keep}

    def error(self, record: Record, e: InputError) -> dict:
        """The error record `--on-error skip` writes in a bad record's place, with the record's id
        and the fields to keep that it has, so that scoring can join and report it."""
        out = {"id": self.record_id(record), "error": {"line": e.line, "field": e.field, "message": e.reason}, "input": self.source(record)}
        return out | {name: record.data[name] for name in self.options.keep if record.data is not None and name in record.data}

    @staticmethod
    def source(record: Record) -> dict:
        """Which input line an output came from, and its digest (what --resume checks)."""
        return {"line": record.line, "digest": record.digest}

    def process(self, record: Record, cfg: DecodeConfig | None = None) -> tuple[dict, list]:
        """The output object for one record and its (confidence, agreed) pairs; raises
        `InputError` for a bad record."""
        ids, cfg = self.request(record, cfg)
        result = self.engine.generate(ids, cfg, key=self.record_id(record))
        return self.output(record, result), result.pairs

    def _fit_context(self, cfg: DecodeConfig, prompt_len: int, line: int) -> DecodeConfig:
        context = self.engine.adapter.context_length
        if context is None or self.engine.adapter.is_encoder_decoder:
            return cfg
        if prompt_len >= context:
            raise InputError(
                f"the prompt is {prompt_len} tokens, the model's context is {context}",
                line=line,
                field=self.template.main_field,
            )
        room = context - prompt_len
        return cfg if cfg.max_new_tokens <= room else replace(cfg, max_new_tokens=room)


def prompt_of(engine: Engine, fields: dict, task: str = "auto") -> list[int]:
    """The prompt ids of one record given by its fields, as a JSONL input line holds them."""
    return Batch(engine, BatchOptions(task=task)).prompt_ids(Record(0, fields))


def load_prompts(engine: Engine, path: str, limit: int, task: str = "auto") -> tuple[list[Record], list[list[int]]]:
    """The first `limit` records of a JSONL file and their prompts' token ids (bench, calibrate)."""
    if not Path(path).is_file():
        raise InputError(f"no such input file: {path}")
    batch = Batch(engine, BatchOptions(task=task))
    with open(path, "rb") as f:
        records = [r for _, r in zip(range(limit), read_records(f))]
    return records, [batch.prompt_ids(r) for r in records]


def run_batch(
    engine: Engine,
    records: Iterable[Record],
    writer: JsonlWriter,
    options: BatchOptions,
    progress=None,
    estimator: OnlineEstimator | None = None,
    on_fit: Callable[[Fit], None] | None = None,
    batch_size: int = 1,
) -> Summary:
    """Processes every record in order, writing one output line each. With `on_error="fail"` the
    first bad record raises after everything before it is written; with `"skip"` it becomes an
    error record in its place. Records already in a resumed output are skipped (ids checked).

    With an `estimator` (`--threshold auto`), each record decodes with the estimator's current
    threshold, its pairs are observed, and `on_fit` is called after every refit.

    With `batch_size` > 1 up to that many records decode together (batching.py); outputs are
    still written in input order, each as soon as every record before it is written."""
    stream = _Stream(Batch(engine, options), writer, progress, estimator, on_fit)
    fresh = stream.fresh(records)
    if batch_size == 1:
        for index, record in fresh:
            try:
                stream.done(index, *stream.batch.process(record, stream.threshold()))
            except InputError as e:
                stream.failed(index, record, e)
    else:
        stream.run_rows(fresh, batch_size)
    stream.summary.wall_s = time.perf_counter() - stream.summary.began
    return stream.summary


class _Stream:
    """What both ways of running a stream share: resuming, the order of outputs, error records,
    the adaptive threshold and the summary."""

    def __init__(self, batch: Batch, writer: JsonlWriter, progress, estimator, on_fit):
        self.batch, self.writer, self.progress, self.estimator, self.on_fit = batch, writer, progress, estimator, on_fit
        self.summary = Summary()
        self.ready: dict[int, tuple[dict, list | None]] = {}  # finished outputs waiting for earlier ones
        self.next = len(writer.written)  # the index of the next output to write
        if estimator is not None:
            self.summary.trajectory.append((0, estimator.threshold, "initial"))

    def fresh(self, records: Iterable[Record]) -> Iterator[tuple[int, Record]]:
        """(index, record) for the records not yet in a resumed output. The records already there
        must have come from these input lines (the digests written with them, or their ids in
        files of older versions), and the output may not hold more records than the input. A
        record whose id an earlier one has comes back as a bad record."""
        written, seen, index = self.writer.written, {}, -1
        for index, record in enumerate(records):
            self._check_unique(record, seen)
            if index >= len(written):
                yield index, record
                continue
            (got, source), expected = written[index], self.batch.record_id(record)
            if source is not None and source != record.digest:
                raise OutputError(f"cannot resume: output record {index + 1} was not written for input line {record.line} (its text differs); is this the same input?")
            if got != expected:
                raise OutputError(
                    f"cannot resume: output record {index + 1} has id {got!r} but input line {record.line} has id {expected!r}; is this the same input?"
                )
            self.summary.skipped += 1
            _advance(self.progress, self.summary)
        if index + 1 < len(written):
            raise OutputError(f"cannot resume: the output holds {len(written)} records but the input only {index + 1}; is this the same input?")

    def _check_unique(self, record: Record, seen: dict) -> None:
        """Marks a record whose id an earlier record has as bad: --resume and joins key on ids."""
        if record.data is None or record.error is not None:
            return
        rid = self.batch.record_id(record)
        key = json.dumps(rid, sort_keys=True, default=str)
        if key in seen:
            record.error = InputError(f"duplicate id {rid!r}: line {seen[key]} has it too", line=record.line, field=self.batch.options.id_field)
        else:
            seen[key] = record.line

    def threshold(self) -> DecodeConfig | None:
        """The options a record starts with: the estimator's current threshold, if any."""
        return replace(self.batch.options.decode, threshold=self.estimator.threshold) if self.estimator else None

    def failed(self, index: int, record: Record, e: InputError) -> None:
        if self.batch.options.on_error == "fail":
            raise e
        self.done(index, self.batch.error(record, e), None)

    def done(self, index: int, out: dict, pairs: list | None) -> None:
        """Writes `out` once every earlier output is written, and what is then ready after it."""
        self.ready[index] = (out, pairs)
        while self.next in self.ready:
            out, pairs = self.ready.pop(self.next)
            if pairs is None:
                self.summary.errors += 1
            else:
                self.summary.add(out["stats"])
                if self.estimator is not None and (refit := self.estimator.observe(pairs)) is not None:
                    self.summary.trajectory.append((self.estimator.records, self.estimator.threshold, refit.status))
                    if self.on_fit is not None:
                        self.on_fit(refit)
            self.writer.write(out)
            self.summary.records += 1
            self.next += 1
            _advance(self.progress, self.summary)

    def run_rows(self, fresh: Iterator[tuple[int, Record]], batch_size: int) -> None:
        """Decodes records `batch_size` at a time. A bad record in fail mode stops the intake:
        the records before it finish and are written, then its error is raised."""
        from ..decoding.batching import generate_rows

        waiting: dict[int, Record] = {}
        failure: list[InputError] = []

        def jobs():
            for index, record in fresh:
                try:
                    ids, cfg = self.batch.request(record, self.threshold())
                except InputError as e:
                    if self.batch.options.on_error == "fail":
                        failure.append(e)
                        return
                    self.done(index, self.batch.error(record, e), None)
                    continue
                waiting[index] = record
                yield index, ids, cfg, self.batch.record_id(record)

        self.summary.batched = True
        for index, result in generate_rows(self.batch.engine, jobs(), batch_size):
            self.done(index, self.batch.output(waiting.pop(index), result), result.pairs)
        if failure:
            raise failure[0]


def _advance(progress, summary: Summary) -> None:
    if progress is None:
        return
    progress.update(1)
    if summary.rate():
        progress.set_postfix_str(f"{summary.rate():.1f} tok/s", refresh=False)
