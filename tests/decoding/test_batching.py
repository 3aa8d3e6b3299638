"""Batched decoding (`--batch-size`): rows of different lengths in one cache, continuous batching,
and the same tokens as decoding one request at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from free_cli import DecodeConfig, Engine
from free_cli.decoding.batching import generate_rows
from free_cli.decoding.cache import RaggedCache

from helpers import FP32, without_timing
from conftest import make_model, prompts, words
from helpers import invoke, lines



def ragged_prompts(n: int = 9) -> list[list[int]]:
    lengths = [3, 12, 5, 9, 1, 7, 11, 2, 8, 6, 4, 10][:n]
    return [p[:k] for p, k in zip(prompts(n, length=12, seed=3), lengths)]


CONFIGS = {
    "full": DecodeConfig(strategy="full", max_new_tokens=20),
    "static": DecodeConfig(strategy="static", exit_layer=2, max_new_tokens=20),
    "free": DecodeConfig(strategy="free", exit_layer=2, threshold=0.3, max_new_tokens=20),
    "free+sync": DecodeConfig(strategy="free", exit_layer=2, threshold=0.3, max_new_tokens=20, sync_at_end=True),
    "lossless": DecodeConfig(strategy="free", exit_layer=2, threshold=0.3, lossless=True, max_new_tokens=20),
    "lossless+stack": DecodeConfig(strategy="free", exit_layer=2, threshold=0.1, lossless=True, max_new_tokens=20, max_stack=3),
    "calm": DecodeConfig(strategy="calm", threshold=0.3, max_new_tokens=20),
    "calm+decay": DecodeConfig(strategy="calm", threshold=0.5, min_exit_layer=2, decay_tau=2.0, max_new_tokens=20),
    "lossless+context": DecodeConfig(strategy="free", exit_layer=2, threshold=0.3, lossless=True, max_new_tokens=20, prune="context", prune_k=8),
    # what batches used to refuse: measures that look back at earlier layers, per-layer pruning
    "calm+state+adaptive": DecodeConfig(strategy="calm", threshold=0.3, confidence="state", prune="adaptive", prune_k=16, prune_floor=4, max_new_tokens=20),
    "calm+jsd+decaying": DecodeConfig(strategy="calm", threshold=0.3, confidence="jsd", min_exit_layer=2, prune="decaying", prune_k=16, max_new_tokens=20),
    "free+contrastive": DecodeConfig(strategy="free", exit_layer=2, threshold=0.3, confidence="contrastive", max_new_tokens=20),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_equals_one_at_a_time(name, family):
    """fp32, prompts of 1-12 tokens, rows that stop early (a stop token the model reaches in some
    rows), more requests than rows so that finished rows are refilled: every request decodes to
    the tokens, stats and (confidence, agreed) pairs it gets alone."""
    engine = Engine(make_model(family, deep_scale=0.5, logit_scale=16.0))
    ps = ragged_prompts()
    alone = [engine.generate(p, CONFIGS[name]) for p in ps]
    stop = next(a.tokens[3] for a in alone if len(a.tokens) > 3)  # reached by some rows, not by others
    cfg = replace(CONFIGS[name], stop_ids=(stop,))
    alone = [engine.generate(p, cfg) for p in ps]
    assert len({len(a.tokens) for a in alone}) > 1  # rows of different lengths
    for batch_size in (2, 4):
        together = dict(generate_rows(engine, [(i, p, cfg) for i, p in enumerate(ps)], batch_size))
        for i, a in enumerate(alone):
            b = together[i]
            assert b.tokens == a.tokens, (batch_size, i)
            assert [x for x, _ in b.pairs] == pytest.approx([x for x, _ in a.pairs], abs=1e-5)
            assert [y for _, y in b.pairs] == [y for _, y in a.pairs]
            keys = ("new_tokens", "exited_share", "deep_passes", "rejected", "head_macs_per_token", "stop_reason")
            assert {k: b.stats[k] for k in keys} == {k: a.stats[k] for k in keys}


def test_finished_rows_are_refilled_in_input_order():
    """With 2 rows and 5 requests of different lengths, each request takes the first idle row,
    and every request is decoded exactly once."""
    engine = Engine(make_model("llama"))
    ps = ragged_prompts(5)
    lengths = [2, 9, 3, 5, 4]
    jobs = [(i, p, DecodeConfig(strategy="full", max_new_tokens=n)) for i, (p, n) in enumerate(zip(ps, lengths))]
    finished = [key for key, _ in generate_rows(engine, jobs, 2)]
    assert sorted(finished) == list(range(5)) and finished != list(range(5))  # out of order, all there
    assert finished[0] == 0  # the shortest of the first two


def test_ragged_cache_writes_each_row_at_its_own_position():
    cache = RaggedCache(rows=3)
    k = torch.arange(2 * 1 * 2 * 4, dtype=torch.float32).view(2, 1, 2, 4)  # rows 0 and 2, 2 positions
    cache.begin_pass([0, 2], [0, 5])
    keys, values = cache.update(k, -k, 0)
    assert keys.shape == (2, 1, 7, 4)
    assert torch.equal(keys[0, :, 0:2], k[0]) and torch.equal(keys[1, :, 5:7], k[1])
    assert torch.equal(cache.keys[0][1], torch.zeros(1, 64, 4))  # row 1 untouched
    cache.begin_pass([1], [3])
    keys, _ = cache.update(k[:1], k[:1], 0)
    assert keys.shape == (1, 1, 5, 4) and torch.equal(keys[0, :, 3:5], k[0])


def test_cli_batched_output_equals_one_at_a_time(model_dir, write_jsonl):
    path = write_jsonl("in.jsonl", [{"id": f"r{i}", "prompt": words(2 + i % 5, seed=i)} for i in range(7)])
    one = invoke("generate", path, "--model", model_dir, "--lossless", "--exit-layer", "2", "-t", "0.3", *FP32)
    many = invoke("generate", path, "--model", model_dir, "--lossless", "--exit-layer", "2", "-t", "0.3", "--batch-size", "3", *FP32)
    assert one.exit_code == many.exit_code == 0, many.stderr
    a, b = lines(one.stdout), lines(many.stdout)
    assert [r["id"] for r in b] == [f"r{i}" for i in range(7)]
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert "free generate: 7 records" in many.stderr


def test_cli_batched_bad_records(model_dir, write_jsonl, tmp_path):
    """skip: the error record stands in the bad record's place; fail: every record before the
    bad one is written, none after it, exit code 1."""
    rows = [{"id": f"r{i}", "prompt": words(3 + i, seed=i)} for i in range(6)]
    rows[3] = {"id": "r3", "prompt": 7}
    path = write_jsonl("in.jsonl", rows)
    skipped = invoke("generate", path, "--model", model_dir, "--batch-size", "2", "--on-error", "skip", *FP32)
    out = lines(skipped.stdout)
    assert skipped.exit_code == 0 and [r["id"] for r in out] == [f"r{i}" for i in range(6)]
    assert out[3]["error"]["field"] == "prompt" and all("output" in r for i, r in enumerate(out) if i != 3)
    failed = invoke("generate", path, "--model", model_dir, "--batch-size", "2", "-o", tmp_path / "out.jsonl", *FP32)
    assert failed.exit_code == 1 and "line 4" in failed.stderr
    kept = lines((tmp_path / "out.jsonl").read_text())
    assert [r["id"] for r in kept] == ["r0", "r1", "r2"]


def test_what_batching_does_not_do_is_refused_in_one_place(write_jsonl):
    """A batch size below one before the model loads; an encoder-decoder (its cross-attention
    caches are one request's) once it has."""
    from free_cli.decoding.batching import check
    from free_cli.errors import ConfigError

    path = write_jsonl("in.jsonl", [{"prompt": "w1"}])
    result = invoke("generate", path, "--model", "/nowhere", "--batch-size", "0")
    assert result.exit_code == 1 and "at least 1" in result.stderr
    t5 = Engine(make_model("t5"))
    with pytest.raises(ConfigError, match="encoder-decoders decode one record at a time"):
        check(t5, DecodeConfig(strategy="full"), 2)
    check(t5, DecodeConfig(strategy="full"), 1)


# ---------------------------------------------------------------- shards over processes


def _generate(args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "free_cli", "generate", *map(str, args)], env=env, capture_output=True, text=True, **kw)


