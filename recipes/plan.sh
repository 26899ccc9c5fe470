#!/usr/bin/env bash
# docs/scale.md "Planning a large run": disk, peak RAM per rank and time of every stage for the paper's
# settings, from the throughputs measured on this project's 2-core CPU machine (mlpmemory/commands/plan.py
# DEFAULTS; pass THROUGHPUTS=benchmarks/results/scale_sim.json or a GPU machine's JSON to use others).
#   1. GPT-2-large (774M) on WikiText-103 (~116M tokens), k=1024, nprobe 32, memory ~ GPT-2-large (774M)
#   2. Llama-2-7B (6.7B) on 1B tokens, same k / nprobe, memory = the base model's size
# RANKS (default 1) splits the parallel stages. Nothing is built; no run directory is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}
RANKS=${RANKS:-1}
EXTRA=()
if [[ -n "${THROUGHPUTS:-}" ]]; then EXTRA+=(--throughputs "$THROUGHPUTS"); fi

echo "## GPT-2-large on WikiText-103"
"$MLPMEM" plan --tokens 116e6 --model-config recipes/plan/gpt2-large.json --k 1024 --nprobe 32 \
    --memory-params 774e6 --ranks "$RANKS" "${EXTRA[@]}"
echo
echo "## Llama-2-7B on 1B tokens"
"$MLPMEM" plan --tokens 1e9 --model-config recipes/plan/llama-2-7b.json --k 1024 --nprobe 32 \
    --memory-ratio 1.0 --ranks "$RANKS" "${EXTRA[@]}"
