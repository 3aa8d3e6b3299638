"""Reading JSONL input one record at a time, keeping line numbers for error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import InputError


@dataclass
class Record:
    line: int  # 1-based line number in the input
    data: dict | None  # the parsed object; None when the line is bad
    error: InputError | None = None


def read_records(stream: BinaryIO) -> Iterator[Record]:
    """Yields one `Record` per non-blank line. A bad line (not UTF-8, not JSON, not an object)
    comes back with its error instead of data, so the caller decides whether to stop."""
    for line, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(line, None, InputError(f"not valid UTF-8 (byte {e.start + 1})", line=line))
            continue
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield Record(line, None, InputError(f"malformed JSON: {e.msg} at column {e.colno}", line=line))
            continue
        if not isinstance(data, dict):
            yield Record(line, None, InputError(f"expected a JSON object, got {type(data).__name__}", line=line))
            continue
        yield Record(line, data)


def count_records(path) -> int:
    """Non-blank lines in a file (the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())
