#!/usr/bin/env bash
# README "Serving" and docs/serve.md: start `mlpmem serve` on runs/quick, call it with curl and with
# the openai client (recipes/serve/client.py), stop it (SIGINT: graceful), then `mlpmem loadtest`
# (16 streaming requests x 32 tokens at concurrency 1, 4, 8 for base and + MLP memory), which
# writes runs/quick/loadtest/loadtest.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
MLPMEM=${MLPMEM:-.venv/bin/mlpmem}
PORT=${PORT:-8000}

"$MLPMEM" run --run-dir runs/quick                                   # skipped when already built
"$MLPMEM" serve --run-dir runs/quick --port "$PORT" &
server=$!
trap 'kill -INT $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "memory", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}'; echo
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "memory", "prompt": "x", "lam": 1.5}'; echo
.venv/bin/python recipes/serve/client.py
kill -INT $server; wait $server || true
trap - EXIT
"$MLPMEM" loadtest --run-dir runs/quick
