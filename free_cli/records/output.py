"""JSONL output: one object per line, flushed line by line, resumable after a crash or kill."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import OutputError


def check_output(path: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False, source: str | os.PathLike | None = None) -> Path | None:
    """The output file (None: stdout), refused before any work when it cannot be written as asked:
    --resume with --overwrite, a directory, a folder that does not exist or cannot be written, the
    input itself (`source`, compared by inode), or an existing file without --resume or
    --overwrite."""
    path = Path(path) if path is not None and str(path) != "-" else None
    if resume and overwrite:
        raise OutputError("--resume and --overwrite contradict each other: --resume continues the output, --overwrite replaces it")
    if path is None:
        if resume:
            raise OutputError("--resume needs --output FILE: output written to stdout cannot be resumed")
        return None
    if path.is_dir():
        raise OutputError(f"{path} is a directory; --output takes a file")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist")
    if source is not None and str(source) != "-" and path.exists() and os.path.samefile(source, path):
        raise OutputError(f"{path} is the input: write the output to another file (the input would be lost)")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise OutputError(f"cannot write {path}: permission denied")
    if path.exists() and path.stat().st_size > 0 and not (resume or overwrite):
        raise OutputError(f"{path} exists; pass --resume to continue it or --overwrite to replace it")
    return path


class JsonlWriter:
    """Writes records to a file or stdout. With `resume`, an existing file is kept up to its last
    complete line (a torn last line is cut off) and `written` lists the records already there:
    (id, the digest of the input line each came from, or None in files of older versions)."""

    def __init__(self, path: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False, source: str | os.PathLike | None = None):
        self.path = check_output(path, resume=resume, overwrite=overwrite, source=source)
        self.written: list[tuple] = []
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


def _complete_records(path: Path) -> list[tuple]:
    """(id, input digest) of the complete records in `path`, after truncating a torn last line."""
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
        source = record.get("input")
        ids.append((record["id"], source.get("digest") if isinstance(source, dict) else None))
    return ids
