"""Decoding strategies on tiny fp32 models: equalities with the full model and the shallow model,
KV-cache agreement after synchronized parallel decoding, and lossless mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from free_cli import DecodeConfig, Engine, UnsupportedModelError
from free_cli.decoding.strategies import calm as calm_strategy
from free_cli.decoding.strategies import free as free_strategy

from conftest import EOS, FAMILIES, hf_greedy, make_model, prompts

N = 24  # new tokens per generation


def run(engine, prompt, **kw):
    return engine.generate(prompt, DecodeConfig(max_new_tokens=kw.pop("max_new_tokens", N), **kw))


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request):
    return Engine(make_model(request.param, deep_scale=0.3))


def test_full_equals_transformers_greedy(family_engine):
    for prompt in prompts(4):
        ref = hf_greedy(family_engine.model, prompt, N)
        assert run(family_engine, prompt, strategy="full").tokens == ref


def test_free_with_unreachable_threshold_is_full(family_engine):
    for prompt in prompts(3, seed=1):
        full = run(family_engine, prompt, strategy="full")
        free = run(family_engine, prompt, strategy="free", exit_layer=2, threshold=1.01)
        assert free.tokens == full.tokens
        assert free.stats["exited_share"] == 0.0 and free.stats["mean_layers"] == family_engine.num_layers


def test_stats_carry_counts_and_the_shares_derived_from_them(family_engine):
    out = run(family_engine, prompts(1, seed=3)[0], strategy="free", exit_layer=2, threshold=0.5)
    s = out.stats
    assert s["new_tokens"] == len(out.tokens) and 0 <= s["exited_tokens"] <= s["new_tokens"]
    assert s["exited_share"] == s["exited_tokens"] / s["new_tokens"] and s["mean_layers"] == s["layers_run"] / s["new_tokens"]
    assert s["head_macs_per_token"] == s["head_macs"] / s["new_tokens"]


def test_free_with_zero_threshold_is_the_shallow_model(family_engine):
    for prompt in prompts(3, seed=2):
        static = run(family_engine, prompt, strategy="static", exit_layer=2)
        free = run(family_engine, prompt, strategy="free", exit_layer=2, threshold=0.0)
        assert free.tokens == static.tokens
        assert free.stats["deep_passes"] == 0 and free.stats["exited_share"] == 1.0


def test_static_is_the_truncated_model():
    """`static` at layer k equals transformers' greedy decoding of the same model cut to k layers."""
    model = make_model("llama", deep_scale=0.3)
    cut = copy.deepcopy(model)
    del cut.model.layers[3:]
    cut.config.num_hidden_layers = 3
    engine = Engine(model)
    for prompt in prompts(3):
        assert run(engine, prompt, strategy="static", exit_layer=3).tokens == hf_greedy(cut, prompt, N)


