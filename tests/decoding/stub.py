"""A stub model whose exits give logits the test chooses per position, as litgpt's tests drive
speculative decoding with fixed logits. The real `Engine`, `DecodeState` and strategies decode
with it through a stub adapter, so their exit, stacking and rejection logic can be checked against
expectations worked out by hand.

The stub's hidden state at a position is three numbers, (position, layers run, token id): a layer
only records that it ran. The head reads the test's table for the depth a state reached, at the
state's position. Every layer caches the token ids of the positions it runs as its keys, and
checks that it held exactly the positions before them, so a test can see that rewinds and dropped
stacks leave every layer holding the tokens it should.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn

from free_cli import DecodeConfig, Engine
from free_cli.decoding import adapters
from free_cli.decoding import cache as kv
from free_cli.decoding.adapters import LayerContext, Request

V = 16  # vocabulary
EOS = 2
PROMPT = [5, 6, 7]  # the k-th new token (from 0) is predicted at position len(PROMPT) - 1 + k


def logits_for(entry) -> Tensor:
    """A table entry as logits (V,): a token id (confident: probability 0.99), (token id,
    probability of that token), or None (uniform: token 0 at probability 1/V)."""
    if entry is None:
        return torch.zeros(V)
    token, p = (entry, 0.99) if isinstance(entry, int) else entry
    logits = torch.full((V,), math.log((1 - p) / (V - 1)))
    logits[token] = math.log(p)
    return logits


class StubModel(nn.Module):
    """`tables[depth][k]`: the entry (see `logits_for`) the exit after `depth` layers gives for
    the k-th new token; depths and positions without one give uniform logits."""

    def __init__(self, tables: dict[int, list], num_layers: int = 4):
        super().__init__()
        self.config = SimpleNamespace(model_type="stub", is_encoder_decoder=False, _name_or_path="stub")
        self.generation_config = SimpleNamespace(eos_token_id=EOS)
        self.lm_head = nn.Linear(3, V, bias=False)  # its shape only: pruning subsets index its rows
        self.num_layers = num_layers
        self.tables = {depth: [logits_for(e) for e in entries] for depth, entries in tables.items()}

    def logits_at(self, depth: int, position: int) -> Tensor:
        rows, k = self.tables.get(depth, []), position - (len(PROMPT) - 1)
        return rows[k] if 0 <= k < len(rows) else torch.zeros(V)


class StubAdapter:
    """The adapter interface (adapters.py) over a `StubModel`."""

    MODEL_TYPES = ("stub",)
    is_encoder_decoder = False
    hidden_size = 3
    context_length = None

    def __init__(self, model: StubModel):
        self.model, self.lm_head, self.num_layers = model, model.lm_head, model.num_layers
        self.norm = nn.Identity()

    def new_cache(self, dtype=None):
        return kv.new_cache(dtype)

    def self_cache(self, cache):
        return cache

    def prepare(self, prompt_ids: list[int]) -> Request:
        return Request(decoder_ids=list(prompt_ids))

    def embed(self, ids: Tensor) -> Tensor:  # (1, q) -> (1, q, 3): no position yet, no layer run
        return torch.stack((torch.full_like(ids, -1), torch.zeros_like(ids), ids), dim=-1).float()

    def layer_context(self, hidden: Tensor, start: int, cache, first_layer: int, request: Request) -> LayerContext:
        return LayerContext(position_ids=torch.arange(start, start + hidden.shape[1])[None], masks={})

    def run_layer(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> Tensor:
        assert (hidden[..., 1] == i).all(), f"layer {i} ran on states of depth {hidden[0, :, 1].tolist()}"
        self.project_kv(i, hidden, ctx, cache)
        out = hidden.clone()
        out[..., 0], out[..., 1] = ctx.position_ids.float(), i + 1
        return out

    def project_kv(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> None:
        start = int(ctx.position_ids[0, 0])
        assert cache.get_seq_length(i) == start, f"layer {i} holds {cache.get_seq_length(i)} positions, the pass starts at {start}"
        tokens = hidden[..., 2][:, None, :, None]  # (1, 1, q, 1)
        cache.update(tokens, tokens, i)

    def logits(self, hidden: Tensor, subset=None) -> Tensor:
        return self.head(self.norm(hidden), subset)

    def head(self, normed: Tensor, subset=None) -> Tensor:  # (1, q, 3) -> (1, q, V), or (1, q, k)
        out = torch.stack([self.model.logits_at(int(d), int(p)) for p, d, _ in normed[0].tolist()])[None]
        return out if subset is None else out[..., subset.ids]


def stub_engine(tables: dict[int, list], num_layers: int = 4) -> Engine:
    """A real `Engine` over a `StubModel` of `num_layers` layers with these exit tables."""
    with mock.patch.object(adapters, "ADAPTERS", (StubAdapter,)):
        return Engine(StubModel(tables, num_layers))


def decode(engine: Engine, **options):
    """Decodes `PROMPT` with these `DecodeConfig` options; returns the final `DecodeState`, having
    checked that what streamed is what was kept."""
    cfg = DecodeConfig(**options)
    state = engine.start(PROMPT, cfg)
    streamed = [t for new in engine.stream(state, cfg) for t in new]
    assert streamed == state.generated
    return state


def cached(engine: Engine, state) -> list[list[int]]:
    """The token ids each layer's cache holds, layer by layer."""
    layers = engine.adapter.self_cache(state.cache).layers
    return [layers[i].keys[0, 0, :, 0].int().tolist() if i < len(layers) and layers[i].keys is not None else [] for i in range(engine.num_layers)]
