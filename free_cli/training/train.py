"""`free train`: the training loop that trains the shallow model's exit by one of the methods in
`methods.py` (`TrainConfig.method`), and `train_job`, what the command does from its options to an
exported checkpoint.

Runs are deterministic for a seed: the order of batches is a function of the seed and the step, and
a checkpoint holds the trainable weights, the optimizer and scheduler, the step and the random
state, so that a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from ..decoding.engine import Engine
from ..errors import ConfigError, InputError
from .config import RESCHEDULABLE, TrainConfig, TrainData
from .distributed import World
from .methods import METHOD_CLASSES
from .trainset import Example, collate, load_examples, self_targets, split, tokens_digest

def checkpoint_path(out: Path) -> Path:
    return out / "checkpoint" / "state.pt"


def no_bar(total: int | None = None):
    """A progress factory that shows nothing."""
    return contextlib.nullcontext()


def autocast_for(device: torch.device, dtype: str):
    """The forward passes' autocast for a training dtype (fp32 | bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


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


class LossModule(nn.Module):
    """The method's loss as a module's forward, so that DistributedDataParallel wraps the whole
    step: every trainable parameter (an untied head too) is the wrapped module's, and a process
    with no example in a micro-batch still takes part with a loss of zero that touches them all."""

    def __init__(self, method, trainable: nn.Module):
        super().__init__()
        self.method, self.trainable = method, trainable

    def forward(self, batch, keys) -> Tensor:
        if not keys:
            return sum(p.sum() for p in self.trainable.parameters() if p.requires_grad) * 0.0
        return self.method.loss(batch, keys)


