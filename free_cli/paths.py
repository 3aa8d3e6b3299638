"""Where `free` keeps what it makes once per machine: converted models and measured pass costs."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$FREE_HOME, else $XDG_CACHE_HOME/free, else ~/.cache/free."""
    if os.environ.get("FREE_HOME"):
        return Path(os.environ["FREE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "free"
