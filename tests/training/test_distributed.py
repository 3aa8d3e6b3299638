"""`free train` under torchrun: two gloo processes at a global batch reach the losses and weights one
process reaches at that batch, a run whose process was killed resumes (with another number of
processes too) and ends where an unbroken run ends, and self targets generated in batches equal
those generated one at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from free_cli import Engine
from free_cli.training.distributed import World
from free_cli.training.trainset import Example, self_targets

from conftest import make_model, prompts, tiny_tokenizer, words


def data(write_jsonl, n: int = 36) -> str:
    rows = [{"id": i, "prompt": words(4 + i % 5, seed=i), "response": words(3 + i % 4, seed=1000 + i)} for i in range(n)]
    return write_jsonl("train.jsonl", rows)


def train(args, processes: int = 1, **kw) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "free_cli", "train", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "free_cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def losses(out) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


METHODS = {
    "exit-only": (["--method", "exit-only", "--prompt-positions", "3"], "exit.safetensors"),
    "shallow-deep": (["--method", "shallow-deep", "--kd", "dyna", "--alpha", "0.5", "--lora-rank", "4"], "adapter_model.safetensors"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_gloo_processes_train_what_one_process_trains(method, model_dir, write_jsonl, tmp_path):
    """Global batch 6 split by chunk ownership between two processes (one micro-batch may give a
    process fewer examples, or none): the same loss at every step and the same weights, to float
    rounding (gloo sums gradients in another order)."""
    extra, weights_file = METHODS[method]
    common = [data(write_jsonl), "--model", model_dir, "--exit-layer", "2", "--steps", "6", "--batch-size", "6", "--grad-accum", "2",
              "--eval-every", "3", "--save-every", "3", "--device", "cpu", "--dtype", "fp32", "--lr", "1e-2", "-q", *extra]  # fmt: skip
    one = train([*common, "-o", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = train([*common, "-o", tmp_path / "two"], processes=2)
    assert two.returncode == 0, two.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = weights(tmp_path / "one" / weights_file), weights(tmp_path / "two" / weights_file)
    # Summation order (gloo's, and the threads') rounds gradients differently; Adam divides a gradient
    # by its running scale, which turns a rounding of a near-zero gradient into a visible step. Weights
    # agree to 1% of each tensor's scale (measured: 0.13% at most); a step of lr = 1e-2 taken wrongly
    # would move a weight by about 30% of it.
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-2 * float(a[k].abs().max())), (k, float((a[k] - b[k]).abs().max()))
    config = json.loads((tmp_path / "two" / "free_exit.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert config["world_size"] == 2 and all(row["world_size"] == 2 for row in log) and "world_size" not in json.loads((tmp_path / "one" / "free_exit.json").read_text())
    assert [row["step"] for row in log if "eval_agreement" in row] == [3, 6]  # rank 0 alone evaluates and logs


def test_a_killed_run_resumes_with_another_number_of_processes(model_dir, write_jsonl, tmp_path):
    """Two processes killed after a checkpoint; resumed by one process, the run ends with the
    weights an unbroken one-process run ends with."""
    common = [data(write_jsonl), "--model", model_dir, "--exit-layer", "2", "--steps", "300", "--batch-size", "4", "--eval-every", "300",
              "--save-every", "4", "--device", "cpu", "--dtype", "fp32", "-q"]  # fmt: skip
    whole = train([*common, "-o", tmp_path / "whole"])
    assert whole.returncode == 0, whole.stderr
    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "free_cli", "train", *map(str, common), "-o", str(broken)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log, deadline = broken / "train_log.jsonl", time.time() + 180
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 10):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes
    proc.wait()
    assert (broken / "checkpoint" / "state.pt").exists() and not (broken / "exit.safetensors").exists()
    resumed = train([*common, "-o", broken, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "whole" / "exit.safetensors"), weights(broken / "exit.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max())) for k in a)  # Adam magnifies rounding where gradients are near 0


def test_self_targets_in_batches_equal_one_at_a_time(tmp_path):
    """fp32: continuous batching decodes each prompt to the tokens it decodes to alone; a second
    call reads the cache; a process that owns some examples generates only those."""
    engine = Engine(make_model("llama", deep_scale=0.3), tiny_tokenizer())
    examples = [Example(p[: 3 + i % 6], []) for i, p in enumerate(prompts(10, length=10, seed=5))]
    alone = self_targets(engine, examples, 12, tmp_path / "alone.jsonl", batch_size=1)
    batched = self_targets(engine, examples, 12, tmp_path / "batched.jsonl", batch_size=4)
    assert [e.target for e in batched] == [e.target for e in alone] and all(e.target for e in alone)
    again = self_targets(engine, examples, 12, tmp_path / "batched.jsonl", batch_size=4, owned=lambda i: False)
    assert [e.target for e in again] == [e.target for e in alone]
    world = World(rank=1, size=2, chunk=3)
    mine = self_targets(engine, examples, 12, tmp_path / "part.jsonl", owned=world.owns)
    assert {tuple(e.prompt) for e in mine} == {tuple(examples[i].prompt) for i in range(10) if (i // 3) % 2 == 1}


def test_each_process_generates_its_share_of_the_held_out_targets_and_reads_the_others(tmp_path, monkeypatch):
    """Self targets for training or held-out records under two processes: each writes only the
    examples it owns into its own part of the cache and, once every part is written (the barrier),
    reads the others' parts, ending with what one process generates alone."""
    from free_cli.training.config import TrainData
    from free_cli.training.train import _own_outputs

    engine = Engine(make_model("llama", deep_scale=0.3), tiny_tokenizer())
    engine.stop_ids = ()  # whole generations
    examples = [Example(p[: 3 + i % 4], []) for i, p in enumerate(prompts(7, length=8, seed=9))]
    data = TrainData(("unused",), self_max_new_tokens=5)
    (tmp_path / "alone").mkdir(), (tmp_path / "two").mkdir()
    alone = _own_outputs(engine, examples, data, tmp_path / "alone" / "eval_targets.jsonl", world=World())
    monkeypatch.setattr(World, "barrier", lambda self: None)  # the ranks run one after the other here
    cache = tmp_path / "two" / "eval_targets.jsonl"
    _own_outputs(engine, examples, data, cache, world=World(rank=1, size=2, chunk=2))
    rank0 = _own_outputs(engine, examples, data, cache, world=World(rank=0, size=2, chunk=2))
    assert [e.target for e in rank0] == [e.target for e in alone] and all(len(e.target) == 5 for e in alone)
    lines = {r: len((tmp_path / "two" / f"eval_targets.part-{r}-of-2.jsonl").read_text().splitlines()) for r in (0, 1)}
    assert lines == {0: 4, 1: 3} and not cache.exists()  # rank 0 owns examples {0, 1} and {4, 5}, rank 1 {2, 3} and {6}
