#!/usr/bin/env bash
# README "Memory size (mlpmem scaling)": memories of 1, 4 and 16 blocks on the quick run's
# targets, test perplexity vs parameters and (largest memory, snapshots at 25/50/100%) vs
# training rows. Both tables: 1 epoch (benchmarks/results/scaling_quick.*) and 3 epochs
# (benchmarks/results/scaling_quick_3ep.*). The 4-block, 1-epoch memory is the run's own.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --preset quick --run-dir runs/quick                 # skipped when recipes/quick.sh ran
"$MLPMEM" scaling --run-dir runs/quick --scaling-blocks 1,4,16    # writes runs/quick/scaling/
"$MLPMEM" scaling --run-dir runs/quick --scaling-blocks 1,4,16 --scaling-epochs 3 \
  --scaling-out runs/quick/scaling_3ep
