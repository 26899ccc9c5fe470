#!/usr/bin/env bash
# README "A larger run": the large preset's results table.
# large = 500k datastore tokens, the paper's windows (block 1024 / stride 512), the whole held-out
# split (8,191 validation tokens), index 'auto' (IVF-Flat at this size), the same 4-block memory,
# 1 epoch. +RAG is not part of the README's large table: --no-rag-ppl skips its long pass.
# Writes runs/large/ (also used by recipes/bench.sh and recipes/qa.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --preset large --run-dir runs/large --no-rag-ppl
