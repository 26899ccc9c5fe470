#!/usr/bin/env bash
# README "Speed (mlpmem bench)": prefill tokens/s, decode latency, TTFT and peak RSS of base,
# +MLP memory, +kNN-LM (exact and IVF-PQ) and +RAG on the large run; kNN cost vs datastore size
# (25k / 100k / 400k rows); FLOP overhead model. Full output in
# benchmarks/results/bench_large_bench.{md,json} and the charts beside it.
# 4 held-out prompts x 256 tokens, 16 greedy decode tokens, medians of 2 repeats after a
# warm-up, 2 torch/FAISS threads (the README's 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --preset large --run-dir runs/large --no-rag-ppl   # skipped when recipes/large.sh ran
"$MLPMEM" bench --run-dir runs/large --bench-prompts 4 --bench-repeats 2 --bench-decode-tokens 16 \
  --bench-threads 2                                                # writes runs/large/bench/
