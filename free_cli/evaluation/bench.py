"""Speed side by side: every contender on the same prompts, model, precision and device, in one
process. Warm-up runs are excluded and the order of contenders rotates from prompt to prompt, so
drift of the machine spreads over all of them. Speedups are ratios against the fastest full-model
baseline (our own loop, transformers' `generate` in each precision) measured in the same run."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..decoding import kernels
from ..decoding.engine import Engine
from ..decoding.loading import load_engine
from ..decoding.stats import Tally
from ..errors import ConfigError, InputError
from ..metrics import consistency, evaluate
from ..records.stream import load_prompts
from ..thresholds.estimator import EstimatorConfig, OnlineEstimator
from .contenders import FULL, Contender, Plan, contenders
from .report import explain_mismatches, write_report
from .score import references_of


@dataclass
class Runs:
    """One contender's timed runs: their stats summed (stats.py), in all and per repeat."""

    by_repeat: list[list[dict]] = field(default_factory=list)  # each timed pass's stats: drift shows here
    peak_bytes: int | None = None
    outputs: list = field(default_factory=list)  # generated ids per prompt (first repeat)
    lossless: bool = False  # a lossless row: its drafted tokens are checked, and `acceptance` reported

    @property
    def total(self) -> Tally:
        return Tally.of(s for stats in self.by_repeat for s in stats)


class Runner:
    """Runs one contender on one prompt; holds the adaptive threshold's estimator across prompts."""

    def __init__(self, engine: Engine, max_new_tokens: int, estimator: OnlineEstimator | None = None):
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.estimator = estimator or OnlineEstimator(EstimatorConfig(), update_every=1, threshold=0.9)
        self.models: dict[torch.dtype, object] = {}  # transformers' rows: the model in each precision

    def model_in(self, dtype: torch.dtype | None):
        """The engine's model as transformers runs it in `dtype`: the engine's own copy in that
        precision, else a converted one (made once)."""
        dtype = dtype or self.engine.dtype
        if dtype not in self.models:
            own = self.engine.model_in(dtype)
            self.models[dtype] = own if own is not None else self.engine.converted(dtype).model
        return self.models[dtype]

    def run(self, contender: Contender, prompt: list[int], learn: bool = True) -> tuple[list[int], dict]:
        """The generated ids and their stats (counts as `Engine.stats` gives them); a count
        transformers' `generate` does not tell is None."""
        if contender.config is None or contender.kind == "hf-early-exit":
            early = contender.config.exit_layer if contender.kind == "hf-early-exit" else None
            model = self.model_in(contender.dtype)
            tokens, seconds, prefill = hf_generate(self.engine, model, prompt, self.max_new_tokens, early, contender.lookup)
            n, full = len(tokens), contender.kind == "generate"  # the full model runs every layer and the whole head per token
            layers, head = (n * self.engine.num_layers, n * self.engine.vocab_size * self.engine.adapter.hidden_size) if full else (None, None)
            return tokens, {"new_tokens": n, "wall_time_s": seconds, "prefill_s": prefill, "exited_tokens": None, "layers_run": layers, "head_macs": head}
        cfg = contender.config
        if contender.kind == "auto":
            cfg = replace(cfg, threshold=self.estimator.threshold)
        result = self.engine.generate(prompt, cfg)
        if contender.kind == "auto" and learn:
            self.estimator.observe(result.pairs)
        return result.tokens, result.stats


