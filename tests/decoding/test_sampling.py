"""Sampling: the truncated distribution, reproducible draws per record, and lossless sampling
distributed exactly as the full model's sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from free_cli import DecodeConfig, Engine
from free_cli.decoding.batching import generate_rows
from free_cli.decoding.sampling import Sampling, distribution, verify

from conftest import make_model, prompts, words
from helpers import FP32, without_timing
from helpers import invoke, lines


def test_distribution_truncates_by_k_and_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.allclose(distribution(logits, Sampling(1.0)), logits.exp())
    assert torch.allclose(distribution(logits, Sampling(1.0, top_k=2)), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top-p 0.8: the smallest top set reaching 0.8 is {0.5, 0.2, 0.15} (0.85)
    assert torch.allclose(distribution(logits, Sampling(1.0, top_p=0.8)), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    hot = distribution(logits, Sampling(2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2, -1)) and hot[0] < 0.5


def test_verify_keeps_or_redraws_from_the_residual():
    """Drafting from p and verifying against q: the kept-or-redrawn token is distributed as q
    (checked on the exact probabilities: P(x) = p(x) min(1, q(x)/p(x)) + (1 - Σ min(p, q)) r(x))."""
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(6000):
        x = int(torch.multinomial(p, 1, generator=g))
        replacement = verify(x, p, q, g)
        counts[x if replacement is None else replacement] += 1
    assert chisquare(counts.numpy(), 6000 * q.numpy()).pvalue > 1e-3
    assert verify(1, p, q, g) is None  # q(x) >= p(x): always kept


def exact_first_tokens(model, prompt: list[int], s: Sampling) -> torch.Tensor:
    """The full model's sampling distribution of the first two tokens, (V, V), by enumeration."""
    with torch.no_grad():
        first = distribution(model(torch.tensor([prompt])).logits[0, -1], s)  # (V,)
        batch = torch.tensor([prompt + [t] for t in range(first.shape[0])])
        second = distribution(model(batch).logits[:, -1], s)  # (V, V)
    return first[:, None] * second


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, top_k=12, top_p=0.9)])
def test_lossless_sampling_is_distributed_as_full_sampling(sampling):
    """3,000 draws of the first two tokens under lossless free with a low threshold (most tokens
    are drafted by the shallow model and many rejected), decoded 64 at a time (each draws from its
    own generator, as alone), against the exact distribution of the full model's sampling. Chi-square tests on the first token and on the second at a 0.1% level each:
    with independent seeds a correct implementation fails either with probability about 0.2%;
    the seeds here are fixed, so the test's outcome is too."""
    model = make_model("llama", deep_scale=0.3, logit_scale=3.0)
    engine = Engine(model)
    prompt = prompts(1, length=5, seed=11)[0]
    exact = exact_first_tokens(model, prompt, sampling)
    cfg = DecodeConfig(strategy="free", exit_layer=2, threshold=0.05, lossless=True, max_new_tokens=2,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=5)  # fmt: skip
    n, V = 3000, exact.shape[0]
    counts, rejected, exited = torch.zeros(2, V), 0, 0.0
    draws = dict(generate_rows(engine, ((i, prompt, cfg) for i in range(n)), 64))  # each request its own generator
    for i in range(n):
        out = draws[i]
        for j, token in enumerate(out.tokens[:2]):
            counts[j, token] += 1
        rejected += out.stats["rejected"]
        exited += out.stats["exited_share"]
    assert rejected > n / 10 and exited > n / 4  # drafts were made and rejected often
    for observed, expected in ((counts[0], exact.sum(1)), (counts[1], exact.sum(0))):
        assert observed[expected == 0].sum() == 0  # nothing truncation rules out is ever drawn
        keep = n * expected >= 5  # chi-square needs expected counts of 5 or more: pool the rest
        obs, exp = observed[keep], n * expected[keep]
        if n * expected[~keep].sum() >= 5:
            obs, exp = torch.cat([obs, observed[~keep].sum(0, keepdim=True)]), torch.cat([exp, n * expected[~keep].sum(0, keepdim=True)])
        assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_temperature_zero_is_greedy_and_a_seed_repeats_across_resume_and_batching(model_dir, write_jsonl, tmp_path):
    path = write_jsonl("in.jsonl", [{"id": f"r{i}", "prompt": words(3 + i % 3, seed=i)} for i in range(6)])
    base = ["generate", path, "--model", model_dir, "--exit-layer", "2", "-t", "0.3", *FP32]
    greedy, cold = invoke(*base), invoke(*base, "--temperature", "0", "--seed", "9")
    assert [r["output"] for r in lines(greedy.stdout)] == [r["output"] for r in lines(cold.stdout)]
    sample = [*base, "--lossless", "--temperature", "1.0", "--top-p", "0.95", "--seed", "3"]
    whole = invoke(*sample)
    again = invoke(*sample)
    other = invoke(*sample[:-1], "4")
    outputs = [r["output"] for r in lines(whole.stdout)]
    assert outputs == [r["output"] for r in lines(again.stdout)] and outputs != [r["output"] for r in lines(other.stdout)]
    assert outputs != [r["output"] for r in lines(greedy.stdout)]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(line + "\n" for line in whole.stdout.splitlines()[:2]))  # a run cut after two records
    resumed = invoke(*sample, "-o", out, "--resume")
    assert resumed.exit_code == 0 and without_timing(out.read_text()) == without_timing(whole.stdout)
    batched = invoke(*sample, "--batch-size", "4")
    assert [r["output"] for r in lines(batched.stdout)] == outputs
