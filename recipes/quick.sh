#!/usr/bin/env bash
# README "What the main job prints": the quick preset's results table (base, +kNN-LM, +MLP memory,
# +RAG on the held-out test half; lambda/T chosen on validation).
# quick = 100k datastore tokens, 24k held-out tokens, block 512 / stride 256, 4,096 validation
# tokens; memory: 4 blocks (small), last layer's FFN input, alpha 0.4, 1 epoch, seed 0.
# Writes runs/quick/ (results.json, eval/ppl.json, eval/ppl_validation.png). Re-running skips
# every finished stage and prints the same table.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

# A new run directory without --preset gets the quick preset: this is exactly `mlpmem run`.
"$MLPMEM" run --preset quick --run-dir runs/quick
