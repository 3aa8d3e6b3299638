"""Training methods: what each trains, its loss, the shallow exit's agreement with the deep model,
and the checkpoint it exports. `train.py` runs them (`TrainConfig.method`):
- `exit-only`: the backbone stays frozen; an `ExitModule` after layer L_s learns the deep model's
  next-token distribution (soft cross-entropy on the deep model's top-k). The deep model, and so
  the lossless output, stay exactly as they were. This makes a downloaded chat model fast without
  task fine-tuning.
- `shallow-deep`: FREE's fine-tuning of the whole model, (L_s·CE_shallow + L·CE_deep)/(L_s + L)
  plus α times layerwise distillation from deep to shallow hidden states (`kd`: none, last,
  uniform, dyna).
- `calm`: CALM's fine-tuning, the cross-entropy of every layer's exit weighted by depth.
- `meta`: CALM's learned confidence: a small classifier on the frozen model's hidden states that
  predicts whether a layer's exit agrees with the last layer.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import DynamicCache

from . import losses
from ..decoding.adapters import Request
from ..decoding.confidence import MetaClassifier
from ..decoding.engine import Engine
from ..decoding.exits import ADAPTER_WEIGHTS, ExitModule, stored, write_config
from .features import Features, FeatureStore, weights_fingerprint
from .trainset import Example, TokenBatch, collate

if TYPE_CHECKING:
    from .config import TrainConfig


def forward_states(model, batch: TokenBatch) -> tuple[list[Tensor], Tensor]:
    """A decoder-only forward pass over the columns that carry labels: every layer's raw output
    (index 0: the embeddings, index l: layer l), each (B, T', d), and the final normalized states
    (B, T', d). A batch's no-grad prefix (`TokenBatch.prefix`) runs first, into a cache the rest
    attends to, so its cost is a forward pass only."""
    cache = None
    if batch.prefix:
        cache = DynamicCache()
        with torch.no_grad():
            cut = slice(0, batch.prefix)
            model.model(input_ids=batch.ids[:, cut], attention_mask=batch.attention[:, cut], position_ids=batch.positions[:, cut], cache=cache, use_cache=True)
    raw = {}
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda _m, _i, out: raw.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    rest = slice(batch.prefix, None)
    try:
        out = model.model(
            input_ids=batch.ids[:, rest], attention_mask=batch.attention, position_ids=batch.positions[:, rest],
            cache=cache, use_cache=cache is not None, output_hidden_states=True,
        )  # fmt: skip
    finally:
        handle.remove()
    states = list(out.hidden_states)
    states[-1] = raw["last"]  # transformers reports the normalized output there
    return states, out.last_hidden_state


class Method:
    """What a training method trains and how: its parameters, its loss on a batch, the shallow
    exit's agreement with the deep model, and the checkpoint it exports."""

    def __init__(self, engine: Engine, cfg: TrainConfig):
        self.engine, self.cfg, self.adapter = engine, cfg, engine.adapter
        self.L, self.L_s = engine.num_layers, cfg.exit_layer

    def trainable(self) -> nn.Module: ...

    def prepare(self, examples: list[Example], name: str, pad: int, progress=None, owned=lambda i: True, folder: Path | None = None) -> None:
        """Work done once per example before training (none by default), for the examples
        `owned` says this process trains on; what is kept on disk goes in `folder`."""

    def loss(self, batch, keys: list) -> Tensor:
        """The training loss on a batch; `keys` identify its examples (for per-example caches): a
        mean over its loss positions (`positions`)."""

    def positions(self, batch, keys: list) -> int:
        """How many positions the loss on this batch averages over: its target tokens."""
        return int(batch.mask.sum())

    def agreement(self, batch, keys: list) -> tuple[int, int]:
        """(agreeing, total) target positions: the shallow exit's argmax against the deep model's."""

    def export(self, out: Path, meta: dict, dtype: torch.dtype) -> None:
        """Writes the trained weights, stored in `dtype`, and the small config."""


class ExitOnly(Method):
    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        engine.model.requires_grad_(False)
        self.module = ExitModule(engine.adapter, self.L_s, cfg.exit_layers, int(cfg.init_from)).to(torch.float32).requires_grad_(True)
        if cfg.start_from is not None:  # continue a trained exit
            self.module.load_state_dict(ExitModule.load(Path(cfg.start_from), engine.adapter, torch.float32, engine.device).state_dict())
            self.module.requires_grad_(True)
        self._features: dict[tuple[str, int], Features] = {}  # per example key, reused across epochs

    def trainable(self):
        return self.module

    def prepare(self, examples: list[Example], name: str, pad: int, progress=None, owned=lambda i: True, folder: Path | None = None) -> None:
        """Runs the frozen model once over every example it `owns`, in fixed chunks, keeping layer L_s's
        output and the deep model's top-k at the positions the exit learns from: the target
        positions, and for training examples up to `prompt_positions` prompt positions drawn by
        the seed (the deep model's predictions there are more data from the same pass). Fixed
        chunks and seeded draws make the features the same however training is interrupted (CPU
        kernels round a row differently depending on its place in a batch), and epochs after the
        first cost only the exit. With a `folder`, each chunk is kept there (`FeatureStore`) and
        read back instead of computed when a run resumes."""
        size, extra = self.cfg.batch_size, self.cfg.prompt_positions if name == "train" else 0
        store = None
        if folder is not None:
            key = {"model": self._weights, "exit_layer": self.L_s, "top_k": self.cfg.top_k, "prompt_positions": extra, "seed": self.cfg.seed, "dtype": self.cfg.dtype}
            store = FeatureStore(folder, key, self.engine.device)
        with torch.no_grad():
            for start in range(0, len(examples), size):
                if not owned(start):  # another process's chunk
                    continue
                chunk = examples[start : start + size]
                found = store.load(name, start, chunk) if store is not None else None
                if found is None:
                    found = self._compute(chunk, start, extra, pad)
                    if store is not None:
                        store.save(name, start, chunk, found)
                for row, features in enumerate(found):
                    self._features[(name, start + row)] = features
                if progress is not None:
                    progress.update(len(chunk))

    @functools.cached_property
    def _weights(self) -> str:
        """The frozen model's fingerprint, hashed once for the training and the held-out features."""
        return weights_fingerprint(self.engine.model)

    def _compute(self, chunk: list[Example], start: int, extra: int, pad: int) -> list[Features]:
        batch = collate(chunk, pad, self.engine.device)
        states, final = forward_states(self.engine.model, batch)
        out = []
        for row in range(batch.ids.shape[0]):
            positions = batch.mask[row].nonzero().squeeze(-1)
            if extra:  # positions before the first target one predict prompt tokens
                prompt = int(positions[0])
                drawn = random.Random(f"{self.cfg.seed}/{start + row}").sample(range(prompt), min(extra, prompt))
                positions = torch.cat([torch.tensor(sorted(drawn), dtype=torch.long, device=positions.device), positions])
            top = self.adapter.head(final[row, positions]).float().topk(self.cfg.top_k, dim=-1)
            length = int(batch.attention[row].sum())
            out.append(Features(states[self.L_s][row, :length].to(torch.bfloat16), positions, top.indices, top.values))
        return out

    def features(self, batch, keys) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
        """From `prepare`: layer L_s's output (B, T, d), the (row, position) pairs the exit learns
        from, and the deep model's top-k there (ids, logits), (N, k)."""
        cached = [self._features[k] for k in keys]
        width = batch.ids.shape[1]
        hidden = torch.stack([nn.functional.pad(f.hidden, (0, 0, 0, width - len(f.hidden))) for f in cached])
        rows = torch.cat([torch.full_like(f.positions, b) for b, f in enumerate(cached)])
        where = (rows, torch.cat([f.positions for f in cached]))
        return hidden.float(), where, torch.cat([f.ids for f in cached]), torch.cat([f.logits for f in cached])

    def exit_logits(self, hidden: Tensor, where: tuple[Tensor, Tensor]) -> Tensor:
        ctx = self.adapter.layer_context(hidden, 0, None, 0, Request([]))  # causal; right padding is harmless
        return self.adapter.head(self.module(self.adapter, hidden, ctx, None)[where])

    def loss(self, batch, keys):
        hidden, where, teacher_ids, teacher_logits = self.features(batch, keys)
        return losses.soft_ce(self.exit_logits(hidden, where), teacher_ids, teacher_logits)

    def positions(self, batch, keys):
        return sum(len(self._features[k].positions) for k in keys)

    def agreement(self, batch, keys):
        hidden, where, teacher_ids, _ = self.features(batch, keys)
        ours = self.exit_logits(hidden, where).argmax(-1)
        return int((ours == teacher_ids[:, 0]).sum()), len(ours)

    def export(self, out, meta, dtype):
        self.module.save(out, dtype=dtype, **meta)


class ShallowDeep(Method):
    """FREE's shallow-deep fine-tuning; the shallow exit is the shared final norm and LM head.

    The whole model trains, or with `lora_rank` low-rank adapters on every linear layer of the
    decoder (through `peft`), which are all a checkpoint then holds."""

    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        self.peft = None
        if cfg.lora_rank:
            from peft import LoraConfig, get_peft_model

            from ..decoding.loading import quiet_peft

            alpha = cfg.lora_alpha or 2 * cfg.lora_rank
            config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=linear_layer_names(engine.model), lora_dropout=0.0)
            with quiet_peft():
                self.peft = get_peft_model(engine.model, config)  # adapters injected into engine.model itself
        elif cfg.freeze_embeddings:
            engine.model.get_input_embeddings().requires_grad_(False)

    def trainable(self):
        return self.engine.model

    def loss(self, batch, keys):
        states, final = forward_states(self.engine.model, batch)
        labels = batch.labels[batch.mask]
        shallow = losses.token_ce(self.adapter.logits(states[self.L_s][batch.mask]), labels)
        deep = losses.token_ce(self.adapter.head(final[batch.mask]), labels)
        loss = losses.shallow_deep_loss(shallow, deep, self.L_s, self.L)
        if self.cfg.kd != "none":  # on the states as the shared head reads them, after the final norm
            normed = [self.adapter.norm(s[batch.mask]) for s in states]
            loss = loss + self.cfg.alpha * losses.distillation_loss(normed, self.L_s, self.cfg.kd)
        return loss

    def agreement(self, batch, keys):
        with torch.no_grad():
            states, final = forward_states(self.engine.model, batch)
            shallow = self.adapter.logits(states[self.L_s][batch.mask]).argmax(-1)
            deep = self.adapter.head(final[batch.mask]).argmax(-1)
        return int((shallow == deep).sum()), len(deep)

    def export(self, out, meta, dtype):
        config = {"exit_layer": self.L_s, **meta}
        if self.peft is not None:
            from peft import get_peft_model_state_dict

            save_file({k: v.to(dtype).contiguous() for k, v in get_peft_model_state_dict(self.peft).items()}, str(out / ADAPTER_WEIGHTS))
            self.peft.peft_config["default"].save_pretrained(out)
            config["adapter"] = "lora"
        else:
            self.engine.model.save_pretrained(out, state_dict=stored(self.engine.model, dtype))
        write_config(out, config)


def linear_layer_names(model) -> list[str]:
    """The names (last component) of the decoder layers' linear modules: what adapters go on."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


class Calm(ShallowDeep):
    """CALM's fine-tuning: every layer's exit trained, deeper ones weighted more."""

    def loss(self, batch, keys):
        states, final = forward_states(self.engine.model, batch)
        labels = batch.labels[batch.mask]
        ces = [losses.token_ce(self.adapter.logits(states[l][batch.mask]), labels) for l in range(1, self.L)]
        ces.append(losses.token_ce(self.adapter.head(final[batch.mask]), labels))
        return losses.calm_loss(ces)


class Meta(Method):
    def __init__(self, engine, cfg):
        super().__init__(engine, cfg)
        engine.model.requires_grad_(False)
        self.classifier = MetaClassifier(self.adapter.hidden_size, self.L)

    def trainable(self):
        return self.classifier

    def _examples(self, batch) -> list[tuple[Tensor, Tensor, int]]:
        """(normalized states, agreed, layer) for every layer below the last."""
        with torch.no_grad():
            states, final = forward_states(self.engine.model, batch)
            deep = self.adapter.head(final[batch.mask]).argmax(-1)
            rows = []
            for l in range(1, self.L):
                normed = self.adapter.norm(states[l][batch.mask]).float()
                rows.append((normed, (self.adapter.head(normed).argmax(-1) == deep).float(), l))
        return rows

    def loss(self, batch, keys):
        rows = self._examples(batch)
        return torch.stack([nn.functional.binary_cross_entropy_with_logits(self.classifier(x, l), y) for x, y, l in rows]).mean()

    def agreement(self, batch, keys):
        """For this method: how often the classifier is right at L_s."""
        x, y, l = self._examples(batch)[self.L_s - 1]
        with torch.no_grad():
            right = ((self.classifier(x, l) > 0).float() == y).sum()
        return int(right), len(y)

    def export(self, out, meta, dtype):
        out.mkdir(parents=True, exist_ok=True)
        save_file(stored(self.classifier, dtype), str(out / MetaClassifier.FILE))
        write_config(out, {"exit_layer": self.L_s, "meta": True, **meta})


METHOD_CLASSES = {"exit-only": ExitOnly, "shallow-deep": ShallowDeep, "calm": Calm, "meta": Meta}
