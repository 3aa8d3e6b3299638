"""`free train`: train the shallow model's exit, or the model, under one process or torchrun."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import DeviceOpt, ModelOpt, ThreadsOpt, _progress, reported_errors, use_threads


@app.command()
def train(
    data: Annotated[list[str], typer.Argument(help="JSONL training files (or hf:NAME[:SPLIT] data sets), same fields and tasks as generate.", metavar="DATA.jsonl...")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for checkpoints, the log and the trained exit or model.")],
    method: Annotated[str, typer.Option("--method", help="exit-only (frozen model, trained exit module) | shallow-deep (FREE) | calm | meta (CALM's confidence classifier).")] = "exit-only",
    model: ModelOpt = None,
    exit_layer: Annotated[Optional[int], typer.Option("--exit-layer", help="L_s: the layers before the exit to train (default: round(L / 4); 8 of SmolLM2's 30).")] = None,
    exit_layers: Annotated[int, typer.Option("--exit-layers", help="exit-only: decoder layers in the exit module.")] = 1,
    init_from: Annotated[str, typer.Option("--init-from", help="exit-only: the exit's layers start as copies of the layers after L_s (next), of the model's last layers, which already feed the final norm (last), or of layers N, N+1, ...")] = "next",
    start_from: Annotated[Optional[str], typer.Option("--start-from", help="exit-only: continue the exit in this directory (a trained exit, e.g. a shipped model's exit/): its L_s, layers and weights.")] = None,
    prompt_positions: Annotated[int, typer.Option("--prompt-positions", help="exit-only: also distill the deep model's predictions at up to N prompt positions per training example (drawn by the seed); held-out agreement stays on target tokens.")] = 0,
    kd: Annotated[str, typer.Option("--kd", help="shallow-deep: layerwise distillation mapping: none | last | uniform | dyna.")] = "dyna",
    alpha: Annotated[float, typer.Option("--alpha", help="shallow-deep: weight of the distillation loss.")] = 1.0,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="shallow-deep, calm: train low-rank adapters of this rank on every linear layer (peft) instead of the whole model; the checkpoint holds only them.")] = 0,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="The adapters' alpha (default: 2 x rank).")] = None,
    freeze_embeddings: Annotated[bool, typer.Option("--freeze-embeddings", help="shallow-deep, calm: keep the (tied) embeddings as they are.")] = False,
    detach_prompt: Annotated[bool, typer.Option("--detach-prompt", help="shallow-deep, calm, meta: read the prompt without gradients (a forward pass only); the loss and its gradients cover the target positions.")] = False,
    targets: Annotated[str, typer.Option("--targets", help="reference: the records' target field | self: the model's own greedy outputs (generated once).")] = "reference",
    target_field: Annotated[Optional[str], typer.Option("--target-field", help="The reference field (default by task: summary, answers, output, the target language).")] = None,
    self_max_new_tokens: Annotated[int, typer.Option("--self-max-new-tokens", help="Self targets (--targets, --eval-targets): tokens generated per record.")] = 64,
    self_batch_size: Annotated[int, typer.Option("--self-batch-size", help="Self targets: records decoded together (continuous batching; each decodes to what it would alone).")] = 16,
    task: Annotated[str, typer.Option("--task", help="As for generate.")] = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N records of each source.")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Leave out examples longer than this (prompt and target tokens).")] = 1024,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training examples.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine | linear | constant, after a linear warm-up.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Share of the steps spent warming up.")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data order and initialization.")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="Autocast dtype of the forward passes: fp32 | bf16 (weights stay fp32; bf16 self targets come from a bf16 copy).")] = "fp32",
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="Precision of the saved exit or model: fp32 | bf16 (half the size).")] = "fp32",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Evaluate on the first --max-eval records of this file (a validation split; repeat for several) instead of holding out a share of the training data.")] = None,
    eval_targets: Annotated[Optional[str], typer.Option("--eval-targets", help="--eval-data scored on: reference (the records' target field) | self (the model's own greedy outputs, generated once). Default: as --targets.")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of the examples held out for evaluation.")] = 0.05,
    max_eval: Annotated[int, typer.Option("--max-eval", help="At most this many held-out examples (of each --eval-data file).")] = 200,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps.")] = 100,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 100,
    data_name: Annotated[Optional[str], typer.Option("--data-name", help="Name of the training data, recorded in the checkpoint (default: the files' names).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")] = False,
) -> None:
    """Train the shallow model's exit and write a checkpoint directory.

    The directory works with `free generate --model DIR`: for exit-only, the exit's weights, its
    config (L_s, method, training data, a pointer to the base model) and the tokenizer; for the
    other methods, the whole model as transformers saves it, with the same small config. Evaluates
    the shallow exit's agreement with the deep model on held-out examples every --eval-every steps
    and logs to DIR/train_log.jsonl."""
    from ..training.config import TrainConfig, TrainData, save_dtype as parse_save_dtype
    from ..training.train import train_job

    with reported_errors():
        sources = TrainData(
            tuple(data), targets=targets, target_field=target_field, self_max_new_tokens=self_max_new_tokens, self_batch_size=self_batch_size, task=task, limit=limit,
            max_length=max_length, eval_data=tuple(eval_data or ()), eval_targets=eval_targets, eval_fraction=eval_fraction, max_eval=max_eval, name=data_name,
        ).check()  # fmt: skip
        weights_dtype = parse_save_dtype(save_dtype)
        cfg = TrainConfig(
            method=method, exit_layer=exit_layer, exit_layers=exit_layers, init_from=init_from, start_from=start_from, prompt_positions=prompt_positions, kd=kd, alpha=alpha,
            lora_rank=lora_rank, lora_alpha=lora_alpha, freeze_embeddings=freeze_embeddings, detach_prompt=detach_prompt, steps=steps,
            epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule, warmup=warmup,
            seed=seed, dtype=dtype, eval_every=eval_every, save_every=save_every,
        )  # fmt: skip
        use_threads(threads)
        show = not quiet and sys.stderr.isatty()
        say = None if quiet else lambda line: typer.echo(f"free train: {line}", err=True)
        done = train_job(model, cfg, sources, output, device=device, save_as=weights_dtype, resume=resume, say=say, progress=lambda total: _progress(show, total))
        if not quiet and done.main:
            last = f"held-out agreement {done.final_eval['eval_agreement']:.3f}" if done.final_eval else "no held-out examples"
            typer.echo(f"free train: {done.steps} steps in {done.seconds:.0f} s · {last} · wrote {output}", err=True)
