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
    """Crop every layer in `layers` to its first `length` positions."""
    for i in layers:
        held = cache.get_seq_length(i)
        if held > length:
            cache.layers[i].crop(length - held)
