"""The `free` command line: a thin layer over the library, one module per command. Library errors
become one `Error: ...` line on stderr and exit code 1; stdout carries data only."""

from __future__ import annotations

from . import bench, calibrate, generate, models, score, train  # noqa: F401  (each registers its command)
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="free")
