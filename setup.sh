#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with torch (CPU wheel first, so no
# CUDA build is pulled in), then this package and its test tools. Safe to re-run.
# MLPMEM_EXTRAS=gpu (comma-separated extras of pyproject.toml) also installs GPU FAISS (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test${MLPMEM_EXTRAS:+,$MLPMEM_EXTRAS}]" 2>&1 | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
# MLPMEM_EXTRAS=gpu: faiss-gpu-cu12 ships the same `faiss` module as faiss-cpu; drop faiss-cpu, then restore its files.
case ",${MLPMEM_EXTRAS:-}," in *,gpu,*) .venv/bin/python -m pip uninstall -q -y faiss-cpu && .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps faiss-gpu-cu12 ;; esac
.venv/bin/python -c "import mlpmemory, torch, faiss, transformers; print('mlpmemory', mlpmemory.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| faiss', faiss.__version__)"