class Trainer:
    def __init__(self, engine: Engine, cfg: TrainConfig, train: list[Example], held: list[Example], out: Path, world: World = World()):
        if engine.adapter.is_encoder_decoder:
            raise ConfigError("free train supports decoder-only models (Llama family, Gemma 3) for now")
        self.engine, self.cfg, self.train_set, self.held, self.out, self.world = engine, cfg, train, held, out, world
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.method = METHOD_CLASSES[cfg.method](engine, cfg)
        self.module = self.method.trainable()
        if cfg.method in ("shallow-deep", "calm"):
            self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.step_loss = world.wrap(LossModule(self.method, self.module))
        self.steps = total_steps(cfg, len(train))
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps))
        self.step = 0
        self.pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        self.log = []
        self.prepared = False

    @property
    def checkpoint(self) -> Path:
        return checkpoint_path(self.out)

    @property
    def features(self) -> Path:
        """Where a method keeps its per-example work (exit-only: the frozen model's features)."""
        return self.out / "checkpoint" / "features"

    def autocast(self):
        return autocast_for(self.engine.device, self.cfg.dtype)

    def run(self, resume: bool = False, progress=None, stop_after: int | None = None, report=None) -> list[dict]:
        """Trains to the last step (or `stop_after` steps, for tests), evaluating, checkpointing and
        logging on the way; `report` is called with each evaluated log row. Returns the log."""
        if resume and self.checkpoint.exists():
            self.load_checkpoint()
        spent = self.log[-1].get("seconds", 0.0) if self.log else 0.0  # the wall time before a resume
        began = time.perf_counter() - spent
        self.prepare(progress)
        main = self.world.main
        if progress is not None:
            progress.set_description("train")
            progress.reset(total=self.steps)
            progress.update(self.step)
        if self.step == 0 and self.cfg.start_from is not None and main:  # where a continued exit starts
            row = self.record({"step": 0, **self.evaluate()}, began)
            if report is not None and "eval_agreement" in row:
                report(row | {"loss": row["eval_loss"]})
        while self.step < self.steps and (stop_after is None or self.step < stop_after):
            loss = self.train_step()
            self.step += 1
            row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            if self.world.distributed:
                row["world_size"] = self.world.size
            evaluated = main and (self.step % self.cfg.eval_every == 0 or self.step == self.steps)  # rank 0 alone
            if evaluated:
                row |= self.evaluate()
            self.record(row, began)
            if evaluated and report is not None:
                report(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"loss {loss:.3f}" + (f" agree {row['eval_agreement']:.3f}" if "eval_agreement" in row else ""))
            if main and (self.step % self.cfg.save_every == 0 or self.step == self.steps):
                self.save_checkpoint()
        self.world.barrier()  # the last checkpoint is written before any process goes on
        return self.log

    def record(self, row: dict, began: float) -> dict:
        """Logs a row with the wall seconds since `began` (features and evaluations included),
        in memory and, on rank 0, in train_log.jsonl."""
        row["seconds"] = round(time.perf_counter() - began, 1)
        self.log.append(row)
        if self.world.main:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def prepare(self, progress=None) -> None:
        """The method's once-per-example work (exit-only: the frozen model's features)."""
        if self.prepared:
            return
        if progress is not None:
            progress.set_description("features")
            progress.reset(total=len(self.train_set) + len(self.held))
        with self.autocast():
            self.method.prepare(self.train_set, "train", self.pad, progress, owned=self.world.owns, folder=self.features)
            if self.world.main:  # rank 0 alone evaluates
                self.method.prepare(self.held, "held", self.pad, progress, folder=self.features)
        self.prepared = True

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches of `batch_size` examples (global:
        the same examples whatever the number of processes, each process taking those it owns,
        its loss weighted by its share of the micro-batch's loss positions). Returns the mean loss."""
        total, world = 0.0, self.world
        for a in range(self.cfg.grad_accum):
            micro = self.step * self.cfg.grad_accum + a
            indices = [i for i in batch_indices(micro, len(self.train_set), self.cfg.batch_size, self.cfg.seed) if world.owns(i)]
            keys = [("train", i) for i in indices]
            batch = collate([self.train_set[i] for i in indices], self.pad, self.engine.device, self.cfg.detach_prompt) if indices else None
            share = self.method.positions(batch, keys) if indices else 0
            weight = share * world.size / max(world.total(share), 1) / self.cfg.grad_accum
            last = a == self.cfg.grad_accum - 1
            with self.autocast(), (contextlib.nullcontext() if last or not world.distributed else self.step_loss.no_sync()):
                loss = self.step_loss(batch, keys) * weight
                loss.backward()
            total += world.total(loss.item()) / world.size
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
        """The global state (the same in every process): a run resumes with any number of them."""
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "weights": {k: v for k, v in self.module.named_parameters() if v.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.random.get_rng_state(),
            "config": asdict(self.cfg),
            "examples": self.examples_digest,
            "world_size": self.world.size,
        }
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint, weights_only=False)
        saved = TrainConfig(**state["config"]).check(self.engine.num_layers)  # older checkpoints lack newer fields
        if replace(saved, **{k: getattr(self.cfg, k) for k in RESCHEDULABLE}) != self.cfg:
            raise ConfigError(f"{self.checkpoint} was written with other training options; resume with the same options or a new --output")
        if state.get("examples", self.examples_digest) != self.examples_digest:  # older checkpoints lack it
            raise ConfigError(
                f"{self.checkpoint} was written for other training or held-out examples (the data, --limit, --targets or --eval-data differ); "
                "resume with the same data or a new --output"
            )
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
            if self.world.main:
                log.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.log = rows

    @functools.cached_property
    def examples_digest(self) -> str:
        """A hash of the training and held-out examples' tokens: a run resumes on the examples it began with."""
        return tokens_digest(self.train_set + self.held, key=f"{len(self.train_set)} training examples")

    def export(self, meta: dict, dtype: torch.dtype = torch.float32) -> None:
        """The trained exit or model with its weights in `dtype`, and the tokenizer."""
        self.method.export(self.out, meta, dtype)
        self.engine.tokenizer.save_pretrained(self.out)


# ---------------------------------------------------------------- the command


class TrainResult(NamedTuple):
    steps: int  # the steps trained, a resumed run's earlier ones included
    final_eval: dict | None  # the last evaluated log row, if anything was held out
    seconds: float  # the training loop's time, the features and evaluations included
    main: bool = True  # this process reports the run (rank 0)


def training_examples(engine: Engine, data: TrainData, cfg: TrainConfig, out: Path, progress=no_bar, world: World = World()) -> tuple[list[Example], list[Example], int]:
    """The training and held-out examples, and how many were left out as too long. Held out are a
    share of the examples, or the first --max-eval records of each evaluation file, with targets
    of their kind (`data.scored_on()`). Self targets are generated once (cached in `out`) by the
    model in the training precision (under bf16, a bf16 copy of its weights, as decoding in bf16
    sees them), each process generating those of the examples it owns into its own part of the
    cache."""
    common = {"task": data.task, "target_field": data.target_field, "max_length": data.max_length}
    examples, too_long = load_examples(engine, list(data.sources), limit=data.limit, references=data.targets == "reference", **common)
    own = "self" in (data.targets, data.scored_on())  # the self targets' decoder, converted once: not autocast, which recasts every weight at every pass
    decoder = engine.converted(torch.bfloat16) if own and cfg.dtype == "bf16" else engine
    if data.targets == "self":
        examples = _own_outputs(decoder, examples, data, out / "self_targets.jsonl", progress, world)
    if not examples:
        raise InputError("no training examples (all records too long, or none given)")
    if not data.eval_data:
        return *split(examples, data.eval_fraction, data.max_eval, cfg.seed), too_long
    held = []
    for path in data.eval_data:
        got, long = load_examples(engine, [path], limit=data.max_eval, references=data.scored_on() == "reference", **common)
        if not got:
            raise InputError(f"{path}: no evaluation examples (no records, or all longer than --max-length {data.max_length} tokens)")
        held, too_long = held + got, too_long + long
    if data.scored_on() == "self":
        held = _own_outputs(decoder, held, data, out / "eval_targets.jsonl", progress, world)
    return examples, held, too_long


