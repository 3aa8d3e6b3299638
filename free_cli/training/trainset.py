"""Training examples: the prompt exactly as `free generate` renders it, and a target (a reference
field of the record, or the model's own greedy output), tokenized; the loss falls on target
tokens only."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..records.stream import Batch, BatchOptions
from ..decoding.batching import generate_rows
from ..decoding.config import DecodeConfig
from ..decoding.engine import Engine
from ..decoding.precision import Precision
from ..errors import ConfigError, InputError
from ..records.prompts import Fields
from ..records.input import read_records

# The reference field for each task, on the shared data sets.
TARGET_FIELDS = {"summarization": "summary", "qa": "answers", "instruction": "output", "prompt": "response"}


@dataclass
class Example:
    prompt: list[int]
    target: list[int]  # ends with a stop token


def load_examples(
    engine: Engine,
    paths: list[str],
    *,
    task: str = "auto",
    fields: Fields = Fields(),
    target_field: str | None = None,
    limit: int | None = None,
    max_length: int = 1024,
    references: bool = True,
) -> tuple[list[Example], int]:
    """Examples from JSONL files (or `datasets` names, see `read_source`) and how many records were
    left out for being longer than `max_length` tokens. With `references`, each record's target
    field is tokenized as its target (a missing or bad one raises `InputError` naming it);
    without, targets are left empty, to be generated (`self_targets`)."""
    examples, too_long = [], 0
    eos = _stop_token(engine)
    for path in paths:
        batch = Batch(engine, BatchOptions(task=task, fields=fields))
        for record in read_source(path, limit):
            prompt = batch.prompt_ids(record)
            target = []
            if references:
                text = _target_text(batch, record, target_field)
                target = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            if len(prompt) + len(target) > max_length:
                too_long += 1
                continue
            examples.append(Example(prompt, target))
    return examples, too_long


def read_source(path: str, limit: int | None):
    """Records of a local JSONL file, or of a `datasets` data set named `hf:NAME[:SPLIT]` (which
    must be reachable or in the local `datasets` cache)."""
    if path.startswith("hf:"):
        from datasets import load_dataset

        from ..records.input import Record

        name, _, split = path[3:].partition(":")
        try:
            rows = load_dataset(name, split=split or "train")
        except Exception as e:
            raise InputError(f"cannot load the data set {name!r}: {str(e).splitlines()[0]}") from None
        for i, row in enumerate(rows):
            if limit is not None and i >= limit:
                return
            yield Record(i + 1, dict(row))
        return
    if not Path(path).is_file():
        raise InputError(f"no such file: {path}")
    with open(path, "rb") as f:
        for i, record in enumerate(read_records(f)):
            if limit is not None and i >= limit:
                return
            yield record


def _target_text(batch: Batch, record, field: str | None) -> str:
    template = batch.template
    name = field or (template.target_language if template.task == "translation" else TARGET_FIELDS.get(template.task))
    if name is None:
        raise InputError("no reference field is known for this task; name one with --target-field", line=record.line)
    if name not in record.data:
        raise InputError("missing target field", line=record.line, field=name)
    value = record.data[name]
    if isinstance(value, dict) and "text" in value:  # SQuAD in `datasets`' layout
        value = value["text"]
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        raise InputError("the target must be non-empty text", line=record.line, field=name)
    return value


def _stop_token(engine: Engine) -> int:
    if engine.stop_ids:
        return min(engine.stop_ids)
    if engine.tokenizer.eos_token_id is not None:
        return engine.tokenizer.eos_token_id
    raise ConfigError("the model has no stop token to end training targets with")


def self_targets(
    engine: Engine, examples: list[Example], max_new_tokens: int, cache: Path, batch_size: int = 16, progress=None,
    owned=lambda i: True, parts: list[Path] = (),
) -> list[Example]:
    """The model's own greedy outputs as targets (what the exit sees at decoding time), generated
    once with continuous batching (`batch_size` rows; each row decodes to what it would alone) and
    appended to `cache` (a JSONL file) as each finishes, so that a resumed run reuses them; targets
    found in `parts` (other processes' caches) are taken as they are, and only the examples
    `owned` are generated here. Rows are keyed by the prompt's ids, the token budget and the
    engine's precision, so a run over other records, with another budget or in another precision
    never picks up a stale target. Returns the examples with a target, each its own."""
    prompts = [e.prompt for e in examples]
    keys = [_target_key(p, max_new_tokens, engine.precision) for p in prompts]
    done = {}
    for path in (cache, *parts):
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    done[row["key"]] = row["target"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line after a kill, or a row of an older layout
    todo = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in done and owned(i)}.values())
    if progress is not None:
        progress.update(len(prompts) - len(todo))
    cfg = DecodeConfig(strategy="full", max_new_tokens=max_new_tokens)  # to the model's own stop tokens
    with open(cache, "a") as out:
        for i, generation in generate_rows(engine, ((i, prompts[i], cfg) for i in todo), batch_size):
            done[keys[i]] = generation.tokens
            out.write(json.dumps({"key": keys[i], "target": generation.tokens}) + "\n")
            out.flush()
            if progress is not None:
                progress.update(1)
    return [Example(p, done[k]) for p, k in zip(prompts, keys) if done.get(k)]


def tokens_digest(examples: list[Example], key: str = "") -> str:
    """A hash of `key` and the examples' prompt and target tokens, in order."""
    h = hashlib.sha256(key.encode())
    for example in examples:
        h.update(json.dumps([example.prompt, example.target]).encode())
    return h.hexdigest()


def _target_key(prompt: list[int], max_new_tokens: int, precision: Precision) -> str:
    """fp32 targets are keyed without their precision, as before precisions were told apart."""
    passes = sorted({str(precision.narrow), str(precision.wide)})
    tag = [] if passes == [str(torch.float32)] else ["/".join(passes)]
    return hashlib.sha1(json.dumps([max_new_tokens, prompt, *tag]).encode()).hexdigest()


def data_label(source: str) -> str:
    """How a training source is named in a checkpoint: `hf:` names as given, files by their stem,
    with their folder when the stem is only a split's name (samsum/train, not train)."""
    if source.startswith("hf:"):
        return source
    path = Path(source)
    split = path.stem in ("train", "training", "validation", "valid", "dev", "test", "eval") and path.parent.name
    return f"{path.parent.name}/{path.stem}" if split else path.stem


def split(examples: list[Example], eval_fraction: float, max_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic held-out split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_eval, int(round(eval_fraction * len(examples))))
    held = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return train, held


@dataclass
class TokenBatch:
    """A decoder-only batch: `ids` (B, T); `attention` (B, T) 1 for real tokens; `positions` (B, T)
    each token's position in its own sequence. `labels` (B, T - prefix) the next token at columns
    whose next token is a target token, −100 elsewhere; `mask` (B, T - prefix) those columns.

    With `prefix` > 0 the columns [0, prefix) hold each example's prompt but its last token,
    left-padded, a context the model reads without gradients (`--detach-prompt`); the columns
    after it hold the last prompt token and the target, right-padded, and labels cover only them."""

    ids: Tensor
    labels: Tensor
    mask: Tensor
    attention: Tensor
    positions: Tensor
    prefix: int = 0


def collate(examples: list[Example], pad: int, device, detach_prompt: bool = False) -> TokenBatch:
    """Right-padded sequences, or with `detach_prompt` the split layout of `TokenBatch.prefix`.
    Position p predicts token p + 1, so the loss starts at the prompt's last token."""
    heads = [e.prompt[:-1] if detach_prompt else [] for e in examples]
    tails = [e.prompt[len(h) :] + e.target for h, e in zip(heads, examples)]
    prefix, width = max(map(len, heads)), max(map(len, tails))
    B = len(examples)
    ids = torch.full((B, prefix + width), pad, dtype=torch.long)
    attention = torch.zeros((B, prefix + width), dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    for b, (head, tail, e) in enumerate(zip(heads, tails, examples)):
        ids[b, prefix - len(head) : prefix + len(tail)] = torch.tensor(head + tail)
        attention[b, prefix - len(head) : prefix + len(tail)] = 1
        first = len(e.prompt) - len(head) - 1  # the column of the prompt's last token in the tail
        labels[b, first : first + len(e.target)] = torch.tensor(e.target)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    to = lambda t: t.to(device)  # noqa: E731
    return TokenBatch(to(ids), to(labels), to(labels >= 0), to(attention), to(positions), prefix)
