"""Agreement of trained exits with the deep model on prompts no exit was trained on, with the
model's own greedy outputs as targets (what decoding sees).

Usage, from the repository root: python docs/runs/eval_exits.py EXITDIR...
The greedy targets are generated once and cached in ./eval_targets.jsonl."""
import json
import sys
import tempfile
from pathlib import Path

import torch

from free_cli.decoding.exits import ExitModule
from free_cli.decoding.loading import load_engine
from free_cli.records.prompts import Fields
from free_cli.training.train import Trainer, TrainConfig
from free_cli.training.trainset import load_examples, self_targets

torch.set_num_threads(2)
engine = load_engine(None, dtype="fp32", device="cpu")
rows = [json.loads(line) for line in open("../shared/data/instructions/train.jsonl")][9000:9040]
instructions = Path(tempfile.mkdtemp()) / "instructions_eval.jsonl"  # records no run trained on
instructions.write_text("".join(json.dumps(r) + "\n" for r in rows))
sources = ["../shared/data/samsum/validation.jsonl", "../shared/data/squad/test.jsonl", str(instructions)]
ex, _ = load_examples(engine, sources, task="auto", fields=Fields(), target_field=None, limit=40, max_length=1024, references=False)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ex = self_targets(engine, ex, 64, Path("eval_targets.jsonl"))
print(len(ex), "examples", sum(len(x.target) for x in ex), "target tokens", flush=True)
for d in sys.argv[1:]:
    module = ExitModule.load(Path(d), engine.adapter, torch.float32, engine.device)
    cfg = TrainConfig(method="exit-only", exit_layer=module.exit_layer, steps=1, dtype="bf16").check(engine.num_layers)
    trainer = Trainer(engine, cfg, ex[:1], ex, Path(tempfile.mkdtemp()))  # its evaluation only
    trainer.method.module = module
    print(json.dumps({"exit": d, "exit_layer": module.exit_layer, **trainer.evaluate()}), flush=True)
