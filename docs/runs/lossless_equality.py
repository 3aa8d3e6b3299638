"""Lossless free against full with the default settings (the policy, the shipped exit, λ = 0.9,
context pruning; and unpruned), 64 new tokens, on the first N records of test splits: how many
outputs are equal, and where each other one diverges.

Usage, from the repository root: python docs/runs/lossless_equality.py samsum,squad,iwslt2017_de_en 30
"""
import sys, json, torch
from free_cli import DecodeConfig
from free_cli.decoding.loading import load_engine
from free_cli.records.stream import Batch, BatchOptions
from free_cli.records.input import read_records
torch.set_num_threads(2)
e = load_engine()
for d in sys.argv[1].split(","):
    b = Batch(e, BatchOptions())
    with open(f"../shared/data/{d}/test.jsonl", "rb") as f:
        ps = [b.prompt_ids(r) for _, r in zip(range(int(sys.argv[2])), read_records(f))]
    same = {"lossless": 0, "lossless+none": 0}
    for p in ps:
        full = e.generate(p, DecodeConfig(strategy="full", max_new_tokens=64)).tokens
        for name, cfg in (("lossless", DecodeConfig(lossless=True, max_new_tokens=64)), ("lossless+none", DecodeConfig(lossless=True, prune="none", max_new_tokens=64))):
            out = e.generate(p, cfg).tokens
            same[name] += out == full
            if out != full:
                j = next((i for i, (a, c) in enumerate(zip(out, full)) if a != c), min(len(out), len(full)))
                print(json.dumps({"set": d, "row": name, "prompt": ps.index(p), "diverges_at": j}), flush=True)
    print(json.dumps({"set": d, "records": len(ps), **same}), flush=True)
