"""Typed errors. The library raises these; the CLI turns each into one `Error: ...` line on
stderr and a non-zero exit."""

from __future__ import annotations


class FreeError(Exception):
    """Base class for every error `free` reports to a user."""


class ConfigError(FreeError):
    """Options that are invalid or conflict with each other."""


class ModelLoadError(FreeError):
    """A model could not be found or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture has no adapter."""


class InputError(FreeError):
    """A bad input record. Carries the 1-based line number and the field at fault."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None):
        self.line, self.field, self.reason = line, field, message
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class OutputError(FreeError):
    """The output file cannot be written or resumed safely."""
