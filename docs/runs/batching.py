"""Throughput of batched decoding: tokens and records per second at batch sizes B for our full,
free and lossless free (continuous batching, `free generate --batch-size B`) against transformers'
batched `generate` (left-padded, the batch decoding until its last row stops), on the same records,
in one precision policy.

Usage, from the repository root:
    python docs/runs/batching.py [--records 16] [--new-tokens 48] [--dtype auto|fp32|bf16]
        [--batch-sizes 1,4,8,16] [--model M] [--threshold 0.9] [--data ../shared/data/samsum/test.jsonl]
Each configuration runs the whole set once after a warm-up on two records; wall time includes
prefill. Prints one JSON line per configuration to stdout and a table to stderr.
"""
import argparse
import json
import sys
import time

import torch

from free_cli import DecodeConfig, Tally, generate_rows, load_engine, load_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--records", type=int, default=16)
parser.add_argument("--new-tokens", type=int, default=48)
parser.add_argument("--dtype", default="auto")
parser.add_argument("--batch-sizes", default="1,4,8,16")
parser.add_argument("--model", default=None)
parser.add_argument("--threshold", type=float, default=0.9)
parser.add_argument("--data", default="../shared/data/samsum/test.jsonl")
parser.add_argument("--skip", default="", help="comma-separated rows to leave out: full, free, lossless, transformers")
args = parser.parse_args()
torch.set_num_threads(2)
engine = load_engine(args.model, dtype=args.dtype, device="cpu")
_, prompts = load_prompts(engine, str(args.data), args.records)
N = args.new_tokens
configs = {
    "full": DecodeConfig(strategy="full", max_new_tokens=N),
    "free": DecodeConfig(strategy="free", threshold=args.threshold, max_new_tokens=N),
    "lossless": DecodeConfig(strategy="free", threshold=args.threshold, lossless=True, max_new_tokens=N),
}
configs = {k: v for k, v in configs.items() if k not in args.skip.split(",")}
tokenizer = engine.tokenizer
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(engine.stop_ids)
stop = sorted(engine.stop_ids)


def ours(cfg, prompts, size):
    began = time.perf_counter()
    results = dict(generate_rows(engine, [(i, p, cfg) for i, p in enumerate(prompts)], size))
    seconds = time.perf_counter() - began
    outs = [results[i] for i in range(len(prompts))]
    exited = Tally.of(r.stats for r in outs).exited_tokens
    return [r.tokens for r in outs], seconds, exited


def transformers(prompts, size):
    """transformers' generate over consecutive groups of `size` records, left-padded."""
    tokens, began = [], time.perf_counter()
    model = engine.model
    for start in range(0, len(prompts), size):
        group = prompts[start : start + size]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            tokens.append(row[:cut])
    return tokens, time.perf_counter() - began, None


rows = []
reference = None
for size in map(int, args.batch_sizes.split(",")):
    runs = {name: (lambda cfg=cfg: ours(cfg, prompts, size)) for name, cfg in configs.items()}
    if "transformers" not in args.skip:
        runs["transformers"] = lambda: transformers(prompts, size)
    for name, run in runs.items():
        if name == "transformers":  # warm-up
            transformers(prompts[:2], min(size, 2))
        else:
            ours(configs[name], prompts[:2], min(size, 2))
        tokens, seconds, exited = run()
        n = sum(map(len, tokens))
        if name == "full" and size == 1:
            reference = tokens
        same = sum(a == b for a, b in zip(tokens, reference)) if reference else None
        row = {"row": name, "batch_size": size, "precision": engine.precision.describe(), "records": len(prompts), "tokens": n,
               "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 2), "records_per_s": round(len(prompts) / seconds, 3),
               "exited_share": round(exited / n, 3) if exited is not None else None, "same_as_full_b1": same}
        rows.append(row)
        print(json.dumps(row), flush=True)

print(f"\n{engine.describe()} · {len(prompts)} records of {args.data} · {N} new tokens at most", file=sys.stderr)
print(f"{'row':14s} {'B':>3s} {'tok/s':>7s} {'rec/s':>6s} {'exited':>6s} {'same as full B=1':>16s}", file=sys.stderr)
for r in rows:
    exited = f"{r['exited_share']:.2f}" if r["exited_share"] is not None else "-"
    print(f"{r['row']:14s} {r['batch_size']:3d} {r['tokens_per_s']:7.1f} {r['records_per_s']:6.3f} {exited:>6s} {r['same_as_full_b1']!s:>16s}", file=sys.stderr)