class _FirstToken:
    """A transformers streamer that notes when the first new token arrives (after the prompt)."""

    def __init__(self, engine: Engine):
        self.engine, self.puts, self.at = engine, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt (or the decoder's start token)
            self.engine.device_sync()
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(engine: Engine, model, prompt: list[int], max_new_tokens: int, assistant_early_exit: int | None = None, lookup: int | None = None) -> tuple[list[int], float, float | None]:
    """transformers' greedy decoding of the same model (`model`: the engine's, in the precision to
    run, with PyTorch's own kernels), timed like ours: ids, seconds, seconds to the first token.
    With `assistant_early_exit`, its self-speculative decoding drafted by the first layers; with
    `lookup`, its prompt lookup decoding drafting that many tokens a round."""
    ids = torch.tensor([prompt], device=engine.device)
    kwargs = {"attention_mask": torch.ones_like(ids)} if not engine.adapter.is_encoder_decoder else {}
    if assistant_early_exit is not None:
        kwargs["assistant_early_exit"] = assistant_early_exit
    if lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = lookup
    first = _FirstToken(engine)
    engine.device_sync()
    began = time.perf_counter()
    with torch.inference_mode(), kernels.bypassed():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=first, **kwargs)
    engine.device_sync()
    seconds = time.perf_counter() - began
    start = 1 if engine.adapter.is_encoder_decoder else len(prompt)
    return out[0, start:].tolist(), seconds, None if first.at is None else first.at - began


