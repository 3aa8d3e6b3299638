"""One small adapter per model family: the only place that knows where a Hugging Face model keeps
its embedding, layers, final norm, head and positions.

The engine runs any contiguous range of layers `[start, stop)` over a segment of positions. An
adapter builds, once per segment, what every layer of that segment needs besides the hidden states
(masks, rotary cos/sin or T5's relative bias) with transformers' own helpers, then calls the
family's own layer modules. Nothing here copies modeling code.

Caches are transformers' `DynamicCache` with plain (non-sliding) layers: early-exit decoding lets
layers of one cache hold different lengths, and a rewind must be able to crop any layer. Sliding
windows are applied through the masks instead, which gives the same attention.
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import cache as kv
from ..errors import UnsupportedModelError

_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass
class Request:
    """Per-request inputs an adapter derives from the prompt.

    `decoder_ids` are the tokens the decoder starts from (the prompt itself for decoder-only models,
    the start token for T5); `encoder_states` is T5's encoder output, (1, n, d)."""

    decoder_ids: list[int]
    encoder_states: Tensor | None = None


@dataclass
class LayerContext:
    """What every layer of one segment needs besides the hidden states, built once per segment."""

    position_ids: Tensor  # (1, q)
    masks: dict[str, Tensor | None]  # by layer type; None lets SDPA use its causal path
    rotary: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (cos, sin), (1, q, hd)
    position_bias: Tensor | None = None  # T5 relative bias, (1, heads, q, kv)
    encoder_states: Tensor | None = None

    def rows(self, picks: Tensor, columns: int) -> "LayerContext":
        """The context of a ragged pass narrowed to the rows at `picks` (CALM's pass as rows exit),
        whose keys now span `columns` positions."""
        return LayerContext(
            position_ids=self.position_ids[picks],
            masks={k: (m[picks][..., :columns] if m is not None else None) for k, m in self.masks.items()},
            rotary={k: (cos[picks], sin[picks]) for k, (cos, sin) in self.rotary.items()},
            position_bias=self.position_bias,
            encoder_states=self.encoder_states,
        )


