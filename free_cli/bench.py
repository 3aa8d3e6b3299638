"""Speed side by side: every contender on the same prompts, model, precision and device, in one
process. Warm-up runs are excluded and the order of contenders rotates from prompt to prompt, so
drift of the machine spreads over all of them. Speedups are ratios against the faster of the two
full-model baselines (our own loop and transformers' `generate`) measured in the same run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .config import DecodeConfig
from .engine import Engine

FULL, GENERATE = "full", "transformers generate"


@dataclass(frozen=True)
class Contender:
    name: str
    config: DecodeConfig | None  # None: transformers' own greedy `generate`


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    exited: float = 0.0
    layers: float = 0.0
    outputs: list = field(default_factory=list)  # generated ids per prompt (first repeat)


def contenders(max_new_tokens: int, exit_layer: int | None, thresholds: list[float]) -> list[Contender]:
    base = DecodeConfig(max_new_tokens=max_new_tokens, exit_layer=exit_layer)
    rows = [Contender(FULL, replace(base, strategy="full")), Contender(GENERATE, None)]
    for t in thresholds:
        rows.append(Contender(f"free λ={t:g}", replace(base, strategy="free", threshold=t)))
    for t in thresholds:
        rows.append(Contender(f"free lossless λ={t:g}", replace(base, strategy="free", threshold=t, lossless=True)))
    return rows


def hf_generate(engine: Engine, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy decoding of the same model, timed like ours."""
    ids = torch.tensor([prompt], device=engine.device)
    kwargs = {"attention_mask": torch.ones_like(ids)} if not engine.adapter.is_encoder_decoder else {}
    engine.synchronize()
    began = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    engine.synchronize()
    seconds = time.perf_counter() - began
    start = 1 if engine.adapter.is_encoder_decoder else len(prompt)
    return out[0, start:].tolist(), seconds


def run_one(engine: Engine, contender: Contender, prompt: list[int], max_new_tokens: int):
    if contender.config is None:
        tokens, seconds = hf_generate(engine, prompt, max_new_tokens)
        return tokens, seconds, 0.0, float(engine.num_layers)
    result = engine.generate(prompt, contender.config)
    s = result.stats
    return result.tokens, s["wall_time_s"], s["exited_share"], s["mean_layers"]


def run_bench(
    engine: Engine,
    prompts: list[list[int]],
    rows: list[Contender],
    *,
    max_new_tokens: int,
    repeats: int = 1,
    warmup: int = 1,
    progress=None,
) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Summary rows, and each contender's generated ids per prompt (from the first repeat)."""
    for contender in rows:  # warm-up, not timed
        for prompt in prompts[:warmup]:
            run_one(engine, contender, prompt, max_new_tokens)
    tallies = {c.name: Tally() for c in rows}
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            k = (i + repeat) % len(rows)
            for contender in rows[k:] + rows[:k]:
                tokens, seconds, exited, layers = run_one(engine, contender, prompt, max_new_tokens)
                t = tallies[contender.name]
                t.tokens += len(tokens)
                t.seconds += seconds
                t.exited += exited * len(tokens)
                t.layers += layers * len(tokens)
                if repeat == 0:
                    t.outputs.append(tokens)
            if progress is not None:
                progress.update(1)
    outputs = {name: t.outputs for name, t in tallies.items()}
    return summarize(tallies, engine.num_layers), outputs


def summarize(tallies: dict[str, Tally], num_layers: int) -> list[dict]:
    rate = {name: t.tokens / t.seconds if t.seconds else 0.0 for name, t in tallies.items()}
    best_full = max(rate.get(FULL, 0.0), rate.get(GENERATE, 0.0)) or 1.0
    reference = tallies[FULL].outputs if FULL in tallies else None
    rows = []
    for name, t in tallies.items():
        n = max(t.tokens, 1)
        row = {
            "row": name,
            "tokens_per_s": rate[name],
            "speedup": rate[name] / best_full,
            "new_tokens": t.tokens,
            "seconds": t.seconds,
            "exited_share": t.exited / n,
            "mean_layers": t.layers / n,
            "num_layers": num_layers,
            "prompts": len(t.outputs),
        }
        if reference is not None:
            row["equal_to_full"] = sum(a == b for a, b in zip(t.outputs, reference))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A fixed-width table for people (stderr)."""
    head = f"{'row':<24} {'tok/s':>8} {'× best full':>11} {'exited':>7} {'layers':>7} {'= full':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        equal = f"{r['equal_to_full']}/{r['prompts']}" if "equal_to_full" in r else "-"
        lines.append(
            f"{r['row']:<24} {r['tokens_per_s']:>8.2f} {r['speedup']:>10.2f}x {100 * r['exited_share']:>6.0f}% "
            f"{r['mean_layers']:>7.1f} {equal:>8}"
        )
    return "\n".join(lines)


def explain_mismatches(
    engine: Engine, prompts: list[list[int]], outputs: dict[str, list[list[int]]], rows: list[Contender]
) -> list[dict]:
    """For every lossless output that differs from `full`: where it diverges, the full model's
    top-2 logit gap there (a near-tie that rounding can flip), and whether the same prompt agrees
    when both run in fp32. Lossless mode is exact in exact arithmetic; in bf16 a synchronized pass
    over k positions rounds differently from k one-token steps."""
    lossless = [c for c in rows if c.config is not None and c.config.lossless]
    cases = [
        (c, i)
        for c in lossless
        for i, (a, b) in enumerate(zip(outputs[c.name], outputs[FULL]))
        if a != b
    ]
    if not cases:
        return []
    fp32 = _fp32_twin(engine)
    found = []
    for contender, i in cases:
        ours, full = outputs[contender.name][i], outputs[FULL][i]
        d = next(j for j, (a, b) in enumerate(zip(ours, full)) if a != b) if ours[: len(full)] != full else len(full)
        with torch.inference_mode():
            prefix = torch.tensor([prompts[i] + full[:d]], device=engine.device)
            logits = engine.model(prefix).logits[0, -1].float()
        top = logits.topk(2)
        full_fp32 = fp32.generate(prompts[i], replace(contender.config, strategy="full", lossless=False)).tokens
        ours_fp32 = fp32.generate(prompts[i], contender.config).tokens
        found.append({
            "row": contender.name,
            "prompt": i,
            "diverges_at": d,
            "full_token": full[d] if d < len(full) else None,
            "lossless_token": ours[d] if d < len(ours) else None,
            "top2_logits": [round(v, 4) for v in top.values.tolist()],
            "top2_gap": round(float(top.values[0] - top.values[1]), 4),
            "equal_in_fp32": ours_fp32 == full_fp32,
        })  # fmt: skip
    return found


def _fp32_twin(engine: Engine) -> Engine:
    if engine.dtype == torch.float32:
        return engine
    import copy

    return Engine(copy.deepcopy(engine.model).float(), engine.tokenizer, name=engine.name)
