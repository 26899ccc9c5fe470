"""Scale simulation: the real index build and target search over millions of synthetic rows, bounded RSS.

For each size N (``--rows``), in a fresh subprocess (so its peak RSS is its own):

1. write a synthetic datastore ``<out-dir>/ds_<N>`` chunk by chunk (never whole in RAM), in the layout
   :func:`mlpmemory.datastore.open_datastore` reads: ``keys.f16`` (fp16, d=576: one of ``--clusters``
   Gaussian centres + noise), ``values.i32`` (a token drawn from a small per-cluster vocabulary, so the
   targets have a realistic support) and ``manifest.json`` (``n``, ``dim``, ``arrays``, ``checksums``)
   written with :func:`mlpmemory.io.write_manifest`; an existing complete one of the same N is reused;
2. build the index with the project's own :func:`mlpmemory.index.build_index` (``factory="auto"``
   unless ``--factory``; ``--ondisk`` asks for the on-disk IVF-PQ tier when ``build_index`` has one,
   else the explicit ``IVF{nlist},PQ64x8``), timed; train / add seconds come from the index manifest;
3. search ``--queries`` datastore rows with k+1 neighbours at ``--nprobe`` (what the targets stage
   does), timed, then turn the results into sparse targets with
   :func:`mlpmemory.targets.knn_distribution` (timed apart: the targets pass = search + this);
4. record peak RSS (``ru_maxrss``) and the VmRSS sampled every 0.2 s in each phase.

The table of all sizes is printed and written to ``--out`` (JSON, merged with earlier rows of other sizes)
and the same name with ``.md``. The JSON's ``throughputs`` section is the schema ``mlpmem plan
--throughputs`` reads (add rows/s, search seconds per query vs scanned codes, targets post-processing
rows/s), fitted over every recorded size.

Usage (the sizes of the scale-out issue need ~23 GB free under --out-dir for 20M rows):
    python benchmarks/scale_sim.py --rows 5e6,10e6,20e6 --out-dir /tmp/scale
Quick check (forces IVF-PQ at small N):
    python benchmarks/scale_sim.py --rows 2e5 --out-dir /tmp/scale-dev --flat-max-rows 0 --ivf-flat-max-gb 0
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale_sim.json"
CHUNK_ROWS = 131_072  # rows generated and written per step (~150 MB of fp16 keys at d=576)


class RssSampler:
    """VmRSS of this process every ``period`` seconds (a thread); ``mark(phase)`` starts a new phase."""

    def __init__(self, period: float = 0.2):
        self.period, self.phase, self.peaks, self.anon_peaks = period, "start", {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def vmrss_mb(field: str = "VmRSS") -> float:
        """VmRSS (all resident pages, memory-mapped file pages included) or RssAnon (the process's own
        memory: what must fit in RAM; the datastore memmaps' pages are RssFile, reclaimable)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self):
        v, anon = self.vmrss_mb(), self.vmrss_mb("RssAnon")
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), v)
        self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0.0), anon)

    def mark(self, phase: str):
        self.sample()
        self.phase = phase
        self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def write_synthetic_datastore(path: Path, n: int, dim: int, clusters: int, seed: int, vocab: int = 50_000,
                              tokens_per_cluster: int = 256, noise: float = 0.35) -> dict:
    """A complete datastore of ``n`` clustered rows, written ``CHUNK_ROWS`` at a time; its manifest."""
    from mlpmemory.datastore import KEYS, VALUES, array_files
    from mlpmemory.io import file_checksums, read_manifest, write_manifest

    if (path / "manifest.json").exists():
        try:
            m = read_manifest(path)
            if m.get("n") == n and m.get("dim") == dim and m.get("synthetic", {}).get("seed") == seed:
                return m
        except Exception:  # noqa: BLE001 - an unfinished one is rebuilt below
            pass
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    cluster_tokens = rng.integers(0, vocab, size=(clusters, tokens_per_cluster), dtype=np.int32)
    with open(path / KEYS, "wb") as fk, open(path / VALUES, "wb") as fv:
        for start in range(0, n, CHUNK_ROWS):
            b = min(CHUNK_ROWS, n - start)
            c = rng.integers(0, clusters, size=b)
            keys = centres[c] + noise * rng.standard_normal((b, dim), dtype=np.float32)
            fk.write(keys.astype("<f2").tobytes())
            # a skewed choice among the cluster's tokens (a few frequent, many rare)
            j = np.minimum(rng.geometric(0.02, size=b) - 1, tokens_per_cluster - 1)
            fv.write(cluster_tokens[c, j].astype("<i4").tobytes())
        fk.flush(), fv.flush()
        os.fsync(fk.fileno()), os.fsync(fv.fileno())
    fields = {"n": int(n), "dim": int(dim), "arrays": ["keys", "values"], "key_dtype": "float16",
              "n_tokens": int(n) + 1, "key_site": None, "mem_site": None,
              "synthetic": {"clusters": clusters, "seed": seed, "noise": noise, "vocab": vocab,
                            "tokens_per_cluster": tokens_per_cluster}}
    fields["checksums"] = file_checksums(path, array_files(fields))
    return write_manifest(path, fields)


