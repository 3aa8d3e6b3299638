"""`free bench` end to end on a tiny model: every row, the report files, and properties of the rows
that must hold whatever the timings (lossless rows and transformers' speculative early exit
reproduce full; a threshold above 1 never exits)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import torch

from free_cli.evaluation.contenders import Plan, contenders
from free_cli.cli import app

from conftest import words

runner = CliRunner()


def test_bench_end_to_end(model_dir, write_jsonl, tmp_path):
    rows = [{"id": i, "dialogue": words(8, seed=i), "summary": words(4, seed=100 + i)} for i in range(3)]
    data = write_jsonl("d.jsonl", rows)
    out = tmp_path / "report"
    args = ["bench", data, "-m", model_dir, "--dtype", "fp32", "--device", "cpu", "-n", "10", "--exit-layer", "2",
            "-t", "0.2", "-t", "1.5", "--out-dir", str(out), "-q"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    got = {r["row"]: r for r in map(json.loads, result.stdout.splitlines())}
    kinds = {r["kind"] for r in got.values()}
    assert kinds == {"full", "generate", "hf-lookup", "static", "calm", "free", "auto", "lossless", "hf-early-exit"}
    assert max(got["full"]["speedup"], got["transformers generate fp32"]["speedup"]) == 1.0
    exact = ("transformers generate fp32", "transformers lookup K=3 fp32", "transformers lookup K=10 fp32", "free lossless λ=0.2",
             "free lossless λ=1.5", "free lossless lookup", "free lossless auto λ=0.2", "hf assistant_early_exit", "free λ=1.5")  # fmt: skip
    for name in exact:
        assert got[name]["equal_to_full"] == 3, name
        assert got[name]["rougeL_full"] == 1.0
    assert got["full"]["decode_speedup"] == 1.0 and got["full"]["prefill_s"] > 0
    assert got["transformers generate fp32"]["prefill_s"] > 0  # timed from transformers' streamer
    assert "accepted_per_verification" in got["free lossless lookup"] or "verifications" not in got["free lossless lookup"]
    assert got["free λ=1.5"]["exited_share"] == 0.0
    assert got["static"]["exited_share"] == 1.0 and got["static"]["mean_layers"] == 2.0
    assert set(got["full"]["quality"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert got["full"]["quality"] == got["free lossless λ=0.2"]["quality"]
    assert "final_threshold" in got["free λ=auto"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "| free lossless λ=0.2 |" in md and "rougeL" in md and "process peak RSS" in md
    assert len((out / "bench.jsonl").read_text().splitlines()) == len(got)


def test_rows_can_be_skipped_and_bad_kinds_are_named(model_dir, write_jsonl):
    names = [c.name for c in contenders(Plan(8, 2, (0.5,), skip=("calm", "hf-early-exit", "hf-lookup", "lossless", "full")))]
    assert names == ["full", "transformers generate fp32", "static", "free λ=0.5", "free λ=auto"]
    assert all(c.kind not in ("hf-early-exit", "hf-lookup") for c in contenders(Plan(8, 2, (0.5,)), encoder_decoder=True))
    checked = [c.name for c in contenders(Plan(8, 2, (0.9, 0.5, 0.3), lossless_at=(0.5,), prune=("context",))) if c.kind == "lossless"]
    assert checked == ["free lossless λ=0.5", "free lossless lookup", "free lossless auto λ=0.9", "free lossless λ=0.5 +context"]
    repeated = [c.name for c in contenders(Plan(8, 2, (0.7, 0.5, 0.7), lookup_k=(3, 3), skip=("generate", "static", "calm", "auto", "hf-early-exit")))]
    assert repeated == ["full", "transformers lookup K=3 fp32", "free λ=0.7", "free λ=0.5", "free lossless λ=0.7", "free lossless λ=0.5",
                        "free lossless lookup", "free lossless auto λ=0.7"]  # each row once: rows are aggregated by name
    drafts = [c.name for c in contenders(Plan(8, 2, (0.5,), drafts=("lookup",), lookup_k=(4,), baseline_dtypes=(torch.bfloat16, torch.float32))) if c.kind in ("lossless", "hf-lookup", "generate")]
    assert drafts == ["transformers generate bf16", "transformers lookup K=4 bf16", "transformers generate fp32", "transformers lookup K=4 fp32", "free lossless lookup"]
    data = write_jsonl("p.jsonl", [{"prompt": words(5)}])
    for args, message in ((["--skip", "nope"], "--skip 'nope'"), (["--draft", "beam"], "--draft 'beam'"), (["--baseline-dtype", "int8"], "--baseline-dtype 'int8'")):
        result = runner.invoke(app, ["bench", data, "-m", model_dir, *args])
        assert result.exit_code == 1 and message in result.stderr


def test_confidence_measures_add_rows_and_lossless_stays_exact(model_dir, write_jsonl):
    named = [(c.name, c.config.confidence) for c in contenders(Plan(8, 2, (0.5,), skip=("generate", "hf-lookup", "static", "auto", "hf-early-exit"), measures=("softmax", "margin")))]
    assert named[-3:] == [("calm λ=0.5 [margin]", "margin"), ("free λ=0.5 [margin]", "margin"), ("free lossless λ=0.5 [margin]", "margin")]
    assert {measure for _, measure in named[:-3]} == {"softmax"}
    data = write_jsonl("p.jsonl", [{"prompt": words(6, seed=i)} for i in range(2)])
    args = ["bench", data, "-m", model_dir, "--dtype", "fp32", "--device", "cpu", "-n", "8", "--exit-layer", "2", "-t", "0.1",
            "--skip", "generate", "--skip", "hf-lookup", "--skip", "static", "--skip", "hf-early-exit", "--skip", "auto", "--confidence", "jsd", "-q"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    got = {r["row"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert got["free lossless λ=0.1 [jsd]"]["equal_to_full"] == 2
    assert got["free λ=0.1 [jsd]"]["exited_share"] > 0


def test_explain_checks_pruned_lossless_rows_in_fp32_with_the_trained_exit():
    """--explain reruns a differing lossless row in fp32: with context pruning its full twin runs
    unpruned, and the fp32 twin keeps the trained exit."""
    import torch

    from conftest import make_model, prompts
    from free_cli.evaluation.report import explain_mismatches
    from free_cli.decoding.engine import Engine
    from free_cli.decoding.exits import ExitModule

    model = make_model("llama").to(torch.bfloat16)
    exit_module = ExitModule(Engine(model).adapter, 2).to(torch.bfloat16)
    engine = Engine(model, exit_modules={2: exit_module}, default_exit_layer=2)
    twin = engine.converted(torch.float32)
    assert twin.dtype == torch.float32 and set(twin.exit_modules) == {2}
    assert twin.exit_modules[2].norm.weight.dtype == torch.float32 and engine.dtype == torch.bfloat16
    rows = [c for c in contenders(Plan(6, 2, (0.3,), prune=("context",))) if c.name in ("full", "free lossless λ=0.3 +context")]
    rows = [c.__class__(c.name, c.kind, c.config.resolved(engine.num_layers, 2)) for c in rows]
    ids = prompts(1)
    full = engine.generate(ids[0], rows[0].config).tokens
    changed = full[:2] + [(full[2] + 1) % engine.vocab_size] + full[3:]  # as if a near-tie had flipped at 2
    cases = explain_mismatches(engine, ids, {"full": [full], rows[1].name: [changed]}, rows)
    assert [(c["row"], c["diverges_at"], c["equal_in_fp32"]) for c in cases] == [(rows[1].name, 2, True)]


def test_bench_sampling_rows_report_acceptance(model_dir, write_jsonl):
    data = write_jsonl("d.jsonl", [{"id": i, "prompt": words(6, seed=i)} for i in range(3)])
    args = ["bench", data, "-m", model_dir, "--dtype", "fp32", "--device", "cpu", "-n", "10", "--exit-layer", "2", "-t", "0.2",
            "--temperature", "1.0", "--seed", "2", "-q"] + [a for k in ("generate", "hf-lookup", "static", "calm", "free", "auto", "lossless", "hf-early-exit") for a in ("--skip", k)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    got = {r["row"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(got) == {"full", "full T=1", "free λ=0.2 T=1", "free lossless λ=0.2 T=1"}
    lossless = got["free lossless λ=0.2 T=1"]
    assert 0 < lossless["acceptance"] < 1 and lossless["exited_share"] > 0
    assert "acceptance" not in got["free λ=0.2 T=1"]  # lossy rows check nothing
    assert got["full T=1"]["equal_to_full"] < 3  # drawn, not greedy
