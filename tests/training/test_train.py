"""`free train`: methods on tiny models, the dynamic layer mapping, a frozen backbone, exact resume,
and trained exits in decoding."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from free_cli import DecodeConfig, Engine
from free_cli.errors import ConfigError, InputError
from free_cli.decoding.exits import ExitModule
from free_cli.training.losses import distillation_loss, layer_mapping, monotone_alignment
from free_cli.training.config import TrainConfig, save_dtype
from free_cli.training.train import Trainer, batch_indices
from free_cli.training.trainset import Example, collate, data_label

from conftest import DECODER, VOCAB, make_model, prompts, tiny_tokenizer, words


def chain(n: int, seed: int) -> list[Example]:
    """A synthetic task: after a random prompt, the target continues a fixed bigram chain."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(4, VOCAB, (8,), generator=g).tolist()
        target, x = [], prompt[-1]
        for _ in range(8):
            x = (x * 5 + 3) % (VOCAB - 4) + 4
            target.append(x)
        out.append(Example(prompt, target + [3]))
    return out


def no_generation(engine, rows, batch_size):
    """Stands in for batched decoding where everything must come from a cache."""
    assert not list(rows), "generated again"
    return iter(())


def trainer(method: str, tmp_path, steps: int = 200, seed: int = 0, examples: list[Example] | None = None, **kw) -> Trainer:
    engine = Engine(make_model("llama", deep_scale=0.5, logit_scale=4.0), tiny_tokenizer())
    cfg = TrainConfig(method=method, exit_layer=2, steps=steps, lr=3e-3, batch_size=8, eval_every=steps, seed=seed, **kw)
    return Trainer(engine, cfg.check(engine.num_layers), chain(160, 1) if examples is None else examples, chain(24, 2), tmp_path)


@pytest.mark.parametrize("method", ["exit-only", "shallow-deep", "calm"])
def test_training_raises_the_shallow_exits_agreement(method, tmp_path):
    t = trainer(method, tmp_path, steps=150)
    before = t.evaluate()["eval_agreement"]
    after = t.run()[-1]["eval_agreement"]
    assert after >= before + 0.15, (before, after)


def test_meta_classifier_learns(tmp_path):
    t = trainer("meta", tmp_path, steps=150)
    before = t.evaluate()
    after = t.run()[-1]
    assert after["eval_loss"] < before["eval_loss"] - 0.05 and after["eval_agreement"] >= 0.6


def test_exit_only_leaves_the_deep_model_bit_for_bit(tmp_path):
    t = trainer("exit-only", tmp_path, steps=30)
    before = {k: v.clone() for k, v in t.engine.model.state_dict().items()}
    t.run()
    after = t.engine.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trained = t.method.module.layers[0].mlp.down_proj.weight
    assert not torch.equal(trained, t.engine.model.model.layers[2].mlp.down_proj.weight)  # the exit did train


@pytest.mark.parametrize(("init", "exit_layers", "first"), [("next", 1, 2), ("last", 1, 5), ("last", 2, 4), ("1", 2, 1)])
def test_exit_layers_start_as_copies_of_the_chosen_model_layers(init, exit_layers, first, tmp_path):
    t = trainer("exit-only", tmp_path, steps=1, exit_layers=exit_layers, init_from=init)
    assert t.cfg.init_from == str(first)
    for j, layer in enumerate(t.method.module.layers):
        source = t.engine.model.model.layers[first + j].state_dict()
        assert all(torch.equal(v, source[k]) for k, v in layer.state_dict().items())
    t.run()
    t.export({"method": "exit-only"})
    loaded = ExitModule.load(tmp_path, t.engine.adapter, torch.float32, "cpu")
    assert loaded.describe() == {"exit_layer": 2, "exit_layers": exit_layers, "init_from": first}


def test_exit_saved_in_bf16_is_the_trained_exit_rounded(tmp_path):
    t = trainer("exit-only", tmp_path, steps=5)
    t.run()
    t.export({"method": "exit-only"}, torch.bfloat16)
    saved, trained = load_file(str(tmp_path / "exit.safetensors")), t.method.module.state_dict()
    assert saved.keys() == trained.keys() and all(v.dtype == torch.bfloat16 and torch.equal(v, trained[k].to(torch.bfloat16)) for k, v in saved.items())
    loaded = ExitModule.load(tmp_path, t.engine.adapter, torch.float32, "cpu").state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in saved.items())


def test_an_unknown_save_precision_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from free_cli.cli import app

    with pytest.raises(ConfigError):
        save_dtype("fp16")
    result = CliRunner().invoke(app, ["train", "nowhere.jsonl", "-o", str(tmp_path / "out"), "--save-dtype", "fp16"])
    assert result.exit_code == 1 and "fp32 or bf16, got 'fp16'" in result.stderr and not (tmp_path / "out").exists()


