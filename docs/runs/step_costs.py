"""Step costs of the default model with its shipped exit, and what they imply for lossless speed.

Usage, from the repository root: python docs/runs/step_costs.py [--rounds N] [--model M]
Times in ms (bf16, this device; median of N rounds, each round timing every step once in turn, so
that drift in the machine's speed hits all steps alike) of `free calibrate`'s decoding steps: a
full step; a shallow step through layer L_s and the trained exit, with the whole head and with a
pruned head of 1,100 rows (the size of a context subset; building the subset is not timed); the
deep layers and head over 1, 2, 4 and 8 positions. Then the share p of tokens that must exit and
be accepted, with no rejections, for lossless mode to reach 1.0x, 1.2x, 1.5x and 2x of the full
model: each token pays a shallow step, and each token that does not exit a deep pass over two
positions."""
import argparse
import json
import statistics
import time

import torch

from free_cli import DecodeConfig, Precision, decoding_steps, load_engine

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=101)
parser.add_argument("--model", default=None, help="as free generate's --model (default: the embedded model with its exit)")
parser.add_argument("--dtype", default="auto", help="a precision policy, as free generate's --dtype")
parser.add_argument("--mixed", action="store_true", help="the policy of a CPU without native bf16 (run under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to emulate one)")
args = parser.parse_args()
torch.set_num_threads(2)
engine = load_engine(args.model, dtype="fp32" if args.mixed else args.dtype, device="cpu")
if args.mixed:
    engine = engine.converted(Precision(torch.bfloat16, torch.float32))
messages = [{"role": "user", "content": "Summarize: Anna will bring the cake, Tom the drinks, and the party starts at eight."}]
prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
cfg = DecodeConfig(strategy="free", max_new_tokens=1).resolved(engine.num_layers, engine.default_exit_layer)
subset = 1100  # head rows: the size of a context subset

full, shallow, deep_2 = decoding_steps(engine, prompt, cfg)
pruned = decoding_steps(engine, prompt, cfg, subset=subset)[1]
steps = {"full": full, "shallow": shallow, "shallow_pruned": pruned, "deep_2": deep_2}
steps |= {f"deep_{q}": decoding_steps(engine, prompt, cfg, positions=q)[2] for q in (1, 4, 8, 16)}
times = {name: [] for name in steps}
for step in steps.values():
    step()  # warm-up
for _ in range(args.rounds):
    for name, step in steps.items():
        began = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - began)
ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
print(json.dumps({k: round(v, 2) for k, v in ms.items()} | {"unit": "ms", "exit_layer": cfg.exit_layer, "rounds": args.rounds, "precision": engine.precision.describe()}))
for name in ("shallow", "shallow_pruned"):
    needed = {f"p_for_{x}x": round(1 - (ms["full"] / x - ms[name]) / ms["deep_2"], 3) for x in (1.0, 1.2, 1.5, 2.0)}
    print(json.dumps({"shallow": name, **needed}))
