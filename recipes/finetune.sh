#!/usr/bin/env bash
# README "Fine-tuning baselines": +CPT and +LoRA on runs/quick with the memory's token budget, then the
# report with their rows, in-domain and out-of-domain (runs/quick/eval/ppl.json, eval/ood.json, results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --run-dir runs/quick                                   # skipped when already built
"$MLPMEM" finetune --run-dir runs/quick --method cpt
"$MLPMEM" finetune --run-dir runs/quick --method lora
"$MLPMEM" run --run-dir runs/quick                                   # adds the cpt / lora rows
"$MLPMEM" loadtest --run-dir runs/quick --load-systems base,memory,cpt,lora --concurrency 1 --load-requests 6 \
  --load-out runs/quick/loadtest_finetune                          # decode tokens/s, 32 tokens per request
