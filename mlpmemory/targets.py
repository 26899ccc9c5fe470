"""kNN target distributions: for every datastore row, the retriever's next-token distribution.

For row t with key k_t we search k+1 neighbours, drop t itself, and set
``p_kNN(v) = sum_i softmax_i(-d_i / T) * 1[v_i = v]`` over the k that remain (docs/method.md#knn-targets).

Why it is written this way:

- **Self is excluded by id, never by position.** Some FAISS builds return neighbours unsorted,
  and rows with identical keys tie at distance 0, so "drop the first hit" can drop a duplicate
  and keep the row itself - leaking the answer into its own target. We drop the hit whose id is
  the query's row (wherever it is), and if it was not returned we drop the farthest, so exactly
  k neighbours always remain. FAISS's -1 ids (too few results) are treated as missing.
- **Thresholded, then re-normalised.** Probabilities below ``min_prob`` are dropped to keep the
  targets sparse; the rest are re-normalised so every row is a distribution (the public code
  skips this, so its KL targets sum to less than 1).
- **T is searched, not fixed.** The right temperature depends on the key site's distance scale
  (~3 vs ~100 for two sites of the same model), so ``"auto"`` sweeps a grid scaled by the median
  nearest-neighbour distance and keeps the T with the best kNN-LM perplexity on held-out rows.
- **Shards, written atomically.** Target generation is the longest search of the pipeline; rows
  are processed in shards, each written to a temp dir and renamed (``plan.json`` keeps the
  temperature the first shards were made with), so a run killed at any point resumes at the
  first missing shard and yields byte-identical files. Arrays are plain .npy
  (CSR: offsets / token_ids / probs), memory-mapped on read so training can gather random rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import distributed
from .config import TargetsSettings
from .datastore import open_datastore
from .errors import MLPMemError
from .index import index_fingerprint, load_index
from .io import atomic_path, check_checksums, file_checksums, read_json, read_manifest, sha256_json
from .log import log
from .stage import Stage, run_stage

SHARD_FILES = ("offsets", "token_ids", "probs", "next_token")
SHARD_DTYPES = {"offsets": np.int64, "token_ids": np.int32, "probs": np.float16, "next_token": np.int32}
PLAN = "plan.json"


def knn_distribution(dists: np.ndarray, ids: np.ndarray, query_ids: np.ndarray | None, values,
                     k: int, temperature: float, min_prob: float):
    """Sparse kNN next-token distributions for a batch of searched queries.

    dists/ids: (B, K) squared L2 distances and row ids from FAISS (any order; -1 = missing).
    query_ids: (B,) the datastore row of each query (excluded by id), or None (held-out queries).
    Returns CSR ``(offsets int64 (B+1,), token_ids int32, probs float32)``; each row sorted by
    token id, summing to 1 (empty only if no neighbour was found). A row's most probable token is
    always kept, even when ``min_prob`` exceeds it.
    """
    dists = np.asarray(dists, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    if dists.shape != ids.shape or dists.ndim != 2:
        raise ValueError(f"dists {dists.shape} and ids {ids.shape} must be the same (B, K) shape")
    if temperature <= 0:
        raise MLPMemError(f"temperature must be > 0, got {temperature}")
    b = dists.shape[0]
    keep = ids >= 0
    if query_ids is not None:
        keep &= ids != np.asarray(query_ids, dtype=np.int64)[:, None]
    # The k nearest survivors (stable: equal distances keep FAISS's order).
    masked = np.where(keep, dists, np.inf)
    order = np.argsort(masked, axis=1, kind="stable")[:, :k]
    d_sel = np.take_along_axis(masked, order, 1)
    i_sel = np.take_along_axis(ids, order, 1)
    valid = np.isfinite(d_sel)

    logits = np.where(valid, -d_sel / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True) if logits.shape[1] else np.zeros((b, 1))
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.where(valid, np.exp(logits - top), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)

    rows = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None], i_sel.shape)[valid]
    toks = np.asarray(values[i_sel[valid]], dtype=np.int64)
    if len(toks) and toks.min() < 0:
        raise MLPMemError("the datastore holds negative token ids; rebuild it")
    w = w[valid]
    # Sum weights per (row, token): sort by the combined key, reduce over runs of equal keys.
    key = (rows << 32) | toks
    srt = np.argsort(key, kind="stable")
    key, w = key[srt], w[srt]
    if len(key):
        starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1])
        p = np.add.reduceat(w, starts)
        key = key[starts]
    else:
        p = np.zeros(0)
    rows, toks = key >> 32, key & 0xFFFFFFFF

    if len(p):  # rows are sorted, so per-row maxima are a reduceat over row runs
        run = np.flatnonzero(np.concatenate([[True], np.diff(rows) != 0]))
        row_max = np.repeat(np.maximum.reduceat(p, run), np.diff(np.append(run, len(p))))
    else:
        row_max = p
    kept = (p >= min_prob) | (p >= row_max)
    rows, toks, p = rows[kept], toks[kept], p[kept]
    p = p / np.bincount(rows, weights=p, minlength=b)[rows]
    offsets = np.zeros(b + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=b), out=offsets[1:])
    return offsets, toks.astype(np.int32), p.astype(np.float32)


def search_neighbours(index, queries: np.ndarray, k_plus_one: int, batch: int = 4096):
    """``index.search`` in batches of float32 queries; returns (D float32, I int64)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k_plus_one = int(k_plus_one)
    out_d = np.empty((len(queries), k_plus_one), np.float32)
    out_i = np.empty((len(queries), k_plus_one), np.int64)
    for s in range(0, len(queries), batch):
        out_d[s:s + batch], out_i[s:s + batch] = index.search(queries[s:s + batch], k_plus_one)
    return out_d, out_i


