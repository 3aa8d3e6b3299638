"""Learned thresholds, persisted per (model, dataset) in a small JSON file.

Each entry records the threshold, how it was found (the Beta-mixture fit with its parameters and
ζ, or Learn-then-Test with δ and ε), the number of pairs or samples behind it, and when. The exit
layer and confidence measure are part of the key, and the model's name carries its trained exit's
digest (`Engine.store_name`): a threshold means nothing for another exit.

Writes are atomic (a temporary file in the same folder, fsync, rename) and serialized across
processes by an exclusive lock on a sidecar file, with the read-modify-write done under the lock,
so two writers never lose each other's entries. A file that is not a store (corrupt JSON, or
another tool's) is reported with its path and never overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ..errors import FreeError

FORMAT = "free-thresholds"
VERSION = 1
FILENAME = "free_thresholds.json"
KEY = ("model", "dataset", "exit_layer", "confidence")


class StoreError(FreeError):
    """The threshold store cannot be read or written safely."""


class ThresholdStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        return self._read()["entries"]

    def check_writable(self) -> None:
        """Refuses, before any work, a store that could be read but not written: writes go to a
        temporary file beside it (atomic replace) and a lock file, so its folder must be
        writable."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # put() creates the missing folders
        if not os.access(folder, os.W_OK) or (self.path.exists() and not os.access(self.path, os.W_OK)):
            raise StoreError(f"cannot write the threshold store {self.path}: permission denied; choose another with --threshold-store")

    def get(self, model: str, dataset: str, exit_layer: int, confidence: str) -> dict | None:
        """The most recently fitted entry for this key, if any."""
        wanted = dict(zip(KEY, (model, dataset, exit_layer, confidence)))
        found = [e for e in self.entries() if all(e.get(k) == v for k, v in wanted.items())]
        return max(found, key=lambda e: e.get("fitted_at", ""), default=None)

    def put(self, entry: dict) -> dict:
        """Adds or replaces the entry with the same key and method; returns it as stored."""
        missing = [k for k in (*KEY, "method", "threshold") if k not in entry]
        if missing:
            raise StoreError(f"a threshold entry needs {', '.join(missing)}")
        entry = {**entry, "fitted_at": entry.get("fitted_at") or _now()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.with_name(self.path.name + ".lock")):
            data = self._read()
            same = lambda e: all(e.get(k) == entry[k] for k in (*KEY, "method"))  # noqa: E731
            data["entries"] = [e for e in data["entries"] if not same(e)] + [entry]
            self._write(data)
        return entry

    def _read(self) -> dict:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return {"format": FORMAT, "version": VERSION, "entries": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.path} is not valid JSON ({e}); fix or remove it, it will not be overwritten") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise StoreError(f"{self.path} is not a free threshold store; it will not be overwritten")
        if data.get("version", 0) > VERSION:
            raise StoreError(f"{self.path} was written by a newer free (store version {data['version']})")
        return data

    def _write(self, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def default_store_path(model_dir: Path | None, home: Path) -> Path:
    """In the model's own directory when we may write there, else under `free`'s home."""
    if model_dir is not None and os.access(model_dir, os.W_OK):
        return model_dir / FILENAME
    return home / FILENAME


def bmm_entry(model: str, dataset: str, exit_layer: int, confidence: str, fit) -> dict:
    """A store entry for a Beta-mixture threshold (`fit` is a `threshold.Fit` with a threshold)."""
    return {
        "model": model,
        "dataset": dataset,
        "exit_layer": exit_layer,
        "confidence": confidence,
        "method": "bmm",
        "threshold": fit.threshold,
        "zeta": fit.zeta,
        "pairs": fit.pairs,
        "fit": fit.to_dict(),
    }


def ltt_entry(model: str, dataset: str, exit_layer: int, confidence: str, result, distance: str) -> dict:
    """A store entry for a Learn-then-Test threshold (`result` is a certified `ltt.LttResult`)."""
    return {
        "model": model,
        "dataset": dataset,
        "exit_layer": exit_layer,
        "confidence": confidence,
        "method": "ltt",
        "threshold": result.threshold,
        "delta": result.delta,
        "epsilon": result.epsilon,
        "samples": result.samples,
        "distance": distance,
        "p_value": result.p_value,
        "steps": [vars(s) for s in result.steps],
    }


@dataclass
class ThresholdChoice:
    """What a run decodes with: its config (threshold set), the stored entry it took, and for
    `--threshold auto` the online estimator and what to do with each of its fits."""

    decode: object  # DecodeConfig
    stored: dict | None = None
    estimator: object = None  # threshold.OnlineEstimator
    on_fit: Callable | None = None


def choose_threshold(engine, cfg, store: ThresholdStore, dataset: str | None, *, given: bool, auto: bool, estimator_cfg=None, initial: float = 0.9, every: int | None = None, total: int | None = None) -> ThresholdChoice:
    """A threshold given on the command line wins; else the one stored for `dataset` (an `auto`
    run starts from it); else `initial` for `auto` or the default. `auto` also verifies trailing
    stacks (at a low threshold they are most of the evidence) and refits every `every` records
    (default: a share of `total`), each fit stored under `dataset` when one is named."""
    from .estimator import OnlineEstimator, update_every

    known_as = engine.store_name(cfg.exit_layer) if dataset else None
    stored = store.get(known_as, dataset, cfg.exit_layer, cfg.confidence) if dataset and not given else None
    if stored is not None:
        cfg = replace(cfg, threshold=stored["threshold"])
    elif auto:
        cfg = replace(cfg, threshold=initial)
    if not auto:
        return ThresholdChoice(cfg, stored)
    cfg = replace(cfg, sync_at_end=True)
    estimator = OnlineEstimator(estimator_cfg, every or update_every(estimator_cfg, total), cfg.threshold)

    def on_fit(fit) -> None:
        if fit.threshold is not None and dataset:
            store.put(bmm_entry(known_as, dataset, cfg.exit_layer, cfg.confidence, fit))

    return ThresholdChoice(cfg, stored, estimator, on_fit)
