#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with torch (CPU wheel first, so no
# CUDA build is pulled in), then this package and its test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
.venv/bin/python -c "import mlpmemory, torch, faiss, transformers; print('mlpmemory', mlpmemory.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| faiss', faiss.__version__)"
