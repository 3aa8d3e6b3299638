"""KV-cache bookkeeping over transformers' cache objects.

Early-exit decoding lets the layers of one cache hold different numbers of positions (the deep
layers lag behind the shallow ones until a synchronized pass), and a rejected stack is undone by
cropping layers back to a position, as gpt-fast rewinds by position instead of copying tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class StoredLayer(DynamicLayer):
    """A cache layer that keeps keys and values in one dtype whatever precision a pass computes
    in, and hands them back in the pass's (precision.py's mixed policy)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states.to(self.dtype), value_states.to(self.dtype), *args, **kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)


def new_cache(dtype: torch.dtype | None = None) -> DynamicCache:
    """A cache whose layers store keys and values in `dtype`, or as computed (None)."""
    cache = DynamicCache()
    if dtype is not None:
        cache.layer_class_to_replicate = lambda: StoredLayer(dtype)
    return cache


def cached_length(cache: DynamicCache, layer: int) -> int:
    """Positions held by one layer (0 for a layer that has never run)."""
    return cache.get_seq_length(layer)


def truncate(cache: DynamicCache, length: int, layers: range) -> None:
    """Crop every layer in `layers` to its first `length` positions (a `RaggedCache` row needs
    nothing: its lengths are its state's)."""
    if isinstance(cache, RaggedCache):
        return
    for i in layers:
        held = cache.get_seq_length(i)
        if held > length:
            cache.layers[i].crop(length - held)


class RaggedCache:
    """One KV cache for several requests decoded together (`free generate --batch-size`), each
    row's positions at columns [0, length) of preallocated buffers (rows, heads, capacity, d), as
    gpt-fast's cache writes by position.

    A pass runs over some of the rows, each from its own position (`begin_pass`); every layer it
    runs writes row r's new keys and values at columns starts[r] onward and hands back the rows'
    keys and values up to the widest row's end, which the pass's masks cut to each row's own
    (columns past a row's length may hold stale or padding entries: masks never show them). A
    rewind is a row's length going back: nothing to copy. Keys and values are stored in `dtype`
    (None: as the first pass computes them) and handed back in each pass's precision."""

    def __init__(self, rows: int, dtype: torch.dtype | None = None):
        self.rows, self.dtype = rows, dtype
        self.keys: dict[int, torch.Tensor] = {}  # slot -> (rows, heads, capacity, d)
        self.values: dict[int, torch.Tensor] = {}
        self.pass_rows: list[int] = []
        self.pass_starts: list[int] = []

    def begin_pass(self, rows: list[int], starts: list[int]) -> None:
        self.pass_rows, self.pass_starts = list(rows), list(starts)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, slot: int, *args, **kwargs):
        """(b, heads, q, d) for the pass's b rows -> their keys and values (b, heads, T, d)."""
        q, end = key_states.shape[2], max(self.pass_starts) + key_states.shape[2]
        keys, values = self._buffers(slot, key_states, end)
        for i, (row, start) in enumerate(zip(self.pass_rows, self.pass_starts)):
            keys[row, :, start : start + q] = key_states[i]
            values[row, :, start : start + q] = value_states[i]
        rows = self.pass_rows
        if rows == list(range(rows[0], rows[0] + len(rows))):  # a run of rows: a view, no copy
            k, v = keys[rows[0] : rows[0] + len(rows), :, :end], values[rows[0] : rows[0] + len(rows), :, :end]
        else:
            index = torch.tensor(rows, device=keys.device)
            k, v = keys[index, :, :end], values[index, :, :end]
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def _buffers(self, slot: int, like: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's buffers, allocated or doubled to hold `end` columns."""
        held = self.keys.get(slot)
        if held is not None and held.shape[2] >= end:
            return held, self.values[slot]
        capacity = max(end, 64, 2 * (held.shape[2] if held is not None else 0))
        _, heads, _, dim = like.shape
        dtype = self.dtype or like.dtype
        keys = torch.zeros(self.rows, heads, capacity, dim, dtype=dtype, device=like.device)
        values = torch.zeros_like(keys)
        if held is not None:
            keys[:, :, : held.shape[2]] = held
            values[:, :, : held.shape[2]] = self.values[slot]
        self.keys[slot], self.values[slot] = keys, values
        return keys, values