@pytest.mark.parametrize("family", ["llama", "gemma3", "t5"])
def test_deep_cache_after_parallel_pass_equals_sequential(family):
    """The deep layers' keys and values for stacked positions, computed in one synchronized pass,
    equal those of feeding the same tokens one at a time through all layers."""
    model = make_model(family, deep_scale=0.2)
    engine = Engine(model)
    cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=0.4, sync_at_end=True, max_new_tokens=30)
    checked = 0
    for prompt in prompts(4, seed=3):
        state = engine.start(prompt, cfg)
        for _ in engine.stream(state, cfg):
            pass
        assert state.deep_passes < len(state.generated), "nothing was stacked; the test would prove nothing"
        reference = _sequential_cache(engine, state)
        cache = engine.adapter.self_cache(state.cache)
        for i in range(engine.num_layers):
            n = cache.get_seq_length(i)
            assert n == state.fed
            torch.testing.assert_close(cache.layers[i].keys, reference.layers[i].keys[:, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.layers[i].values, reference.layers[i].values[:, :, :n], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked


def _sequential_cache(engine, state):
    """The full model's cache after feeding the decoder's tokens one at a time."""
    adapter, cache = engine.adapter, engine.adapter.new_cache()
    with torch.inference_mode():
        for pos, token in enumerate(state.tokens[: state.fed]):
            hidden = adapter.embed(torch.tensor([[token]]))
            ctx = adapter.layer_context(hidden, pos, cache, 0, state.request)
            for i in range(engine.num_layers):
                hidden = adapter.run_layer(i, hidden, ctx, cache)
    return adapter.self_cache(cache)


class RewindLog:
    """Records where lossless mode rejects a stack: the rejected token's place in the stack and
    whether the discarded tokens held an early-exited stop token."""

    def __init__(self, monkeypatch):
        self.places, self.rejected_stop = set(), 0
        original = free_strategy.rewind

        def spy(engine, state, p, token):
            stack = state.tokens[state.final :]  # not yet verified: the stack under check
            place = p + 1 - state.final
            self.places.add("first" if place == 0 else "last" if place == len(stack) - 1 else "middle")
            self.rejected_stop += any(t in state.stop_ids for t in stack[place:])
            original(engine, state, p, token)

        monkeypatch.setattr(free_strategy, "rewind", spy)


@pytest.mark.parametrize("deep_scale", [0.2, 0.5])
def test_lossless_equals_full(monkeypatch, deep_scale):
    """Over many prompts, thresholds and stack limits, lossless output equals `full` token for
    token, rejections at every place in a stack included, and stop tokens that exit early."""
    engine = Engine(make_model("llama", deep_scale=deep_scale, logit_scale=16.0))
    log = RewindLog(monkeypatch)
    early_stops = runs = 0
    for prompt in prompts(8, seed=4):
        full = run(engine, prompt, strategy="full", max_new_tokens=40)
        # A stop token the full model reaches midway, so that generations end on a stop token.
        stop = full.tokens[len(full.tokens) // 2]
        full_stopped = run(engine, prompt, strategy="full", max_new_tokens=40, stop_ids=(stop,))
        for threshold in (0.0, 0.3, 0.6, 0.9):
            for max_stack in (None, 3):
                for stop_ids, ref in ((None, full), ((stop,), full_stopped)):
                    out = run(
                        engine, prompt, strategy="free", exit_layer=2, threshold=threshold, lossless=True,
                        max_stack=max_stack, max_new_tokens=40, stop_ids=stop_ids,
                    )  # fmt: skip
                    assert out.tokens == ref.tokens, (threshold, max_stack, stop_ids)
                    runs += 1
                    early_stops += bool(stop_ids) and out.stats["stop_reason"] == "stop_token" and _last_exited(out)
    assert log.places == {"first", "middle", "last"}
    assert early_stops > 0 and log.rejected_stop > 0


def _last_exited(generation) -> bool:
    return generation.stats["exited_share"] > 0 and generation.stats["mean_layers"] < generation.stats["num_layers"]


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "mistral", "t5"])
def test_lossless_equals_full_other_families(family):
    engine = Engine(make_model(family, deep_scale=0.3))
    exited = 0
    for prompt in prompts(4, seed=5):
        full = run(engine, prompt, strategy="full")
        for threshold in (0.1, 0.5, 0.9):
            out = run(engine, prompt, strategy="free", exit_layer=2, threshold=threshold, lossless=True)
            assert out.tokens == full.tokens
            exited += out.stats["exited_share"] > 0
    assert exited


def test_pairs_match_an_independent_forward():
    """Every generated token's shallow prediction is checked once: the pair holds the shallow
    softmax confidence at its position and whether the shallow argmax equals the full model's."""
    model = make_model("llama", deep_scale=0.2)
    engine = Engine(model)
    L_s = 2
    cfg = DecodeConfig(strategy="free", exit_layer=L_s, threshold=0.5, sync_at_end=True, max_new_tokens=30)
    for prompt in prompts(3, seed=6):
        state = engine.start(prompt, cfg)
        for _ in engine.stream(state, cfg):
            pass
        assert len(state.pairs) == len(state.generated)
        with torch.no_grad():
            out = model(torch.tensor([state.tokens]), output_hidden_states=True)
            shallow = model.lm_head(model.model.norm(out.hidden_states[L_s]))[0].softmax(-1)
            full = out.logits[0].argmax(-1)
        for k, (conf, agreed) in enumerate(state.pairs):
            p = state.prompt_len - 1 + k
            assert conf == pytest.approx(shallow[p].max().item(), abs=1e-5)
            assert agreed == bool(shallow[p].argmax() == full[p])


def test_lossy_free_stack_is_dropped_or_synced():
    engine = Engine(make_model("llama", deep_scale=0.2))
    prompt = prompts(1, seed=7)[0]
    for sync in (False, True):
        cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=0.0, sync_at_end=sync, max_new_tokens=10)
        state = engine.start(prompt, cfg)
        for _ in engine.stream(state, cfg):
            pass
        cache = engine.adapter.self_cache(state.cache)
        lengths = {cache.get_seq_length(i) for i in range(engine.num_layers)}
        # Every layer holds the same positions: all fed ones when synced, none when dropped.
        assert lengths == ({state.fed} if sync else {0})
        assert not state.pending


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "t5"])
def test_state_copying_matches_the_layers_own_projection(family):
    """CALM's copied keys and values equal what the layer's own attention module caches when run
    on the copied hidden state."""
    engine = Engine(make_model(family))
    adapter = engine.adapter
    request = adapter.prepare(prompts(1)[0])
    hidden = torch.randn(1, 1, adapter.hidden_size)
    ours = adapter.new_cache()
    ctx = adapter.layer_context(hidden, 0, ours, 3, request)
    with torch.inference_mode():
        adapter.project_kv(3, hidden, ctx, ours)
        theirs = adapter.new_cache()
        layer = adapter.layers[3]
        if family == "t5":
            block = layer.layer[0]
            block.SelfAttention(block.layer_norm(hidden), position_bias=ctx.position_bias, past_key_values=theirs)
        else:
            kind = adapter.layer_types[3]
            layer.self_attn(layer.input_layernorm(hidden), position_embeddings=ctx.rotary[kind], attention_mask=None, past_key_values=theirs)
    a, b = adapter.self_cache(ours).layers[3], adapter.self_cache(theirs).layers[3]
    torch.testing.assert_close(a.keys, b.keys)
    torch.testing.assert_close(a.values, b.values)


