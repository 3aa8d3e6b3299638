"""c(k): the cost of a full pass (all layers and the LM head) over k rows after a 300-token
context, under the default precision policy with free's row kernels and with PyTorch's kernels
(the policy as it was before them: bf16 under 8 rows, fp32 from 8, oneDNN from 4 rows). What the
draft cost model and the synchronized pass pay (docs/benchmarks.md, "The row kernels").

Usage, from the repository root: python docs/runs/pass_costs.py [--rounds N] [--model M] [--widths 1,2,4] [--policy P]
Medians of N rounds (default 9), each timing every width under each policy in turn, so that drift
of the machine hits all alike. --policy "row kernels" times the default policy alone (one copy of
the weights, for models too large to hold twice). Prints one JSON line per policy: ms per width and c(k) / c(1).
"""
import argparse
import json
import statistics
import time

import torch

from free_cli import DecodeConfig, Precision, decoding_steps, load_engine

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=9)
parser.add_argument("--model", default=None)
parser.add_argument("--policy", choices=("both", "row kernels"), default="both", help="row kernels: the default policy alone, one copy of the weights (a 1.5B model and its converted copy fill 24 GB)")
parser.add_argument("--widths", default="1,2,3,4,6,8,12,16,24,32", help="comma-separated row counts")
args = parser.parse_args()
torch.set_num_threads(2)
WIDTHS = tuple(int(w) for w in args.widths.split(","))
kernels = load_engine(args.model, device="cpu")
cfg = DecodeConfig(strategy="free", max_new_tokens=1).resolved(kernels.num_layers, kernels.default_exit_layer)
policies = {"row kernels": kernels}
if args.policy == "both":
    policies["pytorch kernels"] = kernels.converted(Precision(torch.bfloat16, torch.float32, wide_from=8, onednn_from=4, kernel_rows=0))
prompt = [100 + (7 * i) % 1000 for i in range(300)]
steps = {(name, k): decoding_steps(engine, prompt, cfg, rows=k)[0] for name, engine in policies.items() for k in WIDTHS}
for step in steps.values():
    step()  # warm-up
times = {key: [] for key in steps}
for _ in range(args.rounds):
    for key, step in steps.items():
        began = time.perf_counter()
        step()
        times[key].append(time.perf_counter() - began)
for name, engine in policies.items():
    ms = {k: 1000 * statistics.median(times[(name, k)]) for k in WIDTHS}
    print(json.dumps({"policy": name, "precision": engine.precision.describe(), "ms": {k: round(v, 1) for k, v in ms.items()}, "relative": {k: round(v / ms[1], 2) for k, v in ms.items()}}))
