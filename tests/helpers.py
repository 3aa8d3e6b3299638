"""Helpers the CLI tests share: run a command in-process, read its JSONL, a good record."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from free_cli.cli import app

from conftest import words

runner = CliRunner()
FP32 = ["--dtype", "fp32", "--device", "cpu", "-n", "12"]


def invoke(*args, input=None):
    """`free ARGS...` in this process (typer's runner): exit code, stdout and stderr apart."""
    return runner.invoke(app, [str(a) for a in args], input=input)


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def good(i: int) -> dict:
    return {"id": f"r{i}", "prompt": words(6, seed=i)}


def without_timing(text: str) -> list[dict]:
    """Output records with their timings left out (they differ from run to run)."""
    rows = lines(text)
    for row in rows:
        for key in ("wall_time_s", "tokens_per_s", "prefill_s"):
            row.get("stats", {}).pop(key, None)
    return rows
