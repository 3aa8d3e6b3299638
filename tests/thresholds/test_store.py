"""The per-dataset threshold store: atomic, locked writes; corrupt or foreign files refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from free_cli.thresholds.store import StoreError, ThresholdStore


def entry(dataset: str, threshold: float, method: str = "bmm", **extra) -> dict:
    return {"model": "m", "dataset": dataset, "exit_layer": 8, "confidence": "softmax", "method": method, "threshold": threshold, **extra}


def test_put_get_and_replace(tmp_path):
    store = ThresholdStore(tmp_path / "t.json")
    assert store.get("m", "samsum", 8, "softmax") is None
    store.put(entry("samsum", 0.8, fitted_at="2026-01-01T00:00:00+00:00"))
    store.put(entry("squad", 0.7))
    store.put(entry("samsum", 0.6, method="ltt", fitted_at="2026-02-01T00:00:00+00:00"))
    assert store.get("m", "samsum", 8, "softmax")["threshold"] == 0.6  # the most recent fit
    store.put(entry("samsum", 0.85, fitted_at="2026-03-01T00:00:00+00:00"))  # replaces the bmm entry
    assert len(store.entries()) == 3
    assert store.get("m", "samsum", 8, "softmax")["threshold"] == 0.85
    assert store.get("m", "samsum", 10, "softmax") is None  # another exit layer is another key
    assert json.loads((tmp_path / "t.json").read_text())["format"] == "free-thresholds"


@pytest.mark.parametrize("content", ["{not json", '{"entries": []}', "[1, 2]"])
def test_corrupt_or_foreign_files_are_refused_and_kept(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    store = ThresholdStore(path)
    with pytest.raises(StoreError, match=str(path)):
        store.put(entry("samsum", 0.8))
    with pytest.raises(StoreError):
        store.get("m", "samsum", 8, "softmax")
    assert path.read_text() == content


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from free_cli.thresholds.store import ThresholdStore
    store = ThresholdStore(sys.argv[1])
    while not os.path.exists(sys.argv[1] + ".go"):  # start together
        time.sleep(0.001)
    for i in range(int(sys.argv[3])):
        store.put({"model": "m", "dataset": f"{sys.argv[2]}-{i}", "exit_layer": 8,
                   "confidence": "softmax", "method": "bmm", "threshold": i / 100})
    """
)


def test_two_processes_writing_at_once_keep_both_entries(tmp_path):
    path = tmp_path / "t.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "150"]) for name in ("a", "b")]
    time.sleep(2.0)  # both interpreters up and waiting
    (tmp_path / "t.json.go").touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    datasets = {e["dataset"] for e in ThresholdStore(path).entries()}
    assert datasets == {f"{name}-{i}" for name in ("a", "b") for i in range(150)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t.json.")]  # no temporary files left
