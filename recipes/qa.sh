#!/usr/bin/env bash
# README "Question answering (mlpmem eval-qa)": EM / F1 of base, +MLP memory, +kNN-LM and +RAG
# (BM25 top-1) on the default corpus's Natural Questions, per coverage group, on the large run.
# Settings of benchmarks/results/qa_nq_large.json: 2-shot, greedy (at most 12 tokens), lambda
# chosen by gold-answer log-likelihood on 100 dev questions, 750 reported questions per group
# (in_memory, heldout), latency timed on 20 questions.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}

"$MLPMEM" run --preset large --run-dir runs/large --no-rag-ppl   # skipped when recipes/large.sh ran
"$MLPMEM" eval-qa --run-dir runs/large --qa-data nq --few-shot 2 --qa-dev 100 \
  --qa-groups in_memory,heldout --qa-limit 750 --qa-max-tokens 12 --rag-n 1 \
  --latency-questions 20                                           # writes runs/large/qa/nq/
