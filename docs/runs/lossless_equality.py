"""Lossless free against full with the default settings (the policy, the shipped exit, λ = 0.9,
drafts auto, context pruning; unpruned; drafting by lookup alone), 64 new tokens, on the first N records of test splits: how many
outputs are equal, and where each other one diverges.

Usage, from the repository root: python docs/runs/lossless_equality.py samsum,squad,iwslt2017_de_en 30
"""
import sys, json, torch
from free_cli import DecodeConfig, load_engine, load_prompts
torch.set_num_threads(2)
e = load_engine()
for d in sys.argv[1].split(","):
    _, ps = load_prompts(e, f"../shared/data/{d}/test.jsonl", int(sys.argv[2]))
    same = {"lossless": 0, "lossless+none": 0, "lossless+lookup": 0}
    for p in ps:
        full = e.generate(p, DecodeConfig(strategy="full", max_new_tokens=64)).tokens
        for name, cfg in (("lossless", DecodeConfig(lossless=True, max_new_tokens=64)), ("lossless+none", DecodeConfig(lossless=True, prune="none", max_new_tokens=64)), ("lossless+lookup", DecodeConfig(lossless=True, draft="lookup", max_new_tokens=64))):
            out = e.generate(p, cfg).tokens
            same[name] += out == full
            if out != full:
                j = next((i for i, (a, c) in enumerate(zip(out, full)) if a != c), min(len(out), len(full)))
                print(json.dumps({"set": d, "row": name, "prompt": ps.index(p), "diverges_at": j}), flush=True)
    print(json.dumps({"set": d, "records": len(ps), **same}), flush=True)
