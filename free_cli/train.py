"""`free train`: training the shallow model's exit.

Methods (`TrainConfig.method`):
- `exit-only`: the backbone stays frozen; an `ExitModule` after layer L_s learns the deep model's
  next-token distribution (soft cross-entropy on the deep model's top-k). The deep model, and so
  the lossless output, stay exactly as they were. This makes a downloaded chat model fast without
  task fine-tuning.
- `shallow-deep`: FREE's fine-tuning of the whole model, (L_s·CE_shallow + L·CE_deep)/(L_s + L)
  plus α times layerwise distillation from deep to shallow hidden states (`kd`: none, last,
  uniform, dyna).
- `calm`: CALM's fine-tuning, the cross-entropy of every layer's exit weighted by depth.
- `meta`: CALM's learned confidence: a small classifier on the frozen model's hidden states that
  predicts whether a layer's exit agrees with the last layer.

Runs are deterministic for a seed: the order of batches is a function of the seed and the step, and
a checkpoint holds the trainable weights, the optimizer and scheduler, the step and the random
state, so that a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import DynamicCache

from . import losses
from .adapters import Request
from .confidence import MetaClassifier
from .engine import Engine
from .errors import ConfigError
from .exits import ADAPTER_WEIGHTS, CONFIG, ExitModule, stored
from .trainset import Example, TokenBatch, collate

METHODS = ("exit-only", "shallow-deep", "calm", "meta")
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


def forward_states(model, batch: TokenBatch) -> tuple[list[Tensor], Tensor]:
    """A decoder-only forward pass over the columns that carry labels: every layer's raw output
    (index 0: the embeddings, index l: layer l), each (B, T', d), and the final normalized states
    (B, T', d). A batch's no-grad prefix (`TokenBatch.prefix`) runs first, into a cache the rest
    attends to, so its cost is a forward pass only."""
    cache = None
    if batch.prefix:
        cache = DynamicCache()
        with torch.no_grad():
            cut = slice(0, batch.prefix)
            model.model(input_ids=batch.ids[:, cut], attention_mask=batch.attention[:, cut], position_ids=batch.positions[:, cut], cache=cache, use_cache=True)
    raw = {}
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda _m, _i, out: raw.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    rest = slice(batch.prefix, None)
    try:
        out = model.model(
            input_ids=batch.ids[:, rest], attention_mask=batch.attention, position_ids=batch.positions[:, rest],
            cache=cache, use_cache=cache is not None, output_hidden_states=True,
        )  # fmt: skip
    finally:
        handle.remove()
    states = list(out.hidden_states)
    states[-1] = raw["last"]  # transformers reports the normalized output there
    return states, out.last_hidden_state


class Method:
    """What a training method trains and how: its parameters, its loss on a batch, the shallow
    exit's agreement with the deep model, and the checkpoint it exports."""

    def __init__(self, engine: Engine, cfg: TrainConfig):
        self.engine, self.cfg, self.adapter = engine, cfg, engine.adapter
        self.L, self.L_s = engine.num_layers, cfg.exit_layer

    def trainable(self) -> nn.Module: ...

    def prepare(self, examples: list[Example], name: str, pad: int, progress=None) -> None:
        """Work done once per example before training (none by default)."""

    def loss(self, batch, keys: list) -> Tensor:
        """The training loss on a batch; `keys` identify its examples (for per-example caches)."""

    def agreement(self, batch, keys: list) -> tuple[int, int]:
        """(agreeing, total) target positions: the shallow exit's argmax against the deep model's."""

    def export(self, out: Path, meta: dict, dtype: torch.dtype) -> None:
        """Writes the trained weights, stored in `dtype`, and the small config."""


class Features(NamedTuple):
    """What the exit learns from for one example, computed once by `ExitOnly.prepare`."""

    hidden: Tensor  # layer L_s's output, (T, d), bf16
    positions: Tensor  # (N,) the positions it learns at
    ids: Tensor  # (N, k) the deep model's top-k tokens there
    logits: Tensor  # (N, k) and their logits


class ExitOnly(Method):
    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        engine.model.requires_grad_(False)
        self.module = ExitModule(engine.adapter, self.L_s, cfg.exit_layers, int(cfg.init_from)).to(torch.float32).requires_grad_(True)
        self._features: dict[tuple[str, int], Features] = {}  # per example key, reused across epochs

    def trainable(self):
        return self.module

    def prepare(self, examples: list[Example], name: str, pad: int, progress=None) -> None:
        """Runs the frozen model once over every example, in fixed chunks, keeping layer L_s's
        output and the deep model's top-k at the positions the exit learns from: the target
        positions, and for training examples up to `prompt_positions` prompt positions drawn by
        the seed (the deep model's predictions there are more data from the same pass). Fixed
        chunks and seeded draws make the features the same however training is interrupted (CPU
        kernels round a row differently depending on its place in a batch), and epochs after the
        first cost only the exit."""
        size, extra = self.cfg.batch_size, self.cfg.prompt_positions if name == "train" else 0
        with torch.no_grad():
            for start in range(0, len(examples), size):
                batch = collate(examples[start : start + size], pad, self.engine.device)
                states, final = forward_states(self.engine.model, batch)
                for row in range(batch.ids.shape[0]):
                    positions = batch.mask[row].nonzero().squeeze(-1)
                    if extra:  # positions before the first target one predict prompt tokens
                        prompt = int(positions[0])
                        drawn = random.Random(f"{self.cfg.seed}/{start + row}").sample(range(prompt), min(extra, prompt))
                        positions = torch.cat([torch.tensor(sorted(drawn), dtype=torch.long, device=positions.device), positions])
                    top = self.adapter.head(final[row, positions]).float().topk(self.cfg.top_k, dim=-1)
                    length = int(batch.attention[row].sum())
                    self._features[(name, start + row)] = Features(states[self.L_s][row, :length].to(torch.bfloat16), positions, top.indices, top.values)
                if progress is not None:
                    progress.update(batch.ids.shape[0])

    def features(self, batch, keys) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
        """From `prepare`: layer L_s's output (B, T, d), the (row, position) pairs the exit learns
        from, and the deep model's top-k there (ids, logits), (N, k)."""
        cached = [self._features[k] for k in keys]
        width = batch.ids.shape[1]
        hidden = torch.stack([nn.functional.pad(f.hidden, (0, 0, 0, width - len(f.hidden))) for f in cached])
        rows = torch.cat([torch.full_like(f.positions, b) for b, f in enumerate(cached)])
        where = (rows, torch.cat([f.positions for f in cached]))
        return hidden.float(), where, torch.cat([f.ids for f in cached]), torch.cat([f.logits for f in cached])

    def exit_logits(self, hidden: Tensor, where: tuple[Tensor, Tensor]) -> Tensor:
        ctx = self.adapter.layer_context(hidden, 0, None, 0, Request([]))  # causal; right padding is harmless
        return self.adapter.head(self.module(self.adapter, hidden, ctx, None)[where])

    def loss(self, batch, keys):
        hidden, where, teacher_ids, teacher_logits = self.features(batch, keys)
        return losses.soft_ce(self.exit_logits(hidden, where), teacher_ids, teacher_logits)

    def agreement(self, batch, keys):
        hidden, where, teacher_ids, _ = self.features(batch, keys)
        ours = self.exit_logits(hidden, where).argmax(-1)
        return int((ours == teacher_ids[:, 0]).sum()), len(ours)

    def export(self, out, meta, dtype):
        self.module.save(out, dtype=dtype, **meta)


class ShallowDeep(Method):
    """FREE's shallow-deep fine-tuning; the shallow exit is the shared final norm and LM head.

    The whole model trains, or with `lora_rank` low-rank adapters on every linear layer of the
    decoder (through `peft`), which are all a checkpoint then holds."""

    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        self.peft = None
        if cfg.lora_rank:
            from peft import LoraConfig, get_peft_model

            alpha = cfg.lora_alpha or 2 * cfg.lora_rank
            config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=linear_layer_names(engine.model), lora_dropout=0.0)
            with warnings.catch_warnings():  # peft asks transformers a deprecated question
                warnings.simplefilter("ignore", FutureWarning)
                self.peft = get_peft_model(engine.model, config)  # adapters injected into engine.model itself
        elif cfg.freeze_embeddings:
            engine.model.get_input_embeddings().requires_grad_(False)

    def trainable(self):
        return self.engine.model

    def loss(self, batch, keys):
        states, final = forward_states(self.engine.model, batch)
        labels = batch.labels[batch.mask]
        shallow = losses.token_ce(self.adapter.logits(states[self.L_s][batch.mask]), labels)
        deep = losses.token_ce(self.adapter.head(final[batch.mask]), labels)
        loss = losses.shallow_deep_loss(shallow, deep, self.L_s, self.L)
        if self.cfg.kd != "none":  # on the states as the shared head reads them, after the final norm
            normed = [self.adapter.norm(s[batch.mask]) for s in states]
            loss = loss + self.cfg.alpha * losses.distillation_loss(normed, self.L_s, self.cfg.kd)
        return loss

    def agreement(self, batch, keys):
        with torch.no_grad():
            states, final = forward_states(self.engine.model, batch)
            shallow = self.adapter.logits(states[self.L_s][batch.mask]).argmax(-1)
            deep = self.adapter.head(final[batch.mask]).argmax(-1)
        return int((shallow == deep).sum()), len(deep)

    def export(self, out, meta, dtype):
        config = {"format": "free-exit", "version": 1, "exit_layer": self.L_s, **meta}
        if self.peft is not None:
            from peft import get_peft_model_state_dict

            save_file({k: v.to(dtype).contiguous() for k, v in get_peft_model_state_dict(self.peft).items()}, str(out / ADAPTER_WEIGHTS))
            self.peft.peft_config["default"].save_pretrained(out)
            config["adapter"] = "lora"
        else:
            self.engine.model.save_pretrained(out, state_dict=stored(self.engine.model, dtype))
        (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def linear_layer_names(model) -> list[str]:
    """The names (last component) of the decoder layers' linear modules: what adapters go on."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


class Calm(ShallowDeep):
    """CALM's fine-tuning: every layer's exit trained, deeper ones weighted more."""

    def loss(self, batch, keys):
        states, final = forward_states(self.engine.model, batch)
        labels = batch.labels[batch.mask]
        ces = [losses.token_ce(self.adapter.logits(states[l][batch.mask]), labels) for l in range(1, self.L)]
        ces.append(losses.token_ce(self.adapter.head(final[batch.mask]), labels))
        return losses.calm_loss(ces)


class Meta(Method):
    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        engine.model.requires_grad_(False)
        self.classifier = MetaClassifier(self.adapter.hidden_size, self.L)

    def trainable(self):
        return self.classifier

    def _examples(self, batch) -> list[tuple[Tensor, Tensor, int]]:
        """(normalized states, agreed, layer) for every layer below the last."""
        with torch.no_grad():
            states, final = forward_states(self.engine.model, batch)
            deep = self.adapter.head(final[batch.mask]).argmax(-1)
            rows = []
            for l in range(1, self.L):
                normed = self.adapter.norm(states[l][batch.mask]).float()
                rows.append((normed, (self.adapter.head(normed).argmax(-1) == deep).float(), l))
        return rows

    def loss(self, batch, keys):
        rows = self._examples(batch)
        return torch.stack([nn.functional.binary_cross_entropy_with_logits(self.classifier(x, l), y) for x, y, l in rows]).mean()

    def agreement(self, batch, keys):
        """For this method: how often the classifier is right at L_s."""
        x, y, l = self._examples(batch)[self.L_s - 1]
        with torch.no_grad():
            right = ((self.classifier(x, l) > 0).float() == y).sum()
        return int(right), len(y)

    def export(self, out, meta, dtype):
        out.mkdir(parents=True, exist_ok=True)
        save_file(stored(self.classifier, dtype), str(out / MetaClassifier.FILE))
        (out / CONFIG).write_text(json.dumps({"format": "free-exit", "version": 1, "exit_layer": self.L_s, "meta": True, **meta}, indent=2) + "\n")


METHOD_CLASSES = {"exit-only": ExitOnly, "shallow-deep": ShallowDeep, "calm": Calm, "meta": Meta}


# ---------------------------------------------------------------- the loop


def batch_indices(step_micro: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of micro-batch `step_micro`: epochs are seeded permutations of the data."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step_micro, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size : (k + 1) * batch_size]


def total_steps(cfg: TrainConfig, n: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * max(1, n // cfg.batch_size) / cfg.grad_accum))


def lr_lambda(cfg: TrainConfig, steps: int):
    warm = int(cfg.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress

    return factor


class Trainer:
    def __init__(self, engine: Engine, cfg: TrainConfig, train: list[Example], held: list[Example], out: Path):
        if engine.adapter.is_encoder_decoder:
            raise ConfigError("free train supports decoder-only models (Llama family, Gemma 3) for now")
        self.engine, self.cfg, self.train_set, self.held, self.out = engine, cfg, train, held, out
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.method = METHOD_CLASSES[cfg.method](engine, cfg)
        self.module = self.method.trainable()
        if cfg.method in ("shallow-deep", "calm"):
            self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.steps = total_steps(cfg, len(train))
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps))
        self.step = 0
        self.pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        self.log = []
        self.prepared = False

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint" / "state.pt"

    def autocast(self):
        enabled = self.cfg.dtype == "bf16"
        return torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=enabled)

    def run(self, resume: bool = False, progress=None, stop_after: int | None = None, report=None) -> list[dict]:
        """Trains to the last step (or `stop_after` steps, for tests), evaluating, checkpointing and
        logging on the way; `report` is called with each evaluated log row. Returns the log."""
        if resume and self.checkpoint.exists():
            self.load_checkpoint()
        self.prepare(progress)
        if progress is not None:
            progress.set_description("train")
            progress.reset(total=self.steps)
            progress.update(self.step)
        while self.step < self.steps and (stop_after is None or self.step < stop_after):
            loss = self.train_step()
            self.step += 1
            row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            if self.step % self.cfg.eval_every == 0 or self.step == self.steps:
                row |= self.evaluate()
                if report is not None:
                    report(row)
            self.log.append(row)
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"loss {loss:.3f}" + (f" agree {row['eval_agreement']:.3f}" if "eval_agreement" in row else ""))
            if self.step % self.cfg.save_every == 0 or self.step == self.steps:
                self.save_checkpoint()
        return self.log

    def prepare(self, progress=None) -> None:
        """The method's once-per-example work (exit-only: the frozen model's features)."""
        if self.prepared:
            return
        if progress is not None:
            progress.set_description("features")
            progress.reset(total=len(self.train_set) + len(self.held))
        with self.autocast():
            self.method.prepare(self.train_set, "train", self.pad, progress)
            self.method.prepare(self.held, "held", self.pad, progress)
        self.prepared = True

    def train_step(self) -> float:
        total = 0.0
        for a in range(self.cfg.grad_accum):
            micro = self.step * self.cfg.grad_accum + a
            indices = batch_indices(micro, len(self.train_set), self.cfg.batch_size, self.cfg.seed)
            batch = collate([self.train_set[i] for i in indices], self.pad, self.engine.device, self.cfg.detach_prompt)
            with self.autocast():
                loss = self.method.loss(batch, [("train", i) for i in indices]) / self.cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def evaluate(self) -> dict:
        """The shallow exit's agreement with the deep model on the held-out examples, and the loss."""
        if not self.held:
            return {}
        self.prepare()
        agree = count = 0
        loss_sum = 0.0
        for start in range(0, len(self.held), self.cfg.batch_size):
            chunk = self.held[start : start + self.cfg.batch_size]
            batch = collate(chunk, self.pad, self.engine.device, self.cfg.detach_prompt)
            keys = [("held", start + j) for j in range(len(chunk))]
            with torch.no_grad(), self.autocast():
                a, n = self.method.agreement(batch, keys)
                loss_sum += float(self.method.loss(batch, keys)) * len(chunk)
            agree, count = agree + a, count + n
        return {"eval_agreement": agree / max(count, 1), "eval_loss": loss_sum / len(self.held)}

    def save_checkpoint(self) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "weights": {k: v for k, v in self.module.named_parameters() if v.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.random.get_rng_state(),
            "config": asdict(self.cfg),
        }
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint, weights_only=False)
        saved = TrainConfig(**state["config"]).check(self.engine.num_layers)  # older checkpoints lack newer fields
        if replace(saved, **{k: getattr(self.cfg, k) for k in RESCHEDULABLE}) != self.cfg:
            raise ConfigError(f"{self.checkpoint} was written with other training options; resume with the same options or a new --output")
        missing = {k for k, v in self.module.named_parameters() if v.requires_grad} - set(state["weights"])
        if missing:
            raise ConfigError(f"{self.checkpoint} lacks trained weights ({sorted(missing)[0]}, ...); resume with the same options or a new --output")
        self.module.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.random.set_rng_state(state["rng"])
        self.step = state["step"]
        log = self.out / "train_log.jsonl"
        if log.exists():  # keep the log consistent with the checkpoint
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            rows = [r for r in rows if r["step"] <= self.step]
            log.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.log = rows

    def export(self, meta: dict, dtype: torch.dtype = torch.float32) -> None:
        """The trained exit or model with its weights in `dtype`, and the tokenizer."""
        self.method.export(self.out, meta, dtype)
        self.engine.tokenizer.save_pretrained(self.out)