def _own_outputs(engine: Engine, examples: list[Example], data: TrainData, cache: Path, progress=no_bar, world: World = World()) -> list[Example]:
    """`examples` with `engine`'s own greedy outputs as targets, generated into `cache` (each
    process its share, in its own part of it) or read back from it."""
    mine = cache.with_name(f"{cache.stem}.part-{world.rank}-of-{world.size}.jsonl") if world.distributed else cache

    def parts() -> list[Path]:  # the other processes' caches
        return sorted({cache, *cache.parent.glob(f"{cache.stem}.part-*.jsonl")} - {mine})

    with progress(len(examples)) as bar:
        if bar is not None:
            bar.set_description(cache.stem)
        done = self_targets(engine, examples, data.self_max_new_tokens, mine, data.self_batch_size, progress=bar, owned=world.owns, parts=parts())
    if not world.distributed:
        return done
    world.barrier()  # every part is written
    return self_targets(engine, examples, data.self_max_new_tokens, mine, owned=lambda i: False, parts=parts())


def train_job(
    model: str | None, cfg: TrainConfig, data: TrainData, out: Path, *, device: str = "auto", save_as: torch.dtype = torch.float32,
    resume: bool = False, say: Callable[[str], None] | None = None, progress: Callable | None = None,
) -> TrainResult:
    """`free train`: loads `model` (a spec, as `load_engine` takes) in fp32, trains (or resumes)
    in `out`, and exports the trained exit or model there with a config that records how it was
    trained and, for weights that go with a frozen base model, which. `say` gets progress lines
    (each step's evaluation too when no bar is shown); `progress(total)` opens a progress bar, or
    yields None."""
    from ..decoding.loading import DEFAULT_MODEL, load_engine

    if checkpoint_path(out).exists() and not resume:
        raise ConfigError(f"{out} holds a checkpoint: pass --resume to continue it, or choose another --output")
    world = World.from_env(chunk=cfg.batch_size)
    tell = say if say is not None and world.main else (lambda line: None)
    progress = progress if progress is not None and world.main else no_bar
    engine = load_engine(model, dtype="fp32", device=world.device(device))
    world.start(engine.device)
    cfg = cfg.check(engine.num_layers)
    tell(f"{engine.describe()} · {cfg.method} at L_s={cfg.exit_layer}" + (f" · {world.size} processes" if world.distributed else ""))
    out.mkdir(parents=True, exist_ok=True)
    train_set, held, too_long = training_examples(engine, data, cfg, out, progress, world)
    tell(f"{len(train_set)} training and {len(held)} held-out examples ({too_long} left out as longer than {data.max_length} tokens)")
    trainer = Trainer(engine, cfg, train_set, held, out, world)
    began = time.perf_counter()

    def report(row: dict) -> None:  # progress lines for logs, where no bar is shown
        agreement = f" · held-out agreement {row['eval_agreement']:.3f}" if "eval_agreement" in row else ""
        tell(f"step {row['step']}/{trainer.steps} · loss {row['loss']:.4f}{agreement} · {row['seconds'] / 60:.1f} min")

    with progress(trainer.steps) as bar:
        log = trainer.run(resume=resume, progress=bar, report=report if bar is None and say else None)
    evals = [r for r in log if "eval_agreement" in r]
    meta = {"method": cfg.method, "data": data.label(), "targets": data.targets, "eval_targets": data.scored_on(), "steps": trainer.step, "final_eval": evals[-1] if evals else None}
    if world.distributed:
        meta["world_size"] = world.size
    if cfg.method in ("exit-only", "meta") or cfg.lora_rank:  # a pointer to the frozen base model the weights go with
        meta["base_model"] = DEFAULT_MODEL if model is None else engine.name
    if world.main:
        trainer.export(meta, save_as)
        if trainer.features.exists():
            size = sum(f.stat().st_size for f in trainer.features.iterdir())
            tell(f"features kept in {trainer.features} ({size / 1e6:.0f} MB) for a resumed or longer run; delete the folder when done")
    return TrainResult(trainer.step, meta["final_eval"], time.perf_counter() - began, world.main)
