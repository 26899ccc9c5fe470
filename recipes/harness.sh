#!/usr/bin/env bash
# README "Standard benchmarks (lm-evaluation-harness)": the offline tasks on runs/quick for the base LM,
# + MLP memory and + kNN-LM at the run's validation lambdas (NQ-open and open SQuAD: the first 200
# questions, 4-shot, greedy, EM/F1; TruthfulQA MC1/MC2: the archive's 299 questions). Writes
# runs/quick/harness/<system>_lam<lambda>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --run-dir runs/quick                                   # skipped when already built
for system in base memory knn_lm; do
  "$MLPMEM" eval-harness --run-dir runs/quick --system "$system" --tasks mlpmem_truthfulqa_mc1,mlpmem_truthfulqa_mc2
  "$MLPMEM" eval-harness --run-dir runs/quick --system "$system" --tasks mlpmem_nq_open,mlpmem_squad_open --limit 200
done