def _ondisk_kwargs(build_index, n: int, dim: int, args) -> tuple[str, dict]:
    """(factory, extra build_index kwargs) for the on-disk tier: its own switch when build_index has one."""
    params = inspect.signature(build_index).parameters
    if "storage" in params:  # index.py's on-disk tier: lists merged with merge_ondisk, memory-mapped on load
        if args.factory == "auto":  # (auto gives Flat / IVF-Flat below its thresholds: ask for IVF-PQ)
            from mlpmemory.index import choose_factory

            return choose_factory(n, dim, flat_max_rows=0, ivf_flat_max_bytes=0,
                                  train_samples=args.train_samples), {"storage": "disk"}
        return args.factory, {"storage": "disk"}
    for name in ("ondisk", "on_disk"):
        if name in params:
            return args.factory, {name: True}
    from mlpmemory.index import choose_factory

    # no on-disk tier yet: the explicit IVF-PQ factory the auto rule would pick for a datastore beyond RAM
    f = choose_factory(n, dim, flat_max_rows=0, ivf_flat_max_bytes=0, train_samples=args.train_samples)
    print(f"scale_sim: build_index has no on-disk mode; using factory {f}", file=sys.stderr)
    return f, {}


CPU_SECONDS: dict = {}  # CPU seconds (every thread) of the index build's phases, by phase


def _cpu_timed(module, name: str, phase: str) -> None:
    """Wrap ``module.name`` so its CPU seconds add up in :data:`CPU_SECONDS` (train, add).

    On a shared machine the wall-clock seconds the index manifest records include the time other
    processes held the cores; CPU seconds / threads is what the phase costs on idle cores.
    """
    fn = getattr(module, name, None)
    if fn is None:
        return

    def wrapped(*a, **kw):
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            CPU_SECONDS[phase] = CPU_SECONDS.get(phase, 0.0) + time.process_time() - t

    setattr(module, name, wrapped)