def _p_true(offsets, toks, probs, true_tokens) -> np.ndarray:
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    hit = toks == np.asarray(true_tokens)[rows]
    return np.bincount(rows[hit], weights=probs[hit], minlength=len(offsets) - 1)


def choose_temperature(index, values, heldout, *, k: int, grid=None,
                       lambdas=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5), max_queries: int = 4096,
                       min_prob: float = 0.0) -> dict:
    """Pick T by kNN-LM perplexity on held-out rows (which are not in the datastore).

    Default grid: the median squared distance to the 1st neighbour, times 2**j for j = -6..1.
    One search; every T reuses it. For each T the best lambda in ``lambdas`` is used.
    """
    if heldout.lm_logprob is None:
        raise MLPMemError(f"held-out datastore at {heldout.path} has no lm_logprob; rebuild it with the "
                          "base LM's log-probs (needed to choose the temperature) or pass a fixed temperature")
    if heldout.dim != index.d:
        raise MLPMemError(f"held-out keys have dim {heldout.dim} but the index has {index.d}; "
                          "use a held-out datastore captured at the same site with the same model")
    if heldout.n == 0:
        raise MLPMemError(f"held-out datastore at {heldout.path} is empty; it needs rows to choose the temperature")
    n_q = min(heldout.n, int(max_queries))
    rows = np.unique(np.linspace(0, heldout.n - 1, n_q).round().astype(np.int64))
    queries = np.asarray(heldout.keys[rows], dtype=np.float32)
    dists, ids = search_neighbours(index, queries, k)
    d1 = np.where(ids >= 0, dists, np.inf).min(axis=1)
    d1 = d1[np.isfinite(d1)]
    median_d1 = float(np.median(d1)) if len(d1) else 0.0
    if grid is None:
        scale = median_d1
        if scale <= 0:  # degenerate (held-out keys duplicated in the datastore): use all distances
            pos = dists[(ids >= 0) & (dists > 0)]
            scale = float(np.median(pos)) if len(pos) else 1.0
        grid = [scale * 2.0 ** j for j in range(-6, 2)]
    true_tok = np.asarray(heldout.values[rows], dtype=np.int64)
    lm_lp = np.asarray(heldout.lm_logprob[rows], dtype=np.float64)
    lm_p = np.exp(lm_lp)
    results = []
    for t in grid:
        off, tok, p = knn_distribution(dists, ids, None, values, k, float(t), min_prob)
        pk = _p_true(off, tok, p, true_tok)
        best = None
        for lam in lambdas:
            mix = lam * pk + (1.0 - lam) * lm_p
            ppl = float(np.exp(-np.mean(np.log(np.maximum(mix, 1e-300)))))
            if best is None or ppl < best[0]:
                best = (ppl, float(lam))
        results.append({"T": float(t), "knn_lm_ppl": best[0], "best_lambda": best[1],
                        "knn_only_ppl": float(np.exp(-np.mean(np.log(np.maximum(pk, 1e-10)))))})
    chosen = min(results, key=lambda r: r["knn_lm_ppl"])
    return {"temperature": chosen["T"], "grid": results, "base_ppl": float(np.exp(-np.mean(lm_lp))),
            "n_queries": int(len(rows)), "median_d1": median_d1}


