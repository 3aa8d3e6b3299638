"""The `free` Typer application and its root options; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="free",
    help="Early-exit decoding for language models: FREE shallow-deep decoding, CALM baselines, lossless mode.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"free {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Early-exit decoding for language models (FREE, CALM, lossless)."""