def run_one(n: int, args) -> dict:
    """One size, in this process: datastore, index, search; the result row."""
    import faiss

    from mlpmemory import index as index_module
    from mlpmemory.datastore import open_datastore
    from mlpmemory.index import build_index, load_index
    from mlpmemory.targets import knn_distribution, search_neighbours

    for name, phase in (("_train_index", "train"), ("_add_keys", "add"), ("_add_shard", "add"),
                        ("_merge_shards", "merge"), ("measure_recall", "recall")):
        _cpu_timed(index_module, name, phase)

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    out = Path(args.out_dir)
    ds_dir = out / f"ds_{n}"
    row = {"n": n, "dim": args.dim, "k": args.k, "nprobe": args.nprobe, "threads": faiss.omp_get_max_threads(),
           "faiss": faiss.__version__, "clusters": args.clusters}
    with RssSampler() as rss:
        rss.mark("write")
        t = time.perf_counter()
        write_synthetic_datastore(ds_dir, n, args.dim, args.clusters, args.seed)
        row["write_seconds"] = time.perf_counter() - t
        factory, extra = args.factory, {}
        if args.ondisk:
            factory, extra = _ondisk_kwargs(build_index, n, args.dim, args)
        tag = (factory if factory != "auto" else "auto").replace(",", "_") + ("_ondisk" if extra else "")
        index_dir = out / f"index_{n}_{tag}"
        if not args.reuse_index:
            shutil.rmtree(index_dir, ignore_errors=True)
        rss.mark("index")
        t, cpu = time.perf_counter(), time.process_time()
        kw = dict(factory=factory, nprobe=args.nprobe, train_samples=args.train_samples, **extra)
        if args.flat_max_rows is not None:
            kw["flat_max_rows"] = args.flat_max_rows
        if args.ivf_flat_max_gb is not None:
            kw["ivf_flat_max_bytes"] = int(args.ivf_flat_max_gb * (1 << 30))
        m = build_index(ds_dir, index_dir, **kw)
        row["index_wall_seconds"] = time.perf_counter() - t
        row["index_cpu_seconds"] = time.process_time() - cpu  # all threads; ~ wall x threads when not contended
        row["cpu_seconds"] = dict(CPU_SECONDS)
        params = m.get("params", {})
        row.update(factory=m["factory"], index_type=m.get("index_type"), nlist=params.get("nlist"), m=params.get("m"),
                   train_seconds=m.get("train_seconds"), add_seconds=m.get("add_seconds"),
                   build_seconds=m.get("build_seconds"), index_file_bytes=m.get("file_bytes"),
                   recall_at_64=m.get("recall"), ondisk=bool(extra) or m.get("storage") == "disk",
                   merge_seconds=m.get("merge_seconds"), ivfdata_bytes=m.get("ivfdata_bytes"))
        row["add_rows_per_s"] = n / m["add_seconds"] if m.get("add_seconds") else None

        rss.mark("search")
        ds = open_datastore(ds_dir)
        index, _ = load_index(index_dir, ds.manifest, nprobe=args.nprobe)
        nq = min(args.queries, n)
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, nq, replace=False)).astype(np.int64)
        k = min(args.k, n - 1)
        search_neighbours(index, np.asarray(ds.keys[rows[:64]], np.float32), k + 1)  # warm-up
        search_s = post_s = search_cpu = post_cpu = 0.0
        nnz = 0
        temperature = None
        for s in range(0, nq, args.batch):
            r = rows[s:s + args.batch]
            q = np.asarray(ds.keys[r], dtype=np.float32)
            t, cpu = time.perf_counter(), time.process_time()
            d, i = search_neighbours(index, q, k + 1, args.batch)
            search_s += time.perf_counter() - t
            search_cpu += time.process_time() - cpu
            if temperature is None:  # the median distance to the nearest other row, as the auto grid's scale
                d1 = np.where((i >= 0) & (i != r[:, None]), d, np.inf).min(axis=1)
                temperature = float(np.median(d1[np.isfinite(d1)])) or 1.0
            t, cpu = time.perf_counter(), time.process_time()
            off, _, _ = knn_distribution(d, i, r, ds.values, k, temperature, args.min_prob)
            post_s += time.perf_counter() - t
            post_cpu += time.process_time() - cpu
            nnz += int(off[-1])
        row.update(queries=nq, search_seconds=search_s, search_qps=nq / search_s, search_cpu_seconds=search_cpu,
                   post_cpu_seconds=post_cpu, load_average=os.getloadavg()[0],
                   targets_post_rows_per_s=nq / post_s, targets_rows_per_s=nq / (search_s + post_s),
                   mean_nnz=nnz / nq, temperature=temperature,
                   scanned_codes_per_query=(args.nprobe * n / row["nlist"]) if row.get("nlist") else n)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row["vmrss_peak_mb"] = {k: round(v, 1) for k, v in rss.peaks.items() if k != "start"}
    row["rss_anon_peak_mb"] = {k: round(v, 1) for k, v in rss.anon_peaks.items() if k != "start"}
    row["datastore_bytes"] = sum(f.stat().st_size for f in ds_dir.iterdir() if f.is_file())
    if not args.keep:
        shutil.rmtree(ds_dir, ignore_errors=True)
        shutil.rmtree(index_dir, ignore_errors=True)
    return row


