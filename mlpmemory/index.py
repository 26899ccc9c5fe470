"""The FAISS index over the datastore keys (squared L2), built once and checked on every load.

Why it looks the way it does:

- **Exact while affordable.** Below ``flat_max_rows`` rows we use a Flat index: exact search
  costs ~1.6 ms/query at 200k x 576 on two cores, and the kNN targets are then exactly the
  method's definition. Above, IVF-Flat (exact distances in the probed lists) while the float32
  keys fit in ``ivf_flat_max_bytes``, then IVF-PQ (the paper's choice: 64-byte 8-bit codes,
  nprobe 32, ~64 B/row); :func:`choose_factory` documents the rule and the measurements.
- **Keys never exist whole in float32.** The datastore keeps fp16 keys in a memmap; we convert
  ``add_batch`` rows at a time and hand them to ``index.add``. Training uses a deterministic
  sample of at most ``train_samples`` rows.
- **Recall is measured, not assumed.** Approximate search silently changes the targets, so every
  build records recall@k against brute force (computed chunk by chunk over the memmap) and the
  search throughput, and both land in the manifest.
- **Nothing is trusted on load.** The file size, FAISS's own parser, ``ntotal``/``d`` and the
  fingerprint of the datastore it was built from are all checked; a corrupt file is a one-line
  :class:`MLPMemError`, never a C++ traceback. The index file is written to a temp name and
  renamed, and the manifest goes last (:mod:`mlpmemory.stage`), so an interrupted build never
  looks complete.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from . import distributed
from .config import IndexSettings
from .datastore import open_datastore
from .errors import MLPMemError
from .io import (
    MANIFEST,
    atomic_path,
    atomic_write_json,
    check_file_size,
    read_json,
    read_manifest,
    sha256_file,
    sha256_json,
    sha256_verified,
)
from .log import log, logger
from .stage import Stage, run_stage

INDEX_FILE = "index.faiss"
PQ_MIN_TRAIN = 39 * 256  # FAISS wants >= 39 points per centroid; an 8-bit PQ has 256 per sub-quantizer
MIN_POINTS_PER_LIST = 39
IVF_FLAT_MAX_BYTES = int(IndexSettings.ivf_flat_max_gb * (1 << 30))


def _pow2_nearest(x: float) -> int:
    return 1 << max(0, int(round(math.log2(max(x, 1.0)))))


def choose_factory(n: int, d: int, flat_max_rows: int = IndexSettings.flat_max_rows,
                   train_samples: int | None = None, ivf_flat_max_bytes: int = IVF_FLAT_MAX_BYTES) -> str:
    """The FAISS factory string for ``n`` keys of dimension ``d``.

    Rule:

    - ``n <= flat_max_rows``: ``"Flat"`` (exact search).
    - ``n * d * 4 <= ivf_flat_max_bytes``: ``"IVF{nlist},Flat"``: exact distances inside the probed
      lists. Measured on 200k SmolLM2 keys (k=1024, nprobe 32): Flat 623 q/s; IVF1024,Flat
      1,481 q/s at recall@1024 0.88; IVF2048,PQ64x8 2,504 q/s at recall 0.73 and approximate
      distances. While the float32 keys fit in RAM, IVF-Flat is the better target builder.
    - otherwise IVF with ``nlist`` = the power of two nearest ``4 * sqrt(n)``, halved until every
      list gets at least 39 training points (training points = ``min(n, train_samples)``);
    - the codes: PQ with ``m`` sub-quantizers of 8 bits, ``m`` = the largest divisor of ``d`` that
      is <= 64 (so 64-byte codes whenever 64 divides ``d``, e.g. d = 576, 768, 2048, 4096), giving
      ``"IVF{nlist},PQ{m}x8"``;
    - ``"IVF{nlist},Flat"`` instead when PQ is not sensible: fewer than 39*256 training points
      (the 256 centroids of each sub-quantizer cannot be trained) or no divisor of ``d`` in
      [8, 64] while d > 8 (e.g. a prime d would give 1-byte codes).
    """
    if n <= 0 or d <= 0:
        raise MLPMemError(f"cannot index n={n} keys of dimension d={d}; build a non-empty datastore first")
    if n <= flat_max_rows:
        return "Flat"
    n_train = n if train_samples is None else min(n, int(train_samples))
    nlist = _pow2_nearest(4.0 * math.sqrt(n))
    while nlist > 1 and n_train / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    if n * d * 4 <= ivf_flat_max_bytes:
        return f"IVF{nlist},Flat"
    m = max(x for x in range(1, min(d, 64) + 1) if d % x == 0)
    if n_train >= PQ_MIN_TRAIN and (m >= 8 or m == d):
        return f"IVF{nlist},PQ{m}x8"
    return f"IVF{nlist},Flat"


def _index_params(index, nprobe: int | None) -> dict:
    params: dict = {}
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return params
    params["nlist"] = int(ivf.nlist)
    params["nprobe"] = int(ivf.nprobe if nprobe is None else nprobe)
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:
        params["m"] = int(pq.M)
        params["nbits"] = int(pq.nbits)
    return params


def _set_nprobe(index, nprobe: int | None) -> None:
    if nprobe is None:
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return  # Flat: nothing to probe
    ivf.nprobe = int(nprobe)


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A deterministic, sorted sample of row ids (sorted: memmap reads go forward)."""
    size = min(n, size)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def exact_knn(keys: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared-L2 top-``k`` of ``queries`` over an fp16 memmap, chunk by chunk.

    Returns (D, I) sorted by distance. Only one chunk of keys is ever float32.
    """
    n = keys.shape[0]
    k = min(k, n)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.empty((len(queries), 0), np.float32)
    best_i = np.empty((len(queries), 0), np.int64)
    for start in range(0, n, chunk):
        xb = np.ascontiguousarray(keys[start:start + chunk], dtype=np.float32)
        d, i = faiss.knn(queries, xb, min(k, len(xb)))
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, i.astype(np.int64) + start], axis=1)
        if all_d.shape[1] > k:
            sel = np.argpartition(all_d, k - 1, axis=1)[:, :k]
            all_d = np.take_along_axis(all_d, sel, 1)
            all_i = np.take_along_axis(all_i, sel, 1)
        best_d, best_i = all_d, all_i
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)


def measure_recall(index, keys: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """recall@k of ``index`` against brute force, tie-aware, plus the index's search throughput.

    A true neighbour is any row within the exact k-th distance (plus a float tolerance), so rows
    with identical keys, or last-bit differences between BLAS kernels, do not count as misses.
    """
    n = keys.shape[0]
    k = min(k, n)
    margin = min(n, 2 * k)
    gt_d, gt_i = exact_knn(keys, queries, margin)
    t0 = time.perf_counter()
    _, approx_i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    seconds = time.perf_counter() - t0
    hits = 0
    for row in range(len(queries)):
        dk = gt_d[row, k - 1]
        tol = 1e-4 * max(abs(float(dk)), 1.0)
        truth = gt_i[row][gt_d[row] <= dk + tol]
        found = approx_i[row][approx_i[row] >= 0]
        hits += min(k, int(np.isin(found, truth).sum()))
    return {"recall": hits / (k * len(queries)) if len(queries) else 1.0,
            "recall_k": int(k), "recall_queries": int(len(queries)),
            "search_qps": len(queries) / seconds if seconds > 0 else float("inf")}


def _to_gpu(index):
    if faiss.get_num_gpus() <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        raise MLPMemError("use_gpu was requested but FAISS sees no GPU (faiss-cpu installed?); "
                          "drop the GPU option or install faiss-gpu")
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError as e:  # e.g. a PQ layout the GPU kernels do not support
        logger.warning(f"index: GPU FAISS cannot hold this index ({str(e).splitlines()[0]}); building on CPU")
        return index, False


def new_index(d: int, factory: str):
    """An empty L2 index for ``factory``, with PQ's polysemous training switched off.

    ``faiss.index_factory`` enables polysemous training for PQ codes. It only serves polysemous
    (Hamming-filtered) search, which kNN-LM never uses, and it dominates training time (28 s vs
    0.3 s for PQ32 on 5k keys in our tests).
    """
    import faiss

    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise MLPMemError(f"FAISS cannot build factory {factory!r} for d={d} ({str(e).splitlines()[0]}); "
                          "use factory='auto' or a valid FAISS factory string") from None
    inner = faiss.downcast_index(index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


def _train_index(index, ds, factory: str, train_samples: int, seed: int, add_batch: int) -> float:
    """Train an IVF/PQ index on a deterministic sample of the keys; the seconds it took (0 for Flat)."""
    if index.is_trained:
        return 0.0
    n, d = ds.n, ds.dim
    rows = _sample_rows(n, train_samples, seed)
    xt = np.empty((len(rows), d), np.float32)
    for s in range(0, len(rows), add_batch):
        xt[s:s + add_batch] = ds.keys[rows[s:s + add_batch]]
    log(f"index: training {factory} on {len(rows):,} of {n:,} keys")
    t0 = time.perf_counter()
    try:
        index.train(xt)
    except RuntimeError as e:
        raise MLPMemError(f"FAISS could not train {factory!r} on {len(rows)} keys "
                          f"({str(e).splitlines()[0]}); use a smaller nlist or factory='auto'") from None
    return time.perf_counter() - t0


def _add_keys(index, ds, add_batch: int) -> float:
    """Add every key, ``add_batch`` fp16 rows converted at a time; the seconds it took."""
    t0 = time.perf_counter()
    with tqdm(total=ds.n, desc="index add", unit="row", unit_scale=True) as bar:
        for s in range(0, ds.n, add_batch):
            chunk = np.ascontiguousarray(ds.keys[s:s + add_batch], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))
    return time.perf_counter() - t0


def _build_index_files(ds, index_dir: Path, factory: str, settings: dict, fingerprint: str, use_gpu: bool,
                       add_batch: int) -> dict:
    """Train, fill, measure and write the index (atomically); returns the manifest fields."""
    t_start = time.perf_counter()
    seed = settings["seed"]
    index = new_index(ds.dim, factory)
    on_gpu = False
    if use_gpu:
        index, on_gpu = _to_gpu(index)
    train_seconds = _train_index(index, ds, factory, settings["train_samples"], seed, add_batch)
    add_seconds = _add_keys(index, ds, add_batch)
    cpu_index = faiss.index_gpu_to_cpu(index) if on_gpu else index
    return _measure_and_write(index, cpu_index, ds, index_dir, factory, settings, fingerprint,
                              {"built_on_gpu": on_gpu, "storage": "ram", "train_seconds": train_seconds,
                               "add_seconds": add_seconds}, t_start)


def _measure_and_write(index, cpu_index, ds, index_dir: Path, factory: str, settings: dict, fingerprint: str,
                       extra: dict, t_start: float) -> dict:
    """Measure recall against brute force, write the index file (atomically); the manifest fields."""
    nprobe, seed = settings["nprobe"], settings["seed"]
    _set_nprobe(index, nprobe)
    queries = np.asarray(ds.keys[_sample_rows(ds.n, settings["recall_queries"], seed + 1)], dtype=np.float32)
    quality = measure_recall(index, ds.keys, queries, settings["recall_k"])
    _set_nprobe(cpu_index, nprobe)
    path = index_dir / INDEX_FILE
    with atomic_path(path) as tmp:
        faiss.write_index(cpu_index, str(tmp))
    fields = {
        "factory": factory, "index_type": type(faiss.downcast_index(cpu_index)).__name__,
        "params": _index_params(cpu_index, nprobe), "n": int(cpu_index.ntotal), "dim": int(ds.dim), "metric": "l2",
        "datastore_fingerprint": fingerprint, "settings": settings, **quality, **extra,
        "build_seconds": time.perf_counter() - t_start,
        "file_bytes": path.stat().st_size, "file_sha256": sha256_file(path),
    }
    if extra.get("storage") == "disk":
        fields["ivfdata_bytes"] = (index_dir / IVFDATA_FILE).stat().st_size
    log(f"index: {factory} ({fields['storage']}): recall@{quality['recall_k']} = {quality['recall']:.4f}, "
        f"{quality['search_qps']:.0f} queries/s, {fields['build_seconds']:.1f} s")
    return fields


# ---------------------------------------------------------------------------------------------
# The sharded build: quantizer trained once, shards added in parallel, merged (in RAM or on disk).
# ---------------------------------------------------------------------------------------------

TRAINED_FILE = "trained.faiss"
IVFDATA_FILE = "index.ivfdata"


def ivf_bytes(n: int, d: int, factory: str) -> int:
    """Bytes of an IVF index's inverted lists (codes + 8-byte ids) for ``n`` keys of dimension ``d``."""
    pq = re.search(r",PQ(\d+)(?:x(\d+))?", factory)
    code = int(pq[1]) * int(pq[2] or 8) // 8 if pq else d * 4  # PQ m x nbits codes, else float32 vectors
    return n * (code + 8)


def choose_storage(n: int, d: int, factory: str, storage: str = IndexSettings.index_storage,
                   ondisk_min_gb: float = IndexSettings.ondisk_min_gb) -> str:
    """'ram' or 'disk' for an index: only IVF lists can live on disk; 'auto' puts them there above ``ondisk_min_gb``."""
    if not factory.startswith("IVF"):
        if storage == "disk":
            raise MLPMemError(f"--index-storage disk needs an IVF index, but the factory is {factory!r}; use an IVF "
                              "factory (or 'auto' on a datastore above --flat-max-rows) or --index-storage ram")
        return "ram"
    if storage != "auto":
        return storage
    return "disk" if ivf_bytes(n, d, factory) > ondisk_min_gb * (1 << 30) else "ram"


def _shard_file(a: int, b: int) -> str:
    return f"shard-{a:012d}-{b:012d}.faiss"  # named by rows: a resumed job with other ranks redoes only its own


def _train_once(ds, index_dir: Path, factory: str, settings: dict, add_batch: int) -> float:
    """Train the coarse quantizer (and PQ) once, on rank 0, and save the empty trained index; its seconds."""
    path = index_dir / TRAINED_FILE
    if path.exists():
        return float(read_json(index_dir / "trained.json").get("train_seconds", 0.0))
    index = new_index(ds.dim, factory)
    seconds = _train_index(index, ds, factory, settings["train_samples"], settings["seed"], add_batch)
    atomic_write_json(index_dir / "trained.json", {"train_seconds": seconds})
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return seconds


SHARD_MAX_ROWS = 1 << 21  # a shard is built in RAM (~72 B/row for PQ64): 2M rows bound that, and a resume redoes <= 2M


def _pieces(a: int, b: int) -> list[tuple[int, int]]:
    """A rank's row range [a, b) cut into shards of at most :data:`SHARD_MAX_ROWS` rows."""
    return [(x, min(b, x + SHARD_MAX_ROWS)) for x in range(a, b, SHARD_MAX_ROWS)]


def _add_shard(ds, index_dir: Path, a: int, b: int, add_batch: int) -> None:
    """This rank's rows [a, b) added (with their global ids) to a copy of the trained index, saved as a shard."""
    path = index_dir / _shard_file(a, b)
    if path.exists() or a >= b:
        return
    index = faiss.read_index(str(index_dir / TRAINED_FILE))
    with tqdm(total=b - a, desc="index add", unit="row", unit_scale=True) as bar:
        for s in range(a, b, add_batch):
            chunk = np.ascontiguousarray(ds.keys[s:min(b, s + add_batch)], dtype=np.float32)
            index.add_with_ids(chunk, np.arange(s, s + len(chunk), dtype=np.int64))
            bar.update(len(chunk))
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _merge_shards(index_dir: Path, shards: list[Path], storage: str):
    """The trained index holding every shard's lists, in shard order (= one process's add order)."""
    index = faiss.read_index(str(index_dir / TRAINED_FILE))
    if storage == "disk":
        from faiss.contrib.ondisk import merge_ondisk

        (index_dir / IVFDATA_FILE).unlink(missing_ok=True)  # a killed merge's partial file
        merge_ondisk(index, [str(p) for p in shards], str(index_dir / IVFDATA_FILE))
        return index
    for p in shards:
        index.merge_from(faiss.read_index(str(p)), 0)
    return index


def _build_sharded(ds, index_dir: Path, factory: str, settings: dict, fingerprint: str, storage: str,
                   add_batch: int) -> dict:
    """Every rank adds its row range to the quantizer trained once; rank 0 merges, measures and writes."""
    t_start = time.perf_counter()
    train_seconds = distributed.main_first(lambda: _train_once(ds, index_dir, factory, settings, add_batch))
    parts = distributed.world_size()
    spans = [distributed.span(ds.n, r, parts) for r in range(parts)]
    t_add = time.perf_counter()
    for a, b in _pieces(*spans[distributed.rank() if parts > 1 else 0]):
        _add_shard(ds, index_dir, a, b, add_batch)
    distributed.barrier()  # every shard is on disk
    add_seconds = time.perf_counter() - t_add
    if not distributed.is_main():
        return {}  # rank 0 writes the manifest
    with distributed.all_cores():
        shards = [index_dir / _shard_file(a, b) for span in spans for a, b in _pieces(*span)]
        index = _merge_shards(index_dir, shards, storage)
        fields = _measure_and_write(index, index, ds, index_dir, factory, settings, fingerprint,
                                    {"built_on_gpu": False, "storage": storage, "train_seconds": train_seconds,
                                     "add_seconds": add_seconds, "shards": [list(x) for x in spans],
                                     "merge_seconds": time.perf_counter() - t_add - add_seconds}, t_start)
    return fields


def _remove_build_files(index_dir: Path) -> None:
    """Shards and the trained quantizer, once the manifest is written (rank 0)."""
    for p in [index_dir / TRAINED_FILE, index_dir / "trained.json", *index_dir.glob("shard-*.faiss")]:
        p.unlink(missing_ok=True)


def build_index(datastore_dir, index_dir, *, factory: str = IndexSettings.index_factory,
                flat_max_rows: int = IndexSettings.flat_max_rows, train_samples: int = 200_000,
                nprobe: int = IndexSettings.nprobe, recall_queries: int = 256, recall_k: int = 64,
                use_gpu: bool = IndexSettings.use_gpu, seed: int = 0, add_batch: int = 65_536,
                ivf_flat_max_bytes: int = IVF_FLAT_MAX_BYTES, storage: str = IndexSettings.index_storage,
                ondisk_min_gb: float = IndexSettings.ondisk_min_gb) -> dict:
    """Build (or find already built) the FAISS index of a datastore's keys; returns its manifest.

    An IVF index is built in shards when there are several ranks (torchrun) or its lists go on disk
    (``storage``): the quantizer is trained once on rank 0, each rank adds its contiguous row range
    (global ids) to a copy, and rank 0 merges the shards in row order (in RAM with ``merge_from``,
    or on disk with FAISS's ``merge_ondisk``), so the lists hold what one process's adds would.
    A Flat index is built by rank 0 alone.
    """
    ds = open_datastore(datastore_dir)
    index_dir = Path(index_dir)
    if ds.n == 0:
        raise MLPMemError(f"datastore at {datastore_dir} is empty; nothing to index")
    resolved = (choose_factory(ds.n, ds.dim, flat_max_rows, train_samples, ivf_flat_max_bytes) if factory == "auto"
                else factory)
    where = choose_storage(ds.n, ds.dim, resolved, storage, ondisk_min_gb)
    settings = {"factory": resolved, "factory_requested": factory, "train_samples": int(train_samples),
                "nprobe": int(nprobe), "recall_queries": int(recall_queries), "recall_k": int(recall_k),
                "seed": int(seed), **({"storage": "disk"} if where == "disk" else {})}
    fingerprint = sha256_json(ds.manifest)
    stage = Stage(index_dir, {"datastore_fingerprint": fingerprint, **settings}, "index",
                  view=lambda m: {"datastore_fingerprint": m.get("datastore_fingerprint"), **m.get("settings", {})})
    sharded = resolved.startswith("IVF") and (where == "disk" or distributed.world_size() > 1) and not use_gpu
    if not sharded:
        return run_stage(stage, lambda: _build_index_files(ds, index_dir, resolved, settings, fingerprint, use_gpu,
                                                           add_batch))
    manifest = run_stage(stage, lambda: _build_sharded(ds, index_dir, resolved, settings, fingerprint, where,
                                                       add_batch), parallel=True)
    if distributed.is_main():
        _remove_build_files(index_dir)
    return manifest


def load_index(index_dir, datastore_manifest: dict | None = None, nprobe: int | None = None,
               verify_sha256: bool = False):
    """Open a finished index: (faiss index, manifest). Everything that can be checked cheaply is.

    ``verify_sha256`` also checks the file's sha256 (catches same-size corruption): a full read the first
    time, then only when its size or mtime changed (:func:`mlpmemory.io.sha256_verified`).
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir, "index")
    path = index_dir / INDEX_FILE
    check_file_size(path, int(manifest["file_bytes"]), "index")
    if verify_sha256 and manifest.get("file_sha256") and not sha256_verified(path, manifest["file_sha256"]):
        raise MLPMemError(f"index file {path} does not match the checksum in its manifest (corrupted); "
                          f"delete {index_dir} and re-run the index stage to rebuild it")
    if datastore_manifest is not None and sha256_json(datastore_manifest) != manifest.get("datastore_fingerprint"):
        raise MLPMemError(f"index at {index_dir} was built from a different datastore than the one given; "
                          "rebuild the index for this datastore (or point to the matching one)")
    ondisk = manifest.get("storage") == "disk"
    if ondisk:
        check_file_size(index_dir / IVFDATA_FILE, int(manifest["ivfdata_bytes"]), "index")
    try:  # on disk: the lists file is found beside the index file wherever the run folder now is, and mmapped
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR) if ondisk else faiss.read_index(str(path))
    except (RuntimeError, MemoryError, ValueError) as e:
        first = (str(e).strip().splitlines() or ["unreadable"])[-1][:200]
        raise MLPMemError(f"index file {path} is corrupted ({first}); "
                          f"delete {index_dir} and rebuild the index") from None
    if int(index.ntotal) != int(manifest["n"]) or int(index.d) != int(manifest["dim"]):
        raise MLPMemError(f"index file {path} holds {index.ntotal} x {index.d} but its manifest says "
                          f"{manifest['n']} x {manifest['dim']}; rebuild the index")
    _set_nprobe(index, nprobe if nprobe is not None else manifest.get("params", {}).get("nprobe"))
    return index, manifest


def index_fingerprint(index_dir) -> str:
    """What a later stage records to prove which index it used (hash of the index manifest)."""
    return sha256_json(read_json(Path(index_dir) / MANIFEST))
