"""What batched strategies share: grouping rows into passes."""

from __future__ import annotations


# Rows whose pass is at most this many positions share one pass, padded to the longest of them;
# a wider row (a prompt) runs alone, as padding every other row to its length would cost more.
SHARED_WIDTH = 16


def by_width(states: list, width=lambda s: len(s.unfed())) -> list[list]:
    """Rows grouped into passes by the positions each feeds (`width`): each wide row alone, the
    narrow ones together."""
    wide = [[s] for s in states if width(s) > SHARED_WIDTH]
    narrow = [s for s in states if width(s) <= SHARED_WIDTH]
    return wide + ([narrow] if narrow else [])
