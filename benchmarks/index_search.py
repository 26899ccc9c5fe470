"""Target-search throughput of exact (Flat) vs the auto IVF-PQ index on a real datastore.

For each index: build (timed), then search ``--queries`` datastore rows with k+1 neighbours
(the targets stage's query), and measure recall@k of the approximate index against exact search
on ``--recall-queries`` rows. Writes JSON. Usage:
    python benchmarks/index_search.py --datastore runs/x/datastore --k 1024 --out bench/index_search.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datastore", required=True)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--recall-queries", type=int, default=256)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--ivf-flat-lists", type=int, default=1024)
    ap.add_argument("--out", default="bench/index_search.json")
    args = ap.parse_args()

    import faiss

    from mlpmemory.datastore import open_datastore
    from mlpmemory.index import build_index, load_index, measure_recall
    from mlpmemory.targets import search_neighbours

    ds = open_datastore(args.datastore)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(ds.n, min(args.queries, ds.n), replace=False))
    queries = np.asarray(ds.keys[rows], dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="mlpmem-index-"))
    result = {"datastore": str(args.datastore), "n": ds.n, "dim": ds.dim, "k": args.k, "queries": len(rows),
              "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "indexes": []}
    ivf_flat = f"IVF{args.ivf_flat_lists},Flat"
    for name, kwargs in (("exact", {"factory": "Flat"}), ("auto-ivf", {"factory": "auto", "flat_max_rows": 0}),
                         ("ivf-flat", {"factory": ivf_flat})):
        t = time.perf_counter()
        m = build_index(args.datastore, tmp / name, nprobe=args.nprobe, recall_k=args.k,
                        recall_queries=args.recall_queries, **kwargs)
        build_s = time.perf_counter() - t
        index, _ = load_index(tmp / name, ds.manifest, nprobe=args.nprobe)
        search_neighbours(index, queries[:64], args.k + 1)  # warm-up
        t = time.perf_counter()
        search_neighbours(index, queries, args.k + 1)
        secs = time.perf_counter() - t
        rec = measure_recall(index, ds.keys, queries[: args.recall_queries], args.k)
        entry = {"name": name, "factory": m["factory"], "build_s": build_s, "search_qps_k": len(queries) / secs,
                 "recall_at_k": rec["recall"], "recall_queries": rec["recall_queries"], "file_bytes": m["file_bytes"]}
        result["indexes"].append(entry)
        print(json.dumps(entry), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