def test_two_torchrun_processes_write_what_one_process_writes(model_dir, write_jsonl, tmp_path):
    path = write_jsonl("in.jsonl", [{"id": f"r{i}", "prompt": words(2 + i % 4, seed=i)} for i in range(7)])
    args = [path, "--model", model_dir, "--lossless", "--exit-layer", "2", "-t", "0.3", *FP32]
    one = _generate([*args, "-o", tmp_path / "one.jsonl"])
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "free_cli", "generate", *map(str, args), "-o", str(tmp_path / "two.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert without_timing((tmp_path / "two.jsonl").read_text()) == without_timing((tmp_path / "one.jsonl").read_text())
    assert "rank 0 of 2" in two.stderr and "rank 1 of 2" in two.stderr and "merged 2 parts" in two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "one.jsonl", "two.jsonl"]  # parts gone


def test_a_killed_rank_resumes_and_nothing_is_lost_or_written_twice(model_dir, tmp_path):
    """Rank 1 of 2 is killed mid-stream (it waits on stdin for more records); rank 0 finishes
    and cannot merge alone; rank 1 resumed finishes its part and merges."""
    records = [json.dumps({"id": f"r{i}", "prompt": words(3, seed=i)}) + "\n" for i in range(8)]
    out, whole = tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    args = ["-", "--model", model_dir, *FP32, "-o", out]
    rank = lambda r: {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}  # noqa: E731
    first = _generate(args, rank(0), input="".join(records))
    assert first.returncode == 0 and not out.exists(), first.stderr
    proc = subprocess.Popen([sys.executable, "-m", "free_cli", "generate", *map(str, args)], env={**os.environ, **rank(1)}, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdin.write("".join(records[:4]).encode())  # rank 1's records 1 and 3
    proc.stdin.flush()
    part = tmp_path / "out.jsonl.part-1-of-2"
    deadline = time.time() + 120
    while (not part.exists() or part.read_text().count("\n") < 2) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert part.read_text().count("\n") == 2 and not out.exists()
    resumed = _generate([*args, "--resume"], rank(1), input="".join(records))
    assert resumed.returncode == 0, resumed.stderr
    assert _generate(["-", "--model", model_dir, *FP32, "-o", whole], input="".join(records)).returncode == 0
    assert without_timing(out.read_text()) == without_timing(whole.read_text())
    again = _generate([*args, "--resume"], rank(0), input="".join(records))
    assert again.returncode == 0 and "is complete" in again.stderr


def test_merge_refuses_parts_of_different_inputs(tmp_path):
    from free_cli.errors import OutputError
    from free_cli.records.shards import merge

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("0\n2\n")
    b.write_text("1\n3\n5\n")
    with pytest.raises(OutputError, match="do not split one input"):
        merge([a, b], tmp_path / "out")
    b.write_text("1\n")
    merge([a, b], tmp_path / "out")
    assert (tmp_path / "out").read_text() == "0\n1\n2\n"
