"""Frozen-model features for the exit variants in docs/benchmarks.md: layer 8, 12 and 15 states and
the deep model's top 64 at every position, for the first 500 records of each training set (split
as free train splits them, self targets) and the 120 unseen prompts of eval_exits.py.

Usage, from the repository root: python docs/runs/exit_variants_features.py (about 14 min on a
2-core CPU; writes exit_variants/feat_*.pt, 1.4 GB), then docs/runs/exit_variants.py."""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, ".")
from free_cli.decoding.loading import load_engine
from free_cli.records.prompts import Fields
from free_cli.training.trainset import load_examples, self_targets, split, collate
from free_cli.training.methods import forward_states
torch.set_num_threads(2)
Path("exit_variants").mkdir(exist_ok=True)
rows = [json.loads(line) for line in open("../shared/data/instructions/train.jsonl")][9000:9040]
Path("exit_variants/instr_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
LAYERS = [8, 12, 15]
eng = load_engine(None, dtype="fp32", device="cpu")
D = "../shared/data"
srcs = [f"{D}/samsum/train.jsonl", f"{D}/squad/train.jsonl", f"{D}/instructions/train.jsonl"]
ex, _ = load_examples(eng, srcs, limit=500, references=False)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ex = self_targets(eng, ex, 64, Path("exit_variants/self_targets.jsonl"))
train, held = split(ex, 0.05, 200, 0)
ev, _ = load_examples(eng, [f"{D}/samsum/validation.jsonl", f"{D}/squad/test.jsonl", "exit_variants/instr_eval.jsonl"], limit=40, references=False)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ev = self_targets(eng, ev, 64, Path("eval_targets.jsonl"))
print(len(train), len(held), len(ev), flush=True)
pad = eng.tokenizer.pad_token_id
def feats(examples, name):
    out = []
    t = time.time()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(examples), 8):
            b = collate(examples[s:s+8], pad, eng.device)
            states, final = forward_states(eng.model, b.ids, b.attention)
            for r in range(b.ids.shape[0]):
                n = int(b.attention[r].sum()); P = len(examples[s+r].prompt)
                top = eng.adapter.head(final[r, :n]).float().topk(64, dim=-1)
                out.append({"P": P, "n": n, "ids": b.ids[r, :n].clone(),
                            "h": {l: states[l][r, :n].to(torch.bfloat16).clone() for l in LAYERS},
                            "tid": top.indices.to(torch.int32), "tl": top.values.to(torch.bfloat16)})
            print(name, s, f"{time.time()-t:.0f}s", flush=True)
    torch.save(out, f"exit_variants/feat_{name}.pt")
feats(ev, "unseen"); feats(held, "held"); feats(train, "train")
print("done", flush=True)
