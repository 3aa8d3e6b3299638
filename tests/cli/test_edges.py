"""Edge cases a new user met: every probe ends in a one-line error (exit 1) or the documented
behaviour, never a traceback, and never loses a byte of input or of finished output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from free_cli.records import output as output_module
from free_cli.thresholds import store as store_module

from conftest import words
from helpers import FP32, good, invoke, lines


def snapshot(*paths) -> list[bytes]:
    return [open(p, "rb").read() for p in paths]


# ----------------------------------------------------------------------------- the output file
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_the_output_may_not_be_the_input(model_dir, write_jsonl, flag):
    data = write_jsonl("x.jsonl", [good(0), good(1)])
    before = snapshot(data)
    result = invoke("generate", data, "--model", model_dir, *FP32, "-o", data, flag)
    assert result.exit_code == 1 and f"{data} is the input" in result.stderr
    assert snapshot(data) == before
    link = os.path.join(os.path.dirname(data), "alias.jsonl")
    os.link(data, link)  # the same file by another name
    result = invoke("generate", data, "--model", model_dir, *FP32, "-o", link, flag)
    assert result.exit_code == 1 and "is the input" in result.stderr and snapshot(data) == before


def test_outputs_that_cannot_be_written_are_refused_before_loading(model_dir, write_jsonl, tmp_path, monkeypatch):
    data = write_jsonl("in.jsonl", [good(0)])
    cases = [
        (tmp_path / "missing" / "out.jsonl", "the folder"),
        (tmp_path, "is a directory"),
    ]
    for target, message in cases:
        for flags in ((), ("--overwrite",), ("--resume",)):
            result = invoke("generate", data, "--model", "no-such-model-dir/", *FP32, "-o", target, *flags)
            assert result.exit_code == 1 and message in result.stderr, (target, flags, result.stderr)
            assert "Traceback" not in result.output
    folder = tmp_path / "readonly"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(output_module.os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    result = invoke("generate", data, "--model", "no-such-model-dir/", *FP32, "-o", folder / "out.jsonl")
    assert result.exit_code == 1 and "permission denied" in result.stderr


def test_resume_and_overwrite_together_are_refused(model_dir, write_jsonl, tmp_path):
    data, out = write_jsonl("in.jsonl", [good(0)]), tmp_path / "out.jsonl"
    out.write_text('{"id": "r0", "output": "x"}\n')
    result = invoke("generate", data, "--model", model_dir, *FP32, "-o", out, "--resume", "--overwrite")
    assert result.exit_code == 1 and "contradict" in result.stderr
    assert out.read_text() == '{"id": "r0", "output": "x"}\n'


def test_resume_refuses_an_output_of_another_input(model_dir, write_jsonl, tmp_path):
    """Ids from line numbers match across inputs; the digest of each input line does not."""
    first = write_jsonl("a.jsonl", [{"prompt": words(5, seed=i)} for i in range(3)])
    other = write_jsonl("b.jsonl", [{"prompt": words(5, seed=10 + i)} for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert invoke("generate", first, "--model", model_dir, *FP32, "-o", out).exit_code == 0
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:2]))  # as if killed after two
    before = snapshot(out, other)
    result = invoke("generate", other, "--model", model_dir, *FP32, "-o", out, "--resume")
    assert result.exit_code == 1 and "was not written for input line 1" in result.stderr
    assert snapshot(out, other) == before


def test_resume_refuses_an_output_longer_than_its_input(model_dir, write_jsonl, tmp_path):
    whole = write_jsonl("a.jsonl", [good(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert invoke("generate", whole, "--model", model_dir, *FP32, "-o", out).exit_code == 0
    shorter = write_jsonl("b.jsonl", [good(i) for i in range(2)])
    before = snapshot(out)
    result = invoke("generate", shorter, "--model", model_dir, *FP32, "-o", out, "--resume")
    assert result.exit_code == 1 and "holds 3 records but the input only 2" in result.stderr
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- ids and error records
def test_duplicate_ids_are_refused_naming_both_lines(model_dir, write_jsonl, tmp_path):
    rows = [good(0), good(1), {"id": "r0", "prompt": words(4)}, good(3)]
    data, out = write_jsonl("in.jsonl", rows), tmp_path / "out.jsonl"
    result = invoke("generate", data, "--model", model_dir, *FP32, "-o", out)
    assert result.exit_code == 1 and "line 3, field 'id': duplicate id 'r0': line 1 has it too" in result.stderr
    assert [r["id"] for r in lines(out.read_text())] == ["r0", "r1"]  # the records before it are written
    skipped = invoke("generate", data, "--model", model_dir, *FP32, "--on-error", "skip")
    got = lines(skipped.stdout)
    assert skipped.exit_code == 0 and [r["id"] for r in got] == ["r0", "r1", "r0", "r3"]
    assert "duplicate id" in got[2]["error"]["message"] and "output" not in got[2]


def test_skip_mode_error_records_keep_their_fields_and_score_apart(model_dir, write_jsonl, tmp_path):
    rows = [
        {"id": "a", "dialogue": words(6), "summary": words(3)},
        {"id": "b", "summary": words(3)},  # no dialogue: a bad record
        {"id": "c", "dialogue": words(6, seed=2), "summary": words(3, seed=2)},
    ]
    data, out = write_jsonl("in.jsonl", rows), tmp_path / "out.jsonl"
    result = invoke("generate", data, "--model", model_dir, *FP32, "--on-error", "skip", "--keep", "summary", "-o", out)
    assert result.exit_code == 0
    got = lines(out.read_text())
    assert got[1]["id"] == "b" and got[1]["summary"] == rows[1]["summary"] and "error" in got[1]
    assert got[1]["input"]["line"] == 2
    kept = json.loads(invoke("score", out, "-q").stdout)
    assert kept["records"] == 2 and kept["errors"] == 1
    joined = json.loads(invoke("score", out, "--references", data, "-q").stdout)
    assert joined["metrics"] == kept["metrics"] and joined["errors"] == 1


# ----------------------------------------------------------------------------- input and notices
def test_a_byte_order_mark_is_accepted(model_dir, tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(good(0)).encode() + b"\n" + json.dumps(good(1)).encode() + b"\n")
    for mode in ("fail", "skip"):
        result = invoke("generate", data, "--model", model_dir, *FP32, "--on-error", mode)
        got = lines(result.stdout)
        assert result.exit_code == 0 and [r["id"] for r in got] == ["r0", "r1"] and all("output" in r for r in got)


def test_the_context_limit_is_the_stop_reason(model_dir, write_jsonl):
    data = write_jsonl("in.jsonl", [{"id": 1, "prompt": words(56)}])  # 58 of the 64 positions
    result = invoke("generate", data, "--model", model_dir, "--dtype", "fp32", "-n", "20", "--strategy", "full", "--device", "cpu")
    stats = lines(result.stdout)[0]["stats"]
    assert result.exit_code == 0 and stats["stop_reason"] == "context_limit" and stats["new_tokens"] < 20


def test_an_unknown_dataset_and_fp16_on_a_cpu_are_said(model_dir, write_jsonl, tmp_path):
    data = write_jsonl("in.jsonl", [good(0)])
    result = invoke("generate", data, "--model", model_dir, "--dtype", "fp16", "--device", "cpu", "-n", "3", "--dataset", "nope",
                    "--threshold-store", tmp_path / "store.json")  # fmt: skip
    assert result.exit_code == 0
    assert "no threshold stored for dataset 'nope'" in result.stderr and "using λ=0.9" in result.stderr
    assert "fp16 on a CPU is emulated" in result.stderr


def test_a_closed_pipe_ends_generate_quietly(model_dir, write_jsonl):
    data = write_jsonl("in.jsonl", [good(i) for i in range(60)])
    cmd = f"{sys.executable} -m free_cli generate {data} --model {model_dir} --dtype fp32 --device cpu -n 4 -q | head -1"
    done = subprocess.run(["bash", "-c", cmd + "; echo ${PIPESTATUS[0]} >&2"], capture_output=True, text=True)
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["id"] == "r0"
    assert done.stderr.strip().splitlines()[-1] == "0" and "Traceback" not in done.stderr, done.stderr


# ----------------------------------------------------------------------------- calibrate, bench, score
@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limits_below_one_are_refused(model_dir, write_jsonl, limit):
    data = write_jsonl("in.jsonl", [good(0)])
    for cmd in (["calibrate", data, "--dataset", "d"], ["bench", data]):
        result = invoke(*cmd, "--model", model_dir, "--limit", limit)
        assert result.exit_code == 1 and "--limit must be at least 1" in result.stderr, cmd


def test_calibrate_refuses_a_store_it_cannot_write_before_running(model_dir, write_jsonl, tmp_path, monkeypatch):
    data = write_jsonl("in.jsonl", [good(i) for i in range(3)])
    folder = tmp_path / "locked"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(store_module.os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    result = invoke("calibrate", data, "--dataset", "d", "--model", model_dir, *FP32[:4], "--threshold-store", folder / "t.json", "-q")
    assert result.exit_code == 1 and "cannot write the threshold store" in result.stderr
    assert result.stdout == ""  # nothing ran


def test_calibrate_warns_when_the_stored_threshold_is_slower_than_full(model_dir, write_jsonl, tmp_path):
    data = write_jsonl("in.jsonl", [good(i) for i in range(12)])
    result = invoke("calibrate", data, "--dataset", "d", "--model", model_dir, *FP32[:4], "-n", "8", "--threshold-store", tmp_path / "t.json")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    row = next(r for r in found["table"] if r["threshold"] == found["threshold"])
    assert ("warning:" in result.stderr) == (row["estimated_speedup"] < 1)


def test_fail_under_bounds_off_the_scale_are_refused(write_jsonl):
    rows = write_jsonl("p.jsonl", [{"id": 1, "output": "a b", "summary": "a b"}])
    result = invoke("score", rows, "--fail-under", "rougeL=25", "-q")
    assert result.exit_code == 1 and "rougeL is reported in [0, 1]; did you mean 0.25?" in result.stderr
    assert invoke("score", rows, "--fail-under", "f1=101", "-q").exit_code == 1  # f1 is not computed, and off scale


def test_threads_are_set_and_shared_among_local_ranks(monkeypatch):
    import torch

    from free_cli.cli.options import use_threads

    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert use_threads(None) == 3  # the user's setting wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert use_threads(None) == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        torch.set_num_threads(before)


def test_the_wheel_carries_every_file_the_package_reads(tmp_path):
    """A non-editable install gets the row kernel's source and the shipped weights and configs:
    every file under free_cli/ that is not Python is in a wheel built from the tracked files (a
    copy, so that no build folder in the checkout can fill the gaps)."""
    import shutil
    import zipfile
    from pathlib import Path

    pytest.importorskip("setuptools")  # the build backend, used without isolation (offline)
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "source"
    for name in tracked.stdout.splitlines():
        if name.startswith(("free_cli/", "pyproject.toml", "README.md")) and (root / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [name for name in tracked.stdout.splitlines() if name.startswith("free_cli/") and not name.endswith(".py")]
    assert "free_cli/decoding/kernels/rows.cpp" in data
    assert [name for name in data if name not in names] == []
