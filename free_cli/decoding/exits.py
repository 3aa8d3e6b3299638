"""Trained exits: what turns layer L_s's hidden states into next-token logits for the shallow
model, when the shared final norm and LM head alone are not enough.

An `ExitModule` (the exit-only training method) is a few decoder layers of the model's own family
followed by its own final norm; the model's LM head follows, shared. Its layers have their own
KV-cache slots after the model's L, and run over every position the shallow model processes, so
their caches are always complete. The backbone is untouched, so the deep model, and with it the
lossless output, stays exactly the model's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ModelLoadError

WEIGHTS = "exit.safetensors"
CONFIG = "free_exit.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name: the directory is also a peft adapter


class ExitModule(nn.Module):
    def __init__(self, adapter, exit_layer: int, num_layers: int = 1, init_from: int | None = None):
        """`num_layers` decoder layers initialized from the model's layers `init_from`,
        `init_from + 1`, ... (default: L_s, the layers that follow the exit), caching into the
        slots after the model's last layer."""
        super().__init__()
        init_from = exit_layer if init_from is None else init_from
        if not 0 <= init_from <= adapter.num_layers - num_layers:
            raise ValueError(f"cannot initialize {num_layers} exit layers from layer {init_from}")
        self.exit_layer, self.init_from, self.first_slot = exit_layer, init_from, adapter.num_layers
        self.layers = nn.ModuleList(adapter.new_layer(init_from + j, self.first_slot + j) for j in range(num_layers))
        self.kinds = [adapter.layer_types[init_from + j] for j in range(num_layers)]
        self.norm = adapter.new_norm()

    @property
    def slots(self) -> range:
        return range(self.first_slot, self.first_slot + len(self.layers))

    def forward(self, adapter, hidden: Tensor, ctx, cache) -> Tensor:
        """Layer L_s's output (1, q, d) -> normalized exit states (1, q, d) for the LM head."""
        for layer, kind in zip(self.layers, self.kinds):
            hidden = adapter.call_layer(layer, kind, hidden, ctx, cache)
        return self.norm(hidden)

    def describe(self) -> dict:
        return {"exit_layer": self.exit_layer, "exit_layers": len(self.layers), "init_from": self.init_from}

    def save(self, directory: Path, dtype: torch.dtype = torch.float32, **meta) -> None:
        """Writes the weights in `dtype` and a small config; `meta` (base model, method, data)
        goes with it."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file(stored(self, dtype), str(directory / WEIGHTS))
        write_config(directory, {**self.describe(), **meta})

    @classmethod
    def load(cls, directory: Path, adapter, dtype: torch.dtype, device) -> "ExitModule":
        config = read_config(directory)
        module = cls(adapter, config["exit_layer"], config["exit_layers"], config["init_from"])
        try:
            state = load_file(str(directory / WEIGHTS), device=str(device))
            module.load_state_dict(state)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load the exit module in {directory}: {e}") from None
        return module.to(device=device, dtype=dtype).eval()


def stored(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """A module's weights as saved: floating-point tensors in `dtype`, contiguous and detached.
    Tied weights (one tensor under two names) stay one tensor, so savers still see the tie."""
    cast: dict[int, Tensor] = {}

    def one(v: Tensor) -> Tensor:
        if v.data_ptr() not in cast:
            cast[v.data_ptr()] = (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
        return cast[v.data_ptr()]

    return {k: one(v) for k, v in module.state_dict().items()}


def digest(directory: Path) -> str:
    """A short digest of the exit's weights in `directory`: what tells two exits apart."""
    return hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()[:12]


def write_config(directory: Path, config: dict) -> None:
    """Writes `free_exit.json`, what marks a directory as something trained for `free`: the format
    tag, then `config` (L_s, how it was trained, a pointer to the base model)."""
    (directory / CONFIG).write_text(json.dumps({"format": "free-exit", "version": 1, **config}, indent=2) + "\n")


def read_config(directory: Path) -> dict:
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if config.get("format") != "free-exit":
        raise ModelLoadError(f"{path} is not a free exit config")
    return config