def idle_seconds(row: dict, phase: str) -> tuple[float, str]:
    """Seconds of a phase (train, add, search, post) on idle cores: CPU seconds / threads when recorded
    (a shared machine's wall clock includes other processes' turns), else the wall-clock seconds."""
    cpu = {"train": (row.get("cpu_seconds") or {}).get("train"), "add": (row.get("cpu_seconds") or {}).get("add"),
           "search": row.get("search_cpu_seconds"), "post": row.get("post_cpu_seconds")}[phase]
    if cpu:
        return cpu / max(int(row.get("threads") or 1), 1) if phase != "post" else cpu, "cpu"
    wall = {"train": row.get("train_seconds"), "add": row.get("add_seconds"), "search": row.get("search_seconds"),
            "post": row["queries"] / row["targets_post_rows_per_s"] if row.get("targets_post_rows_per_s") else None}
    return float(wall[phase] or 0.0), "wall"


def fit_throughputs(rows: list[dict]) -> dict:
    """The ``mlpmem plan --throughputs`` schema, fitted over the IVF rows of one machine, in idle-core seconds
    (:func:`idle_seconds`).

    search: seconds/query = a + b * scanned codes (nprobe * N / nlist), least squares (b = 0 with one size);
    index add: rows/s (median); index train: seconds = a + b * nlist (a = median with one size);
    targets post-processing: rows/s (median).
    """
    ivf = [r for r in rows if r.get("nlist")]
    if not ivf:
        return {}
    scanned = np.array([r["scanned_codes_per_query"] for r in ivf], float)
    spq = np.array([idle_seconds(r, "search")[0] / r["queries"] for r in ivf])
    nl = np.array([r["nlist"] for r in ivf], float)
    tr = np.array([idle_seconds(r, "train")[0] for r in ivf])
    if len(set(scanned)) > 1:
        b, a = np.polyfit(scanned, spq, 1)
        if b < 0 or a < 0:  # noise: fall back to a proportional model through the largest size
            j = int(np.argmax(scanned))
            a, b = 0.0, float(spq[j] / scanned[j])
    else:
        a, b = float(spq.mean()), 0.0
    if len(set(nl)) > 1:
        tb, ta = np.polyfit(nl, tr, 1)
        if tb < 0 or ta < 0:
            ta, tb = 0.0, float(np.median(tr / nl))
    else:
        ta, tb = float(np.median(tr)), 0.0
    first = ivf[0]
    merged = [r for r in ivf if r.get("ondisk") and r.get("merge_seconds") and r.get("ivfdata_bytes")]
    merge = ({"merge_bytes_per_s": float(np.median([r["ivfdata_bytes"] / r["merge_seconds"] for r in merged]))}
             if merged else {})
    return {
        "source": "benchmarks/scale_sim.py, N = " + ", ".join(f"{r['n']:,}" for r in ivf)
                  + f", {first['threads']} threads, "
                  f"faiss {first['faiss']}",
        "threads": first["threads"],
        "index": {"factory": first["factory"], "train_seconds_fixed": float(ta), "train_seconds_per_list": float(tb),
                  "train_samples": first.get("train_samples"),
                  "add_rows_per_s": float(np.median([r["n"] / idle_seconds(r, "add")[0] for r in ivf])), **merge},
        "search": {"seconds_per_query": float(a), "seconds_per_scanned_code": float(b), "k": first["k"],
                   "nprobe": first["nprobe"]},
        # (the synthetic rows' mean_nnz is not a real corpus's: it stays in the rows, not here)
        "targets_post": {"rows_per_s": float(np.median([r["queries"] / idle_seconds(r, "post")[0] for r in ivf])),
                         "k": first["k"]},
    }