def _write_shard(targets_dir: Path, s: int, arrays: dict, info: dict) -> None:
    """One shard folder of .npy arrays plus shard.json, written under a temporary name and renamed."""
    with atomic_path(targets_dir / f"shard_{s:05d}") as tmp:
        tmp.mkdir()
        for name in SHARD_FILES:
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[name], dtype=SHARD_DTYPES[name]), allow_pickle=False)
        # hashed while the files are fresh in the page cache; the manifest collects them (shard_files)
        checksums = file_checksums(tmp, [f"{name}.npy" for name in SHARD_FILES])
        (tmp / "shard.json").write_text(json.dumps({**info, "checksums": checksums}))


def shard_files(manifest: dict) -> list[str]:
    """Every shard's files, relative to the targets folder (what the manifest's ``checksums`` cover)."""
    return [f"shard_{s:05d}/{name}.npy" for s in range(int(manifest["n_shards"])) for name in SHARD_FILES]


def _shard_span(s: int, n: int, shard_rows: int) -> tuple[int, int]:
    return s * shard_rows, min(n, (s + 1) * shard_rows)


def _checked_k_and_temperature(n: int, k: int | None, k_explicit: bool, temperature, min_prob: float, heldout_dir):
    """``k`` (capped at n - 1 unless given explicitly) and the temperature ("auto" or a float), validated."""
    k = TargetsSettings(k=k).k_value()
    if k < 1:
        raise MLPMemError(f"k must be >= 1, got {k}")
    if k > n - 1:
        if k_explicit:
            raise MLPMemError(f"k={k} is larger than the datastore ({n} rows, so at most {n - 1} neighbours "
                              "besides a row itself); choose a smaller k")
        log(f"targets: k={k} capped at {n - 1} (the datastore has {n} rows)")
        k = n - 1
    if not (0.0 <= min_prob < 1.0):
        raise MLPMemError(f"min_prob must be in [0, 1), got {min_prob}")
    if isinstance(temperature, str) and temperature != "auto":
        try:
            temperature = float(temperature)
        except ValueError:
            raise MLPMemError(f"temperature must be 'auto' or a number > 0, got {temperature!r}") from None
    if temperature == "auto":
        if heldout_dir is None:
            raise MLPMemError("temperature='auto' needs a held-out datastore (heldout_dir) to choose T; "
                              "pass one or give a fixed temperature")
        return k, temperature
    if not float(temperature) > 0:
        raise MLPMemError(f"temperature must be 'auto' or a number > 0, got {temperature!r}")
    return k, float(temperature)


def _plan(stage: Stage, index, ds, heldout, k: int, temperature, min_prob: float) -> dict:
    """The temperature of this build: the one a partial build used (plan.json), else chosen now and saved."""
    plan = stage.resume(PLAN, restart=False)  # resuming: reuse the temperature the finished shards were made with
    if plan is not None:
        return plan
    selection = None
    if temperature == "auto":
        selection = choose_temperature(index, ds.values, heldout, k=k, min_prob=min_prob)
        log(f"targets: auto temperature: T={selection['temperature']:.4g} "
              f"(median d1 {selection['median_d1']:.4g}, base ppl {selection['base_ppl']:.3f})")
    plan = {"temperature": float(selection["temperature"]) if selection else float(temperature),
            "temperature_selection": selection}
    stage.save_progress(PLAN, plan)
    return plan


def _shard_arrays(index, ds, a: int, b: int, batch: int, k: int, t: float, min_prob: float, bar):
    """The CSR targets of rows [a, b), searched ``batch`` rows at a time; (arrays, nnz, search seconds)."""
    parts, search_s = [], 0.0
    for i in range(a, b, batch):
        j = min(b, i + batch)
        t0 = time.perf_counter()
        dists, ids = search_neighbours(index, ds.keys[i:j], k + 1, batch)
        search_s += time.perf_counter() - t0
        parts.append(knn_distribution(dists, ids, np.arange(i, j, dtype=np.int64), ds.values, k, t, min_prob))
        bar.update(j - i)
        bar.set_postfix(qps=f"{(j - a) / max(search_s, 1e-9):.0f}")
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for off, _, _ in parts:
        offsets.append(off[1:] + base)
        base += int(off[-1])
    arrays = {"offsets": np.concatenate(offsets), "token_ids": np.concatenate([p[1] for p in parts]),
              "probs": np.concatenate([p[2] for p in parts]), "next_token": np.asarray(ds.values[a:b], dtype=np.int32)}
    return arrays, base, search_s


