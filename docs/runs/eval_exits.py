"""Agreement of trained exits with the deep model on prompts no exit was trained on, with the
model's own greedy outputs as targets (what decoding sees).

Usage, from the repository root: python docs/runs/eval_exits.py EXITDIR...
The greedy targets are generated once and cached in ./eval_targets.jsonl."""
import json
import sys
import tempfile

import torch
from pathlib import Path
from free_cli.loading import load_engine
from free_cli.prompts import Fields
from free_cli.train import Trainer, TrainConfig
from free_cli.trainset import load_examples, self_targets
from free_cli.exits import ExitModule
torch.set_num_threads(2)
engine = load_engine(None, dtype="fp32", device="cpu")
sources = [("../shared/data/samsum/validation.jsonl", 40), ("../shared/data/squad/test.jsonl", 40)]
ex = []
for path, n in sources:
    e, _ = load_examples(engine, [path], task="auto", fields=Fields(), target_field=None, limit=n, max_length=1024, references=False)
    ex += e
rows = [json.loads(l) for l in open("../shared/data/instructions/train.jsonl")][9000:9040]
instructions = Path(tempfile.mkdtemp()) / "instructions_eval.jsonl"
instructions.write_text("".join(json.dumps(r) + "\n" for r in rows))
e, _ = load_examples(engine, [str(instructions)], task="auto", fields=Fields(), target_field=None, limit=40, max_length=1024, references=False)
ex += e
with torch.autocast("cpu", dtype=torch.bfloat16):
    ex = self_targets(engine, ex, 64, Path("eval_targets.jsonl"))
print(len(ex), "examples", sum(len(x.target) for x in ex), "target tokens", flush=True)
for d in sys.argv[1:]:
    cfgd = json.loads((Path(d) / "free_exit.json").read_text())
    L_s = cfgd["exit_layer"]
    cfg = TrainConfig(method="exit-only", exit_layer=L_s, steps=1, dtype="bf16").check(engine.num_layers)
    t = Trainer(engine, cfg, ex[:1], ex, Path(tempfile.mkdtemp()))
    t.method.module = ExitModule.load(Path(d), engine.adapter, torch.float32, engine.device)
    r = t.evaluate()
    print(json.dumps({"exit": d, "exit_layer": L_s, **r}), flush=True)
