"""`free generate` on JSONL: exit codes, ordering, bad input, resume. Runs our CLI explicitly
(in process through Typer's runner, or as `python -m free_cli`), never whatever `free` is on PATH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from free_cli import __version__
from free_cli.cli import app

from helpers import FP32, good, invoke, lines, without_timing
from conftest import words



def test_generate_writes_one_record_per_input_in_order(model_dir, write_jsonl):
    path = write_jsonl("in.jsonl", [good(i) for i in range(5)])
    result = invoke("generate", path, "--model", model_dir, *FP32)
    assert result.exit_code == 0, result.stderr
    out = lines(result.stdout)  # stdout holds the records and nothing else
    assert [r["id"] for r in out] == [f"r{i}" for i in range(5)]
    for record in out:
        assert isinstance(record["output"], str)
        stats = record["stats"]
        assert {"new_tokens", "exited_share", "mean_layers", "deep_passes", "wall_time_s", "tokens_per_s", "strategy", "threshold"} <= set(stats)
        assert 1 <= stats["new_tokens"] <= 12
    assert "free generate: 5 records" in result.stderr


def test_lossless_output_equals_full_through_the_cli(model_dir, write_jsonl):
    path = write_jsonl("in.jsonl", [good(i) for i in range(6)])
    full = invoke("generate", path, "--model", model_dir, "--strategy", "full", *FP32)
    lossless = invoke("generate", path, "--model", model_dir, "--lossless", "--exit-layer", "2", "-t", "0.3", *FP32)
    assert full.exit_code == lossless.exit_code == 0
    assert [r["output"] for r in lines(full.stdout)] == [r["output"] for r in lines(lossless.stdout)]
    assert any(r["stats"]["exited_share"] > 0 for r in lines(lossless.stdout))


def test_stdin_and_output_file(model_dir, tmp_path):
    stdin = "".join(json.dumps(good(i)) + "\n" for i in range(3))
    out = tmp_path / "out.jsonl"
    result = invoke("generate", "-", "--model", model_dir, "-o", out, "-q", *FP32, input=stdin)
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""  # --quiet: no summary either
    assert [r["id"] for r in lines(out.read_text())] == ["r0", "r1", "r2"]


def test_ids_default_to_line_numbers_and_fields_are_kept(model_dir, write_jsonl):
    path = write_jsonl("in.jsonl", [{"prompt": words(5), "ref": "a"}, "", {"prompt": words(5, 1), "ref": "b"}])
    result = invoke("generate", path, "--model", model_dir, "--keep", "ref", *FP32)
    assert result.exit_code == 0
    assert [(r["id"], r["ref"]) for r in lines(result.stdout)] == [(1, "a"), (3, "b")]


BAD = {
    "malformed JSON": ('{"id": "bad", "prompt": "w1 w2"', None),
    "not an object": ('["w1", "w2"]', None),
    "missing field": ({"id": "bad", "text": "w1"}, "prompt"),
    "empty value": ({"id": "bad", "prompt": "   "}, "prompt"),
    "non-text value": ({"id": "bad", "prompt": 42}, "prompt"),
    "longer than the context": ({"id": "bad", "prompt": words(80)}, "prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_record_fails_after_keeping_earlier_records(model_dir, write_jsonl, tmp_path, case):
    bad, field = BAD[case]
    path = write_jsonl("in.jsonl", [good(0), bad, good(2)])
    out = tmp_path / "out.jsonl"
    result = invoke("generate", path, "--model", model_dir, "-o", out, *FP32)
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: line 2")
    if field:
        assert f"field {field!r}" in message
    assert [r["id"] for r in lines(out.read_text())] == ["r0"]


@pytest.mark.parametrize("case", BAD)
def test_bad_record_skipped_in_place(model_dir, write_jsonl, case):
    bad, field = BAD[case]
    path = write_jsonl("in.jsonl", [good(0), bad, good(2)])
    result = invoke("generate", path, "--model", model_dir, "--on-error", "skip", *FP32)
    assert result.exit_code == 0
    out = lines(result.stdout)
    assert [r.get("id") for r in out] == ["r0", "bad" if isinstance(bad, dict) else 2, "r2"]
    assert out[1]["error"]["line"] == 2 and out[1]["error"]["field"] == field and "output" not in out[1]
    assert "1 errors" in result.stderr


def test_existing_output_is_not_overwritten(model_dir, write_jsonl, tmp_path):
    path = write_jsonl("in.jsonl", [good(0)])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "keep"}\n')
    result = invoke("generate", path, "--model", model_dir, "-o", out, *FP32)
    assert result.exit_code == 1 and "--resume" in result.stderr
    assert out.read_text() == '{"id": "keep"}\n'
    assert invoke("generate", path, "--model", model_dir, "-o", out, "--overwrite", *FP32).exit_code == 0
    assert [r["id"] for r in lines(out.read_text())] == ["r0"]


def test_resume_cuts_a_torn_line_and_continues(model_dir, write_jsonl, tmp_path):
    path = write_jsonl("in.jsonl", [good(i) for i in range(5)])
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert invoke("generate", path, "--model", model_dir, "-o", whole, *FP32).exit_code == 0
    complete = whole.read_text().splitlines(keepends=True)
    part.write_text("".join(complete[:2]) + complete[2][:20])  # a run killed mid-line
    result = invoke("generate", path, "--model", model_dir, "-o", part, "--resume", *FP32)
    assert result.exit_code == 0, result.stderr
    assert "resumed after 2" in result.stderr
    assert without_timing(part.read_text()) == without_timing(whole.read_text())


def test_resume_refuses_a_different_input(model_dir, write_jsonl, tmp_path):
    out = tmp_path / "out.jsonl"
    first = write_jsonl("a.jsonl", [good(0), good(1)])
    assert invoke("generate", first, "--model", model_dir, "-o", out, *FP32).exit_code == 0
    other = write_jsonl("b.jsonl", [good(5), good(6), good(7)])
    result = invoke("generate", other, "--model", model_dir, "-o", out, "--resume", *FP32)
    assert result.exit_code == 1 and "same input" in result.stderr


def test_resume_after_a_killed_run(model_dir, tmp_path):
    """Kill -9 a real process mid-stream (it waits on stdin for more records), then resume."""
    records = [json.dumps(good(i)) + "\n" for i in range(6)]
    out, whole = tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    cmd = [sys.executable, "-m", "free_cli", "generate", "-", "--model", model_dir, *FP32]
    proc = subprocess.Popen([*cmd, "-o", str(out)], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdin.write("".join(records[:3]).encode())
    proc.stdin.flush()
    deadline = time.time() + 120
    while (not out.exists() or out.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_text().count("\n") == 3
    resumed = subprocess.run([*cmd, "-o", str(out), "--resume"], input="".join(records).encode(), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    subprocess.run([*cmd, "-o", str(whole)], input="".join(records).encode(), check=True, capture_output=True)
    assert without_timing(out.read_text()) == without_timing(whole.read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "full", "--lossless"], "--lossless applies to --strategy free only"),
        (["--strategy", "beam"], "unknown strategy"),
        (["--threshold", "high"], "--threshold must be a number"),
        (["--on-error", "ignore"], "--on-error must be fail or skip"),
        (["--resume"], "--resume needs --output"),
        (["--exit-layer", "6"], "exit layer must lie in [1, 5]"),
    ],
)
def test_option_errors(model_dir, write_jsonl, args, message):
    path = write_jsonl("in.jsonl", [good(0)])
    result = invoke("generate", path, "--model", model_dir, *args)
    assert result.exit_code == 1 and message in result.stderr and result.stdout == ""


def test_model_errors(write_jsonl, tmp_path):
    path = write_jsonl("in.jsonl", [good(0)])
    missing = invoke("generate", path, "--model", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "no such model directory" in missing.stderr
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(gpt2)
    unsupported = invoke("generate", path, "--model", gpt2)
    assert unsupported.exit_code == 1 and "'gpt2' is not supported" in unsupported.stderr and "llama" in unsupported.stderr
    assert invoke("generate", tmp_path / "absent.jsonl").exit_code == 1


def test_unreachable_hub_id_fails_at_once_with_what_to_do(write_jsonl, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local hub cache
    path = write_jsonl("in.jsonl", [good(0)])
    began = time.time()
    result = invoke("generate", path, "--model", "some-org/some-model")
    assert result.exit_code == 1 and time.time() - began < 20
    assert "cannot load 'some-org/some-model' from the Hugging Face hub: HF_HUB_OFFLINE is set" in result.stderr
    assert "local model directory" in result.stderr


def test_every_command_has_help():
    result = invoke("--help")
    assert result.exit_code == 0
    commands = [c for c in app.registered_commands]
    assert commands
    for command in commands:
        name = command.name or command.callback.__name__
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and len(sub.stdout) > 200
        assert (command.callback.__doc__ or "").strip()


def test_module_and_console_script_are_ours():
    by_module = subprocess.run([sys.executable, "-m", "free_cli", "--version"], capture_output=True, text=True)
    assert by_module.returncode == 0 and by_module.stdout.strip() == f"free {__version__}"
    script = Path(sys.executable).parent / "free"  # what the README's environment puts first on PATH
    if not script.exists():
        pytest.skip("free_cli is not installed as a package in this environment")
    by_script = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert by_script.stdout.strip() == f"free {__version__}"


def test_the_demo_commands_on_a_tiny_model(model_dir, write_jsonl, tmp_path):
    """`make demo`'s commands: lossless generate, the same records through full, and the line
    that compares them (speed, equal outputs)."""
    data = write_jsonl("in.jsonl", [{"id": i, "dialogue": words(8, seed=i), "summary": words(3, seed=i)} for i in range(3)])
    early, full = tmp_path / "free.jsonl", tmp_path / "full.jsonl"
    assert invoke("generate", data, "--model", model_dir, *FP32, "--lossless", "--keep", "summary", "-o", early).exit_code == 0
    assert invoke("generate", data, "--model", model_dir, *FP32, "--strategy", "full", "-q", "-o", full).exit_code == 0
    result = invoke("score", early, "--against", full, "--format", "line", "-q")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    line = result.stdout
    assert line.startswith("3 records · ") and "outputs equal 3/3" in line and "x) · " in line and " against " in line
    assert "rougeL" in line  # the kept references are scored too
