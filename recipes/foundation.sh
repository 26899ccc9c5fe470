#!/usr/bin/env bash
# README "Speed and memory of the foundation": datastore build vs a bare forward pass (16k corpus
# tokens, 8 x 1024-token windows, stride 512, best of 2 repeats), peak RSS of the build at 50k and
# 200k corpus tokens, and target search at 199,999 real keys (Flat vs IVF-Flat vs IVF-PQ, k=1024).
# Results in benchmarks/results/datastore_overhead.json and index_search_200k.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}
PY=${PYTHON:-.venv/bin/python}

"$PY" benchmarks/datastore_overhead.py --tokens 16000 --block 1024 --batch-size 8 --repeats 2 \
  --rss-sizes 50000 200000 --out bench/datastore_overhead.json
# A 200k-token datastore (199,999 keys at the last layer's FFN input) to search.
"$MLPMEM" datastore --run-dir runs/ds200k --max-train-tokens 200000
"$PY" benchmarks/index_search.py --datastore runs/ds200k/datastore --k 1024 --queries 2048 \
  --out bench/index_search_200k.json