def test_calm_exits_and_copies_state():
    engine = Engine(make_model("llama", deep_scale=0.3))
    L = engine.num_layers
    for prompt in prompts(3, seed=8):
        assert run(engine, prompt, strategy="calm", threshold=1.01).tokens == run(engine, prompt, strategy="full").tokens
        cfg = DecodeConfig(strategy="calm", threshold=0.0, min_exit_layer=3, max_new_tokens=N)
        state = engine.start(prompt, cfg)
        for _ in engine.stream(state, cfg):
            pass
        assert state.depths == [L] + [3] * (N - 1)  # the first token comes with the prompt's full pass
        cache = engine.adapter.self_cache(state.cache)
        assert {cache.get_seq_length(i) for i in range(L)} == {state.fed}


def test_calm_decaying_threshold():
    cfg = DecodeConfig(strategy="calm", threshold=0.8, decay_tau=4.0, max_new_tokens=100)
    assert calm_strategy.threshold_at(cfg, 0) == pytest.approx(0.9 * 0.8 + 0.1)
    assert calm_strategy.threshold_at(cfg, 50) == pytest.approx(0.72 + 0.1 * math.exp(-2.0))
    assert calm_strategy.threshold_at(DecodeConfig(threshold=0.8), 50) == 0.8


def test_stop_token_ends_generation():
    engine = Engine(make_model("llama"))
    prompt = prompts(1)[0]
    full = run(engine, prompt, strategy="full", max_new_tokens=30)
    stop = full.tokens[5]
    first = full.tokens.index(stop)
    out = run(engine, prompt, strategy="full", max_new_tokens=30, stop_ids=(stop,))
    assert out.tokens == full.tokens[: first + 1] and out.stats["stop_reason"] == "stop_token"
    assert engine.stop_ids == {EOS}


def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama.*t5"):
        Engine(model)
