"""Scoring generated outputs: quality against references, consistency with the full model's
outputs, and speed from the stats `free generate` wrote. Scales follow each metric's usual
report: ROUGE and the consistency figures in [0, 1], BLEU, chrF and SQuAD EM/F1 in [0, 100]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError
from ..metrics import DEFAULT_METRICS, PERCENT, ROUGE, consistency, evaluate
from ..records.input import read_records
from ..decoding.stats import Tally

REFERENCE_FIELDS = ("summary", "answers", "output", "reference", "references", "target", "en")


@dataclass
class Scored:
    """Everything `free score` reports for one predictions file."""

    records: int
    metrics: dict[str, float] = field(default_factory=dict)
    consistency: dict[str, float] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    errors: int = 0  # error records of `generate --on-error skip`: counted apart, not scored
    reference_field: str | None = None

    def figures(self) -> dict[str, float]:
        """One flat name -> value map: what `--fail-under` names."""
        return {**self.metrics, **self.consistency, **self.speed}

    def to_json(self) -> dict:
        out = {"records": self.records, "errors": self.errors, "reference_field": self.reference_field}
        out.update(metrics=self.metrics, consistency=self.consistency, speed=self.speed, signatures=self.signatures)
        return out


def speed(stats: list[dict]) -> dict[str, float]:
    """Aggregates of `generate`'s per-record stats, weighted by generated tokens (stats from
    older versions, with shares but no counts, included)."""
    stats = [s for s in stats if s]
    if not stats:
        return {}
    t = Tally.of(stats)
    return {"tokens_per_s": t.tokens_per_s, "exited_share": t.exited_share, "mean_layers": t.mean_layers, "new_tokens": float(t.new_tokens)}


# ---- reading and joining ----------------------------------------------------------------------


def task_of(reference_field: str) -> str:
    """The kind of task a reference field implies, for the default metrics."""
    if reference_field == "answers":
        return "qa"
    if reference_field == "summary":
        return "summarization"
    from ..records.prompts import LANGUAGES

    return "translation" if reference_field in LANGUAGES else "generic"


def reference_texts(value, line: int, name: str) -> list[str]:
    """A reference field as a list of strings: text, a list of texts, or SQuAD's `{"text": [...]}`."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InputError("a reference must be text or a non-empty list of texts", line=line, field=name)
    return value


def reference_field_of(record: dict, exclude: str | None = None) -> str | None:
    """The first known reference field the record has (not `exclude`, the output's own field)."""
    return next((name for name in REFERENCE_FIELDS if name in record and name != exclude), None)


def references_of(records, reference_field: str | None, metrics) -> tuple[list[list[str]] | None, list[str] | None]:
    """Each record's references and the metrics to score them with (bench): the named field or
    the detected one, the task's default metrics unless given; (None, None) without references."""
    if reference_field == "none" or not records:
        return None, None
    name = reference_field or reference_field_of(records[0].data or {})
    if name is None:
        return None, None
    return [reference_texts(r.data.get(name), r.line, name) for r in records], list(metrics or DEFAULT_METRICS[task_of(name)])


def detect_reference_field(record: dict, line: int, exclude: str | None = None) -> str:
    name = reference_field_of(record, exclude)
    if name is not None:
        return name
    raise InputError(f"no reference field among {sorted(record)}; name it with --reference-field", line=line)


def read_keyed(path: Path, id_field: str) -> dict:
    """id -> (line, record) for a JSONL file; a bad line, a missing id or a repeated id is an
    `InputError` naming the file and line."""
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    rows = {}
    with open(path, "rb") as f:
        for rec in read_records(f):
            if rec.error is not None:
                raise InputError(f"{path}: {rec.error}")
            if id_field not in rec.data:
                raise InputError(f"{path}: missing id", line=rec.line, field=id_field)
            key = rec.data[id_field]
            if not isinstance(key, (str, int)):
                raise InputError(f"{path}: an id must be text or an integer", line=rec.line, field=id_field)
            if key in rows:
                raise InputError(f"{path}: duplicate id {key!r} (also on line {rows[key][0]})", line=rec.line, field=id_field)
            rows[key] = (rec.line, rec.data)
    return rows


def _output(record: dict, field_name: str, path: Path, line: int) -> str | None:
    """A record's generated text; None for an error record (`generate --on-error skip`)."""
    if "error" in record and field_name not in record:
        return None
    value = record.get(field_name)
    if not isinstance(value, str):
        raise InputError(f"{path}: the output must be text", line=line, field=field_name)
    return value


