"""The precision policy: what it picks for each device capability, that each pass runs as picked,
and that lossless decoding still equals `full` under a mixed policy."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from free_cli import DecodeConfig, Engine
from free_cli.decoding import kernels
from free_cli.decoding import device as capability
from free_cli.decoding import precision as prec
from free_cli.errors import ConfigError
from free_cli.decoding.precision import FP32_FROM_ROWS, ONEDNN_FROM_ROWS, Precision

from conftest import FLAT, make_model, prompts, repeating_prompts

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def row_kernels():
    """Skips where the row kernels cannot be built. Built in the test, not at collection, so that
    the test's timeout covers the build."""
    if not kernels.available():
        pytest.skip("the row kernels cannot be built here")


@pytest.mark.parametrize(
    ("flags", "narrow", "wide"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, torch.bfloat16),  # AVX512-BF16
        ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16, torch.bfloat16),  # AMX
        ({"fp", "asimd", "bf16"}, torch.bfloat16, torch.bfloat16),  # Arm with the BF16 extension
        ({"avx2", "fma", "avx512f"}, torch.bfloat16, torch.float32),  # AVX512 without bf16
        ({"avx2", "fma"}, torch.bfloat16, torch.float32),
        (set(), torch.bfloat16, torch.float32),  # nothing known
    ],
)
def test_auto_on_cpu_follows_the_bf16_capability(monkeypatch, flags, narrow, wide):
    """Native bf16: bf16 throughout. Emulated: bf16 steps and fp32 prompts, the cut-over after the
    row kernels' widest pass where they run (AVX2 and FMA, and a compiler), else at FP32_FROM_ROWS."""
    monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset(flags))
    policy = prec.resolve("auto", CPU)
    assert (policy.narrow, policy.wide, policy.onednn_from) == (narrow, wide, ONEDNN_FROM_ROWS)
    kernel = narrow != wide and {"avx2", "fma"} <= flags and kernels.available()
    assert policy.kernel_rows == (kernels.MAX_ROWS if kernel else 0)
    cut = kernels.MAX_ROWS + 1 if kernel else FP32_FROM_ROWS if narrow != wide else None
    if cut is not None:
        assert policy.dtype_for(1) == narrow and policy.dtype_for(cut - 1) == narrow
        assert policy.dtype_for(cut) == wide and policy.dtype_for(1000) == wide
    assert policy.cache == torch.bfloat16


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_is_one_precision_and_leaves_kernels_alone(monkeypatch, bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    policy = prec.resolve("auto", CUDA)
    assert (policy.narrow, policy.wide, policy.onednn_from) == (dtype, dtype, None)


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_an_explicit_dtype_is_every_pass(monkeypatch, name):
    monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset())
    policy = prec.resolve(name, CPU)
    assert policy.narrow == policy.wide == prec.DTYPES[name] and not policy.mixed
    with pytest.raises(ConfigError, match="auto or one of"):
        prec.resolve("int8", CPU)


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    real = capability.Path
    monkeypatch.setattr(capability, "Path", lambda p: real(cpuinfo) if p == "/proc/cpuinfo" else real(p))
    capability.cpu_flags.cache_clear()
    try:
        assert capability.cpu_flags() == frozenset({"fpu", "avx2", "avx512_bf16"})
    finally:
        capability.cpu_flags.cache_clear()


def test_kernels_follow_the_rows_and_are_restored():
    policy = Precision(torch.float32, torch.float32)
    assert torch.backends.mkldnn.enabled
    with policy.kernels_for(1):
        assert not torch.backends.mkldnn.enabled
    with policy.kernels_for(ONEDNN_FROM_ROWS):
        assert torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    torch._C._set_mkldnn_enabled(False)
    try:
        with policy.kernels_for(64):
            assert not torch.backends.mkldnn.enabled  # never turned on against the user's setting
    finally:
        torch._C._set_mkldnn_enabled(True)


MIXED = Precision(torch.bfloat16, torch.float32, wide_from=4)


def mixed_engine(**shape) -> Engine:
    return Engine(make_model("llama", **shape), precision=MIXED)


def test_mixed_engine_keeps_a_full_precision_copy_for_wide_passes():
    model = make_model("llama")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, precision=MIXED)
    wide = engine.adapter_of(torch.zeros(1, dtype=torch.float32)).model
    assert all(torch.equal(v, reference[k]) for k, v in wide.state_dict().items())  # every bit
    assert all(v.dtype == torch.bfloat16 for v in engine.model.state_dict().values() if v.is_floating_point())


def test_each_pass_runs_in_the_precision_of_its_width():
    """A prompt wider than the cut-over runs in fp32, single-token steps in bf16, and the cache
    keeps one dtype (bf16) throughout."""
    engine = mixed_engine()
    seen = []
    for layer in (engine.adapter_of(torch.zeros(1, dtype=d)).layers[0] for d in (torch.bfloat16, torch.float32)):
        layer.register_forward_pre_hook(lambda _m, args, kw: seen.append((args[0] if args else kw["hidden_states"]).dtype), with_kwargs=True)
    state = engine.start(prompts(1, length=9)[0], DecodeConfig(strategy="full", max_new_tokens=3))
    with torch.inference_mode():
        for _ in engine.stream(state, DecodeConfig(strategy="full", max_new_tokens=3)):
            pass
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]  # prompt, then two steps
    cache = engine.adapter.self_cache(state.cache)
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}