def _mb(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(rows: list[dict]) -> str:
    head = ("| N | factory | threads | train s | add s | add rows/s | index MB | recall@64 | search q/s (k+1) | "
            "targets rows/s | idle-core train s / add rows/s / q/s | peak RSS MB | VmRSS index / search MB | "
            "RssAnon index / search MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["n"], r["factory"])):
        vm, an = r.get("vmrss_peak_mb", {}), r.get("rss_anon_peak_mb", {})
        lines.append(f"| {r['n']:,} | {r['factory']}{' (on disk)' if r.get('ondisk') else ''} | {r['threads']} | "
                     f"{r['train_seconds']:.1f} | {r['add_seconds']:.1f} | {r['add_rows_per_s']:,.0f} | "
                     f"{r['index_file_bytes'] / 1e6:,.1f} | {r['recall_at_64']:.3f} | {r['search_qps']:,.0f} | "
                     f"{r['targets_rows_per_s']:,.0f} | {idle_seconds(r, 'train')[0]:.1f} / "
                     f"{r['n'] / max(idle_seconds(r, 'add')[0], 1e-9):,.0f} / "
                     f"{r['queries'] / max(idle_seconds(r, 'search')[0], 1e-9):,.0f} | {r['peak_rss_mb']:,.0f} | "
                     f"{_mb(vm.get('index'))} / {_mb(vm.get('search'))} | "
                     f"{_mb(an.get('index'))} / {_mb(an.get('search'))} |")
    return "\n".join(lines)


def parse_rows(spec: str) -> list[int]:
    try:
        sizes = [int(float(x)) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"scale_sim: --rows must be comma-separated numbers (5e6,10e6), got {spec!r}") from None
    if not sizes or min(sizes) < 2:
        raise SystemExit(f"scale_sim: --rows must be sizes >= 2, got {spec!r}")
    return sizes


def disk_needed(n: int, dim: int) -> int:
    """Bytes the largest size needs under --out-dir: fp16 keys + values + an IVF-PQ index (~80 B/row)."""
    return n * (dim * 2 + 4) + n * 80 + (1 << 30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="5e6,10e6,20e6", help="comma-separated datastore sizes")
    ap.add_argument("--out-dir", default="/tmp/scale", help="scratch folder for datastores and indexes")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (a .md table is written next to it)")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=20_000, help="rows searched to measure the targets pass")
    ap.add_argument("--batch", type=int, default=1024, help="queries per search call (the targets default)")
    ap.add_argument("--min-prob", type=float, default=1e-6)
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--ondisk", action="store_true", help="the on-disk IVF-PQ tier (falls back to IVF-PQ in RAM)")
    ap.add_argument("--train-samples", type=int, default=200_000)
    ap.add_argument("--flat-max-rows", type=int, default=None, help="passed to build_index (0: never Flat)")
    ap.add_argument("--ivf-flat-max-gb", type=float, default=None, help="passed to build_index (0: never IVF-Flat)")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0: FAISS's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the datastores and indexes under --out-dir")
    ap.add_argument("--reuse-index", action="store_true", help="reuse a finished index instead of rebuilding it")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, JSON on stdout
    args = ap.parse_args(argv)

    if args.one is not None:
        row = run_one(args.one, args)
        row["train_samples"] = args.train_samples
        print("SCALE_SIM_ROW " + json.dumps(row), flush=True)
        return 0

    sizes = parse_rows(args.rows)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    need, free = disk_needed(max(sizes), args.dim), shutil.disk_usage(out_dir).free
    if need > free:
        raise SystemExit(f"scale_sim: {max(sizes):,} rows need ~{need / 1e9:.1f} GB under {out_dir}, only "
                         f"{free / 1e9:.1f} GB free; choose smaller --rows or another --out-dir")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = list(old.get("rows", []))
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for n in sizes:
        cmd = [sys.executable, __file__, *passthrough, "--one", str(n)]
        print(f"scale_sim: N = {n:,} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SCALE_SIM_ROW ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"scale_sim: N = {n:,} failed (exit {proc.returncode}); see the messages above")
        row = json.loads(line.split(" ", 1)[1])
        key = (row["n"], row["factory"], row["threads"], bool(row.get("ondisk")))
        rows = [r for r in rows if (r["n"], r["factory"], r["threads"], bool(r.get("ondisk"))) != key] + [row]
        print(json.dumps(row), flush=True)
        result = {"machine": f"{os.cpu_count()} CPUs", "rows": rows, "throughputs": fit_throughputs(rows)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text("# Scale simulation (benchmarks/scale_sim.py)\n\n" + table(rows) + "\n\n"
                                          "Fitted throughputs (`mlpmem plan --throughputs " + str(out) + "`):\n\n"
                                          "```json\n" + json.dumps(result["throughputs"], indent=2) + "\n```\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
