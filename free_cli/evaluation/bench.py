"""Speed side by side: every contender on the same prompts, model, precision and device, in one
process. Warm-up runs are excluded and the order of contenders rotates from prompt to prompt, so
drift of the machine spreads over all of them. Speedups are ratios against the faster of the two
full-model baselines (our own loop and transformers' `generate`) measured in the same run."""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..decoding import kernels
from ..decoding.config import DecodeConfig
from ..decoding.engine import Engine
from .score import consistency, evaluate, format_figure
from ..decoding.stats import Tally
from ..thresholds.estimator import EstimatorConfig, OnlineEstimator

FULL = "full"
KINDS = ("full", "generate", "static", "calm", "free", "auto", "lossless", "sampling", "hf-early-exit", "hf-lookup")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # one of KINDS
    config: DecodeConfig | None = None  # None: transformers' own `generate`
    dtype: torch.dtype | None = None  # transformers' rows: the precision it runs in
    lookup: int | None = None  # transformers' prompt lookup: tokens drafted a round


@dataclass(frozen=True)
class Plan:
    """Which rows a benchmark runs (free bench's options): see `contenders`."""

    max_new_tokens: int = 64
    exit_layer: int | None = None
    thresholds: tuple[float, ...] = (0.9,)
    skip: tuple[str, ...] = ()
    prune: tuple[str, ...] = ()
    prune_k: int = 1024
    measures: tuple[str, ...] = ()
    sampling: DecodeConfig | None = None
    lossless_at: tuple[float, ...] | None = None
    drafts: tuple[str, ...] = ("exit", "lookup", "auto")  # lossless rows: each draft
    lookup_k: tuple[int, ...] = (3, 10)  # transformers' prompt lookup rows: each K
    baseline_dtypes: tuple[torch.dtype, ...] = (torch.float32,)  # transformers' rows: each precision


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


