"""`free bench`'s report: a table for people, markdown for docs, the quality-versus-latency plot,
and the traces of lossless outputs that differ from full."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..decoding.engine import Engine
from .contenders import FULL, Contender
from .score import format_figure


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
