#!/usr/bin/env bash
# Issue 21's measurement: one `free bench` per shared data set, default precision, batch 1, the
# default model: our full loop, transformers' generate and prompt lookup (K 3 and 10), lossless
# free with each draft. News articles run transformers in fp32 only (its bf16 prefill of a long
# article is several times slower on a CPU without native bf16); the others in both precisions.
# Usage, from the repository root: bash docs/runs/drafts_bench.sh [N records, default 20]
set -euo pipefail
n=${1:-20}
data=../shared/data
common=(-t 0.9 --skip static --skip calm --skip free --skip auto --skip hf-early-exit -q)
run() {  # name, input, new tokens, extra options...
  local name=$1 input=$2 new=$3; shift 3
  echo "== $name $(date +%T)" >&2
  free bench "$input" --limit "$n" -n "$new" "${common[@]}" --out-dir "docs/bench/drafts-$name" "$@" > /dev/null
}
run xsum "$data/xsum/validation.jsonl" 64 --baseline-dtype fp32
run cnn_dailymail "$data/cnn_dailymail/train.jsonl" 64 --baseline-dtype fp32
run samsum "$data/samsum/test.jsonl" 64
run squad "$data/squad/test.jsonl" 32
run iwslt "$data/iwslt2017_de_en/test.jsonl" 64
