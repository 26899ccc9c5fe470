"""Datastore build cost vs a bare forward pass, and peak RSS at two corpus sizes.

Measures, on the same windows, batch size and dtype:
- bare full forward (``model(input_ids)``, logits included) and bare backbone forward;
- ``build_datastore`` (keys at the last layer's FFN input + memory inputs at 0.7 depth,
  written to disk with fsync per batch);
then, in fresh subprocesses, the peak RSS of ``build_datastore`` at two corpus sizes.
Writes JSON to --out. Usage:
    python benchmarks/datastore_overhead.py --tokens 20000 --rss-sizes 50000 200000 --out bench/datastore.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RSS_SCRIPT = """
import resource, sys, time, json, threading
from mlpmemory.models import load_model
from mlpmemory.datastore import build_datastore
lm = load_model(sys.argv[1], dtype=sys.argv[6])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def vmrss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
samples, done = [], threading.Event()
def sampler():
    while not done.is_set():
        samples.append((time.perf_counter(), vmrss())); time.sleep(0.2)
threading.Thread(target=sampler, daemon=True).start()
start_rss = vmrss()
t = time.perf_counter()
build_datastore(lm, sys.argv[2], int(sys.argv[3]), sys.argv[4], block=int(sys.argv[5]), stride=int(sys.argv[5]) // 2,
                batch_size=8, progress=False, mem_site="0.7")  # as measured: keys and memory inputs at two sites
done.set()
t1 = time.perf_counter()
timeline = {f"{q}%": max([r for ts, r in samples if ts - t <= (t1 - t) * q / 100] or [start_rss])
            for q in (10, 25, 50, 75, 100)}
print(json.dumps({"rss_after_load_mb": before / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "vmrss_at_build_start_mb": start_rss, "vmrss_peak_during_build_mb": max(r for _, r in samples),
                  "vmrss_peak_by_fraction_of_build": timeline,
                  "vmrss_at_build_end_mb": vmrss(), "seconds": time.perf_counter() - t}))
"""


def corpus_tokens(lm, n: int, cache_dir) -> np.ndarray:
    from mlpmemory.corpus import iter_documents

    out, total = [], 0
    for doc in iter_documents("wiki", cache_dir=cache_dir):
        ids = lm.tokenizer(doc.text, add_special_tokens=False).input_ids + [lm.tokenizer.eos_token_id]
        out.append(ids)
        total += len(ids)
        if total >= n:
            break
    return np.concatenate(out)[:n].astype(np.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-sizes", type=int, nargs="*", default=[50_000, 200_000])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rss-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--out", default="bench/datastore_overhead.json")
    args = ap.parse_args()

    from mlpmemory.corpus import sliding_windows
    from mlpmemory.datastore import build_datastore
    from mlpmemory.models import load_model

    lm = load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
    n_max = max([args.tokens] + args.rss_sizes)
    tmp = Path(tempfile.mkdtemp(prefix="mlpmem-bench-"))
    tok_path = tmp / "tokens.i32"
    corpus_tokens(lm, n_max, args.cache_dir).tofile(tok_path)
    tokens = np.fromfile(tok_path, dtype=np.int32)[: args.tokens]
    stride = args.block // 2
    windows = sliding_windows(len(tokens), args.block, stride)
    batches = [windows[i:i + args.batch_size] for i in range(0, len(windows), args.batch_size)]

    def bare(fn):
        with torch.inference_mode():  # warm-up on one batch
            fn(input_ids=torch.from_numpy(np.stack([tokens[w.begin:w.end] for w in batches[0]]).astype(np.int64)))
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                fn(input_ids=torch.from_numpy(np.stack([tokens[w.begin:w.end] for w in b]).astype(np.int64)),
                   use_cache=False)
        return time.perf_counter() - t

    sub_path = tmp / "sub.i32"
    tokens.tofile(sub_path)

    def build(tag):
        t = time.perf_counter()
        build_datastore(lm, sub_path, len(tokens), tmp / f"ds{tag}", block=args.block, stride=stride,
                        batch_size=args.batch_size, progress=False, mem_site="0.7")
        return time.perf_counter() - t

    if args.rss_only:
        args.repeats = 0
    # warm-up of the build path (kernels, page cache) on one batch, as bare() does for itself
    build_datastore(lm, sub_path, min(len(tokens), args.block * args.batch_size // 2 + 1), tmp / "warm",
                    block=args.block, stride=stride, batch_size=args.batch_size, progress=False, mem_site="0.7")
    # interleave the measurements so drift on a shared machine hits all of them alike; keep the best
    times = {"full": [], "backbone": [], "build": []}
    for rep in range(args.repeats):
        times["full"].append(bare(lm.model))
        times["backbone"].append(bare(lm.model.base_model))
        times["build"].append(build(rep))
    t_full, t_backbone, t_build = (min(times[k] or [float("nan")]) for k in ("full", "backbone", "build"))
    fwd_tokens = sum(w.end - w.begin for w in windows)
    result = {
        "machine": f"{torch.get_num_threads()} threads, {lm.device}, dtype {lm.dtype}",
        "model": args.model, "corpus_tokens": len(tokens), "forward_tokens": fwd_tokens, "block": args.block,
        "stride": stride, "batch_size": args.batch_size,
        "bare_full_forward_s": t_full, "bare_backbone_forward_s": t_backbone, "datastore_build_s": t_build,
        "datastore_rows_per_s": (len(tokens) - 1) / t_build,
        "bare_full_forward_corpus_tok_per_s": (len(tokens) - 1) / t_full,
        "overhead_vs_full_forward": t_build / t_full - 1,
        "overhead_vs_backbone_forward": t_build / t_backbone - 1,
        "all_times_s": times, "repeats": args.repeats, "rss": [], "scratch_dir": str(tmp),
    }
    print(json.dumps(result, indent=2), flush=True)
    for n in args.rss_sizes:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, lm.path or args.model, str(tok_path), str(n),
                              str(tmp / f"rss{n}"), str(args.block), args.dtype],
                             capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["corpus_tokens"] = n
        result["rss"].append(rec)
        print(json.dumps(rec), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
