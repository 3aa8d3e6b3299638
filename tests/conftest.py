"""Tiny models built in the tests (fp32, CPU, random weights shaped so that exits happen)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LongT5Config,
    LongT5ForConditionalGeneration,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from free_cli.decoding.costs import StepCosts

torch.set_num_threads(1)
# Commands the tests start as processes use one thread too: the tests run on every core at once
# (pytest-xdist), and a process with more threads than its share of the cores waits on the others.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Step costs for tests that draft: flat pass costs (a pass over 16 rows costs one step), so that
# every lookup match is drafted in full, whatever this machine measures.
FLAT = StepCosts(full=1.0, shallow=0.5, deep=0.6, rows=(1.0,) * 16)

VOCAB = 64
EOS = 3
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    tie_word_embeddings=False,
)  # fmt: skip


def shaped(model, *, weight_scale=4.0, logit_scale=8.0, deep_scale=1.0, exit_layer=2):
    """Random weights reshaped so that decoding is not a coin toss: larger weights and logits give
    peaked distributions (confident exits, few near-ties), and shrinking what the layers after
    `exit_layer` add to the residual stream makes the shallow model agree with the deep one often,
    but not always. `deep_scale` tunes that agreement."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
        head = model.lm_head.weight
        if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.mul_(logit_scale)
        layers = model.decoder.block if model.config.is_encoder_decoder else model.model.layers
        for layer in layers[exit_layer:]:
            for p in _residual_writers(layer):
                p.mul_(deep_scale)
    return model.eval()


def _residual_writers(layer):
    if hasattr(layer, "self_attn"):
        return [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
    return [sub.o.weight for sub in (layer.layer[0].SelfAttention, layer.layer[1].EncDecAttention)] + [
        layer.layer[-1].DenseReluDense.wo.weight
    ]


def make_model(family: str, seed: int = 0, **shape):
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**DECODER))
    elif family == "gemma3":
        types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
        cfg = Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=4, layer_types=types, final_logit_softcapping=30.0)
        model = Gemma3ForCausalLM(cfg)
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**DECODER))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**DECODER, head_dim=8))
    elif family == "mistral":  # every layer windowed, window shorter than the sequences
        model = MistralForCausalLM(MistralConfig(**DECODER, sliding_window=5))
    elif family == "t5":
        cfg = T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=6, num_decoder_layers=6, num_heads=4,
            decoder_start_token_id=0, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
        )  # fmt: skip
        model = T5ForConditionalGeneration(cfg)
    elif family == "longt5":  # transient-global attention in the encoder; T5 blocks in the decoder
        # Equal encoder and decoder depths: transformers' own `generate` (the reference) sizes the
        # decoder's cache from the encoder's depth.
        cfg = LongT5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=6, num_decoder_layers=6, num_heads=4,
            decoder_start_token_id=0, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
            encoder_attention_type="transient-global", local_radius=4, global_block_size=4,
        )  # fmt: skip
        model = LongT5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    return shaped(model, **shape)


FAMILIES = ["llama", "gemma3", "qwen2", "qwen3", "mistral", "t5", "longt5"]


def prompts(n: int, length: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def repeating_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase of six tokens three times, then end on three more: the text
    and what a model continues it with hold n-grams seen before, for lookup drafts to find."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (6,), generator=g).tolist() * 3 + torch.randint(4, VOCAB, (3,), generator=g).tolist() for _ in range(n)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding, the reference for `full`."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )[0].tolist()
    if model.config.is_encoder_decoder:
        return out[1:]  # drop the decoder start token
    return out[len(prompt) :]


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list) -> str:
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(row if isinstance(row, str) else json.dumps(row))
                f.write("\n")
        return str(path)

    return write


WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # ids 4 .. VOCAB-1


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer over `WORDS` whose special ids match the tiny models' configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat:
        tokenizer.chat_template = (
            "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"
        )
    return tokenizer


def words(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama with a 64-token context and its tokenizer, saved like any local model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_model("llama", deep_scale=0.3)
    model.config.max_position_embeddings = 64
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