def test_model_saved_in_bf16_keeps_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**DECODER, "tie_word_embeddings": True}))
    engine = Engine(model, tiny_tokenizer())
    cfg = TrainConfig(method="shallow-deep", exit_layer=2, steps=3, batch_size=8, eval_every=3).check(engine.num_layers)
    t = Trainer(engine, cfg, chain(16, 1), chain(4, 2), tmp_path)
    t.run()
    t.export({"method": "shallow-deep"}, torch.bfloat16)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in saved and all(v.dtype == torch.bfloat16 for v in saved.values())  # one copy of the tie
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k].to(torch.bfloat16).float()) for k, v in reloaded.state_dict().items())


def test_prompt_positions_add_the_deep_models_predictions_on_prompts(tmp_path):
    """Training examples learn at up to N seeded prompt positions besides their targets, with the
    deep model's top-k there; held-out ones are scored on targets only; draws repeat exactly."""
    t = trainer("exit-only", tmp_path / "a", steps=1, prompt_positions=3)
    t.prepare()
    model = t.engine.model
    for i, example in enumerate(t.train_set[:5]):
        _, positions, ids, _ = t.method._features[("train", i)]
        P = len(example.prompt)
        prompt_part, target_part = positions[:-len(example.target)].tolist(), positions[-len(example.target):].tolist()
        assert len(prompt_part) == 3 and len(set(prompt_part)) == 3 and all(0 <= p < P - 1 for p in prompt_part)
        assert target_part == list(range(P - 1, P - 1 + len(example.target)))
        with torch.no_grad():
            deep = model(torch.tensor([example.prompt + example.target])).logits[0].argmax(-1)
        assert ids[:, 0].tolist() == deep[positions].tolist()
    for i, example in enumerate(t.held):
        assert len(t.method._features[("held", i)][1]) == len(example.target)
    again = trainer("exit-only", tmp_path / "b", steps=1, prompt_positions=3)
    again.prepare()
    assert all(torch.equal(t.method._features[k][1], again.method._features[k][1]) for k in t.method._features)
    assert t.run()[-1]["loss"] > 0


@pytest.mark.parametrize("init", ["deepest", "4"])
def test_exit_layers_that_do_not_exist_are_refused(init):
    with pytest.raises(ConfigError, match="init"):
        TrainConfig(method="exit-only", exit_layer=2, init_from=init).check(4)


@pytest.mark.parametrize("method", ["exit-only", "shallow-deep"])
def test_resume_reaches_the_same_weights(method, tmp_path):
    whole = trainer(method, tmp_path / "whole", steps=40, save_every=10)
    whole.run()
    broken = trainer(method, tmp_path / "broken", steps=40, save_every=10)
    broken.run(stop_after=23)  # the last checkpoint is step 20; steps 21-23 are lost
    resumed = trainer(method, tmp_path / "broken", steps=40, save_every=10)
    resumed.run(resume=True)
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "broken" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))  # the log holds every step once
    seconds = [r["seconds"] for r in rows]  # wall time across the resume, the broken run's counted
    assert seconds == sorted(seconds) and seconds[20] >= seconds[19] > 0