def contenders(plan: Plan, encoder_decoder: bool = False) -> list[Contender]:
    """The rows of a benchmark: our full loop; transformers' `generate` and its prompt lookup at
    each K, in each baseline precision; static, calm, free at each threshold, free with the
    adaptive threshold; lossless free with each draft (the exit's at each threshold, lookup, auto
    at the first); transformers' self-speculative early exit (decoder-only models); less the kinds
    in `skip`. Each schedule in `prune` adds pruned rows: `context` to free and lossless free, a
    per-layer one to calm. Each confidence measure in `measures` other than softmax adds calm, free
    and lossless free rows with that measure at the first threshold. `lossless_at` limits the
    lossless rows drafted by the exit to those thresholds."""
    base = DecodeConfig(max_new_tokens=plan.max_new_tokens, exit_layer=plan.exit_layer, prune="none")  # pruned rows are added by name
    thresholds, first = plan.thresholds, plan.thresholds[0]
    rows = [Contender(FULL, "full", replace(base, strategy="full"))]
    for dtype in plan.baseline_dtypes:
        name = DTYPE_NAMES[dtype]
        rows.append(Contender(f"transformers generate {name}", "generate", dtype=dtype))
        if not encoder_decoder:
            rows += [Contender(f"transformers lookup K={k} {name}", "hf-lookup", dtype=dtype, lookup=k) for k in plan.lookup_k]
    rows.append(Contender("static", "static", replace(base, strategy="static")))
    rows.append(Contender(f"calm λ={first:g}", "calm", replace(base, strategy="calm", threshold=first)))
    rows += [Contender(f"free λ={t:g}", "free", replace(base, strategy="free", threshold=t, draft="exit")) for t in thresholds]
    rows.append(Contender("free λ=auto", "auto", replace(base, strategy="free", sync_at_end=True, draft="exit")))
    checked = [t for t in thresholds if plan.lossless_at is None or t in plan.lossless_at]
    lossless = replace(base, strategy="free", lossless=True)
    if "exit" in plan.drafts:
        rows += [Contender(f"free lossless λ={t:g}", "lossless", replace(lossless, threshold=t, draft="exit")) for t in checked]
    if "lookup" in plan.drafts:
        rows.append(Contender("free lossless lookup", "lossless", replace(lossless, draft="lookup")))
    if "auto" in plan.drafts:
        rows.append(Contender(f"free lossless auto λ={first:g}", "lossless", replace(lossless, threshold=first, draft="auto")))
    for schedule in plan.prune:
        pruned = replace(base, prune=schedule, prune_k=plan.prune_k)
        if schedule == "context":
            rows += [Contender(f"free λ={t:g} +context", "free", replace(pruned, strategy="free", threshold=t, draft="exit")) for t in thresholds]
            if "exit" in plan.drafts:
                rows += [Contender(f"free lossless λ={t:g} +context", "lossless", replace(pruned, strategy="free", threshold=t, lossless=True, draft="exit")) for t in checked]
        else:
            rows.append(Contender(f"calm λ={first:g} +{schedule}", "calm", replace(pruned, strategy="calm", threshold=first)))
    for measure in (m for m in plan.measures if m != "softmax"):
        measured = replace(base, confidence=measure, threshold=first)
        rows.append(Contender(f"calm λ={first:g} [{measure}]", "calm", replace(measured, strategy="calm")))
        rows.append(Contender(f"free λ={first:g} [{measure}]", "free", replace(measured, strategy="free", draft="exit")))
        rows.append(Contender(f"free lossless λ={first:g} [{measure}]", "lossless", replace(measured, strategy="free", lossless=True, draft="exit")))
    if plan.sampling is not None:  # sampling rows: the options' temperature, top-k, top-p and seed
        s = plan.sampling
        drawn = replace(base, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, threshold=first)
        label = f"T={s.temperature:g}"
        rows.append(Contender(f"full {label}", "sampling", replace(drawn, strategy="full")))
        rows.append(Contender(f"free λ={first:g} {label}", "sampling", replace(drawn, strategy="free", draft="exit")))
        rows.append(Contender(f"free lossless λ={first:g} {label}", "sampling", replace(drawn, strategy="free", lossless=True, draft="exit")))
    if not encoder_decoder:
        rows.append(Contender("hf assistant_early_exit", "hf-early-exit", replace(base, strategy="static"), dtype=plan.baseline_dtypes[0] if plan.baseline_dtypes else None))
    return [r for r in rows if r.kind not in plan.skip or r.kind == "full"]


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


def table(rows: list[dict]) -> str:
    """A fixed-width table for people (stderr)."""
    metrics = list(rows[0].get("quality", {})) if rows else []
    head = f"{'row':<32} {'tok/s':>8} {'× best full':>11} {'× decode':>9} {'acc/ver':>7} {'exited':>7} {'layers':>7} {'head M':>7} {'= full':>8} {'RL full':>7}"
    head += "".join(f" {m:>9}" for m in metrics) + f" {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        equal = f"{r['equal_to_full']}/{r['prompts']}" if "equal_to_full" in r else "-"
        exited = "-" if r["exited_share"] is None else f"{100 * r['exited_share']:.0f}%"
        layers = "-" if r["mean_layers"] is None else f"{r['mean_layers']:.1f}"
        head_m = "-" if r["head_mmacs_per_token"] is None else f"{r['head_mmacs_per_token']:.1f}"
        decode = "-" if r.get("decode_speedup") is None else f"{r['decode_speedup']:.2f}x"
        accepted = f"{r['accepted_per_verification']:.2f}" if "accepted_per_verification" in r else "-"
        line = f"{r['row']:<32} {r['tokens_per_s']:>8.2f} {r['speedup']:>10.2f}x {decode:>9} {accepted:>7} {exited:>7} {layers:>7} {head_m:>7} {equal:>8} {r.get('rougeL_full', float('nan')):>7.3f}"
        line += "".join(f" {format_figure(m, r['quality'][m]):>9}" for m in metrics)
        line += f" {'-' if r['peak_memory_mb'] is None else format(r['peak_memory_mb'], '.0f'):>8}"
        lines.append(line)
    return "\n".join(lines)


