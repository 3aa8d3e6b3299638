#!/usr/bin/env bash
# How the shipped model `smollm2-samsum` (free_cli/models/smollm2-samsum/) was made and measured,
# from the repository root with the README's environment active. RUN is a scratch folder.
# Each training command checkpoints as it goes and continues with --resume after a kill.
# `all` makes the model as first shipped (2026-12-02: steps 1-5, a one-layer exit on reference
# summaries); the exit shipped since 2026-12-04 comes from steps exit2 (its self targets, cached),
# exit2c and ship-exit, run after it.
set -euo pipefail
RUN=${RUN:-runs/smollm2-samsum}
DATA=../shared/data/samsum
step=${1:-all}

stored() {  # the thresholds in model folder $1's store as -t flags, or with $2 (bmm | ltt) that method's value
  python - "$1" "${2:-}" <<'EOF'
import json, sys
entries = sorted(json.load(open(f"{sys.argv[1]}/free_thresholds.json"))["entries"], key=lambda e: e["dataset"])
method = sys.argv[2]
print(" ".join(("%.4f" if method else "-t %.4f") % e["threshold"] for e in entries if not method or e["method"] == method))
EOF
}

if [[ $step == all || $step == tune ]]; then
  # 1. FREE's shallow-deep fine-tuning on SAMSum references: L_s = 8 of 30 layers, the shared
  #    head as the exit, (L_s CE_shallow + L CE_deep)/(L_s + L) + 0.5 x layerwise KD (dynamic
  #    mapping), LoRA rank 32 on every linear layer, the prompt read without gradients.
  #    Held-out agreement plateaus near 28% by step 360 (lr 5e-4); 400 steps is 1,600 examples.
  free train $DATA/train.jsonl -o $RUN --method shallow-deep --kd dyna --alpha 0.5 --exit-layer 8 \
    --lora-rank 32 --detach-prompt --batch-size 4 --max-length 512 --lr 5e-4 --steps ${TUNE_STEPS:-400} \
    --eval-data $DATA/validation.jsonl --max-eval 48 --eval-every 80 --save-every 40 \
    --save-dtype bf16 --data-name samsum/train --resume
fi

if [[ $step == all || $step == exit ]]; then
  # 2. An exit layer after layer 8 of the tuned model, distilled from the tuned deep model on
  #    reference summaries and 32 dialogue positions per example (the model frozen, its features
  #    computed once). Run here as --steps 300 (0.379), then resumed with --steps 700.
  free train $DATA/train.jsonl --model $RUN -o $RUN/exit-train --method exit-only --exit-layer 8 \
    --exit-layers 1 --init-from last --prompt-positions 32 --limit 1200 --max-length 512 \
    --steps 700 --lr 2e-3 --dtype bf16 --save-dtype bf16 --eval-data $DATA/validation.jsonl \
    --max-eval 100 --eval-every 100 --save-every 100 --data-name samsum/train --resume
fi

if [[ $step == all || $step == package ]]; then
  # 3. The shipped folder: the adapters (bf16), the exit, and the config with the recipe.
  out=free_cli/models/smollm2-samsum
  mkdir -p $out/exit
  cp $RUN/adapter_model.safetensors $out/
  python - "$RUN" "$out" <<'EOF'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