def score_file(
    predictions: Path,
    *,
    references: Path | None = None,
    reference_field: str | None = None,
    against: Path | None = None,
    metrics: list[str] | None = None,
    output_field: str = "output",
    id_field: str = "id",
) -> Scored:
    """Scores a predictions file (`free generate`'s output). References come from the records
    themselves (a field kept with `generate --keep`) or from `references`, joined by id; `against`
    is the full model's predictions for the same ids. Error records (`--on-error skip`) are counted
    apart and scored nowhere."""
    every = read_keyed(predictions, id_field)
    if not every:
        raise InputError(f"{predictions}: no records to score")
    rows = {key: row for key, row in every.items() if _output(row[1], output_field, predictions, row[0]) is not None}
    if not rows:
        raise InputError(f"{predictions}: all {len(every)} records are error records (--on-error skip): nothing to score")
    refs_by_id = read_keyed(references, id_field) if references is not None else None
    first = next(iter(rows.values()))[1]
    quality = bool(refs_by_id is not None or reference_field or metrics or reference_field_of(first, output_field))
    outputs, golds, stats = [], [], []
    for key, (line, record) in rows.items():
        outputs.append(_output(record, output_field, predictions, line))
        stats.append(record.get("stats"))
        if not quality:
            continue
        source, where, source_line = record, predictions, line
        if refs_by_id is not None:
            if key not in refs_by_id:
                raise InputError(f"{predictions}: id {key!r} has no record in {references}", line=line, field=id_field)
            source_line, source = refs_by_id[key]
            where = references
        if reference_field is None:
            reference_field = detect_reference_field(source, source_line, exclude=output_field if refs_by_id is None else None)
        if reference_field not in source:
            raise InputError(f"{where}: missing reference", line=source_line, field=reference_field)
        golds.append(reference_texts(source[reference_field], source_line, reference_field))
    scored = Scored(records=len(rows), errors=len(every) - len(rows), reference_field=reference_field)
    if golds:
        chosen = list(metrics) if metrics else list(DEFAULT_METRICS[task_of(reference_field)])
        scored.metrics, scored.signatures = evaluate(outputs, golds, chosen)
    if against is not None:
        full_rows = read_keyed(against, id_field)
        full, full_stats = [], []
        for key, (line, _) in rows.items():
            if key not in full_rows:
                raise InputError(f"{predictions}: id {key!r} has no record in {against}", line=line, field=id_field)
            full_line, full_record = full_rows[key]
            text = _output(full_record, output_field, against, full_line)
            if text is None:
                raise InputError(f"{against}: id {key!r} is an error record there, so it cannot be compared", line=full_line, field=id_field)
            full.append(text)
            full_stats.append(full_record.get("stats"))
        scored.consistency = consistency(outputs, full)
        baseline = speed(full_stats).get("tokens_per_s")
    scored.speed = speed(stats)
    if against is not None and baseline and "tokens_per_s" in scored.speed:  # the same records, both timed
        scored.speed |= {"against_tokens_per_s": baseline, "speedup": scored.speed["tokens_per_s"] / baseline}
    return scored


UNIT = ROUGE + ("exact_match_full", "rougeL_full", "exited_share")  # reported in [0, 1]


def parse_bounds(specs: list[str]) -> dict[str, float]:
    """`--fail-under name=value` options; a bound off its figure's scale (rougeL=25: ROUGE is in
    [0, 1]) is refused, as it could never be met."""
    bounds = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        try:
            bounds[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"--fail-under takes NAME=VALUE (e.g. rougeL=0.40), got {spec!r}")
        top = 1.0 if name in UNIT else 100.0 if name in PERCENT else None
        if top is not None and not 0 <= bounds[name] <= top:
            hint = f"; did you mean {bounds[name] / 100:g}?" if top == 1.0 and 1 < bounds[name] <= 100 else ""
            raise ConfigError(f"--fail-under {name}={value.strip()}: {name} is reported in [0, {top:g}]{hint}")
    return bounds


def shortfalls(scored: Scored, bounds: dict[str, float]) -> list[str]:
    """The figures below their bounds, as messages; a bound naming no figure is a `ConfigError`."""
    figures = scored.figures()
    missing = [name for name in bounds if name not in figures]
    if missing:
        raise ConfigError(f"--fail-under names {missing[0]!r}, which was not computed; computed: {', '.join(figures) or 'nothing'}")
    return [f"{name} = {figures[name]:.4g} is below {bound:g}" for name, bound in bounds.items() if figures[name] < bound]


def render(scored: Scored, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(scored.to_json(), ensure_ascii=False)
    if fmt == "line":
        return line(scored)
    figures = scored.figures()
    if fmt == "markdown":
        lines = ["| figure | value |", "| --- | ---: |"] + [f"| {k} | {format_figure(k, v)} |" for k, v in figures.items()]
    elif fmt == "table":
        width = max((len(k) for k in figures), default=6)
        lines = [f"{k:<{width}}  {format_figure(k, v):>10}" for k, v in figures.items()]
    else:
        raise ConfigError(f"--format must be json, line, markdown or table, got {fmt!r}")
    head = f"{scored.records} records" + (f" scored, {scored.errors} error records left out" if scored.errors else "")
    lines.insert(0, head if fmt == "table" else f"{head}\n")
    lines += [f"{name}: {sig}" for name, sig in scored.signatures.items()]
    return "\n".join(lines)




def format_figure(name: str, value: float) -> str:
    """Figures in [0, 100] with 2 decimals; others with 4 below 10 (ROUGE, shares), else 2."""
    return f"{value:.2f}" if name in PERCENT or abs(value) >= 10 else f"{value:.4f}"


def line(scored: Scored) -> str:
    """One line for people: the records, speed (against the compared file's, when both are
    timed), outputs equal to the compared ones, and the quality figures."""
    parts = [f"{scored.records} records"]
    speed_, same = scored.speed, scored.consistency
    if "tokens_per_s" in speed_:
        parts.append(f"{speed_['tokens_per_s']:.1f} tok/s" + (f" against {speed_['against_tokens_per_s']:.1f} ({speed_['speedup']:.2f}x)" if "speedup" in speed_ else ""))
    if same:
        parts.append(f"outputs equal {round(same['exact_match_full'] * scored.records)}/{scored.records}")
    parts += [f"{name} {format_figure(name, value)}" for name, value in scored.metrics.items()]
    return " · ".join(parts)