def test_exit_features_are_kept_on_disk_and_read_back_only_for_the_same_setting(tmp_path, monkeypatch):
    """A resumed exit-only run reads the frozen model's features from the checkpoint folder instead
    of running the model, and trains to the same weights; another top-k, other weights or a
    damaged file are computed again, never read."""
    from free_cli.training import methods

    whole = trainer("exit-only", tmp_path / "whole", steps=20, save_every=10, prompt_positions=3)
    whole.run()
    broken = trainer("exit-only", tmp_path / "broken", steps=20, save_every=10, prompt_positions=3)
    broken.run(stop_after=13)
    folder = tmp_path / "broken" / "checkpoint" / "features"
    assert len(list(folder.glob("*.safetensors"))) == 160 // 8 + 24 // 8  # one file per chunk, held-out ones too

    def no_model(*a, **k):
        raise AssertionError("the model ran")

    with monkeypatch.context() as m:
        m.setattr(methods, "forward_states", no_model)
        resumed = trainer("exit-only", tmp_path / "broken", steps=20, save_every=10, prompt_positions=3)
        resumed.run(resume=True)
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(all(torch.equal(x, y) for x, y in zip(whole.method._features[k], resumed.method._features[k])) for k in whole.method._features)

    calls = []
    real = methods.forward_states
    monkeypatch.setattr(methods, "forward_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    other_k = trainer("exit-only", tmp_path / "broken", steps=1, prompt_positions=3, top_k=5)
    other_k.prepare()
    assert len(calls) == 23 and other_k.method._features[("train", 0)].ids.shape[1] == 5
    calls.clear()
    damaged = folder / "train-0000008.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    again = trainer("exit-only", tmp_path / "broken", steps=1, prompt_positions=3, top_k=5)
    again.prepare()
    assert len(calls) == 1  # the damaged chunk alone
    assert all(all(torch.equal(x, y) for x, y in zip(other_k.method._features[k], again.method._features[k])) for k in again.method._features)
    calls.clear()
    retrained = trainer("exit-only", tmp_path / "broken", steps=1, prompt_positions=3, top_k=5)
    with torch.no_grad():
        next(retrained.engine.model.parameters()).add_(1e-3)
    retrained.prepare()
    assert len(calls) == 23


def test_a_larger_run_reads_an_earlier_runs_features_for_the_examples_it_begins_with(tmp_path, monkeypatch):
    """More records appended after an earlier run's (docs/runs/default_exit.sh's MORE and
    SEED_FROM): with that run's feature files linked in, only the new examples' chunks run the
    model, and the features equal those of a run that computed all of them."""
    import shutil

    from free_cli.training import methods

    def run(examples, out):
        t = trainer("exit-only", out, steps=1, prompt_positions=3, examples=examples)
        t.prepare()
        return t

    first, more = chain(160, 1), chain(40, 3)
    run(first, tmp_path / "first")
    shutil.copytree(tmp_path / "first" / "checkpoint" / "features", tmp_path / "larger" / "checkpoint" / "features", copy_function=os.link)
    calls = []
    real = methods.forward_states
    monkeypatch.setattr(methods, "forward_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    larger = run(first + more, tmp_path / "larger")
    assert len(calls) == 40 // 8  # the new chunks alone; the held-out ones were read too
    calls.clear()
    scratch = run(first + more, tmp_path / "scratch")
    assert len(calls) == 200 // 8 + 24 // 8
    assert larger.method._features.keys() == scratch.method._features.keys()
    assert all(all(torch.equal(x, y) for x, y in zip(larger.method._features[k], scratch.method._features[k])) for k in scratch.method._features)


def test_a_resumed_run_may_change_its_length_but_not_its_method_or_examples(tmp_path):
    broken = trainer("shallow-deep", tmp_path, steps=40, save_every=10)
    broken.run(stop_after=20)
    longer = trainer("shallow-deep", tmp_path, steps=30, save_every=10)
    log = longer.run(resume=True)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the new schedule's end
    with pytest.raises(ConfigError, match="other training options"):
        trainer("shallow-deep", tmp_path, steps=30, kd="last").run(resume=True)
    other = trainer("shallow-deep", tmp_path, steps=30, save_every=10)
    other.held = other.held[:-1]  # other held-out records: another --eval-data, --limit or target kind
    with pytest.raises(ConfigError, match="other training or held-out examples"):
        other.run(resume=True)


# ---------------------------------------------------------------- the dynamic layer mapping


@pytest.mark.parametrize("L, L_s", [(6, 2), (12, 4), (24, 6), (30, 8), (7, 3)])
def test_dynamic_mapping_picks_the_closest_monotone_layers(L, L_s):
    """Hand-built states: deep layer j is a noisy copy of a chosen shallow layer; the mapping
    recovers the choice, for depths no table lists."""
    g = torch.Generator().manual_seed(L)
    shallow = [torch.randn(16, 8, generator=g) * 3 for _ in range(L_s)]
    chosen = sorted(torch.randint(1, L_s + 1, (L - L_s,), generator=g).tolist())
    states = [torch.randn(16, 8, generator=g)] + shallow
    states += [shallow[i - 1] + 0.01 * torch.randn(16, 8, generator=g) for i in chosen]
    costs = torch.stack([torch.stack([(states[i] - states[j]).pow(2).mean() for i in range(1, L_s + 1)]) for j in range(L_s + 1, L + 1)])
    assert layer_mapping("dyna", L_s, L, costs) == list(zip(range(L_s + 1, L + 1), chosen))
    assert distillation_loss(states, L_s, "dyna") < 1e-3


def test_monotone_alignment_is_optimal():
    g = torch.Generator().manual_seed(0)
    for n, m in [(3, 3), (5, 2), (4, 4), (6, 3)]:
        costs = torch.rand(n, m, generator=g)
        best = min(
            (p for p in itertools.product(range(m), repeat=n) if list(p) == sorted(p)),
            key=lambda p: sum(costs[j, i] for j, i in enumerate(p)),
        )
        assert monotone_alignment(costs) == list(best)


def test_fixed_mappings():
    assert layer_mapping("last", 8, 30) == [(30, 8)]
    uniform = layer_mapping("uniform", 8, 30)
    assert uniform[0] == (9, 1) and uniform[-1] == (30, 8) and [i for _, i in uniform] == sorted(i for _, i in uniform)
    assert layer_mapping("uniform", 2, 3) == [(3, 2)]


# ---------------------------------------------------------------- data


def test_targets_only_carry_the_loss():
    batch = collate([Example([5, 6, 7], [8, 9, 3]), Example([5, 6], [10, 3])], pad=0, device="cpu")
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9, 3], [5, 6, 10, 3, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 8, 9, 3, -100], [-100, 10, 3, -100, -100, -100]]
    assert batch.attention.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_batch_order_depends_on_seed_and_step_only():
    assert batch_indices(7, 100, 8, 3) == batch_indices(7, 100, 8, 3)
    assert batch_indices(7, 100, 8, 3) != batch_indices(7, 100, 8, 4)
    epoch = [i for k in range(12) for i in batch_indices(k, 100, 8, 0)]
    assert sorted(epoch) == sorted(set(epoch)) and len(epoch) == 96  # no example twice in an epoch


