"""Decoding strategies. Each is a generator `decode(engine, state, cfg)` that yields lists of
token ids as they become final."""

from . import calm, free, full, static

STRATEGIES = {"full": full.decode, "static": static.decode, "calm": calm.decode, "free": free.decode}