class DecoderOnlyAdapter:
    """Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3) and Gemma 3 text."""

    MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
    is_encoder_decoder = False
    # Passes of up to this many rows get explicit boolean masks (the row kernels' attention takes
    # them; wider passes get transformers' own, which may leave the mask to SDPA's causal path).
    explicit_rows = 1

    def __init__(self, model):
        config = model.config
        base = model.model
        self.model, self.config = model, config
        self.embed_tokens, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.rotary_emb, self.lm_head = base.rotary_emb, model.lm_head
        self.num_layers = len(self.layers)
        self.hidden_size = config.hidden_size
        self.context_length = getattr(config, "max_position_embeddings", None)
        types = getattr(config, "layer_types", None)
        if not types:  # Mistral-style: one window for every layer, or none
            sliding = getattr(config, "sliding_window", None) is not None
            types = ["sliding_attention" if sliding else "full_attention"] * self.num_layers
        self.layer_types = list(types)
        self._rotary_by_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        self._softcap = getattr(config, "final_logit_softcapping", None)
        # The family's own rotation function, from the module that defines its attention.
        attention_module = sys.modules[type(self.layers[0].self_attn).__module__]
        self._apply_rotary = attention_module.apply_rotary_pos_emb

    def new_cache(self, dtype: torch.dtype | None = None) -> DynamicCache:
        """A cache for one request, storing keys and values in `dtype` (None: as computed)."""
        return kv.new_cache(dtype)

    def self_cache(self, cache) -> DynamicCache:
        return cache

    def prepare(self, prompt_ids: list[int]) -> Request:
        return Request(decoder_ids=list(prompt_ids))

    def embed(self, ids: Tensor) -> Tensor:  # (1, q) -> (1, q, d)
        return self.embed_tokens(ids)

    def layer_context(self, hidden: Tensor, start: int, cache, first_layer: int, request: Request) -> LayerContext:
        """Masks and rotary positions for positions `start .. start+q-1` through layers from
        `first_layer` on, whose caches all hold exactly `start` positions."""
        q = hidden.shape[1]
        position_ids = torch.arange(start, start + q, device=hidden.device).unsqueeze(0)
        types = set(self.layer_types[first_layer:])
        if q <= self.explicit_rows:  # an explicit mask: a one-row step then attends as each row of a wider pass does
            masks = self._masks(position_ids, start + q, types)
        else:
            masks = {
                t: _MASK_BUILDERS[t](
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    cache=cache,
                    position_ids=position_ids,
                    layer_idx=first_layer,
                )
                for t in types
            }
        return LayerContext(position_ids=position_ids, masks=masks, rotary=self._rotary(hidden, position_ids, types))

    def ragged_context(self, hidden: Tensor, starts: list[int], first_layer: int) -> LayerContext:
        """Masks and rotary positions for a pass over b rows of a `RaggedCache`, (b, q, d): row r
        at positions starts[r] .. starts[r]+q-1 of its own sequence, attending to its columns up to
        each query's position (within the window, for sliding layers). Queries past a row's real
        ones are padding: they attend like the others and their outputs are ignored."""
        q = hidden.shape[1]
        position_ids = torch.tensor(starts, device=hidden.device)[:, None] + torch.arange(q, device=hidden.device)  # (b, q)
        types = set(self.layer_types[first_layer:])
        masks = self._masks(position_ids, max(starts) + q, types)
        return LayerContext(position_ids=position_ids, masks=masks, rotary=self._rotary(hidden, position_ids, types))

    def _masks(self, position_ids: Tensor, length: int, types: set[str]) -> dict[str, Tensor]:
        """Boolean masks (b, 1, q, length) by layer type: each query sees the columns up to its
        position, within the window for sliding layers."""
        columns = torch.arange(length, device=position_ids.device)[None, None, :]  # (1, 1, T)
        positions = position_ids[:, :, None]  # (b, q, 1)
        causal = columns <= positions
        window = getattr(self.config, "sliding_window", None)
        return {t: (causal & (columns > positions - window) if t == "sliding_attention" else causal)[:, None] for t in types}

    def _rotary(self, hidden: Tensor, position_ids: Tensor, types: set[str]) -> dict:
        if self._rotary_by_type:
            return {t: self.rotary_emb(hidden, position_ids, t) for t in types}
        return dict.fromkeys(types, self.rotary_emb(hidden, position_ids=position_ids))

    def run_layer(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> Tensor:
        return self.call_layer(self.layers[i], self.layer_types[i], hidden, ctx, cache)

    def call_layer(self, layer, kind: str, hidden: Tensor, ctx: LayerContext, cache) -> Tensor:
        """Runs one decoder layer of this family (the model's own, or an exit's)."""
        return layer(
            hidden,
            attention_mask=ctx.masks[kind],
            position_embeddings=ctx.rotary[kind],
            position_ids=ctx.position_ids,
            cache=cache,
        )

    def new_layer(self, init_from: int, slot: int):
        """A trainable copy of layer `init_from` whose attention caches into slot `slot`."""
        layer = copy.deepcopy(self.layers[init_from])
        layer.self_attn.layer_idx = slot
        return layer

    def new_norm(self):
        return copy.deepcopy(self.norm)

    def project_kv(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> None:
        """State copying (CALM): write layer i's keys and values computed from `hidden`, the state
        of an earlier layer, without running the layer's attention or MLP."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # (1, kv_heads, q, hd)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        cos, sin = ctx.rotary[self.layer_types[i]]
        _, k = self._apply_rotary(k, k, cos, sin)
        cache.update(k, v, i)

    def logits(self, hidden: Tensor, subset=None) -> Tensor:
        """Final norm and LM head: (1, q, d) -> (1, q, V), or (1, q, k) over a `Subset`."""
        return self.head(self.norm(hidden), subset)

    def head(self, normed: Tensor, subset=None) -> Tensor:
        """The LM head on normalized hidden states; over a pruning `Subset`'s rows when given."""
        logits = self.lm_head(normed) if subset is None else subset.linear(normed)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits


class T5Adapter:
    """T5-family encoder-decoders (T5, mT5, LongT5: its long-input attention is in the encoder;
    its decoder blocks are T5's). The encoder runs once per request; early exit applies to the
    decoder's blocks."""

    MODEL_TYPES = ("t5", "mt5", "longt5")
    is_encoder_decoder = True

    def __init__(self, model):
        config = model.config
        self.model, self.config = model, config
        self.encoder, self.decoder = model.encoder, model.decoder
        self.layers, self.norm, self.lm_head = self.decoder.block, self.decoder.final_layer_norm, model.lm_head
        self.num_layers = len(self.layers)
        self.hidden_size = config.d_model
        self.context_length = None  # relative positions: no fixed limit
        self.layer_types = ["full_attention"] * self.num_layers
        scale = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
        self._scale = config.d_model**-0.5 if scale else None
        self._bias_attention = self.layers[0].layer[0].SelfAttention  # owns the relative bias table

    def new_cache(self, dtype: torch.dtype | None = None) -> EncoderDecoderCache:
        return EncoderDecoderCache(kv.new_cache(dtype), DynamicCache())

    def self_cache(self, cache) -> DynamicCache:
        return cache.self_attention_cache

    def prepare(self, prompt_ids: list[int]) -> Request:
        ids = torch.tensor([prompt_ids], device=self.lm_head.weight.device)
        states = self.encoder(input_ids=ids).last_hidden_state  # (1, n, d)
        return Request(decoder_ids=[self.config.decoder_start_token_id], encoder_states=states)

    def embed(self, ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(ids)

    def layer_context(self, hidden: Tensor, start: int, cache, first_layer: int, request: Request) -> LayerContext:
        q = hidden.shape[1]
        position_ids = torch.arange(start, start + q, device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.decoder.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=cache.self_attention_cache,
            position_ids=position_ids,
            layer_idx=first_layer,
        )
        # The bias block 0 computes for itself and hands to the others; computed here so that a
        # segment starting at any block gets it.
        bias = self._bias_attention.compute_bias(q, start + q, device=hidden.device, past_seen_tokens=start)
        return LayerContext(
            position_ids=position_ids,
            masks={"full_attention": mask},
            position_bias=bias,
            encoder_states=request.encoder_states,
        )

    def run_layer(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> Tensor:
        return self.call_layer(self.layers[i], "full_attention", hidden, ctx, cache)

    def call_layer(self, layer, kind: str, hidden: Tensor, ctx: LayerContext, cache) -> Tensor:
        return layer(
            hidden,
            attention_mask=ctx.masks[kind],
            position_bias=ctx.position_bias,
            encoder_hidden_states=ctx.encoder_states,
            cache=cache,
        )[0]

    def new_layer(self, init_from: int, slot: int):
        block = copy.deepcopy(self.layers[init_from])
        block.layer[0].SelfAttention.layer_idx = slot
        block.layer[1].EncDecAttention.layer_idx = slot
        return block

    def new_norm(self):
        return copy.deepcopy(self.norm)

    def project_kv(self, i: int, hidden: Tensor, ctx: LayerContext, cache) -> None:
        block = self.layers[i].layer[0]
        attn = block.SelfAttention
        x = block.layer_norm(hidden)
        shape = (*x.shape[:-1], -1, attn.key_value_proj_dim)
        k = attn.k(x).view(shape).transpose(1, 2)  # (1, heads, q, d_kv)
        v = attn.v(x).view(shape).transpose(1, 2)
        cache.self_attention_cache.update(k, v, i)

    def logits(self, hidden: Tensor, subset=None) -> Tensor:
        return self.head(self.norm(hidden), subset)

    def head(self, normed: Tensor, subset=None) -> Tensor:
        if self._scale is not None:
            normed = normed * self._scale
        return self.lm_head(normed) if subset is None else subset.linear(normed)


ADAPTERS = (DecoderOnlyAdapter, T5Adapter)
SUPPORTED_MODEL_TYPES = tuple(t for cls in ADAPTERS for t in cls.MODEL_TYPES)


def adapter_for(model) -> DecoderOnlyAdapter | T5Adapter:
    """The adapter for a loaded transformers model, or a clear error naming what is supported."""
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.MODEL_TYPES:
            return cls(model)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