# ---------------------------------------------------------------- trained exits in decoding


def test_lossless_with_a_trained_exit_equals_full(tmp_path):
    t = trainer("exit-only", tmp_path, steps=60)
    t.run()
    engine = Engine(t.engine.model, exit_modules={2: t.method.module.eval()})
    for prompt in prompts(6, seed=9):
        full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=20))
        for threshold in (0.0, 0.3, 0.7):
            out = engine.generate(prompt, DecodeConfig(strategy="free", exit_layer=2, threshold=threshold, lossless=True, max_new_tokens=20))
            assert out.tokens == full.tokens
    assert engine.generate(prompts(1)[0], DecodeConfig(strategy="free", exit_layer=2, threshold=0.0, max_new_tokens=20)).stats["mean_layers"] == 3


def test_static_with_a_trained_exit_is_layers_then_exit(tmp_path):
    """`static` through a trained exit equals running layers [0, L_s), the exit's layer and its
    norm over the whole sequence at once, then the LM head."""
    t = trainer("exit-only", tmp_path, steps=20)
    t.run()
    module = t.method.module.eval()
    engine = Engine(t.engine.model, exit_modules={2: module})
    model = engine.model
    prompt = prompts(1, seed=10)[0]
    tokens = engine.generate(prompt, DecodeConfig(strategy="static", exit_layer=2, max_new_tokens=12)).tokens
    with torch.no_grad():
        seq = torch.tensor([prompt + tokens[:-1]])
        hidden = model(seq, output_hidden_states=True).hidden_states[2]
        ctx = engine.adapter.layer_context(hidden, 0, None, 0, None)
        logits = engine.adapter.head(module(engine.adapter, hidden, ctx, None))
    assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == tokens


# ---------------------------------------------------------------- the command


