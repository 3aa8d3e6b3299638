"""The decoding engine: a loaded model, its adapter and exit heads, and the named steps every
strategy is built from.

A strategy (see `strategies/`) is a generator over a `DecodeState` that yields lists of token ids
once they are final. `Engine.generate` runs one to completion and times it at the loop boundary
with a single explicit device sync on each side.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from . import cache as kv
from . import kernels
from .adapters import LayerContext, adapter_for
from .config import DecodeConfig
from .cache import RaggedCache
from .exits import ExitModule, digest
from .precision import Precision, same_precision
from .sampling import generator, request_seed
from .state import DecodeState
from .layerpass import LayerPass
from .stats import record_stats


@dataclass(frozen=True)
class Rows:
    """A pass over rows of a `RaggedCache`: the rows, and the position each starts from."""

    rows: list[int]
    starts: list[int]


@dataclass
class Generation:
    tokens: list[int]  # generated ids, a final stop token included
    text: str
    stats: dict
    pairs: list[tuple[float, bool]]  # free: (shallow confidence, agreed with the deep model)


@dataclass
class Shallow:
    """A shallow pass's results per request (Engine.shallow)."""

    hidden: list[Tensor]  # layer L_s's output, (1, q_r, d)
    logits: list[Tensor | None]  # the exit's logits at the last position, (1, 1, V) or over a subset
    states: list[list[Tensor]] | None  # last-position states after the embeddings and each layer


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        exit_modules: dict[int, ExitModule] | None = None,
        default_exit_layer: int | None = None,
        name: str | None = None,
        precision: Precision | None = None,
        source_dir: Path | None = None,
        exit_source: str | None = None,
        meta: nn.Module | None = None,
    ):
        """`exit_modules` maps a depth L_s to a trained exit (see exits.py); depths without one exit
        through the shared final norm and LM head alone. `precision` (precision.py) sets each
        pass's dtype and kernels; by default every pass runs in the model's dtype. A mixed policy
        keeps a second copy of the weights, and of the exits, for its wide passes. The rest is
        provenance, given here so that every copy of an engine carries it."""
        param = next(model.parameters())
        self.device = param.device
        self.precision = precision or same_precision(param.dtype, self.device)
        if self.precision.mixed and model.config.is_encoder_decoder:
            # the encoder's states and the cross-attention cache would have to follow each pass's
            # precision: encoder-decoders run every pass in the wide one
            self.precision = same_precision(self.precision.wide, self.device)
        self.dtype, wide = self.precision.narrow, self.precision.wide
        exit_modules = dict(exit_modules or {})
        self._adapters, self._exits = {}, {}
        if self.precision.mixed:  # copied before the narrow cast, so the wide copy keeps every bit
            self._adapters[wide] = adapter_for(copy.deepcopy(model).to(wide).eval())
            self._exits[wide] = {depth: copy.deepcopy(m).to(wide) for depth, m in exit_modules.items()}
        self.model = model.to(self.dtype).eval()
        self.tokenizer = tokenizer
        exit_modules = {depth: m.to(self.dtype) for depth, m in exit_modules.items()}
        self._adapters[self.dtype], self._exits[self.dtype] = adapter_for(self.model), exit_modules
        self.adapter = self._adapters[self.dtype]  # narrow passes', and what needs no particular precision
        if self.precision.kernel_rows:  # the narrow copy's passes of few rows: free's row kernels
            for module in (self.model, *exit_modules.values()):
                kernels.route(module, self.precision.kernel_rows)
            if not self.adapter.is_encoder_decoder:
                self.adapter.explicit_rows = self.precision.kernel_rows
        self.exit_modules = exit_modules
        self.num_layers = self.adapter.num_layers
        self.vocab_size = self.adapter.lm_head.weight.shape[0]
        self.num_slots = self.num_layers + sum(len(m.layers) for m in exit_modules.values())
        self.default_exit_layer = default_exit_layer
        self.name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.source_dir = source_dir  # the local directory the model was loaded from, if any
        self.exit_source = exit_source  # where a trained exit came from, if any
        self.meta = meta  # CALM's learned confidence classifier, for --confidence meta
        self.step_costs: dict = {}  # measured step costs by shallow depth (costs.py), filled on first use
        eos = model.generation_config.eos_token_id
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def attach_exit(self, module: ExitModule) -> None:
        """Adds a trained exit at its depth L_s, in each pass's precision; L_s becomes the default."""
        for dtype, exits in self._exits.items():
            exits[module.exit_layer] = copy.deepcopy(module).to(dtype).eval()
            if dtype == self.dtype and self.precision.kernel_rows:
                kernels.route(exits[module.exit_layer], self.precision.kernel_rows)
        self.num_slots = self.num_layers + sum(len(m.layers) for m in self.exit_modules.values())
        self.default_exit_layer = module.exit_layer

    def converted(self, precision: torch.dtype | Precision) -> "Engine":
        """This engine under another precision policy (a dtype: every pass in it): a copy of the
        model, its trained exits and its confidence classifier (itself when nothing changes)."""
        if isinstance(precision, torch.dtype):
            if not self.precision.mixed and precision == self.dtype:
                return self
            precision = same_precision(precision, self.device)
        wide = self.precision.wide  # the copy with the most bits
        exits = {depth: copy.deepcopy(m) for depth, m in self._exits[wide].items()}
        engine = Engine(
            copy.deepcopy(self._adapters[wide].model), self.tokenizer, exit_modules=exits, default_exit_layer=self.default_exit_layer, name=self.name,
            precision=precision, source_dir=self.source_dir, exit_source=self.exit_source,
            meta=copy.deepcopy(self.meta).to(precision.wide) if self.meta is not None else None,
        )  # fmt: skip
        engine.stop_ids = self.stop_ids
        return engine

    # ----------------------------------------------------------------- requests
    def start(self, prompt_ids: list[int], cfg: DecodeConfig, key=None, cache: RaggedCache | None = None, row: int | None = None) -> DecodeState:
        """A fresh state for one request, with its own cache or in row `row` of a shared
        `RaggedCache` (batches); runs the encoder for encoder-decoder models. When sampling, the
        request's generator is seeded from the seed and `key` (its record's id)."""
        with torch.inference_mode():
            request = self.adapter.prepare(list(prompt_ids))
        stop_ids = frozenset(cfg.stop_ids) if cfg.stop_ids is not None else self.stop_ids
        tokens = list(request.decoder_ids)
        return DecodeState(
            request=request,
            cache=cache if cache is not None else self.adapter.new_cache(self.precision.cache if self.precision.mixed else None),
            row=row,
            tokens=tokens,
            prompt_len=len(tokens),
            max_new_tokens=cfg.max_new_tokens,
            stop_ids=stop_ids,
            num_layers=self.num_layers,
            final=len(tokens),
            generator=None if cfg.sampling.greedy else generator(request_seed(cfg.seed, key), self.device),
        )

    def adapter_of(self, hidden: Tensor):
        """The adapter whose weights match `hidden`'s precision."""
        return self._adapters[hidden.dtype]

    def model_in(self, dtype: torch.dtype):
        """The engine's copy of the model computing in `dtype`, if it keeps one."""
        adapter = self._adapters.get(dtype)
        return adapter.model if adapter is not None else None

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (b, q) -> embeddings (b, q, d) in the precision of a pass of b x q rows."""
        return self._adapters[self.precision.dtype_for(ids.numel())].embed(ids)

    # ----------------------------------------------------------------- passes over the rows still running
    # Every step runs over a list of requests: one request is the one-row case, with its own cache;
    # several share a `RaggedCache`, each row from its own position. What differs for one row (its
    # cache, transformers' masks for a prompt, a kernel) is decided in the pass, not by the caller.

    def feed(self, states: list[DecodeState], stop: int, exit: bool = False) -> list[Tensor]:
        """Each request's tokens not yet fed through layers [0, stop), in one pass: (1, q_r, d)
        each. With `exit`, a trained exit at depth `stop` runs over them too (its output unused),
        so that its cache keeps every position for later exit decisions."""
        hidden, ctx, out = self._rows(states, [s.unfed() for s in states], 0, stop, [s.fed for s in states])
        for s in states:
            s.fed = len(s.tokens)
        module = self._exits[out.dtype].get(stop) if exit else None
        if module is not None:
            with self.precision.kernels_for(out.shape[0] * out.shape[1]):
                module(self.adapter_of(out), out, ctx, states[0].cache)
        return hidden

    def shallow(self, states: list[DecodeState], depth: int, heads: list[bool] | None = None, exit: bool = True, collect: bool = False) -> Shallow:
        """The shallow model over each request's tokens not yet fed (the prompt at first): layers
        [0, depth) and the exit at that depth, in one pass. Gives each request's layer `depth`
        output (1, q_r, d), what the deep layers continue from, and its exit's logits at its last
        position (1, 1, V), or (1, 1, k) over its pruning subset; None where `heads` is false (no
        exit decision to make: a trained exit's layers still run, to keep its cache whole, unless
        `exit` is false: no request uses the exit any more). With `collect`, each request's
        last-position states after the embeddings and each layer."""
        last = [len(s.unfed()) - 1 for s in states]
        collected: list = []
        hidden, ctx, out = self._rows(states, [s.unfed() for s in states], 0, depth, [s.fed for s in states], collect=(last, collected) if collect else None)
        for s in states:
            s.fed = len(s.tokens)
        module = self._exits[out.dtype].get(depth) if exit else None
        if module is not None:
            with self.precision.kernels_for(out.shape[0] * out.shape[1]):
                out = module(self.adapter_of(out), out, ctx, states[0].cache)  # normed exit states
        wanted = [i for i, want in enumerate(heads or [True] * len(states)) if want and exit]
        rows = {i: out[i : i + 1, last[i] : last[i] + 1] for i in wanted}
        logits: list[Tensor | None] = [None] * len(states)
        if wanted and all(states[i].candidates is None for i in wanted):  # one head product for them all
            both = self.logits(None, torch.cat([rows[i] for i in wanted], dim=1), normed=module is not None)
            for j, i in enumerate(wanted):
                states[i].head_rows += self.vocab_size
                logits[i] = both[:, j : j + 1]
        else:
            for i in wanted:
                logits[i] = self.logits(states[i], rows[i], states[i].candidates, normed=module is not None)
        per_row = [[layer[i : i + 1] for layer in collected] for i in range(len(states))] if collect else None
        return Shallow(hidden, logits, per_row)

    def run(self, states: list[DecodeState], hiddens: list[Tensor], start: int, stop: int, starts: list[int], narrow: bool = False) -> list[Tensor]:
        """Layers [start, stop) over each request's hidden states (1, q_r, d) from position
        starts[r], in one pass; every layer in the range holds exactly starts[r] positions of that
        request. With `narrow`, the pass runs in one row's precision and kernels whatever its width
        (lossless verification: bit for bit the single steps it replaces)."""
        return self._rows(states, hiddens, start, stop, starts, narrow=narrow)[0]

    def layers(self, states: list[DecodeState], hidden: Tensor, starts: list[int]) -> LayerPass:
        """A pass over one new position of each request (b, 1, d), a layer at a time (CALM), its
        context built once; rows leave it as they exit."""
        return LayerPass(self, states, hidden, starts)

    def _rows(self, states, inputs, start, stop, starts, narrow=False, collect=None) -> tuple[list[Tensor], LayerContext, Tensor]:
        """One pass: token id lists or hidden states (1, q_r, d), padded to the longest. Returns
        each request's output (1, q_r, d), the pass's context and its padded output (b, q, d).
        `collect` = (each row's last position, a list that receives (b, 1, d) after the
        embeddings and each layer)."""
        q = max(len(x) if isinstance(x, list) else x.shape[1] for x in inputs)
        if isinstance(inputs[0], list):
            hidden = self.embed(torch.tensor([x + [0] * (q - len(x)) for x in inputs], device=self.device))
            lengths = [len(x) for x in inputs]
        else:
            dtype = self.precision.dtype_for(1 if narrow else len(inputs) * q)
            hidden = torch.cat([nn.functional.pad(x.to(dtype), (0, 0, 0, q - x.shape[1])) for x in inputs])
            lengths = [x.shape[1] for x in inputs]
        picks = None
        if collect is not None:
            picks = (torch.arange(len(inputs), device=self.device), torch.tensor(collect[0], device=self.device))
            collect[1].append(hidden[picks][:, None])
        own = len(states) == 1 and not isinstance(states[0].cache, RaggedCache)
        pos = starts[0] if own else Rows([s.row for s in states], starts)
        out, ctx = self._pass(states[0].cache, states[0].request if own else None, hidden, start, stop, pos, narrow, collect[1] if collect else None, picks)
        return [out[i : i + 1, :n] for i, n in enumerate(lengths)], ctx, out

    def _pass(self, cache, request, hidden, start, stop, pos: int | Rows, narrow: bool = False, states=None, picks=None) -> tuple[Tensor, LayerContext]:
        """The one layer loop. `pos`: the position of one request's first row, or the rows of a
        `RaggedCache` and their positions (b rows, hidden (b, q, d)). The pass runs in the
        precision and with the kernels the policy gives its rows (one row's with `narrow`), and
        returns its output in that precision; `states` receives hidden[picks] (b, 1, d) after
        each layer."""
        rows = 1 if narrow else hidden.shape[0] * hidden.shape[1]
        dtype = self.precision.dtype_for(rows)
        adapter, hidden = self._adapters[dtype], hidden.to(dtype)
        with self.precision.kernels_for(rows):
            if isinstance(pos, Rows):
                cache.begin_pass(pos.rows, pos.starts)
                ctx = adapter.ragged_context(hidden, pos.starts, start)
            else:
                ctx = adapter.layer_context(hidden, pos, cache, start, request)
            for i in range(start, stop):
                hidden = adapter.run_layer(i, hidden, ctx, cache)
                if states is not None:
                    states.append(hidden[picks][:, None])
        return hidden, ctx

    def logits(self, state: DecodeState | None, hidden: Tensor, subset=None, normed: bool = False, narrow: bool = False) -> Tensor:
        """Final norm (unless `normed`) and LM head over hidden states (1, q, d), counting the
        head's rows per position in the state, if given (its multiply-adds are rows x d); with
        `narrow`, with one row's kernels."""
        if state is not None:
            state.head_rows += hidden.shape[1] * (len(subset) if subset is not None else self.vocab_size)
        adapter = self.adapter_of(hidden)
        with self.precision.kernels_for(1 if narrow else hidden.shape[1]):
            return adapter.head(hidden, subset) if normed else adapter.logits(hidden, subset)

    def slots_through(self, depth: int) -> list[int]:
        """Cache slots the shallow model at `depth` writes: its layers and its exit's."""
        module = self.exit_modules.get(depth)
        return [*range(depth), *(module.slots if module is not None else ())]

    def truncate_cache(self, state: DecodeState, length: int, slots=None) -> None:
        """Crops cache slots (all of them by default, exits' included) to `length` positions."""
        slots = range(self.num_slots) if slots is None else slots
        kv.truncate(self.adapter.self_cache(state.cache), length, slots)

    def store_name(self, depth: int) -> str:
        """The model as threshold stores know it at shallow depth `depth`: its name, plus the
        trained exit's digest when one runs there (a threshold means nothing for another exit)."""
        return f"{self.name} + exit {digest(self.exit_source)}" if self.exit_source and depth in self.exit_modules else self.name

    def describe(self) -> str:
        """One line for logs: name, family, depth, device and precision."""
        dtype = self.precision.describe()
        exits = "".join(f", trained exit at {d} (+{len(m.layers)} layer{'s' * (len(m.layers) > 1)})" for d, m in self.exit_modules.items())
        return f"{self.name} ({self.model.config.model_type}, {self.num_layers} layers{exits}) on {self.device} in {dtype}"

    # ----------------------------------------------------------------- driving
    def stream(self, state: DecodeState, cfg: DecodeConfig) -> Iterator[list[int]]:
        """Runs the configured strategy, yielding token ids as they become final."""
        from .strategies import decode

        cfg = cfg.resolved(self.num_layers, self.default_exit_layer)
        with torch.inference_mode():
            yield from decode(self, state, cfg)

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, key=None) -> Generation:
        """Decodes one request to the end and returns its tokens, text and stats; `key` (the
        record's id) seeds its sampling."""
        cfg = cfg.resolved(self.num_layers, self.default_exit_layer)
        state = self.start(prompt_ids, cfg, key)
        self.device_sync()
        began = time.perf_counter()
        for new in self.stream(state, cfg):
            if new and state.prefill_s is None:
                self.device_sync()
                state.prefill_s = time.perf_counter() - began
        self.device_sync()
        wall = time.perf_counter() - began
        tokens = state.generated
        return Generation(tokens, self.decode(tokens), record_stats(self, state, cfg, wall), state.pairs)

    def device_sync(self) -> None:
        """Waits for the device's queued work: timings start and stop here (not FREE's synchronized pass)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