adapter = json.loads((run / "adapter_config.json").read_text())
adapter["base_model_name_or_path"] = "default"
(out / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
config = json.loads((run / "free_exit.json").read_text())
config["base_model"] = "default"
config["command"] = "docs/runs/smollm2_samsum.sh (free train --method shallow-deep, then --method exit-only)"
config.update(json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").exists() else {})
(out / "free_exit.json").write_text(json.dumps(config, indent=2) + "\n")
exit_config = json.loads((run / "exit-train" / "free_exit.json").read_text())
exit_config["base_model"] = ".."
(out / "exit" / "free_exit.json").write_text(json.dumps(exit_config, indent=2) + "\n")
EOF
  cp $RUN/exit-train/exit.safetensors $out/exit/
  du -sh $out
fi

if [[ $step == all || $step == calibrate ]]; then
  # 4. Thresholds from validation dialogues (never the test split), stored beside the shipped model
  #    for `--dataset samsum` (FREE's Beta mixture) and `--dataset samsum-ltt` (Learn-then-Test:
  #    mean 1 - ROUGE-L against the full model's outputs at most δ = 0.2 with probability 1 - ε = 0.9).
  free calibrate $DATA/validation.jsonl --model smollm2-samsum --dataset samsum --method bmm --limit 60 -n 48
  free calibrate $DATA/validation.jsonl --model smollm2-samsum --dataset samsum-ltt --method ltt \
    --delta 0.2 --epsilon 0.1 --grid 0.99,0.95,0.9,0.8,0.7,0.6,0.5,0.4,0.3 --limit 40 -n 48
fi

if [[ $step == all || $step == bench ]]; then
  # 5. 100 test dialogues, one run: a sweep and the two calibrated thresholds (the shipped store's LTT and BMM; 0.7 and 0.3166 with the exit of 2026-12-02), auto,
  #    lossless, static, calm; then the base instruct model's full row for its ROUGE-L.
  thresholds=$(stored free_cli/models/smollm2-samsum)
  bmm=$(stored free_cli/models/smollm2-samsum bmm)
  mkdir -p docs/bench/smollm2-samsum docs/bench/smollm2-samsum-base
  free bench $DATA/test.jsonl --model smollm2-samsum --limit 100 -n 48 -t 0.9 -t 0.5 -t 0.3 $thresholds \
    --lossless-at 0.9 --lossless-at $bmm --prune context --skip hf-early-exit --out-dir docs/bench/smollm2-samsum
  free bench $DATA/test.jsonl --limit 100 -n 48 --skip generate --skip static --skip calm --skip free --skip auto \
    --skip lossless --skip hf-early-exit --out-dir docs/bench/smollm2-samsum-base
fi

# Exits trained on the tuned model's own summaries (generated once with continuous batching, cached
# in self_targets.jsonl) of EXIT2_LIMIT training dialogues (exit3: EXIT3_LIMIT, its own cache); fp32
# on a CPU without native bf16. The two-layer routes reuse exit2's cache when present. Held-out
# agreement is on the validation dialogues' reference summaries, as for every exit in this recipe.
self_targets=(--targets self --self-max-new-tokens 64 --self-batch-size 16
  --max-length 512 --batch-size 8 --save-dtype bf16 --eval-data $DATA/validation.jsonl
  --eval-targets reference --max-eval 100 --data-name samsum/train --resume)

reuse_caches() {  # run $1's self targets (with $3 = features, its features too) copied into run $2 unless it has its own
  local from=$RUN/$1 to=$RUN/$2
  mkdir -p $to
  if [[ -f $from/self_targets.jsonl && ! -f $to/self_targets.jsonl ]]; then cp $from/self_targets.jsonl $to/; fi
  if [[ ${3:-} == features && -d $from/checkpoint/features && ! -d $to/checkpoint/features ]]; then
    mkdir -p $to/checkpoint && cp -r $from/checkpoint/features $to/checkpoint/
  fi
}

continued_exit() {  # the shipped exit continued in $RUN/$1: steps $2, dialogues $3, prompt positions $4, dtype $5, lr $6
  free train $DATA/train.jsonl --model smollm2-samsum -o $RUN/$1 --method exit-only \
    --start-from free_cli/models/smollm2-samsum/exit --steps $2 --lr $6 --prompt-positions $4 --dtype $5 \
    --eval-every 100 --save-every 50 --limit $3 "${self_targets[@]}"
}

if [[ $step == exit2 ]]; then
  # 6. (2026-12-04) The shipped exit trained further (step 0 evaluates it on the same validation
  #    dialogues): 0.424 -> 0.457 in 65 min, flat from step 800 (docs/benchmarks.md; not shipped).
  continued_exit exit2 ${EXIT2_STEPS:-1500} ${EXIT2_LIMIT:-1600} 32 fp32 1e-3
fi

two_layer_exit() {  # a two-layer exit after layer 8 from scratch, in $RUN/$1, reading exit2's cached targets
  local name=$1 steps=$2 positions=$3 every=$4
  reuse_caches exit2 $name
  free train $DATA/train.jsonl --model smollm2-samsum -o $RUN/$name --method exit-only --exit-layer 8 \
    --exit-layers 2 --init-from last --steps $steps --lr 2e-3 --prompt-positions $positions \
    --eval-every $every --save-every 100 --limit ${EXIT2_LIMIT:-1600} "${self_targets[@]}"
}

# 7. (2026-12-04) A two-layer exit after layer 8, from scratch: 0.445 at step 400, stopped there.
if [[ $step == exit2b ]]; then two_layer_exit exit2b ${EXIT2B_STEPS:-800} 32 200; fi

# 8. (2026-12-04) The two-layer exit again, on four times the prompt positions per dialogue (128: the
#    same feature pass, more of the deep model's predictions kept from it). Shipped (step 9).
if [[ $step == exit2c ]]; then two_layer_exit exit2c ${EXIT2C_STEPS:-1000} 128 100; fi

# 8b. (2026-12-04, a CPU with native bf16) The shipped two-layer exit (exit2c) trained further on
#     the tuned model's own summaries of EXIT3_LIMIT training dialogues (2.5 times exit2c's), 256
#     dialogue positions per example (twice exit2c's), in bf16, which that CPU computes natively.
if [[ $step == exit3 ]]; then continued_exit exit3 ${EXIT3_STEPS:-1500} ${EXIT3_LIMIT:-4000} 256 bf16 ${EXIT3_LR:-1e-3}; fi

# 8c. (2026-12-04, Zen 4) exit3 plateaued on its 3,912 dialogues: the shipped exit (exit3) continued on
#     the tuned model's own summaries of EXIT4_LIMIT training dialogues, the same recipe otherwise.
#     exit3's self targets and features are copied in first (keyed by prompt, and by chunk and tokens:
#     only the new dialogues are generated and passed through the frozen model).
if [[ $step == exit4 ]]; then
  reuse_caches exit3 exit4 features
  continued_exit exit4 ${EXIT4_STEPS:-1200} ${EXIT4_LIMIT:-8000} 256 bf16 ${EXIT4_LR:-1e-3}
fi

if [[ $step == ship-exit ]]; then
  # 9. A retrained exit (EXIT_RUN, default exit2c) replaces the shipped one, the one it replaces kept
  #    in $RUN/exit-before for the bench; the threshold store is fitted again (step 4) for the new
  #    exit's digest, on validation dialogues only. EXIT_ROUTE, EXIT_EARLIER_MINUTES and
  #    EXIT_STEPS_RUN describe the run in the shipped config (defaults: exit2c's). exit3 was shipped with
  #    EXIT_RUN=runs/smollm2-samsum/exit3 EXIT_EARLIER_MINUTES=112 EXIT_STEPS_RUN="tune, exit2, exit2c, exit3"
  #    EXIT_ROUTE="exit2c's exit continued on the tuned model's own summaries of 3,912 train dialogues (bf16; 29 min of targets before the run)"
  #    and exit4 (after renaming $RUN/exit-before, so that the bench's "before" is exit3) with
  #    EXIT_RUN=runs/smollm2-samsum/exit4 EXIT_EARLIER_MINUTES=204 EXIT_STEPS_RUN="tune, exit2, exit2c, exit3, exit4"
  #    EXIT_ROUTE="exit3's exit continued on the tuned model's own summaries of 7,843 train dialogues (bf16; 26 min of targets for the 3,931 not in exit3's cache before the run)"
  src=${EXIT_RUN:-$RUN/exit2c}
  out=free_cli/models/smollm2-samsum
  if [[ ! -d $RUN/exit-before ]]; then cp -r $out $RUN/exit-before; fi
  cp $src/exit.safetensors $out/exit/
  python - "$src" "$out" <<'EOF2'
import json, os, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((src / "free_exit.json").read_text())
config["base_model"] = ".."
(out / "exit" / "free_exit.json").write_text(json.dumps(config, indent=2) + "\n")
# the model's recipe: the tuning (38 min), the self targets (17 min, cached) and this exit's run
log = [json.loads(line) for line in (src / "train_log.jsonl").read_text().splitlines()]
minutes = log[-1]["seconds"] / 60 if "seconds" in log[-1] else float(os.environ["EXIT_MINUTES"])  # logs before 2026-12-04 lack it
model = json.loads((out / "free_exit.json").read_text())
route = os.environ.get("EXIT_ROUTE", "the tuned model's own summaries of 1,570 train dialogues")
model["recipe"]["exit"] = (f"exit-only, {config['exit_layers']} layers after layer {config['exit_layer']}, {route}, "
                           f"{config['steps']} steps, {minutes:.0f} min, held-out agreement {config['final_eval']['eval_agreement']:.3f}")
model["train_minutes"] = round(38 + float(os.environ.get("EXIT_EARLIER_MINUTES", 17)) + minutes, 1)  # the tuning, then what came before this run
model["command"] = "free train: docs/runs/smollm2_samsum.sh " + os.environ.get("EXIT_STEPS_RUN", "tune, exit2 (its self targets), exit2c") + ", then ship-exit"
(out / "free_exit.json").write_text(json.dumps(model, indent=2) + "\n")
EOF2
  rm -f $out/free_thresholds.json
  bash $0 calibrate
fi

if [[ $step == exit-bench ]]; then
  # 10. One bench run per exit on 50 test dialogues, default precision policy: the shipped
  #     exit and the one it replaced ($RUN/exit-before), each against its own full row. exit3's
  #     bench ran with BENCH_TAG=exit3 (docs/bench/smollm2-samsum-exit3-{new,before}/).
  for model in smollm2-samsum $RUN/exit-before; do
    name=$([[ $model == smollm2-samsum ]] && echo ${BENCH_TAG:-exit}-new || echo ${BENCH_TAG:-exit}-before)
    dir=$([[ $model == smollm2-samsum ]] && echo free_cli/models/smollm2-samsum || echo $model)
    free bench $DATA/test.jsonl --model $model --limit 50 -n 48 -t 0.9 -t 0.8 -t 0.7 -t 0.6 -t 0.5 $(stored $dir) \
      --lossless-at 0.9 --draft exit --draft auto --skip generate --skip hf-lookup --skip static --skip calm --skip auto \
      --skip hf-early-exit --out-dir docs/bench/smollm2-samsum-$name
  done
fi
