#!/usr/bin/env bash
# README "Measured choices (ablations)": memory input layer (0.5 / 0.7 / 0.85 depth / last layer's
# FFN input) and loss weight alpha (0 / 0.4 / 0.7 / 1), every memory trained on the same kNN
# targets; full table in benchmarks/results/ablations_quick.md.
# The table was measured when the memory read layer 21 (0.7 depth) by default, so the alpha
# ablation (which uses the run's own memory input) ran at layer 21. To reproduce it, the quick run
# is built with --mem-site 0.7 in its own directory; its base LM / kNN-LM numbers are those of
# runs/quick (same keys, same targets). The extra 0.5 / 0.85 depths are captured into
# runs/quick_site07/ablations/ds_050_085*.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}
PY=${PYTHON:-.venv/bin/python}

"$MLPMEM" run --preset quick --run-dir runs/quick_site07 --mem-site 0.7
"$PY" benchmarks/ablations.py --run-dir runs/quick_site07 --sites 0.5,0.7,0.85,last --alphas 0,0.4,0.7,1 \
  | tee runs/quick_site07/ablations/ablations.md
