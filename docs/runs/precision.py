"""End to end, per record with prefill included: our decoding under the precision policy against
our loop as it ran before the policy (bf16 or fp32 throughout, oneDNN for every product) and
transformers' `generate` in bf16 and fp32, on short prompts (SAMSum, SQuAD) and long ones (1,000+
tokens: the contexts of one SQuAD article joined, and a question on one of them).

Usage, from the repository root:
    python docs/runs/precision.py [--per-set N] [--new-tokens N] [--mixed]
`--mixed` times the policy a CPU without native bf16 gets (bf16 steps, fp32 wide passes); run it
with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to emulate such a CPU on one that has bf16.
Contenders run each record in turn, in an order that rotates from record to record; a warm-up
record per contender is not timed. Prints one JSON line per record and contender to stdout, and a
table of mean seconds per record and speedups against the fastest `generate` to stderr.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from free_cli import DecodeConfig, Engine
from free_cli.decoding.loading import DEFAULT_EXIT, default_model_dir, _load
from free_cli.decoding.exits import ExitModule
from free_cli.decoding.precision import Precision, resolve
from free_cli.records.stream import Batch, BatchOptions
from free_cli.records.input import read_records

DATA = Path("../shared/data")
parser = argparse.ArgumentParser()
parser.add_argument("--per-set", type=int, default=4)
parser.add_argument("--new-tokens", type=int, default=48)
parser.add_argument("--mixed", action="store_true")
parser.add_argument("--skip-free", action="store_true")
parser.add_argument("--sets", default="samsum,squad,long")
args = parser.parse_args()
torch.set_num_threads(2)
cpu = torch.device("cpu")


def engine(precision: Precision) -> Engine:
    model, tokenizer = _load(default_model_dir(), precision.wide)
    e = Engine(model, tokenizer, precision=precision)
    e.attach_exit(ExitModule.load(DEFAULT_EXIT, e.adapter, torch.float32, cpu))
    return e


policy = Precision(torch.bfloat16, torch.float32) if args.mixed else resolve("auto", cpu)
legacy = {"bf16": Precision(torch.bfloat16, torch.bfloat16, onednn_from=1), "fp32": Precision(torch.float32, torch.float32, onednn_from=1)}
engines = {"policy": engine(policy), **{f"before {k}": engine(p) for k, p in legacy.items()}}
hf = {"bf16": engines["before bf16"].model, "fp32": engines["before fp32"].model}
tokenizer = engines["policy"].tokenizer


def prompts_of(path: Path, n: int) -> list[list[int]]:
    batch = Batch(engines["policy"], BatchOptions())
    with open(path, "rb") as f:
        return [batch.prompt_ids(r) for _, r in zip(range(n), read_records(f))]


def long_prompts(n: int) -> list[list[int]]:
    """The contexts of one SQuAD article joined until 1,000 tokens, with the article's first question."""
    articles = {}
    for line in open(DATA / "squad/test.jsonl"):
        r = json.loads(line)
        a = articles.setdefault(r["title"], {"contexts": [], "question": r["question"]})
        if r["context"] not in a["contexts"]:
            a["contexts"].append(r["context"])
    batch, out = Batch(engines["policy"], BatchOptions(task="qa")), []
    for title, a in articles.items():
        text = ""
        for c in a["contexts"]:
            text = f"{text}\n\n{c}" if text else c
            if len(tokenizer(text)["input_ids"]) >= 1000:
                break
        from free_cli.records.input import Record

        ids = batch.prompt_ids(Record(0, {"context": text, "question": a["question"]}))
        if len(ids) >= 1000:
            out.append(ids)
        if len(out) == n:
            return out
    return out


sets = {
    "samsum": lambda: prompts_of(DATA / "samsum/test.jsonl", args.per_set),
    "squad": lambda: prompts_of(DATA / "squad/test.jsonl", args.per_set),
    "long": lambda: long_prompts(max(2, args.per_set // 2)),
}
sets = {name: make() for name, make in sets.items() if name in args.sets.split(",")}
N = args.new_tokens
rows = [("full (policy)", "policy", DecodeConfig(strategy="full", max_new_tokens=N))]
rows += [(f"full ({k})", k, DecodeConfig(strategy="full", max_new_tokens=N)) for k in engines if k != "policy"]
if not args.skip_free:
    rows += [("free λ=0.9 (policy)", "policy", DecodeConfig(max_new_tokens=N)), ("lossless (policy)", "policy", DecodeConfig(lossless=True, max_new_tokens=N))]
    rows += [("free λ=0.9 (before bf16)", "before bf16", DecodeConfig(max_new_tokens=N, prune="none")), ("lossless (before bf16)", "before bf16", DecodeConfig(lossless=True, max_new_tokens=N, prune="none"))]
rows += [(f"transformers {k}", k, None) for k in hf]


def run(row, prompt):
    name, key, cfg = row
    if cfg is None:
        ids = torch.tensor([prompt])
        began = time.perf_counter()
        with torch.inference_mode():
            out = hf[key].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)
        return out[0, len(prompt):].tolist(), time.perf_counter() - began
    result = engines[key].generate(prompt, cfg)
    return result.tokens, result.stats["wall_time_s"]


for row in rows:  # warm-up
    run(row, next(iter(sets.values()))[0])
seconds = {s: {r[0]: [] for r in rows} for s in sets}
tokens = {s: {r[0]: [] for r in rows} for s in sets}
i = 0
for s, prompts in sets.items():
    for prompt in prompts:
        k = i % len(rows)
        for row in rows[k:] + rows[:k]:
            out, sec = run(row, prompt)
            seconds[s][row[0]].append(sec)
            tokens[s][row[0]].append(out)
            print(json.dumps({"set": s, "row": row[0], "prompt_tokens": len(prompt), "seconds": sec, "tokens": out}), flush=True)
        i += 1

print(f"\npolicy: {policy.describe()} · {args.new_tokens} new tokens · mean seconds per record (speedup against the faster transformers row)", file=sys.stderr)
for s in sets:
    best = min(statistics.mean(seconds[s][f"transformers {k}"]) for k in hf)
    lengths = [len(p) for p in sets[s]]
    print(f"\n{s}: {len(lengths)} records, prompts {min(lengths)}-{max(lengths)} tokens", file=sys.stderr)
    ref, ours = tokens[s]["transformers bf16"], tokens[s]["full (policy)"]
    for name, _, _ in rows:
        mean = statistics.mean(seconds[s][name])
        same = sum(a == b for a, b in zip(tokens[s][name], ref))
        same_ours = sum(a == b for a, b in zip(tokens[s][name], ours))
        print(f"  {name:28s} {mean:7.2f} s  {best / mean:5.2f}x  same as transformers bf16: {same}/{len(ref)}, as full (policy): {same_ours}/{len(ref)}", file=sys.stderr)