def _fill_shards(stage: Stage, index_dir, ds, heldout, k: int, temperature, min_prob: float, shard_rows: int,
                 batch: int, nprobe) -> dict:
    """Compute every missing shard (a killed run resumes them); returns the manifest fields.

    Under torchrun the missing shards are split into contiguous runs, one per rank; each rank
    searches its rows against the whole index (memory-mapped when on disk) and writes its own
    shards. A shard's rows do not depend on the ranks, so the files are those of one process.
    """
    targets_dir, n, settings = stage.dir, ds.n, stage.identity
    index, _ = load_index(index_dir, ds.manifest, nprobe=nprobe, verify_sha256=True)
    plan = distributed.main_first(lambda: _plan(stage, index, ds, heldout, k, temperature, min_prob))
    t_final = float(plan["temperature"])
    n_shards = (n + shard_rows - 1) // shard_rows
    missing = [s for s in range(n_shards) if not (targets_dir / f"shard_{s:05d}").is_dir()]
    distributed.barrier()  # every rank has listed the missing shards before any is written
    mine = distributed.my_share(missing)
    rows = sum(b - a for a, b in (_shard_span(s, n, shard_rows) for s in mine))
    with tqdm(total=rows, desc="knn targets", unit="row", unit_scale=True) as bar:
        for s in mine:
            a, b = _shard_span(s, n, shard_rows)
            arrays, nnz, search_s = _shard_arrays(index, ds, a, b, batch, k, t_final, min_prob, bar)
            _write_shard(targets_dir, s, arrays, {"start": a, "end": b, "nnz": nnz, "search_seconds": search_s})
    distributed.barrier()  # every shard is on disk
    infos = [read_json(targets_dir / f"shard_{s:05d}" / "shard.json") for s in range(n_shards)]
    recorded = {f"shard_{s:05d}/{name}": rec for s, info in enumerate(infos)
                for name, rec in (info.get("checksums") or {}).items()}  # the rest are hashed by Stage.finish
    nnz = sum(int(info["nnz"]) for info in infos)
    search_s = sum(float(info["search_seconds"]) for info in infos)
    fields = {"settings": settings, "k": int(k), "temperature": t_final,
              "temperature_selection": plan["temperature_selection"], "min_prob": float(min_prob),
              "shard_rows": int(shard_rows), "n_shards": n_shards, "n": n, "nnz": nnz, "mean_nnz": nnz / n,
              "datastore_fingerprint": settings["datastore_fingerprint"],
              "index_fingerprint": settings["index_fingerprint"],
              "search_seconds": search_s, "queries_per_s": n / search_s if search_s > 0 else None,
              "checksums": recorded}
    log(f"targets: {n:,} rows, {nnz / n:.1f} non-zeros per row, T={t_final:.4g}, "
          f"{fields['queries_per_s'] or 0:.0f} queries/s")
    return fields


def build_targets(datastore_dir, index_dir, targets_dir, *, heldout_dir=None, k: int | None = TargetsSettings.k,
                  temperature: float | str = TargetsSettings.temperature, min_prob: float = TargetsSettings.min_prob,
                  shard_rows: int = TargetsSettings.shard_rows, batch: int = TargetsSettings.search_batch,
                  nprobe: int | None = None, k_explicit: bool = False) -> dict:
    """Compute (or resume, or find finished) the kNN targets of every datastore row.

    ``k=None`` is the default number of neighbours, capped at the datastore's size; an explicit
    ``k`` larger than the datastore is an error with ``k_explicit``. ``nprobe=None`` searches with
    the index's own setting.
    """
    ds = open_datastore(datastore_dir)
    if ds.n < 2:
        raise MLPMemError(f"datastore at {datastore_dir} has {ds.n} rows; kNN targets need at least 2")
    k, temperature = _checked_k_and_temperature(ds.n, k, k_explicit, temperature, min_prob, heldout_dir)
    index_manifest = read_manifest(index_dir, "index")
    ds_fp = sha256_json(ds.manifest)
    if index_manifest.get("datastore_fingerprint") != ds_fp:
        raise MLPMemError(f"index at {index_dir} was built from a different datastore than {datastore_dir}; "
                          "rebuild the index for this datastore")
    eff_nprobe = nprobe if nprobe is not None else index_manifest.get("params", {}).get("nprobe")
    settings = {"k": int(k), "temperature_requested": temperature, "min_prob": float(min_prob),
                "shard_rows": int(shard_rows), "nprobe": eff_nprobe, "datastore_fingerprint": ds_fp,
                "index_fingerprint": index_fingerprint(index_dir)}
    heldout = None
    if temperature == "auto":
        heldout = open_datastore(heldout_dir, "held-out datastore", check=("lm_logprob",))
        settings["heldout_fingerprint"] = sha256_json(heldout.manifest)
    stage = Stage(targets_dir, settings, "targets", view=lambda m: m.get("settings", {}), files=shard_files)
    return run_stage(stage, lambda: _fill_shards(stage, index_dir, ds, heldout, k, temperature, min_prob, shard_rows,
                                                 batch, eff_nprobe), parallel=True)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    run_start = np.cumsum(lengths) - lengths
    return np.repeat(starts - run_start, lengths) + np.arange(total, dtype=np.int64)


