"""What batched strategies share: grouping rows into passes."""

from __future__ import annotations


def by_width(states: list) -> list[list]:
    """Rows grouped into passes: each row with a prompt to feed alone (padding prompts of other
    lengths to the longest would cost more than it saves), every single-token row together."""
    wide = [[s] for s in states if len(s.unfed()) > 1]
    narrow = [s for s in states if len(s.unfed()) == 1]
    return wide + ([narrow] if narrow else [])