def markdown(rows: list[dict], header: str = "") -> str:
    """The table as markdown, for docs and CI summaries."""
    metrics = list(rows[0].get("quality", {})) if rows else []
    cols = ["row", "tok/s", "speedup", "decode speedup", "kept/verification", "exited", "layers/token", "head MMACs/token", "= full", "ROUGE-L vs full"] + metrics + ["peak MB"]
    lines = ([header, ""] if header else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["row"], f"{r['tokens_per_s']:.2f}", f"{r['speedup']:.2f}x",
            "-" if r.get("decode_speedup") is None else f"{r['decode_speedup']:.2f}x",
            f"{r['accepted_per_verification']:.2f}" if "accepted_per_verification" in r else "-",
            "-" if r["exited_share"] is None else f"{100 * r['exited_share']:.0f}%",
            "-" if r["mean_layers"] is None else f"{r['mean_layers']:.1f} / {r['num_layers']}",
            "-" if r["head_mmacs_per_token"] is None else f"{r['head_mmacs_per_token']:.1f}",
            f"{r.get('equal_to_full', '-')}/{r['prompts']}", f"{r.get('rougeL_full', float('nan')):.3f}",
        ]  # fmt: skip
        cells += [format_figure(m, r["quality"][m]) for m in metrics]
        cells.append("-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Quality against normalized latency (the best full baseline's time per token = 1), as in the
    FREE paper's ROUGE-L versus latency curves. Quality is ROUGE-L, F1 or BLEU against the
    references (the first measured), else ROUGE-L against the full model's outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = list(rows[0].get("quality", {}))
    metric = next((m for m in ("rougeL", "f1", "bleu") if m in measured), measured[0] if measured else None)
    label = metric or "ROUGE-L vs full output"
    y = lambda r: r["quality"][metric] if metric else r.get("rougeL_full", math.nan)  # noqa: E731
    x = lambda r: 1 / r["speedup"] if r["speedup"] else math.nan  # noqa: E731
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"full": "s", "generate": "s", "hf-lookup": "X", "static": "v", "calm": "^", "free": "o", "auto": "*", "lossless": "D", "hf-early-exit": "P"}
    series: dict[str, list[dict]] = {}  # a threshold sweep of one configuration: "free +context"
    for r in rows:
        name = r["row"] if r.get("kind") == "auto" else re.sub(r"\s*λ=\S+", "", r["row"]).strip()
        series.setdefault(name, []).append(r)
    for name, group in series.items():
        group.sort(key=x)
        ax.plot([x(r) for r in group], [y(r) for r in group], marker=markers.get(group[0].get("kind"), "o"), linestyle="-" if len(group) > 1 else "", label=name)
        for r in group:  # each point's threshold; the legend names the configuration
            found = re.search(r"λ=(\S+)", r["row"])
            if found and r.get("kind") != "auto":
                ax.annotate(found.group(1), (x(r), y(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("normalized latency per token (best full baseline = 1)")
    ax.set_ylabel(label)
    ax.set_title(title.replace(" · ", "\n"), fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, rows: list[dict], header: str) -> list[Path]:
    """bench.jsonl, bench.md and bench.png in `out_dir`."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.jsonl", out_dir / "bench.md", out_dir / "bench.png"]
    paths[0].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    paths[1].write_text(markdown(rows, header) + "\n")
    plot(rows, paths[2], header)
    return paths


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
    fp32 = engine.converted(torch.float32)
    full_config = next(c.config for c in rows if c.name == FULL)  # the row `outputs[FULL]` came from
    found = []
    for contender, i in cases:
        ours, full = outputs[contender.name][i], outputs[FULL][i]
        d = next(j for j, (a, b) in enumerate(zip(ours, full)) if a != b) if ours[: len(full)] != full else len(full)
        with torch.inference_mode():
            prefix = torch.tensor([prompts[i] + full[:d]], device=engine.device)
            logits = engine.model(prefix).logits[0, -1].float()
        top = logits.topk(2)
        full_fp32 = fp32.generate(prompts[i], full_config).tokens
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
