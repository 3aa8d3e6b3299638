"""`free train`'s options: what is trained and how (TrainConfig), and on what (TrainData), checked
before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import ConfigError
from .trainset import data_label

METHODS = ("exit-only", "shallow-deep", "calm", "meta")  # methods.METHOD_CLASSES implements each
KD_KINDS = ("none", "last", "uniform", "dyna")
SCHEDULES = ("cosine", "linear", "constant")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Options a resumed run may change: its length (the schedule then continues from the current step
# towards the new end) and how often it evaluates and checkpoints.
RESCHEDULABLE = ("steps", "epochs", "eval_every", "save_every")


def save_dtype(name: str) -> torch.dtype:
    """The precision the trained weights are saved in, by name (fp32 | bf16)."""
    if name not in SAVE_DTYPES:
        raise ConfigError(f"weights can be saved in {' or '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


@dataclass(frozen=True)
class TrainConfig:
    method: str = "exit-only"
    exit_layer: int | None = None  # L_s; None: round(L / 4)
    exit_layers: int = 1  # exit-only: decoder layers in the exit module
    init_from: str = "next"  # exit-only: the model layers the exit starts from: next | last | an index
    start_from: str | None = None  # exit-only: a trained exit's directory to continue from (its L_s, layers and weights)
    kd: str = "dyna"  # shallow-deep: layerwise distillation mapping
    alpha: float = 1.0  # shallow-deep: weight of the distillation loss
    # shallow-deep, calm: what is trained and what each example costs.
    lora_rank: int = 0  # > 0: low-rank adapters (peft) on every linear layer, the model frozen
    lora_alpha: float | None = None  # the adapters' scale numerator; None: 2 x rank
    freeze_embeddings: bool = False  # the (tied) embeddings stay as they are
    detach_prompt: bool = False  # the prompt is read without gradients: a forward pass only
    top_k: int = 64  # exit-only: the deep model's tokens the exit learns from
    prompt_positions: int = 0  # exit-only: prompt positions per training example also distilled
    steps: int | None = None  # optimizer steps; None: `epochs` over the training examples
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.05  # share of the steps
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "fp32"  # the forward passes' autocast dtype: fp32 | bf16
    eval_every: int = 100
    save_every: int = 100

    def check(self, num_layers: int) -> "TrainConfig":
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.kd not in KD_KINDS:
            raise ConfigError(f"unknown distillation {self.kd!r}; choose one of {', '.join(KD_KINDS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"training dtype must be fp32 or bf16, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "top_k", "exit_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1")
        if self.lora_rank < 0 or (self.lora_alpha is not None and not self.lora_alpha > 0):
            raise ConfigError("the LoRA rank must be 0 (full weights) or more, and its alpha positive")
        if self.lora_rank and self.method not in ("shallow-deep", "calm"):
            raise ConfigError("--lora-rank applies to the methods that fine-tune the model (shallow-deep, calm)")
        if self.detach_prompt and self.method == "exit-only":
            raise ConfigError("--detach-prompt applies to the methods that backpropagate through the model (exit-only reads cached features)")
        if self.prompt_positions < 0:
            raise ConfigError("prompt positions must be 0 or more")
        if not self.lr > 0 or (self.steps is not None and self.steps < 1) or not self.epochs > 0:
            raise ConfigError("the learning rate, steps and epochs must be positive")
        if self.start_from is not None:
            return self._continued(num_layers)
        exit_layer = self.exit_layer or max(1, round(num_layers / 4))
        if not 1 <= exit_layer < num_layers:
            raise ConfigError(f"exit layer must lie in [1, {num_layers - 1}], got {exit_layer}")
        init = {"next": exit_layer, "last": num_layers - self.exit_layers}.get(str(self.init_from), self.init_from)
        try:
            init = int(init)
        except ValueError:
            raise ConfigError(f"--init-from must be next, last or a layer index, got {self.init_from!r}") from None
        if self.method == "exit-only" and not 0 <= init <= num_layers - self.exit_layers:
            raise ConfigError(f"{self.exit_layers} exit layers initialized from layer {init} do not fit in {num_layers} layers")
        return TrainConfig(**{**asdict(self), "exit_layer": exit_layer, "init_from": str(init)})

    def _continued(self, num_layers: int) -> "TrainConfig":
        """`start_from`: the exit's depth, layers and initialization are those of the exit in it."""
        from ..decoding.exits import WEIGHTS, read_config
        from ..errors import ModelLoadError

        if self.method != "exit-only":
            raise ConfigError("--start-from continues a trained exit: it applies to --method exit-only")
        directory = Path(self.start_from)
        try:
            exit_cfg = read_config(directory)
        except ModelLoadError as e:
            raise ConfigError(f"--start-from {directory}: {e}") from None
        if not (directory / WEIGHTS).exists() or "exit_layers" not in exit_cfg:
            raise ConfigError(f"--start-from {directory}: no trained exit there ({WEIGHTS})")
        if self.exit_layer not in (None, exit_cfg["exit_layer"]):
            raise ConfigError(f"--start-from {directory} holds an exit at L_s={exit_cfg['exit_layer']}, not {self.exit_layer}")
        same = {"exit_layer": exit_cfg["exit_layer"], "exit_layers": exit_cfg["exit_layers"], "init_from": str(exit_cfg["init_from"]), "start_from": str(directory.resolve())}
        return replace(self, start_from=None, **{k: v for k, v in same.items() if k != "start_from"}).check(num_layers).with_start(same["start_from"])

    def with_start(self, start_from: str) -> "TrainConfig":
        return replace(self, start_from=start_from)


@dataclass(frozen=True)
class TrainData:
    """Where the training examples come from, their targets, and what is evaluated on."""

    sources: tuple[str, ...]  # JSONL files or hf:NAME[:SPLIT] data sets
    targets: str = "reference"  # the records' target field | self: the model's own greedy outputs
    target_field: str | None = None  # None: the task's
    self_max_new_tokens: int = 64  # targets self: tokens generated per record
    self_batch_size: int = 16  # targets self: rows decoded together (continuous batching)
    task: str = "auto"
    limit: int | None = None  # the first N records of each source
    max_length: int = 1024  # longer examples (prompt and target tokens) are left out
    eval_data: tuple[str, ...] = ()  # validation files instead of a held-out share of the examples
    eval_targets: str | None = None  # what held-out examples are scored on: reference | self (None: as targets)
    eval_fraction: float = 0.05
    max_eval: int = 200
    name: str | None = None  # recorded in the checkpoint; None: the sources' names

    def check(self) -> "TrainData":
        if isinstance(self.eval_data, str):
            return replace(self, eval_data=(self.eval_data,)).check()
        if self.targets not in ("reference", "self"):
            raise ConfigError(f"--targets must be reference or self, got {self.targets!r}")
        if self.self_batch_size < 1:
            raise ConfigError("--self-batch-size must be at least 1")
        if self.eval_targets not in (None, "reference", "self"):
            raise ConfigError(f"--eval-targets must be reference or self, got {self.eval_targets!r}")
        if self.eval_targets is not None and not self.eval_data:
            raise ConfigError("--eval-targets applies to --eval-data files (a held-out share of the examples keeps its targets)")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}")
        return self

    def scored_on(self) -> str:
        """The targets of the held-out examples."""
        return self.eval_targets or self.targets

    def label(self) -> str:
        return self.name or "+".join(data_label(d) for d in self.sources)
