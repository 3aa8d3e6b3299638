"""`free generate` as a library: stream records through an engine, in input order, one output
record per input record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from .config import DecodeConfig
from .engine import Engine
from .errors import InputError, OutputError
from .output import JsonlWriter
from .prompts import Fields, Template, choose_template, render
from .records import Record
from .threshold import Fit, OnlineEstimator


@dataclass(frozen=True)
class BatchOptions:
    decode: DecodeConfig = DecodeConfig()
    task: str = "auto"
    fields: Fields = Fields()
    id_field: str = "id"
    keep: tuple[str, ...] = ()  # input fields copied into each output record
    on_error: str = "fail"  # fail | skip


@dataclass
class Summary:
    records: int = 0
    errors: int = 0
    skipped: int = 0  # records already in the output (resume)
    new_tokens: int = 0
    exited_tokens: float = 0.0
    layer_sum: float = 0.0
    generation_s: float = 0.0
    wall_s: float = 0.0
    num_layers: int = 0
    trajectory: list = field(default_factory=list)  # --threshold auto: (records, threshold, status)

    def add(self, stats: dict) -> None:
        n = stats["new_tokens"]
        self.new_tokens += n
        self.exited_tokens += stats["exited_share"] * n
        self.layer_sum += stats["mean_layers"] * n
        self.generation_s += stats["wall_time_s"]
        self.num_layers = stats["num_layers"]

    def line(self) -> str:
        n = max(self.new_tokens, 1)
        rate = self.new_tokens / self.generation_s if self.generation_s else 0.0
        parts = [
            f"{self.records} records",
            f"{self.errors} errors",
            f"{self.new_tokens} tokens",
            f"{rate:.1f} tok/s",
            f"exited {100 * self.exited_tokens / n:.0f}%",
            f"mean layers {self.layer_sum / n:.1f}/{self.num_layers}",
            f"{self.wall_s:.1f} s",
        ]
        if self.trajectory:
            first, last = self.trajectory[0][1], self.trajectory[-1][1]
            parts.append(f"λ {first:.3g}→{last:.3g} ({len(self.trajectory) - 1} refits, last {self.trajectory[-1][2]})")
        if self.skipped:
            parts.insert(0, f"resumed after {self.skipped}")
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

    def process(self, record: Record, cfg: DecodeConfig | None = None) -> tuple[dict, list]:
        """The output object for one record and its (confidence, agreed) pairs; raises
        `InputError` for a bad record."""
        data, opts = record.data, self.options
        ids = self.prompt_ids(record)
        cfg = self._fit_context(cfg or opts.decode, len(ids), record.line)
        result = self.engine.generate(ids, cfg)
        out = {"id": self.record_id(record), "output": result.text, "stats": result.stats}
        for name in opts.keep:
            if name not in data:
                raise InputError("missing field (asked for with --keep)", line=record.line, field=name)
            out[name] = data[name]
        return out, result.pairs

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


def run_batch(
    engine: Engine,
    records: Iterable[Record],
    writer: JsonlWriter,
    options: BatchOptions,
    progress=None,
    estimator: OnlineEstimator | None = None,
    on_fit: Callable[[Fit], None] | None = None,
) -> Summary:
    """Processes every record in order, writing one output line each. With `on_error="fail"` the
    first bad record raises after everything before it is written; with `"skip"` it becomes an
    error record in its place. Records already in a resumed output are skipped (ids checked).

    With an `estimator` (`--threshold auto`), each record decodes with the estimator's current
    threshold, its pairs are observed, and `on_fit` is called after every refit."""
    batch, summary = Batch(engine, options), Summary()
    if estimator is not None:
        summary.trajectory.append((0, estimator.threshold, "initial"))
    began = time.perf_counter()
    for index, record in enumerate(records):
        if index < len(writer.written):
            expected = batch.record_id(record)
            if writer.written[index] != expected:
                raise OutputError(
                    f"cannot resume: output record {index + 1} has id {writer.written[index]!r} but input "
                    f"line {record.line} has id {expected!r}; is this the same input?"
                )
            summary.skipped += 1
            _advance(progress, summary)
            continue
        cfg = replace(options.decode, threshold=estimator.threshold) if estimator is not None else None
        try:
            out, pairs = batch.process(record, cfg)
            summary.add(out["stats"])
            if estimator is not None and (refit := estimator.observe(pairs)) is not None:
                summary.trajectory.append((estimator.records, estimator.threshold, refit.status))
                if on_fit is not None:
                    on_fit(refit)
        except InputError as e:
            if options.on_error == "fail":
                raise
            summary.errors += 1
            out = {"id": batch.record_id(record), "error": {"line": e.line, "field": e.field, "message": e.reason}}
        writer.write(out)
        summary.records += 1
        _advance(progress, summary)
    summary.wall_s = time.perf_counter() - began
    return summary


def _advance(progress, summary: Summary) -> None:
    if progress is None:
        return
    progress.update(1)
    if summary.generation_s:
        progress.set_postfix_str(f"{summary.new_tokens / summary.generation_s:.1f} tok/s", refresh=False)
