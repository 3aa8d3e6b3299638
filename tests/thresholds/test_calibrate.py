"""`free calibrate`, stored thresholds in `free generate --dataset`, and `--threshold auto`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from free_cli.cli import app
from free_cli.thresholds.store import ThresholdStore

from conftest import words

runner = CliRunner()
FP32 = ["--dtype", "fp32", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def prompts_file(write_jsonl):
    return write_jsonl("calib.jsonl", [{"id": i, "prompt": words(6, seed=100 + i)} for i in range(12)])


def test_calibrate_bmm_stores_a_threshold_generate_uses(model_dir, prompts_file, tmp_path):
    store = tmp_path / "store.json"
    result = invoke("calibrate", prompts_file, "--dataset", "tiny", "--model", model_dir, "--exit-layer", "2",
                    "-n", "16", "--threshold-store", store, *FP32)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    # One pair per generated token (at most 16 each), some agreeing and some not.
    assert out["method"] == "bmm" and out["fit"]["status"] in ("fitted", "everywhere") and 12 <= out["pairs"] <= 12 * 16
    assert 0 < out["fit"]["agreed"] < out["pairs"]
    threshold = out["threshold"]
    rows = {round(r["threshold"], 6): r for r in out["table"]}
    assert round(threshold, 6) in rows and "<- fitted" in result.stderr
    shares = [r["exited_share"] for r in sorted(out["table"], key=lambda r: r["threshold"])]
    assert shares == sorted(shares, reverse=True)  # a higher threshold lets fewer tokens exit
    entry = ThresholdStore(store).get(out["model"], "tiny", 2, "softmax")
    assert entry["threshold"] == threshold and entry["zeta"] == 0.4 and entry["pairs"] == out["pairs"]

    generated = invoke("generate", prompts_file, "--model", model_dir, "--exit-layer", "2", "--dataset", "tiny",
                       "--threshold-store", store, "-n", "8", *FP32)  # fmt: skip
    assert generated.exit_code == 0
    assert f"threshold {threshold:.4g} stored for dataset 'tiny'" in generated.stderr
    assert {json.loads(line)["stats"]["threshold"] for line in generated.stdout.splitlines()} == {threshold}
    explicit = invoke("generate", prompts_file, "--model", model_dir, "--exit-layer", "2", "--dataset", "tiny",
                      "--threshold-store", store, "-t", "0.5", "-n", "8", *FP32)  # fmt: skip
    assert {json.loads(line)["stats"]["threshold"] for line in explicit.stdout.splitlines()} == {0.5}


def test_threshold_auto_refits_and_persists(model_dir, prompts_file, tmp_path):
    store = tmp_path / "store.json"
    result = invoke("generate", prompts_file, "--model", model_dir, "--exit-layer", "2", "-t", "auto",
                    "--update-every", "3", "--dataset", "tiny-auto", "--threshold-store", store, "-n", "16", *FP32)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    used = [json.loads(line)["stats"]["threshold"] for line in result.stdout.splitlines()]
    assert used[:3] == [0.9, 0.9, 0.9]  # the initial threshold until the first refit
    assert len(set(used)) > 1 and "refits" in result.stderr
    (entry,) = ThresholdStore(store).entries()  # the refit after the last record is stored too
    assert entry["dataset"] == "tiny-auto" and entry["method"] == "bmm" and 0 <= entry["threshold"] <= 1
    # The next run starts from the persisted threshold.
    again = invoke("generate", prompts_file, "--model", model_dir, "--exit-layer", "2", "-t", "auto",
                   "--update-every", "100", "--dataset", "tiny-auto", "--threshold-store", store, "-n", "16", *FP32)  # fmt: skip
    assert {json.loads(line)["stats"]["threshold"] for line in again.stdout.splitlines()} == {entry["threshold"]}


def test_calibrate_ltt_certifies_or_refuses(model_dir, prompts_file, tmp_path):
    store = tmp_path / "store.json"
    common = ["calibrate", prompts_file, "--dataset", "tiny", "--model", model_dir, "--exit-layer", "2", "-n", "16",
              "--method", "ltt", "--grid", "1.5,0.9,0.6,0.3,0.0", "--threshold-store", store, *FP32]  # fmt: skip
    certified = invoke(*common, "--delta", "0.6", "--epsilon", "0.3")
    assert certified.exit_code == 0, certified.stderr
    out = json.loads(certified.stdout)
    steps = out["ltt"]["steps"]
    assert steps[0]["threshold"] == 1.5 and steps[0]["risk"] == 0.0  # nothing exits: the full output
    assert out["threshold"] == min(s["threshold"] for s in steps if s["rejected"])
    assert all(s["p_value"] <= 0.3 for s in steps if s["rejected"])
    entry = ThresholdStore(store).get(out["model"], "tiny", 2, "softmax")
    assert (entry["method"], entry["delta"], entry["epsilon"], entry["samples"]) == ("ltt", 0.6, 0.3, 12)

    refused = invoke(*common, "--delta", "0.001", "--epsilon", "0.05", "--dataset", "tiny-strict")
    assert refused.exit_code == 1 and "no threshold can be certified" in refused.stderr
    assert json.loads(refused.stdout)["threshold"] is None
    assert ThresholdStore(store).get(out["model"], "tiny-strict", 2, "softmax") is None


def test_threshold_errors(model_dir, prompts_file, tmp_path):
    calm = invoke("generate", prompts_file, "--model", model_dir, "--strategy", "calm", "-t", "auto")
    assert calm.exit_code == 1 and "--threshold auto needs --strategy free" in calm.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    corrupt = invoke("calibrate", prompts_file, "--dataset", "x", "--model", model_dir, "--threshold-store", bad, *FP32)
    assert corrupt.exit_code == 1 and str(bad) in corrupt.stderr and corrupt.stdout == ""
    assert bad.read_text() == "{oops"
