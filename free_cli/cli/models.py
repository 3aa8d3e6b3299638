"""`free models` and `free convert`: the shipped models, and GGUF files made plain once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError, InputError
from .app import app
from .options import reported_errors


@app.command()
def models() -> None:
    """List the models shipped in the package, for --model NAME: one JSON object per model on
    stdout (name, base model, L_s, method, training data, the command that trained it and its time,
    size on disk), a table on stderr."""
    from ..decoding.loading import shipped_models

    rows = shipped_models()
    for row in rows:
        typer.echo(json.dumps(row, ensure_ascii=False))
    for row in rows:
        typer.echo(f"{row['name']}: {row['base_model']} fine-tuned ({row['method']}) on {row['data']}, L_s={row['exit_layer']}, {row['size_mb']:.0f} MB; trained in {row.get('train_minutes', '?')} min", err=True)


@app.command()
def convert(
    gguf: Annotated[Path, typer.Argument(help="A GGUF model file.", metavar="MODEL.gguf")],
    output: Annotated[Path, typer.Argument(help="New directory for the safetensors copy and tokenizer.", metavar="DIR")],
) -> None:
    """Dequantize a GGUF model once to a plain safetensors directory (fp32) that loads in seconds.

    Loading a GGUF file dequantizes it on every run (minutes for larger vocabularies); the
    converted directory works with every command's --model."""
    from ..decoding.loading import convert_gguf

    with reported_errors():
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise InputError(f"{gguf}: not a .gguf file")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ConfigError(f"{output} exists and is not empty; choose a new directory")
        convert_gguf(gguf.resolve(), output, name=gguf.stem)
        typer.echo(f"free convert: wrote {output}", err=True)