def test_train_command_kill_and_resume(model_dir, write_jsonl, tmp_path):
    """`free train` killed after a checkpoint and resumed writes the same exit as an unbroken run,
    and `free generate --model DIR` decodes with it."""
    rows = [{"id": i, "prompt": words(6, seed=i), "response": words(5, seed=1000 + i)} for i in range(40)]
    data = write_jsonl("train.jsonl", rows)
    cmd = [sys.executable, "-m", "free_cli", "train", data, "--model", model_dir, "--exit-layer", "2",
           "--steps", "400", "--save-every", "5", "--eval-every", "200", "--batch-size", "4", "--device", "cpu", "-q"]  # fmt: skip
    whole = subprocess.run([*cmd[:-1], "-o", str(tmp_path / "whole")], check=True, capture_output=True, text=True)
    lines = [line for line in whole.stderr.splitlines() if line.startswith("free train: step ")]
    assert [line.split(" · ")[0] for line in lines] == ["free train: step 200/400", "free train: step 400/400"]  # no bar off a terminal
    proc = subprocess.Popen([*cmd, "-o", str(tmp_path / "broken")])
    log = tmp_path / "broken" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 12):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "broken" / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "broken" / "exit.safetensors").exists()  # it died before the end (388 steps to spare on a busy machine)
    subprocess.run([*cmd, "-o", str(tmp_path / "broken"), "--resume"], check=True)
    a, b = load_file(str(tmp_path / "whole" / "exit.safetensors")), load_file(str(tmp_path / "broken" / "exit.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    config = json.loads((tmp_path / "whole" / "free_exit.json").read_text())
    assert (config["method"], config["exit_layer"], config["data"], config["base_model"]) == ("exit-only", 2, f"{tmp_path.name}/train", model_dir)
    prompts_file = write_jsonl("in.jsonl", [{"id": 0, "prompt": words(6)}])
    out = subprocess.run([sys.executable, "-m", "free_cli", "generate", prompts_file, "--model", str(tmp_path / "whole"),
                          "--lossless", "-t", "0", "--dtype", "fp32", "--device", "cpu", "-n", "8"], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "trained exit at 2" in out.stderr and json.loads(out.stdout)["stats"]["exit_layer"] == 2


def test_thresholds_are_stored_per_trained_exit(model_dir, tmp_path):
    """A threshold fitted through a trained exit is stored under that exit's digest, so neither
    the model's untrained head at the same depth nor another exit picks it up."""
    from free_cli.decoding.loading import load_engine

    bare = load_engine(model_dir, dtype="fp32", device="cpu")
    assert bare.store_name(2) == bare.name
    names = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = ExitModule(bare.adapter, 2)
        module.norm.weight.data.uniform_()
        module.save(tmp_path / f"exit{seed}", method="exit-only", base_model=model_dir)
        engine = load_engine(str(tmp_path / f"exit{seed}"), dtype="fp32", device="cpu")
        assert engine.store_name(3) == engine.name  # no trained exit at depth 3
        names.append(engine.store_name(2))
    digests = [n.split(" + exit ")[1] for n in names]
    assert len(digests[0]) == 12 and digests[0] != digests[1]  # different weights, different keys


def test_training_data_is_named_by_file_and_by_folder_for_split_names():
    sources = ["../shared/data/samsum/train.jsonl", "squad/validation.jsonl", "corpus.jsonl", "train.jsonl", "hf:samsum:train"]
    assert [data_label(s) for s in sources] == ["samsum/train", "squad/validation", "corpus", "train", "hf:samsum:train"]


def test_self_targets_are_the_models_greedy_outputs_and_cached_by_prompt(tmp_path, monkeypatch):
    from free_cli.training import trainset
    from free_cli.training.trainset import self_targets

    engine = Engine(make_model("llama", deep_scale=0.5), tiny_tokenizer())
    engine.stop_ids = (3,)
    examples = [Example(p[: 4 + i], []) for i, p in enumerate(prompts(5, length=9, seed=3))]  # left padding
    cache = tmp_path / "targets.jsonl"
    got = self_targets(engine, examples, 6, cache, batch_size=3)
    cfg = DecodeConfig(strategy="full", max_new_tokens=6, stop_ids=(3,))
    assert [e.target for e in got] == [engine.generate(e.prompt, cfg).tokens for e in examples]
    # A second run over other records in another order reuses the cache by prompt, not by index.
    monkeypatch.setattr(trainset, "generate_rows", no_generation)  # generating again would fail
    again = self_targets(engine, examples[::-1][:3], 6, cache)
    assert [e.target for e in again] == [e.target for e in got[::-1][:3]]
    with open(cache, "a") as f:
        f.write('{"key": "torn')  # a kill mid-line is ignored
    assert [e.target for e in self_targets(engine, examples, 6, cache)] == [e.target for e in got]


def test_meta_classifier_directory_drives_the_meta_confidence(model_dir, write_jsonl, tmp_path):
    """`free train --method meta` writes a classifier beside a pointer to its frozen model;
    `free generate --model DIR --confidence meta` decodes with it, and `meta` without one is an error."""
    from typer.testing import CliRunner

    from free_cli.cli import app

    rows = [{"id": i, "prompt": words(6, seed=i), "response": words(5, seed=1000 + i)} for i in range(24)]
    data = write_jsonl("train.jsonl", rows)
    runner = CliRunner()
    out = tmp_path / "meta"
    result = runner.invoke(app, ["train", data, "--model", model_dir, "--method", "meta", "--steps", "10", "--batch-size", "4", "--device", "cpu", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "meta.safetensors").exists() and json.loads((out / "free_exit.json").read_text())["base_model"] == model_dir
    prompts_file = write_jsonl("in.jsonl", [{"id": i, "prompt": words(6, seed=50 + i)} for i in range(6)])
    common = ["--strategy", "calm", "--confidence", "meta", "--dtype", "fp32", "--device", "cpu", "-n", "6", "-t", "0"]
    result = runner.invoke(app, ["generate", prompts_file, "--model", str(out), *common])
    assert result.exit_code == 0, result.output
    stats = [json.loads(line)["stats"] for line in result.stdout.splitlines()]
    assert any(s["new_tokens"] > 1 and s["mean_layers"] < 6 for s in stats), stats
    result = runner.invoke(app, ["generate", prompts_file, "--model", model_dir, *common])
    assert result.exit_code == 1 and "needs a classifier" in result.stderr


# ---------------------------------------------------------------- cheap fine-tuning


def test_detached_prompt_gives_the_same_loss_and_target_gradients():
    """The split layout (prompt without gradients, then the target attending to its cache) gives
    the loss of the plain right-padded pass, and the same gradients for weights that only see
    target positions (the LM head over them)."""
    torch.manual_seed(0)
    engine = Engine(make_model("llama"), tiny_tokenizer())
    cfg = TrainConfig(method="shallow-deep", exit_layer=2, kd="dyna", alpha=0.5).check(engine.num_layers)
    from free_cli.training.methods import ShallowDeep

    method = ShallowDeep(engine, cfg)
    examples = chain(3, 5)
    examples[1] = Example(examples[1].prompt[:5], examples[1].target[:4] + [3])  # ragged prompts and targets
    results = []
    for detach in (False, True):
        batch = collate(examples, 0, "cpu", detach_prompt=detach)
        engine.model.zero_grad()
        loss = method.loss(batch, None)
        loss.backward()
        results.append((loss.detach(), engine.model.lm_head.weight.grad.clone(), int(batch.mask.sum())))
    (plain, g_plain, n_plain), (split, g_split, n_split) = results
    assert n_plain == n_split == sum(len(e.target) for e in examples)
    assert torch.allclose(plain, split, atol=1e-5) and torch.allclose(g_plain, g_split, atol=1e-5)


def test_split_layout_puts_each_prompt_before_one_column():
    batch = collate([Example([5, 6, 7], [8, 9, 3]), Example([5, 6], [10, 3])], pad=0, device="cpu", detach_prompt=True)
    assert batch.prefix == 2
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9, 3], [0, 5, 6, 10, 3, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 3]]
    assert batch.labels.tolist() == [[8, 9, 3, -100], [10, 3, -100, -100]]


@pytest.mark.parametrize("kw", [{"lora_rank": 4, "detach_prompt": True}, {"freeze_embeddings": True}])
def test_cheap_fine_tuning_raises_the_shallow_agreement(kw, tmp_path):
    t = trainer("shallow-deep", tmp_path, steps=150, **kw)
    embeddings = t.engine.model.get_input_embeddings().weight.clone()
    before = t.evaluate()["eval_agreement"]
    after = t.run()[-1]["eval_agreement"]
    assert after >= before + 0.15, (before, after)
    assert torch.equal(embeddings, t.engine.model.get_input_embeddings().weight)
    trained = {k for k, p in t.module.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in trained) if kw.get("lora_rank") else trained and not any("embed" in k for k in trained)


def test_adapters_saved_and_loaded_give_the_trained_models_logits(tmp_path, monkeypatch):
    """A LoRA checkpoint holds only the adapters (in bf16 here) and a pointer to its base; loading
    it merges them into the base and gives the logits of the trained model with the adapters
    rounded as saved, applied by hand."""
    import free_cli.decoding.loading as loading
    from peft import get_peft_model_state_dict

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    base = make_model("llama")
    base.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    engine = Engine(LlamaForCausalLM.from_pretrained(base_dir), tiny_tokenizer())
    cfg = TrainConfig(method="shallow-deep", exit_layer=2, steps=20, lr=1e-2, batch_size=8, eval_every=20, lora_rank=4).check(engine.num_layers)
    t = Trainer(engine, cfg, chain(32, 1), chain(4, 2), tmp_path / "out")
    t.run()
    t.export({"method": "shallow-deep", "base_model": str(base_dir)}, torch.bfloat16)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k and v.dtype == torch.bfloat16 for k, v in saved.items())
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # by hand: the trained adapters rounded to bf16, each delta B A scaled by alpha / r, added to the base
    by_hand = LlamaForCausalLM.from_pretrained(base_dir)
    trained = get_peft_model_state_dict(t.method.peft)
    scale = 8 / 4
    for name, module in by_hand.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in trained:
            A, B = (trained[key.replace("lora_A", x)].to(torch.bfloat16).float() for x in ("lora_A", "lora_B"))
            module.weight.data += scale * B @ A
    loaded = loading.load_engine(str(tmp_path / "out"), dtype="fp32", device="cpu")
    assert loaded.default_exit_layer == 2 and not loaded.exit_modules
    ids = torch.tensor([prompts(1, 3)[0]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, by_hand(ids).logits, atol=1e-5)
    assert not torch.allclose(loaded.model(ids).logits, base(ids).logits, atol=1e-3)  # the adapters did train



def test_a_tuned_model_with_its_own_exit_loads_as_shipped(tmp_path):
    """The layout of a shipped model: adapters over a base, and an exit trained on the tuned model
    in `exit/`. Loading it gives the merged model with that exit at L_s, its weights as saved."""
    import free_cli.decoding.loading as loading

    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    torch.manual_seed(0)
    make_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    engine = Engine(LlamaForCausalLM.from_pretrained(base_dir), tiny_tokenizer())
    cfg = TrainConfig(method="shallow-deep", exit_layer=2, steps=5, lr=1e-2, batch_size=8, eval_every=5, lora_rank=4).check(engine.num_layers)
    t = Trainer(engine, cfg, chain(16, 1), chain(4, 2), tuned_dir)
    t.run()
    t.export({"method": "shallow-deep", "base_model": str(base_dir)}, torch.bfloat16)
    tuned = loading.load_engine(str(tuned_dir), dtype="fp32", device="cpu")
    assert not tuned.exit_modules
    cfg = TrainConfig(method="exit-only", exit_layer=2, steps=5, batch_size=8, eval_every=5).check(tuned.num_layers)
    e = Trainer(tuned, cfg, chain(16, 1), chain(4, 2), tuned_dir / "exit")
    e.run()
    e.export({"method": "exit-only", "base_model": ".."}, torch.bfloat16)
    shipped = loading.load_engine(str(tuned_dir), dtype="fp32", device="cpu")
    assert shipped.default_exit_layer == 2 and set(shipped.exit_modules) == {2}
    saved = load_file(str(tuned_dir / "exit" / "exit.safetensors"))
    assert all(torch.equal(shipped.exit_modules[2].state_dict()[k], v.float()) for k, v in saved.items())
    fresh = loading.load_engine(str(tuned_dir), dtype="fp32", device="cpu").model.state_dict()
    assert all(torch.equal(v, tuned.model.state_dict()[k]) for k, v in fresh.items())
    out = shipped.generate(prompts(1, 4)[0], DecodeConfig(lossless=True, threshold=0.3, max_new_tokens=6))
    assert out.tokens == shipped.generate(prompts(1, 4)[0], DecodeConfig(strategy="full", max_new_tokens=6)).tokens


def test_an_exit_continues_from_a_trained_one(tmp_path):
    """--start-from: the new run's exit starts as the saved exit (its L_s, layers and weights),
    refuses another method or depth, and trains on from there."""
    first = trainer("exit-only", tmp_path / "first", steps=20, exit_layers=2, init_from="last")
    first.run()
    first.export({"method": "exit-only"})
    saved = {k: v.clone() for k, v in first.method.module.state_dict().items()}
    cfg = TrainConfig(method="exit-only", start_from=str(tmp_path / "first"), steps=5, lr=3e-3, batch_size=8).check(6)
    assert (cfg.exit_layer, cfg.exit_layers, cfg.init_from) == (2, 2, "4")
    engine = Engine(make_model("llama", deep_scale=0.5, logit_scale=4.0), tiny_tokenizer())
    second = Trainer(engine, cfg, chain(160, 1), chain(24, 2), tmp_path / "second")
    assert all(torch.equal(v, saved[k]) for k, v in second.method.module.state_dict().items())
    assert second.evaluate()["eval_agreement"] == pytest.approx(first.evaluate()["eval_agreement"])
    log = second.run()
    assert log[0]["step"] == 0 and log[0]["eval_agreement"] == pytest.approx(first.evaluate()["eval_agreement"])  # where it starts
    assert not all(torch.equal(v, saved[k]) for k, v in second.method.module.state_dict().items())
    with pytest.raises(ConfigError, match="not 3"):
        TrainConfig(method="exit-only", start_from=str(tmp_path / "first"), exit_layer=3).check(6)
    with pytest.raises(ConfigError, match="applies to --method exit-only"):
        TrainConfig(method="calm", start_from=str(tmp_path / "first")).check(6)


def test_bf16_self_targets_come_from_bf16_weights_and_are_cached_apart_from_fp32_ones(model_dir, write_jsonl, tmp_path, monkeypatch):
    """Under --dtype bf16 the model's own outputs are decoded by a bf16 copy of its weights (as
    decoding in bf16 runs it, not fp32 weights under autocast), and keyed by that precision: an
    fp32 run in the same folder generates its own. fp32 keys are those of older caches."""
    import hashlib

    from free_cli.decoding.loading import load_engine
    from free_cli.training import trainset
    from free_cli.training.config import TrainData
    from free_cli.training.train import training_examples
    from free_cli.training.trainset import _target_key

    engine = load_engine(model_dir, dtype="fp32", device="cpu")
    engine.stop_ids = ()  # whole generations: this random model would mostly stop at once
    train = write_jsonl("train.jsonl", [{"id": i, "prompt": words(5, seed=i), "response": "x"} for i in range(4)])
    data = TrainData((train,), targets="self", self_max_new_tokens=5, eval_fraction=0.25).check()
    seen, generate_rows = [], trainset.generate_rows

    def spy(decoder, rows, batch_size):
        seen.append(next(decoder.model.parameters()).dtype)
        return generate_rows(decoder, rows, batch_size)

    monkeypatch.setattr(trainset, "generate_rows", spy)
    greedy = DecodeConfig(strategy="full", max_new_tokens=5)
    bf16 = engine.converted(torch.bfloat16)
    assert bf16.stop_ids == engine.stop_ids  # a converted engine stops where its source does
    for dtype, decoder in (("bf16", bf16), ("fp32", engine)):
        cfg = TrainConfig(method="exit-only", exit_layer=2, steps=1, dtype=dtype).check(engine.num_layers)
        train_set, held, _ = training_examples(engine, data, cfg, tmp_path)
        assert seen.pop() == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        assert [e.target for e in train_set + held] == [decoder.generate(e.prompt, greedy).tokens for e in train_set + held]
        assert all(len(e.target) == 5 for e in train_set + held)
    assert len((tmp_path / "self_targets.jsonl").read_text().splitlines()) == 8  # four prompts, two precisions
    prompt = held[0].prompt
    assert _target_key(prompt, 5, engine.precision) == hashlib.sha1(json.dumps([5, prompt]).encode()).hexdigest()
    assert _target_key(prompt, 5, bf16.precision) != _target_key(prompt, 5, engine.precision)


def test_held_out_records_come_from_each_evaluation_file_with_targets_of_the_chosen_kind(model_dir, write_jsonl, tmp_path, monkeypatch):
    """--eval-data, repeated: the first --max-eval records of each file are held out (the training
    examples all train); they are scored on the model's own greedy outputs by default when the
    targets are self (generated once, cached in eval_targets.jsonl), or on their references."""
    from free_cli.decoding.loading import load_engine
    from free_cli.training import trainset
    from free_cli.training.config import TrainData
    from free_cli.training.train import training_examples

    engine = load_engine(model_dir, dtype="fp32", device="cpu")
    engine.stop_ids = ()  # whole generations: this random model would mostly stop at once
    rows = lambda n, seed: [{"id": i, "prompt": words(5, seed=seed + i), "response": words(4, seed=seed + 500 + i)} for i in range(n)]  # noqa: E731
    train, a, b = write_jsonl("train.jsonl", rows(6, 0)), write_jsonl("a.jsonl", rows(5, 100)), write_jsonl("b.jsonl", rows(5, 200))
    cfg = TrainConfig(method="exit-only", exit_layer=2, steps=1).check(engine.num_layers)
    held_prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)["input_ids"] for r in rows(3, 100) + rows(3, 200)]

    data = TrainData((train,), targets="self", self_max_new_tokens=5, eval_data=(a, b), max_eval=3).check()
    (tmp_path / "self").mkdir()
    examples, held, _ = training_examples(engine, data, cfg, tmp_path / "self")
    assert len(examples) == 6 and [e.prompt for e in held] == held_prompts
    greedy = DecodeConfig(strategy="full", max_new_tokens=5)
    assert [e.target for e in held] == [engine.generate(e.prompt, greedy).tokens for e in held]
    assert all(len(e.target) == 5 for e in held) and len({tuple(e.target) for e in held}) == 6
    assert len((tmp_path / "self" / "eval_targets.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "self" / "self_targets.jsonl").read_text().splitlines()) == 6  # the training prompts only
    monkeypatch.setattr(trainset, "generate_rows", no_generation)  # a second call reads both caches
    assert training_examples(engine, data, cfg, tmp_path / "self")[1] == held

    data = TrainData((train,), targets="self", self_max_new_tokens=5, eval_data=(a, b), eval_targets="reference", max_eval=3).check()
    _, held, _ = training_examples(engine, data, cfg, tmp_path / "self")
    eos = engine.tokenizer.eos_token_id
    assert [e.target for e in held] == [engine.tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [eos] for r in rows(3, 100) + rows(3, 200)]
    empty = write_jsonl("empty.jsonl", [])
    with pytest.raises(InputError, match="empty.jsonl: no evaluation examples"):
        training_examples(engine, TrainData((train,), eval_data=(a, empty)).check(), cfg, tmp_path / "self")
    with pytest.raises(ConfigError, match="--eval-targets"):
        TrainData((train,), eval_targets="self").check()  # a held-out share keeps its own targets
