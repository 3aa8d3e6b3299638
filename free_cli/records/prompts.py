"""Turning input records into prompts: a prompt field as is, or a task template applied to named
fields, rendered with the model's chat template when it has one, T5's task prefixes for
encoder-decoders, and a plain completion format otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, InputError

TASKS = ("auto", "prompt", "summarization", "qa", "translation", "instruction")
SUMMARY_FIELDS = ("dialogue", "document", "article", "text")  # looked for, in order, by `auto`
LANGUAGES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fr": "French",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "zh": "Chinese",
}  # fmt: skip


@dataclass(frozen=True)
class Fields:
    """Record field names; the defaults match the shared data sets (SAMSum, SQuAD, IWSLT, Alpaca)."""

    prompt: str = "prompt"
    text: str | None = None  # summarization source; None: the first of SUMMARY_FIELDS present
    question: str = "question"
    context: str = "context"
    source: str | None = None  # translation source language field; None: the non-English code field
    target_language: str = "en"
    instruction: str = "instruction"
    input: str = "input"


@dataclass(frozen=True)
class Template:
    """A task bound to concrete field names, fixed from the first record of a stream."""

    task: str
    fields: dict[str, str]  # role -> field name, e.g. {"text": "dialogue"}
    target_language: str = "en"

    @property
    def main_field(self) -> str:
        """The field named when the whole prompt is at fault (too long, say)."""
        for role in ("prompt", "text", "context", "source", "instruction"):
            if role in self.fields:
                return self.fields[role]
        return next(iter(self.fields.values()))


def choose_template(task: str, record: dict, fields: Fields, line: int) -> Template:
    """Binds `task` to field names; `auto` picks the task from the fields this record has."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "auto":
        task = _detect(record, fields, line)
    if task == "prompt":
        return Template("prompt", {"prompt": fields.prompt})
    if task == "summarization":
        text = fields.text or next((f for f in SUMMARY_FIELDS if f in record), SUMMARY_FIELDS[0])
        return Template("summarization", {"text": text})
    if task == "qa":
        return Template("qa", {"context": fields.context, "question": fields.question})
    if task == "translation":
        source = fields.source or next(
            (k for k in record if k in LANGUAGES and k != fields.target_language), None
        )
        if source is None:
            raise InputError("no source-language field found; name it with --source-field", line=line)
        return Template("translation", {"source": source}, target_language=fields.target_language)
    return Template("instruction", {"instruction": fields.instruction, "input": fields.input})


def _detect(record: dict, fields: Fields, line: int) -> str:
    if fields.prompt in record:
        return "prompt"
    if fields.instruction in record:
        return "instruction"
    if fields.question in record and fields.context in record:
        return "qa"
    if (fields.text and fields.text in record) or any(f in record for f in SUMMARY_FIELDS):
        return "summarization"
    if fields.source in record or sum(k in LANGUAGES for k in record) >= 2:
        return "translation"
    raise InputError(
        f"cannot tell the task from the fields {sorted(record)}: give a {fields.prompt!r} field, or "
        "choose --task with the field options",
        line=line,
    )


def render(template: Template, record: dict, line: int, style: str) -> str | list[dict]:
    """The prompt for one record: chat messages for `style="chat"`, else text ("t5" or "plain")."""
    v = {role: _text(record, name, line, optional=role == "input") for role, name in template.fields.items()}
    task = template.task
    if task == "prompt":
        return [{"role": "user", "content": v["prompt"]}] if style == "chat" else v["prompt"]
    if style == "t5":
        return {
            "summarization": lambda: f"summarize: {v['text']}",
            "qa": lambda: f"question: {v['question']} context: {v['context']}",
            "translation": lambda: f"translate {_language(template.fields['source'])} to "
            f"{_language(template.target_language)}: {v['source']}",
            "instruction": lambda: _join(v["instruction"], v["input"]),
        }[task]()
    if style == "chat":
        return [{"role": "user", "content": _instruction(template, v)}]
    return {
        "summarization": lambda: f"{v['text']}\n\nSummary:",
        "qa": lambda: f"Context: {v['context']}\nQuestion: {v['question']}\nAnswer:",
        "translation": lambda: f"{_language(template.fields['source'])}: {v['source']}\n"
        f"{_language(template.target_language)}:",
        "instruction": lambda: f"### Instruction:\n{_join(v['instruction'], v['input'])}\n\n### Response:\n",
    }[task]()


def _instruction(template: Template, v: dict) -> str:
    task = template.task
    if task == "summarization":
        kind = "conversation" if template.fields["text"] == "dialogue" else "text"
        return f"Summarize the following {kind} in one or two sentences.\n\n{v['text']}"
    if task == "qa":
        return (
            "Answer the question with a short phrase taken from the context.\n\n"
            f"Context: {v['context']}\n\nQuestion: {v['question']}"
        )
    if task == "translation":
        src, tgt = _language(template.fields["source"]), _language(template.target_language)
        return f"Translate the following {src} text into {tgt}. Reply with the translation only.\n\n{v['source']}"
    return _join(v["instruction"], v["input"])


def _text(record: dict, name: str, line: int, optional: bool = False) -> str:
    if name not in record:
        if optional:
            return ""
        raise InputError("missing field", line=line, field=name)
    value = record[name]
    if not isinstance(value, str):
        if optional and value is None:
            return ""
        raise InputError(f"expected text, got {type(value).__name__}", line=line, field=name)
    if not value.strip() and not optional:
        raise InputError("empty text", line=line, field=name)
    return value


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _language(code: str) -> str:
    return LANGUAGES.get(code, code)
