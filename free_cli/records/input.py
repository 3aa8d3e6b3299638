"""Reading JSONL input one record at a time, keeping line numbers for error messages."""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..errors import InputError


@dataclass
class Record:
    line: int  # 1-based line number in the input
    data: dict | None  # the parsed object; None when the line is bad
    error: InputError | None = None
    digest: str = ""  # of the line's bytes: an output record names the input record it came from


def digest(raw: bytes) -> str:
    """A short digest of an input line (its end of line and surrounding blanks aside)."""
    return hashlib.sha256(raw.strip()).hexdigest()[:16]


def read_records(stream: BinaryIO) -> Iterator[Record]:
    """Yields one `Record` per non-blank line. A bad line (not UTF-8, not JSON, not an object)
    comes back with its error instead of data, so the caller decides whether to stop. A UTF-8
    byte-order mark at the start of the stream is skipped."""
    for line, raw in enumerate(stream, start=1):
        if line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        record = _parse(line, raw)
        if record is not None:
            record.digest = digest(raw)
            yield record


def _parse(line: int, raw: bytes) -> Record | None:
    """One input line as a `Record` (None when blank)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(line, None, InputError(f"not valid UTF-8 (byte {e.start + 1})", line=line))
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return Record(line, None, InputError(f"malformed JSON: {e.msg} at column {e.colno}", line=line))
    if not isinstance(data, dict):
        return Record(line, None, InputError(f"expected a JSON object, got {type(data).__name__}", line=line))
    return Record(line, data)


def count_records(path) -> int:
    """Non-blank lines in a file (the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())