def run_bench(
    engine: Engine,
    prompts: list[list[int]],
    rows: list[Contender],
    *,
    max_new_tokens: int,
    repeats: int = 1,
    warmup: int = 1,
    references: list[list[str]] | None = None,
    metrics: list[str] | None = None,
    progress=None,
) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Summary rows, and each contender's generated ids per prompt (from the first repeat).

    Every contender runs each prompt before the next prompt starts, in an order that rotates from
    prompt to prompt, so drift of the machine spreads over all rows. Peak memory is measured per
    row on CUDA (allocated bytes)."""
    runner = Runner(engine, max_new_tokens)
    for contender in rows:  # warm-up, not timed, not learned from
        for prompt in prompts[:warmup]:
            runner.run(contender, prompt, learn=False)
    runs = {c.name: Runs(lossless=c.config is not None and c.config.lossless) for c in rows}
    cuda = engine.device.type == "cuda"
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            k = (i + repeat) % len(rows)
            for contender in rows[k:] + rows[:k]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(engine.device)
                tokens, stats = runner.run(contender, prompt)
                r = runs[contender.name]
                if cuda:
                    r.peak_bytes = max(r.peak_bytes or 0, torch.cuda.max_memory_allocated(engine.device))
                if len(r.by_repeat) <= repeat:
                    r.by_repeat.append([])
                r.by_repeat[repeat].append(stats)
                if repeat == 0:
                    r.outputs.append(tokens)
            if progress is not None:
                progress.update(1)
    outputs = {name: r.outputs for name, r in runs.items()}
    rows_out = summarize(runs, engine.num_layers, [c.name for c in rows if c.kind in ("full", "generate")])
    texts = {name: [engine.decode(ids) for ids in outs] for name, outs in outputs.items()}
    add_quality(rows_out, texts, references, metrics)
    kinds = {c.name: c.kind for c in rows}
    for row in rows_out:
        row["kind"] = kinds[row["row"]]
    if any(c.kind == "auto" for c in rows):
        row = next(r for r in rows_out if r["kind"] == "auto")
        row["final_threshold"] = runner.estimator.threshold
    return rows_out, outputs


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def summarize(runs: dict[str, Runs], num_layers: int, baselines: list[str]) -> list[dict]:
    """A row per contender. `speedup` is against the fastest of the full-model `baselines` (our
    loop, transformers' generate in each precision), end to end; `decode_speedup` against our full
    loop after each record's first token."""
    totals = {name: r.total for name, r in runs.items()}
    rate = {name: t.tokens_per_s for name, t in totals.items()}
    best_full = max(rate[b] for b in baselines) if baselines else 1.0
    full_decode = totals[FULL].decode_tokens_per_s if FULL in totals else None
    reference = runs[FULL].outputs if FULL in runs else None
    rows = []
    for name, r in runs.items():
        t = totals[name]
        decode = t.decode_tokens_per_s
        row = {
            "row": name,
            "tokens_per_s": rate[name],
            "speedup": rate[name] / best_full if best_full else 0.0,
            "decode_tokens_per_s": decode,
            "decode_speedup": decode / full_decode if decode and full_decode else None,
            "prefill_s": t.prefill_s,
            "new_tokens": t.new_tokens,
            "seconds": t.wall_time_s,
            "exited_share": t.exited_share,
            "mean_layers": t.mean_layers,
            "head_mmacs_per_token": None if t.head_macs is None else t.head_macs_per_token / 1e6,
            "num_layers": num_layers,
            "prompts": len(r.outputs),
            "peak_memory_mb": None if r.peak_bytes is None else r.peak_bytes / 2**20,
            "tokens_per_s_by_repeat": [Tally.of(stats).tokens_per_s for stats in r.by_repeat],
        }
        if r.lossless and t.exited_tokens is not None and t.exited_tokens + (t.rejected or 0):
            row["acceptance"] = t.exited_tokens / (t.exited_tokens + (t.rejected or 0))  # the share of the exit's stacked tokens kept
        if t.verifications:  # lookup drafts: tokens kept per verification round, rounds that kept none
            row["accepted_per_verification"] = t.accepted_per_verification
            row["empty_verifications"] = t.empty_share
        if reference is not None:
            row["equal_to_full"] = sum(a == b for a, b in zip(r.outputs, reference))
        rows.append(row)
    return rows


def add_quality(rows: list[dict], texts: dict[str, list[str]], references: list[list[str]] | None, metrics: list[str] | None) -> None:
    """Each row's quality against the references and its consistency with the full outputs."""
    for row in rows:
        outs = texts[row["row"]]
        if references is not None and metrics:
            row["quality"] = evaluate(outs, references[: len(outs)], metrics)[0]
        if FULL in texts:
            row["rougeL_full"] = consistency(outs, texts[FULL])["rougeL_full"]




@dataclass
class Bench:
    """What one `free bench` run measured: the rows, and what explains or reports them."""

    engine: Engine
    rows: list[dict]
    contenders: list[Contender]
    prompts: list[list[int]]
    outputs: dict[str, list[list[int]]]
    header: str

    def write(self, out_dir: Path) -> list[Path]:
        return write_report(out_dir, self.rows, self.header)

    def mismatches(self) -> list[dict]:
        return explain_mismatches(self.engine, self.prompts, self.outputs, self.contenders)


def bench_job(
    input: str, plan: Plan, *, model: str | None = None, dtype: str = "auto", device: str = "auto", limit: int = 20, task: str = "auto",
    reference_field: str | None = None, metrics: list[str] | None = None, repeats: int = 1, say=lambda line: None, progress=None,
) -> Bench:
    """`free bench`: loads the model, runs every contender of `plan` over the first `limit`
    records of `input`, and summarizes the rows. transformers' rows run in each precision the
    engine computes in unless the plan names them. `progress(total)` opens a progress bar."""
    if not Path(input).is_file():
        raise InputError(f"no such input file: {input}")
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    plan.check()
    engine = load_engine(model, dtype=dtype, device=device)
    rows = contenders(plan, engine.adapter.is_encoder_decoder, computes_in=tuple(dict.fromkeys((engine.precision.narrow, engine.precision.wide))))
    rows = [replace(r, config=r.config.resolved(engine.num_layers, engine.default_exit_layer)) if r.config else r for r in rows]
    records, prompts = load_prompts(engine, input, limit, task)
    references, chosen = references_of(records, reference_field, metrics)
    say(f"{engine.describe()} · {len(prompts)} prompts · {len(rows)} rows")
    with progress(len(prompts) * repeats) as bar:
        results, outputs = run_bench(engine, prompts, rows, max_new_tokens=plan.max_new_tokens, repeats=repeats, references=references, metrics=chosen, progress=bar)
    source = Path(input).resolve()
    header = f"{source.parent.name}/{source.name}, {len(prompts)} prompts, {plan.max_new_tokens} new tokens · {engine.describe()} · process peak RSS {peak_rss_mb():.0f} MB"
    return Bench(engine, results, rows, prompts, outputs, header)
