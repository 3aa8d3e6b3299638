"""KV-cache bookkeeping over transformers' cache objects.

Early-exit decoding lets the layers of one cache hold different numbers of positions (the deep
layers lag behind the shallow ones until a synchronized pass), and a rejected stack is undone by
cropping layers back to a position, as gpt-fast rewinds by position instead of copying tensors.
"""

from __future__ import annotations

from transformers import DynamicCache


def cached_length(cache: DynamicCache, layer: int) -> int:
    """Positions held by one layer (0 for a layer that has never run)."""
    return cache.get_seq_length(layer)


def truncate(cache: DynamicCache, length: int, layers: range) -> None:
    """Crop every layer in `layers` to its first `length` positions."""
    for i in layers:
        held = cache.get_seq_length(i)
        if held > length:
            cache.layers[i].crop(length - held)
