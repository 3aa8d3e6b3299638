"""JSONL output: one object per line, flushed line by line, resumable after a crash or kill."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import OutputError


def check_output(path: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False) -> Path | None:
    """The output file (None: stdout), refused before any work when it cannot be written as asked."""
    path = Path(path) if path is not None and str(path) != "-" else None
    if path is None and resume:
        raise OutputError("--resume needs --output FILE: output written to stdout cannot be resumed")
    if path is not None and path.exists() and path.stat().st_size > 0 and not (resume or overwrite):
        raise OutputError(f"{path} exists; pass --resume to continue it or --overwrite to replace it")
    return path


class JsonlWriter:
    """Writes records to a file or stdout. With `resume`, an existing file is kept up to its last
    complete line (a torn last line is cut off) and `written` lists the ids already there."""

    def __init__(self, path: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False):
        self.path = check_output(path, resume=resume, overwrite=overwrite)
        self.written: list = []
        if self.path is None:
            self._file = sys.stdout
            return
        if resume and self.path.exists():
            self.written = _complete_records(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _complete_records(path: Path) -> list:
    """Ids of the complete records in `path`, after truncating any torn last line."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    ids = []
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            raise OutputError(f"{path} line {number} is not JSON: not a file this tool wrote, refusing to resume") from None
        if not isinstance(record, dict) or "id" not in record:
            raise OutputError(f"{path} line {number} has no id: not a file this tool wrote, refusing to resume")
        ids.append(record["id"])
    return ids
