"""The frozen model's features for exit-only training, kept on disk beside the checkpoint, so that a
resumed run (or a longer one over the same examples) skips the feature pass: on a CPU that pass is
most of a short run (about 20 minutes for 1,600 SAMSum dialogues with the default model).

A file holds one chunk of `--batch-size` consecutive examples (the unit `ExitOnly.prepare`
computes, and the unit a rank owns under torchrun), so any number of processes reads and writes
them. Each file carries a fingerprint of everything its features depend on (the model's weights,
the exit layer, top-k, the prompt positions and their seed, the precision, and the chunk's tokens);
a file whose fingerprint differs is computed again and replaced, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .trainset import tokens_digest


class Features(NamedTuple):
    """What the exit learns from for one example, computed once by `ExitOnly.prepare`."""

    hidden: Tensor  # layer L_s's output, (T, d), bf16
    positions: Tensor  # (N,) the positions it learns at
    ids: Tensor  # (N, k) the deep model's top-k tokens there
    logits: Tensor  # (N, k) and their logits


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of a model's configuration and of every byte of its weights (about a second for a
    135M-parameter model on a CPU, against minutes for the features it guards)."""
    h = hashlib.sha256(model.config.to_json_string().encode() if hasattr(model, "config") else b"")
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


VERSION = 1  # how `ExitOnly` computes features: a change there bumps it, and old files are computed again


class FeatureStore:
    """Chunks of features in `folder`, valid for the setting `key` (a JSON-able dict), read onto
    `device`."""

    def __init__(self, folder: Path, key: dict, device: torch.device | str = "cpu"):
        self.folder, self.key, self.device = folder, json.dumps({"version": VERSION, **key}, sort_keys=True), str(device)

    def _file(self, name: str, start: int) -> Path:
        return self.folder / f"{name}-{start:07d}.safetensors"

    def fingerprint(self, chunk: list) -> str:
        """The setting and the chunk's examples (prompt and target tokens)."""
        return tokens_digest(chunk, self.key)

    def load(self, name: str, start: int, chunk: list) -> list[Features] | None:
        """The chunk's features if a file for this setting and these examples exists, else None."""
        path = self._file(name, start)
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") != self.fingerprint(chunk):
                    return None
            tensors = load_file(str(path), device=self.device)
            return [Features(*(tensors[f"{row}.{field}"] for field in Features._fields)) for row in range(len(chunk))]
        except (OSError, KeyError, RuntimeError, ValueError, SafetensorError):  # missing, partial or foreign: compute it
            return None

    def save(self, name: str, start: int, chunk: list, features: list[Features]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{row}.{field}": value.contiguous() for row, f in enumerate(features) for field, value in zip(Features._fields, f)}
        path = self._file(name, start)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint(chunk)})
        os.replace(tmp, path)