def margins(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """The gap between the top two fp32 logits at each position that chose one of `tokens`."""
    with torch.no_grad():
        logits = model.float()(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


@pytest.mark.parametrize("policy", ["fp32", "mixed"])
def test_lossless_equals_full_under_the_policy(policy):
    """Lossless free equals `full` run under the same policy, over thresholds and stack limits
    whose synchronized passes fall on both sides of the cut-over (stacks of 1-3 rows are bf16,
    longer ones and the prompt fp32). In fp32 entirely; under the mixed policy up to the first
    near-tie of the full output (a top-2 logit gap under 0.05, which a bf16 and an fp32 pass may
    break differently: docs/benchmarks.md counts how often that happens on a real model)."""
    model = make_model("llama", deep_scale=0.5, logit_scale=16.0)
    reference = make_model("llama", deep_scale=0.5, logit_scale=16.0)
    engine = Engine(model, precision=Precision(torch.float32, torch.float32)) if policy == "fp32" else Engine(model, precision=MIXED)
    compared = stacks = 0
    for prompt in prompts(8, length=10, seed=7):
        full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=30))
        gaps = margins(reference, prompt, full.tokens) if policy == "mixed" else []
        n = next((i for i, gap in enumerate(gaps) if gap < 0.05), len(full.tokens))
        for threshold in (0.0, 0.3, 0.6):
            for max_stack in (None, 2):
                cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=threshold, lossless=True, max_stack=max_stack, max_new_tokens=30, draft="exit")
                out = engine.generate(prompt, cfg)
                assert out.tokens[:n] == full.tokens[:n], (prompt, threshold, max_stack)
                stacks += out.stats["deep_passes"]
        compared += n
    assert compared >= 100 and stacks > 0, compared


@pytest.mark.usefixtures("row_kernels")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_row_kernels_make_lossless_exact_in_bf16(family):
    """With the row kernels a pass over k rows computes each row to the bits of a one-row step,
    in bf16 too: lossless free, drafting by the exit and by lookup over stacks of every width,
    equals `full` token for token, with no near-tie allowance (PyTorch's kernels need one)."""
    policy = Precision(torch.bfloat16, torch.float32, wide_from=kernels.MAX_ROWS + 1, kernel_rows=kernels.MAX_ROWS)
    engine = Engine(make_model(family, deep_scale=0.5, logit_scale=16.0), precision=policy)
    engine.step_costs[2] = FLAT
    widths = set()
    for prompt in repeating_prompts(8, seed=7):
        full = engine.generate(prompt, DecodeConfig(strategy="full", max_new_tokens=30))
        for draft in ("exit", "lookup", "auto"):
            for threshold in (0.0, 0.6):
                cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=threshold, lossless=True, max_new_tokens=30, draft=draft)
                out = engine.generate(prompt, cfg)
                assert out.tokens == full.tokens, (prompt, draft, threshold)
                widths.add(out.stats["accepted_drafts"] > 0)
    assert widths == {True, False}  # drafts were kept, and some rounds kept none


@pytest.mark.usefixtures("row_kernels")
def test_a_build_killed_while_holding_the_lock_does_not_block_later_processes(tmp_path):
    """A process killed inside the kernel's build lock (a test's deadline, a killed torchrun rank)
    leaves torch's lock file behind. The next process still gets the kernel, and does not wait on
    that file forever; while the killer's victim lived, nobody else held the lock."""
    built = Path(kernels.extension().__file__).parent
    root = tmp_path / "extensions"
    build = root / built.name
    shutil.copytree(built, build, ignore=shutil.ignore_patterns("lock", "free.lock"))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time\nfrom free_cli.decoding import kernels\n"
         "b = pathlib.Path(sys.argv[1])\nwith kernels.build_lock(b):\n    (b / 'lock').touch(); print('held', flush=True); time.sleep(600)", str(build)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with open(build / "free.lock", "a") as lock:  # held by the other process
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (build / "lock").exists()  # what the killed process left
    probe = "from free_cli.decoding import kernels; print(kernels.available())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr
    assert not (build / "lock").exists()


def test_a_default_generate_run_writes_only_our_lines_to_stderr(model_dir, write_jsonl):
    """No library warning (deprecations, FutureWarnings) reaches stderr in a default run."""
    path = write_jsonl("in.jsonl", [{"id": 1, "prompt": "w1 w2 w3"}, {"id": 2, "prompt": "w4 w5"}])
    done = subprocess.run([sys.executable, "-W", "default", "-m", "free_cli", "generate", path, "--model", model_dir, "-n", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("free") for line in lines), lines
