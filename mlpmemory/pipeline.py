"""The pipeline as plain functions, one per stage, each idempotent and resumable.

Run directory layout::

    <run_dir>/config.json      effective settings of the last command
    <run_dir>/corpus/          token streams (train.i32, heldout.i32) + documents.jsonl
    <run_dir>/datastore/       keys / values / memory inputs of the training split
    <run_dir>/tune/            validation slice of the held-out split (keys + base LM log-probs)
    <run_dir>/index/           FAISS index over datastore keys
    <run_dir>/targets/         sparse kNN target distributions, in shards

The held-out split is cut in two halves by position: the first half (``validation``) is where
settings such as T and lambda are chosen; the second half (``test``) is only ever reported on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import Config
from .manifest import atomic_write_json, check_fields, is_complete, read_json, read_manifest

CORPUS, DATASTORE, TUNE, INDEX, TARGETS = "corpus", "datastore", "tune", "index", "targets"


def log(msg: str) -> None:
    print(f"[mlpmemory] {msg}", file=sys.stderr, flush=True)


class Run:
    """A run directory plus lazily loaded base model, shared by the stages of one command."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", cfg.to_dict())
        self._lm = None
        self.timings: dict[str, float] = {}

    def path(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def lm(self):
        if self._lm is None:
            from .models import load_model

            t = time.perf_counter()
            self._lm = load_model(self.cfg.model, cache_dir=self.cfg.cache_dir, device=self.cfg.device, dtype=self.cfg.dtype)
            log(f"loaded {self.cfg.model} ({self._lm.dtype}, {self._lm.device}) in {time.perf_counter() - t:.1f}s")
        return self._lm

    def timed(self, stage: str, fn):
        """Run a stage; its build time is kept in timings.json so later summaries still show it."""
        done = is_complete(self.path(stage))
        t = time.perf_counter()
        result = fn()
        timings_path = self.dir / "timings.json"
        timings = read_json(timings_path) if timings_path.exists() else {}
        if not done:
            timings[stage] = round(time.perf_counter() - t, 2)
            atomic_write_json(timings_path, timings)
        self.timings[stage] = timings.get(stage, 0.0)
        log(f"{stage}: {'already complete' if done else f'done in {self.timings[stage]:.1f}s'}")
        return result


def stage_corpus(run: Run) -> dict:
    from .corpus import tokenize_corpus

    cfg = run.cfg

    def go():
        lm = run.lm
        return tokenize_corpus(cfg.corpus, lm.tokenizer, run.path(CORPUS), tokenizer_fingerprint=lm.tokenizer_fingerprint,
                               heldout_fraction=cfg.heldout_fraction, max_train_tokens=cfg.max_train_tokens,
                               max_heldout_tokens=cfg.max_heldout_tokens, text_field=cfg.text_field,
                               skip_bad_utf8=cfg.skip_bad_utf8, cache_dir=cfg.cache_dir)
    return run.timed(CORPUS, go)


def validation_tokens(corpus_manifest: dict, tune_tokens: int) -> int:
    """Tokens of the held-out stream used for tuning: a prefix of its first half."""
    return min(tune_tokens, corpus_manifest["n_tokens"]["heldout"] // 2)


def stage_datastore(run: Run) -> dict:
    from .datastore import build_datastore
    from .errors import MLPMemError

    cfg = run.cfg
    corpus = stage_corpus(run)
    identity = {"corpus_fingerprint": corpus["corpus_fingerprint"]}
    common = dict(key_site=cfg.key_site, block=cfg.block, stride=cfg.stride, batch_size=cfg.batch_size)
    cdir = run.path(CORPUS)
    n_valid = validation_tokens(corpus, cfg.tune_tokens)
    if n_valid < 2:  # checked first: T and lambda must be chosen on held-out text
        raise MLPMemError("the held-out split is empty: raise --heldout-fraction or use a larger corpus")
    manifest = run.timed(DATASTORE, lambda: build_datastore(
        run.lm, cdir / "train.i32", corpus["n_tokens"]["train"], run.path(DATASTORE),
        mem_site=cfg.mem_site if cfg.store_mem_inputs else None, identity={**identity, "split": "train"}, **common))
    run.timed(TUNE, lambda: build_datastore(
        run.lm, cdir / "heldout.i32", n_valid, run.path(TUNE), mem_site=cfg.mem_site, store_lm_logprob=True,
        identity={**identity, "split": "heldout-validation"}, **common))
    return manifest


def stage_index(run: Run) -> dict:
    from .index import build_index

    cfg = run.cfg
    if not is_complete(run.path(DATASTORE)):
        stage_datastore(run)
    return run.timed(INDEX, lambda: build_index(run.path(DATASTORE), run.path(INDEX), factory=cfg.index_factory,
                                                flat_max_rows=cfg.flat_max_rows, nprobe=cfg.nprobe, use_gpu=cfg.use_gpu))


def stage_targets(run: Run) -> dict:
    from .targets import build_targets

    cfg = run.cfg
    if not is_complete(run.path(INDEX)) or not is_complete(run.path(TUNE)):
        stage_index(run)
    # The validation slice must come from the same model and capture site as the datastore.
    check_fields(read_manifest(run.path(TUNE), "validation slice"), read_manifest(run.path(DATASTORE), "datastore"),
                 ["model_fingerprint", "tokenizer_fingerprint", "key_site", "dim", "corpus_fingerprint"],
                 f"validation slice {run.path(TUNE)}")
    temperature = cfg.temperature if cfg.temperature == "auto" else float(cfg.temperature)
    return run.timed(TARGETS, lambda: build_targets(
        run.path(DATASTORE), run.path(INDEX), run.path(TARGETS), heldout_dir=run.path(TUNE),
        k=cfg.k if cfg.k is not None else 1024, k_explicit=cfg.k is not None, temperature=temperature,
        min_prob=cfg.min_prob, shard_rows=cfg.shard_rows, batch=cfg.search_batch, nprobe=cfg.nprobe))


def run_all(run: Run) -> dict:
    """Every stage, skipping finished ones; returns the results dict (also saved as results.json)."""
    stage_targets(run)
    return summarize(run)


def summarize(run: Run) -> dict:
    corpus = read_manifest(run.path(CORPUS), "corpus")
    ds = read_manifest(run.path(DATASTORE), "datastore")
    idx = read_manifest(run.path(INDEX), "index")
    tg = read_manifest(run.path(TARGETS), "targets")
    sel = tg.get("temperature_selection") or {}
    results = {
        "model": run.cfg.model,
        "corpus": run.cfg.corpus,
        "tokens": corpus["n_tokens"],
        "datastore_rows": ds["n"],
        "key_site": ds["key_site"],
        "mem_site": ds["mem_site"],
        "index": {"factory": idx.get("factory"), "recall": idx.get("recall"), "qps": idx.get("search_qps")},
        "targets_search_qps": tg.get("queries_per_s"),
        "targets": {"k": tg.get("k"), "temperature": tg.get("temperature"), "mean_nonzeros": tg.get("mean_nnz")},
        "temperature_grid": sel.get("grid"),
        "ppl": {"base": sel.get("base_ppl"),
                "knn_lm_validation": min((g["knn_lm_ppl"] for g in sel.get("grid", [])), default=None)},
        "stage_seconds": read_json(run.dir / "timings.json") if (run.dir / "timings.json").exists() else run.timings,
        "settings": run.cfg.to_dict(),
    }
    atomic_write_json(run.dir / "results.json", results)
    return results


def format_table(results: dict) -> str:
    rows = [
        ("model", results["model"]),
        ("corpus tokens (train / held-out)", f"{results['tokens']['train']:,} / {results['tokens']['heldout']:,}"),
        ("datastore rows", f"{results['datastore_rows']:,}"),
        ("key site / memory-input site", f"layer {results['key_site']['layer']} / "
                                          f"{(results['mem_site'] or {}).get('layer')}"),
        ("index", f"{results['index']['factory']} (recall {results['index']['recall']})"),
        ("targets", f"k={results['targets']['k']}, T={results['targets']['temperature']:.3g}, "
                    f"{results['targets']['mean_nonzeros']:.1f} tokens/row, {results['targets_search_qps']:.0f} queries/s"),
        ("base PPL (validation slice)", f"{results['ppl']['base']:.2f}" if results["ppl"]["base"] else "-"),
        ("kNN-LM PPL (validation slice, best lambda)",
         f"{results['ppl']['knn_lm_validation']:.2f}" if results["ppl"]["knn_lm_validation"] else "-"),
    ]
    rows += [(f"time: {k}", f"{v:.1f}s") for k, v in results["stage_seconds"].items()]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a:<{w}} | {b} |" for a, b in rows]
    if results.get("temperature_grid"):
        lines += ["", "| T | kNN-LM PPL | best lambda | kNN-only PPL |", "|---|---|---|---|"]
        lines += [f"| {g['T']:.3g} | {g['knn_lm_ppl']:.2f} | {g['best_lambda']} | {g['knn_only_ppl']:.1f} |"
                  for g in results["temperature_grid"]]
    return "\n".join(lines)