class KnnTargets:
    """Read-only, memory-mapped kNN targets; rows are datastore rows."""

    def __init__(self, path: Path, manifest: dict, shards: list[dict]):
        self.path, self.manifest, self._shards = path, manifest, shards
        self._checked: set[int] = set()  # shards whose files matched their checksums (on first use)
        self.n = int(manifest["n"])
        self.shard_rows = int(manifest["shard_rows"])
        self.k = int(manifest["k"])
        self.temperature = float(manifest["temperature"])

    def __len__(self) -> int:
        return self.n

    def _check_shard(self, s: int) -> None:
        """A shard's files against the checksums of the manifest, the first time its rows are read."""
        if s not in self._checked:
            names = [f"shard_{s:05d}/{name}.npy" for name in SHARD_FILES]
            check_checksums(self.path, self.manifest, names, f"targets at {self.path}")
            self._checked.add(s)

    def get_rows(self, start: int, end: int):
        """Rows [start, end) as CSR (offsets from 0, token_ids int32, probs float32, next_token int32)."""
        if not (0 <= start <= end <= self.n):
            raise IndexError(f"rows [{start}, {end}) outside [0, {self.n})")
        return self.get(np.arange(start, end, dtype=np.int64))

    def get(self, indices):
        """Arbitrary rows (any order, repeats allowed) as CSR, in the order given."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row index out of range [0, {self.n})")
        shard, local = idx // self.shard_rows, idx % self.shard_rows
        lo = np.zeros(len(idx), np.int64)
        hi = np.zeros(len(idx), np.int64)
        next_token = np.zeros(len(idx), np.int32)
        groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]
        for s, _ in groups:
            self._check_shard(int(s))
        for s, pos in groups:
            sh = self._shards[int(s)]
            lo[pos] = sh["offsets"][local[pos]]
            hi[pos] = sh["offsets"][local[pos] + 1]
            next_token[pos] = sh["next_token"][local[pos]]
        lengths = hi - lo
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        token_ids = np.empty(int(offsets[-1]), np.int32)
        probs = np.empty(int(offsets[-1]), np.float32)
        for s, pos in groups:
            sh = self._shards[int(s)]
            src = _ranges(lo[pos], lengths[pos])
            dst = _ranges(offsets[pos], lengths[pos])
            token_ids[dst] = sh["token_ids"][src]
            probs[dst] = sh["probs"][src]
        return offsets, token_ids, probs, next_token


def open_targets(targets_dir, datastore_manifest: dict | None = None) -> KnnTargets:
    """Open finished targets, checking the datastore fingerprint and every shard's files."""
    targets_dir = Path(targets_dir)
    manifest = read_manifest(targets_dir, "targets")
    if datastore_manifest is not None and sha256_json(datastore_manifest) != manifest.get("datastore_fingerprint"):
        raise MLPMemError(f"targets at {targets_dir} were built from a different datastore; "
                          "rebuild them for this datastore (or point to the matching one)")
    n, shard_rows = int(manifest["n"]), int(manifest["shard_rows"])
    shards = []
    for s in range(int(manifest["n_shards"])):
        a, b = _shard_span(s, n, shard_rows)
        d = targets_dir / f"shard_{s:05d}"
        arrays = {}
        for name in SHARD_FILES:
            try:
                arrays[name] = np.load(d / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise MLPMemError(f"targets shard {d} is missing or corrupted ({name}.npy: {e}); "
                                  f"delete {d} and the manifest, then re-run the targets stage") from None
            if arrays[name].dtype != SHARD_DTYPES[name] or arrays[name].ndim != 1:
                raise MLPMemError(f"targets shard {d}: {name}.npy has dtype {arrays[name].dtype}, "
                                  f"shape {arrays[name].shape}; rebuild the targets")
        off = arrays["offsets"]
        ok = (len(off) == b - a + 1 and len(arrays["next_token"]) == b - a and int(off[0]) == 0
              and int(off[-1]) == len(arrays["token_ids"]) == len(arrays["probs"]))
        if not ok:
            raise MLPMemError(f"targets shard {d} has inconsistent sizes (truncated?); delete {d} and the "
                              "manifest, then re-run the targets stage")
        shards.append(arrays)
    return KnnTargets(targets_dir, manifest, shards)
