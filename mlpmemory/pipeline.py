"""The pipeline as plain functions, one per stage, each idempotent and resumable.

Each stage first calls the one before it: a finished stage returns at once, but only after
checking that it was built with the current settings, so a changed flag can never be silently
ignored by a later stage that reuses an old artifact.

Run directory layout::

    <run_dir>/config.json      effective settings of the last command
    <run_dir>/corpus/          token streams (train.i32, heldout.i32) + documents.jsonl
    <run_dir>/datastore/       keys / values / memory inputs of the training split
    <run_dir>/tune/            validation slice of the held-out split (keys + base LM log-probs)
    <run_dir>/index/           FAISS index over datastore keys
    <run_dir>/targets/         sparse kNN target distributions, in shards
    <run_dir>/memory/          the trained MLP memory (config.json + model.safetensors) and checkpoint
    <run_dir>/rag_bm25/        BM25 index over the datastore's documents (the +RAG baseline)
    <run_dir>/finetune_cpt/    `mlpmem finetune --method cpt`: the base LM after continued pretraining (+CPT)
    <run_dir>/finetune_lora/   `mlpmem finetune --method lora`: a LoRA adapter of the base LM (+LoRA)
    <run_dir>/eval_test/       base-LM pass over the test half of the held-out split, plus
                               rag_logprob.f32 (+RAG log-probs of the same tokens; cpt_/lora_logprob.f32 alike)
    <run_dir>/eval/            ppl.json + ppl_validation.png (perplexity of every system, lambda sweep)
    <run_dir>/eval_text/<fp>/  `eval-ppl --eval-text`: the same report on another text (test/ + ppl.json)
    <run_dir>/results.json     the main job's summary (never written by an --eval-text invocation)

The held-out split is cut in two halves by position: the first half (``validation``) is where
settings such as T and lambda are chosen; the second half (``test``) is only ever reported on.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from . import distributed
from .config import Config
from .errors import MLPMemError
from .io import atomic_write_json, check_fields, is_complete, read_json, read_manifest, sha256_json, write_manifest
from .log import log

CORPUS, DATASTORE, TUNE, INDEX, TARGETS = "corpus", "datastore", "tune", "index", "targets"
MEMORY, EVAL_TEST, EVAL = "memory", "eval_test", "eval"
RAG_BM25, EVAL_TEXT, EVAL_OOD = "rag_bm25", "eval_text", "eval_ood"
FINETUNED = ("cpt", "lora")  # `mlpmem finetune` baselines, reported when trained


class Run:
    """A run directory plus lazily loaded base model, shared by the stages of one command."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.run.run_dir)
        self._lm = None
        self.timings: dict[str, float] = {}

    def save_config(self) -> None:
        """Save the run settings (stage commands only: tool commands read a run, never change it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", self.cfg.to_dict())

    def path(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def lm(self):
        if self._lm is None:
            from .models import load_model

            r = self.cfg.run
            t = time.perf_counter()
            self._lm = load_model(r.model, cache_dir=r.cache_dir, device=r.device, dtype=r.dtype)
            log(f"loaded {r.model} ({self._lm.dtype}, {self._lm.device}) in {time.perf_counter() - t:.1f}s")
        return self._lm

    def release_lm(self) -> None:
        """Free the base LM while a stage does not need it (offline training); the next use reloads it."""
        import gc

        self._lm = None
        gc.collect()

    def timed(self, stage: str, fn):
        """Run a stage; its build time is kept in timings.json so later summaries still show it.

        Under torchrun every rank runs it; rank 0 (which finishes last: it writes the manifest) records it.
        """
        done = is_complete(self.path(stage))
        t = time.perf_counter()
        result = fn()
        timings_path = self.dir / "timings.json"
        timings = read_json(timings_path) if timings_path.exists() else {}
        if not done and distributed.is_main():
            timings[stage] = round(time.perf_counter() - t, 2)
            atomic_write_json(timings_path, timings)
        self.timings[stage] = timings.get(stage, 0.0)
        log(f"{stage}: {'already complete' if done else f'done in {self.timings[stage]:.1f}s'}")
        return result


def open_run(run_dir, **overrides) -> Run:
    """An existing run directory with its saved settings (``overrides``: run settings of this use only,
    e.g. ``device="cpu"``); what tool commands and Python users work on."""
    from .commands.stages import saved_settings
    from .config import make_config

    if not (Path(run_dir) / "config.json").is_file():
        raise MLPMemError(f"{run_dir} is not a run directory (no config.json); build one with "
                          f"`mlpmem run --run-dir {run_dir}` or give --run-dir")
    return Run(make_config(None, None, base=saved_settings(str(run_dir)), **{**overrides, "run_dir": str(run_dir)}))


def preflight(run: Run) -> None:
    """Cheap checks before any model loads or any file is written: a missing corpus path fails here."""
    from .corpus import DEFAULT_CORPUS

    spec = run.cfg.corpus.corpus
    if not is_complete(run.path(CORPUS)) and spec != DEFAULT_CORPUS and not Path(spec).exists():
        raise MLPMemError(f"corpus {spec} does not exist; give --corpus a file or folder (or 'wiki')")


def _tokenize(run: Run, spec: str, out_dir: Path, heldout_fraction: float, caps: dict) -> dict:
    from .corpus import tokenize_corpus

    c, lm = run.cfg.corpus, run.lm
    return tokenize_corpus(spec, lm.tokenizer, out_dir, tokenizer_fingerprint=lm.tokenizer_fingerprint,
                           heldout_fraction=heldout_fraction, text_field=c.text_field, skip_bad_utf8=c.skip_bad_utf8,
                           cache_dir=run.cfg.run.cache_dir, **caps)


def stage_corpus(run: Run) -> dict:
    c = run.cfg.corpus
    caps = {"max_train_tokens": c.max_train_tokens, "max_heldout_tokens": c.max_heldout_tokens}
    return run.timed(CORPUS, lambda: _tokenize(run, c.corpus, run.path(CORPUS), c.heldout_fraction, caps))


def validation_tokens(corpus_manifest: dict, tune_tokens: int) -> int:
    """Tokens of the held-out stream used for tuning: a prefix of its first half."""
    return min(tune_tokens, corpus_manifest["n_tokens"]["heldout"] // 2)


def _window_args(run: Run) -> dict:
    d = run.cfg.datastore
    return dict(key_site=d.key_site, block=d.block, stride=d.stride, batch_size=d.batch_size)


def stage_datastore(run: Run) -> dict:
    from .datastore import build_datastore

    d = run.cfg.datastore
    corpus = stage_corpus(run)
    identity = {"corpus_fingerprint": corpus["corpus_fingerprint"]}
    cdir = run.path(CORPUS)
    n_valid = validation_tokens(corpus, d.tune_tokens)
    if n_valid < 2:  # checked first: T and lambda must be chosen on held-out text
        raise MLPMemError("the held-out split is empty: raise --heldout-fraction or use a larger corpus")
    manifest = run.timed(DATASTORE, lambda: build_datastore(
        run.lm, cdir / "train.i32", corpus["n_tokens"]["train"], run.path(DATASTORE),
        mem_site=d.mem_site if d.store_mem_inputs else None, identity={**identity, "split": "train"},
        **_window_args(run)))
    run.timed(TUNE, lambda: build_datastore(
        run.lm, cdir / "heldout.i32", n_valid, run.path(TUNE), mem_site=d.mem_site, store_lm_logprob=True,
        identity={**identity, "split": "heldout-validation"}, **_window_args(run)))
    return manifest


def stage_index(run: Run) -> dict:
    from .index import build_index

    x = run.cfg.index
    stage_datastore(run)  # a no-op when complete, but it checks the current settings against it
    return run.timed(INDEX, lambda: build_index(run.path(DATASTORE), run.path(INDEX), factory=x.index_factory,
                                                flat_max_rows=x.flat_max_rows, nprobe=x.nprobe, use_gpu=x.use_gpu,
                                                ivf_flat_max_bytes=int(x.ivf_flat_max_gb * (1 << 30)),
                                                storage=x.index_storage, ondisk_min_gb=x.ondisk_min_gb))


def stage_targets(run: Run) -> dict:
    from .targets import build_targets

    t = run.cfg.targets
    stage_index(run)
    # The validation slice must come from the same model and capture site as the datastore.
    check_fields(read_manifest(run.path(TUNE), "validation slice"), read_manifest(run.path(DATASTORE), "datastore"),
                 ["model_fingerprint", "tokenizer_fingerprint", "key_site", "dim", "corpus_fingerprint"],
                 f"validation slice {run.path(TUNE)}")
    temperature = t.temperature if t.temperature == "auto" else float(t.temperature)
    return run.timed(TARGETS, lambda: build_targets(
        run.path(DATASTORE), run.path(INDEX), run.path(TARGETS), heldout_dir=run.path(TUNE), k=t.k_value(),
        k_explicit=t.k is not None, temperature=temperature, min_prob=t.min_prob, shard_rows=t.shard_rows,
        batch=t.search_batch, nprobe=run.cfg.index.nprobe))


def train_settings(cfg: Config, epochs: float | None = None):
    """The memory's training settings from a run's config (``epochs`` overrides the run's)."""
    return cfg.train if epochs is None else replace(cfg.train, epochs=epochs)


def training_datastore(run: Run):
    """The run's datastore, checked to be trainable with the run's model: same weights, memory inputs stored."""
    from .datastore import open_datastore

    ds = open_datastore(run.path(DATASTORE))
    if ds.manifest["model_fingerprint"] != run.lm.fingerprint:
        raise MLPMemError(f"the datastore in {run.path(DATASTORE)} was built with another model or dtype than "
                          f"{run.cfg.run.model} ({run.cfg.run.dtype}); "
                          "use the same --model/--dtype or another --run-dir")
    if ds.manifest.get("mem_site") is None:
        raise MLPMemError("the datastore has no memory-input site; rebuild it with --mem-site")
    return ds


def initial_memory(run: Run, mcfg, valid_inputs=None) -> tuple:
    """A new memory for ``mcfg`` and its init check: with the base's head, the final norm's gain is
    calibrated on the validation slice (``valid_inputs``: another site's states of those rows)."""
    from .datastore import open_datastore
    from .memory import build_memory, calibrate_final_norm

    memory = build_memory(run.lm, mcfg)
    if mcfg.head_init != "embedding":
        return memory, None
    tune = open_datastore(run.path(TUNE), "validation slice")
    inputs = valid_inputs if valid_inputs is not None else tune.mem_inputs
    if inputs is None:
        raise MLPMemError(f"the validation slice {tune.path} stored no memory inputs; rebuild it")
    check = calibrate_final_norm(memory, inputs, tune.values, tune.lm_logprob)
    log(f"memory init: final-norm gain {check['chosen']['source']} x {check['chosen']['scale']:g}, cross-entropy "
        f"{check['ce']:.2f} on {check['rows']} validation rows (uniform {check['uniform_ce']:.2f}, "
        f"base LM {check.get('base_lm_ce', float('nan')):.2f}, copied as is {check['ce_copied_as_is']:.2f})")
    return memory, check


def finished_memory(folder: Path, mcfg, settings, targets, identity: dict) -> dict | None:
    """The manifest of ``folder`` when it already holds this training (same config up to the calibrated
    init, which is taken from the saved config), else None: a finished memory costs no build or calibration."""
    from dataclasses import replace as with_fields

    from .train import training_fingerprint

    if not is_complete(folder) or not (folder / "config.json").exists():
        return None
    saved = read_json(folder / "config.json")
    if {**saved, "init_norm": None} != {**mcfg.to_dict(), "init_norm": None}:
        return None
    manifest = read_json(folder / "manifest.json")
    fp = training_fingerprint(settings, with_fields(mcfg, init_norm=saved.get("init_norm") or {}), targets, identity)
    return manifest if manifest.get("training_fingerprint") == fp else None


def stage_train(run: Run) -> dict:
    from .memory import memory_config_for
    from .targets import open_targets
    from .train import OnlineInputs, train_memory

    s = run.cfg.train
    stage_targets(run)
    ds = training_datastore(run)
    targets = open_targets(run.path(TARGETS), ds.manifest)
    identity = {"datastore_fingerprint": sha256_json(ds.manifest)}

    def go():
        import torch

        torch.manual_seed(s.seed)
        mcfg = memory_config_for(run.lm, ds.manifest["mem_site"], head_init=s.head_init, **s.sizing())
        done = finished_memory(run.path(MEMORY), mcfg, s, targets, identity)
        if done is not None:
            return done
        memory, check = initial_memory(run, mcfg)
        inputs = OnlineInputs(run.lm, ds, run.path(CORPUS) / "train.i32") if s.train_mode == "online" else None
        log(f"memory: {mcfg.n_blocks} blocks, {memory.num_parameters():,} parameters, "
            f"input {ds.manifest['mem_site']['module']}")
        device = run.lm.device
        if inputs is None:  # offline training reads stored states only: the base LM's RAM goes to the memory
            run.release_lm()
        return train_memory(memory, ds, targets, run.path(MEMORY), s, inputs=inputs, device=device,
                            identity=identity, init_check=check)
    return run.timed(MEMORY, go)


def _eval_text_dirs(run: Run, text: str, max_tokens: int | None = None) -> tuple[Path, Path, int, int, dict, Path]:
    """An --eval-text (or an out-of-domain set: its first ``max_tokens``): tokenised under eval_text/, scored
    into eval_text/<its fingerprint>/ (never the run's eval)."""
    spec = str(Path(text).resolve()) if Path(text).exists() else text
    caps = {"max_train_tokens": max_tokens} if max_tokens else {}
    tm = _tokenize(run, text, run.dir / EVAL_TEXT / f"tokens-{sha256_json([spec, caps])[:12]}", 0.0, caps)
    root = run.dir / EVAL_TEXT / tm["corpus_fingerprint"]
    identity = {"corpus_fingerprint": tm["corpus_fingerprint"], "split": "eval-text"}
    token_path = run.dir / EVAL_TEXT / f"tokens-{sha256_json([spec, caps])[:12]}" / "train.i32"
    return root / "test", token_path, 0, tm["n_tokens"]["train"], identity, root


def _test_text(run: Run, eval_text: str | None) -> tuple[Path, Path, int, int, dict, Path]:
    """(test eval dir, token stream, start, n, identity, report dir) of the text to report on."""
    if eval_text:
        return _eval_text_dirs(run, eval_text)
    corpus = read_manifest(run.path(CORPUS), "corpus")
    n_held = corpus["n_tokens"]["heldout"]
    identity = {"corpus_fingerprint": corpus["corpus_fingerprint"], "split": "heldout-test"}
    return (run.path(EVAL_TEST), run.path(CORPUS) / "heldout.i32", n_held // 2, n_held - n_held // 2, identity,
            run.path(EVAL))


def _rag_setup(run: Run):
    """The BM25 retriever and the +RAG settings that key its cache (None, None without --rag-ppl)."""
    e = run.cfg.eval
    if not e.rag_ppl:
        return None, None
    from .rag import BM25Retriever

    retriever = run.timed(RAG_BM25, lambda: BM25Retriever.build_or_load(run))
    return retriever, {"retriever": "bm25", "retriever_fingerprint": retriever.fingerprint, "passages": len(retriever),
                       "passage_tokens": e.rag_passage_tokens, "retrieve_every": e.rag_retrieve_every,
                       "query_tokens": e.rag_query_tokens, "n_passages": 1}


def _eval_key(run: Run, test_dir: Path, mem_fp: str, rag_settings) -> str:
    """What an eval report depends on, from manifests only: a finished eval must not load the index."""
    from .finetuned import finetuned_fingerprints

    tg = read_manifest(run.path(TARGETS), "targets")
    finetuned = finetuned_fingerprints(run)  # only when the run has fine-tunes: other runs keep their key
    return sha256_json({"memory": mem_fp, "index": read_manifest(run.path(INDEX), "index"),
                        "datastore": read_manifest(run.path(DATASTORE), "datastore"), "k": tg["k"],
                        "T": tg["temperature"], "nprobe": run.cfg.index.nprobe, "valid": read_manifest(run.path(TUNE)),
                        "test": read_manifest(test_dir), "lambdas": run.cfg.eval.lambda_list(), "rag": rag_settings,
                        **({"finetuned": finetuned} if finetuned else {})})


def _rag_logprobs(run: Run, retriever, rag_settings, test_dir: Path, token_path: Path):
    """+RAG log-probs of the test tokens, cached in the test eval dir (another lambda grid does not redo it)."""
    from .rag import cached_ralm_logprobs

    e = run.cfg.eval
    lp, meta = cached_ralm_logprobs(test_dir, run.lm, retriever, token_path, retrieve_every=e.rag_retrieve_every,
                                    query_tokens=e.rag_query_tokens, n_passages=1,
                                    batch_size=run.cfg.datastore.batch_size)
    return {"logprob": lp, "settings": rag_settings, **{k: meta.get(k) for k in (
        "seconds", "retrieval_seconds", "chunks_with_passage", "retrievals")}}


def stage_eval(run: Run, eval_text: str | None = None) -> dict:
    """Perplexity of base, +kNN-LM, +MLP memory and +RAG on the test text, settings chosen on validation.

    ``eval_text`` (an invocation option, never a run setting) scores that text instead of the
    held-out test half; its report goes to ``eval_text/<text fingerprint>/``, never to ``eval/``.
    """
    from .evaluate import build_eval_dir

    stage_train(run)
    test_dir, token_path, start, n, identity, out = _test_text(run, eval_text)
    if n < 2:
        raise MLPMemError("the test text is empty: raise --max-heldout-tokens / --heldout-fraction or give --eval-text")
    def base_pass():
        return build_eval_dir(run.lm, token_path, n, test_dir, identity=identity, token_start=start,
                              mem_site=run.cfg.datastore.mem_site, **_window_args(run))
    base_pass() if eval_text else run.timed(EVAL_TEST, base_pass)  # an eval text's times stay out of the run's
    # the LM pass above is split over ranks (a datastore build); the scoring and the report are rank 0's
    report = distributed.main_first(lambda: _eval_report(run, eval_text, test_dir, token_path, out))
    if eval_text:
        return report
    ood = run.timed(EVAL_OOD, lambda: stage_eval_ood(run))
    return {**report, "out_of_domain": ood} if ood else report


def stage_eval_ood(run: Run) -> dict:
    """Every system on each out-of-domain text (``--ood``), at the lambdas chosen on in-domain validation:
    ``{name: {"file", "tokens_scored", "systems": {system: {"ppl", "lambda", "vs_base"}}}}``, also saved
    as eval/ood.json. Each text is an --eval-text of its first ``--ood-tokens`` tokens (cached alike)."""
    from .evaluate import build_eval_dir
    from .ood import resolve

    sets = resolve(run.cfg.eval.ood, run.cfg.corpus.corpus, run.cfg.run.cache_dir)
    summary = {}
    for name, path in sets.items():
        test_dir, token_path, start, n, identity, out = _eval_text_dirs(run, str(path), run.cfg.eval.ood_tokens)
        if n < 2:
            raise MLPMemError(f"the out-of-domain text {path} holds fewer than 2 tokens")
        build_eval_dir(run.lm, token_path, n, test_dir, identity=identity, token_start=start,
                       mem_site=run.cfg.datastore.mem_site, **_window_args(run))
        rep = distributed.main_first(partial(_eval_report, run, str(path), test_dir, token_path, out))
        systems = rep["test"]["systems"]
        summary[name] = {"file": str(path), "tokens_scored": rep["test"]["tokens_scored"], "report": str(out),
                         "systems": {k: {"ppl": v["ppl"], "lambda": v.get("lambda"),
                                         "vs_base": v["ppl"] / systems["base"]["ppl"] - 1} for k, v in systems.items()}}
    if distributed.is_main():  # none asked for: no stale sets in results.json either
        if summary:
            atomic_write_json(run.path(EVAL) / "ood.json", summary)
        else:
            (run.path(EVAL) / "ood.json").unlink(missing_ok=True)
    return summary


def _eval_report(run: Run, eval_text: str | None, test_dir: Path, token_path: Path, out: Path) -> dict:
    """Score every system on the validation slice and the test text; write (or find) the report in ``out``."""
    from .datastore import open_datastore
    from .evaluate import evaluate_ppl, memory_dir_fingerprint

    retriever, rag_settings = _rag_setup(run)
    for scored in (run.path(TUNE), test_dir):  # their stored log-probs are small: checked even when reused
        open_datastore(scored, "eval dir", check=("lm_logprob",))
    mem_fp = memory_dir_fingerprint(run.path(MEMORY))
    key = _eval_key(run, test_dir, mem_fp, rag_settings)
    if is_complete(out) and read_json(out / "manifest.json").get("inputs") == key:
        log(f"{out.name}: already complete")
        return read_json(out / "ppl.json")
    memory, knn = _load_memory_and_knn(run)
    (out / "manifest.json").unlink(missing_ok=True)  # stale: other memory, index or settings

    def go():
        from .finetuned import finetuned_components
        from .systems import systems_for

        rag = _rag_logprobs(run, retriever, rag_settings, test_dir, token_path) if retriever is not None else None
        finetuned = finetuned_components(run, test_dir, token_path)  # +CPT / +LoRA rows, when trained
        systems = systems_for(memory=memory, memory_fingerprint=mem_fp, knn=knn, rag=rag, **finetuned) \
            if finetuned else None
        return evaluate_ppl(run.path(TUNE), test_dir, out, tokenizer=run.lm.tokenizer, memory=memory,
                            memory_fingerprint=mem_fp, knn=knn, lambdas=run.cfg.eval.lambda_list(), rag=rag,
                            systems=systems)
    result = run.timed(EVAL, go) if not eval_text else go()
    write_manifest(out, {"inputs": key, "report": "ppl.json", "text": eval_text or "held-out test half"})
    return result


def _load_memory_and_knn(run: Run):
    from .inference import KNNLM
    from .memory import MLPMemory

    tg = read_manifest(run.path(TARGETS), "targets")
    memory = MLPMemory.from_pretrained(run.path(MEMORY), base=run.lm, device=run.lm.device)
    knn = KNNLM.from_dirs(run.path(INDEX), run.path(DATASTORE), k=int(tg["k"]), temperature=float(tg["temperature"]),
                          nprobe=run.cfg.index.nprobe)
    return memory, knn


def run_all(run: Run) -> dict:
    """Every stage, skipping finished ones; returns the results dict (also saved as results.json)."""
    stage_eval(run)
    return summarize(run)


def summarize(run: Run) -> dict:
    corpus = read_manifest(run.path(CORPUS), "corpus")
    ds = read_manifest(run.path(DATASTORE), "datastore")
    idx = read_manifest(run.path(INDEX), "index")
    tg = read_manifest(run.path(TARGETS), "targets")
    mem = read_manifest(run.path(MEMORY), "memory")
    ev = read_json(run.path(EVAL) / "ppl.json")
    systems = ev["test"]["systems"]
    sel = tg.get("temperature_selection") or {}
    results = {
        "model": run.cfg.run.model,
        "corpus": run.cfg.corpus.corpus,
        "tokens": corpus["n_tokens"],
        "datastore_rows": ds["n"],
        "key_site": ds["key_site"],
        "mem_site": ds["mem_site"],
        "index": {"factory": idx.get("factory"), "recall": idx.get("recall"), "qps": idx.get("search_qps")},
        "targets_search_qps": tg.get("queries_per_s"),
        "targets": {"k": tg.get("k"), "temperature": tg.get("temperature"), "mean_nonzeros": tg.get("mean_nnz")},
        "temperature_grid": sel.get("grid"),
        "ppl": {"base": systems["base"]["ppl"], "knn_lm": systems["knn_lm"]["ppl"],
                "mlp_memory": systems["memory"]["ppl"], "memory_alone": systems["memory"].get("memory_alone_ppl"),
                "rag": systems["rag"]["ppl"] if "rag" in systems else None,
                **{k: systems[k]["ppl"] for k in FINETUNED if k in systems}},
        "bits_per_byte": {k: v.get("bits_per_byte") for k, v in systems.items()},
        "tokens_scored": ev["test"]["tokens_scored"],
        "validation_tokens": ev["validation"]["tokens_scored"],
        "chosen": {"mlp_memory": {"lambda": systems["memory"]["lambda"]},
                   "knn_lm": {"lambda": systems["knn_lm"]["lambda"], "T": systems["knn_lm"]["T"], "k": tg.get("k")},
                   "rag": ({**systems["rag"]["settings"], "retrieval_seconds": systems["rag"].get("retrieval_seconds"),
                            "seconds": systems["rag"].get("seconds")} if "rag" in systems else None)},
        "memory": {"params": mem["memory_params"],
                   "blocks": read_json(run.path(MEMORY) / "config.json").get("n_blocks"), "steps": mem["steps"],
                   "train_rows_per_s": mem.get("rows_per_s_this_session"), "validation": mem.get("validation")},
        "stage_seconds": read_json(run.dir / "timings.json") if (run.dir / "timings.json").exists() else run.timings,
        "out_of_domain": read_json(run.path(EVAL) / "ood.json") if (run.path(EVAL) / "ood.json").exists() else {},
        "finetuned": {k: {f: systems[k].get(f) for f in ("tokens_trained", "trainable_params", "train_seconds",
                                                          "lora_rank", "steps")} for k in FINETUNED if k in systems},
        "settings": run.cfg.to_dict(),
    }
    path = run.dir / "results.json"
    if distributed.is_main() and (not path.is_file()
                                  or path.read_text() != json.dumps(results, indent=2, sort_keys=True) + "\n"):
        atomic_write_json(path, results)  # (unchanged: not rewritten, so a finished read-only run still reports)
    return results


def ood_table(ood: dict, test_tokens: int, test_ppl: dict) -> list[str]:
    """Lines of the in-domain vs out-of-domain table (PPL and change vs base per set); none without sets."""
    if not ood:
        return []
    names = [("base", "base", "base LM"), ("knn_lm", "knn_lm", "+ kNN-LM"), ("memory", "mlp_memory", "+ MLP memory"),
             ("rag", "rag", "+ RAG (in-context)"), ("cpt", "cpt", "+ CPT"), ("lora", "lora", "+ LoRA")]

    def cell(ppl_value: float, base: float, key: str) -> str:
        return f"{ppl_value:.3f}" + ("" if key == "base" else f" ({100 * (ppl_value / base - 1):+.2f}%)")

    lines = [f"Out-of-domain perplexity (same lambdas; in-domain: the test above, {test_tokens:,} tokens)", "",
             "| system | in-domain test | " + " | ".join(f"{k} ({v['tokens_scored']:,} tok)" for k, v in ood.items())
             + " |", "|---|" + "---|" * (len(ood) + 1)]
    for key, test_key, label in names:
        if test_ppl.get(test_key) is None:
            continue
        cells = [cell(test_ppl[test_key], test_ppl["base"], key)]
        cells += ["-" if key not in v["systems"] else cell(v["systems"][key]["ppl"], v["systems"]["base"]["ppl"], key)
                  for v in ood.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def format_table(results: dict) -> str:
    """The main job's results: test perplexity of every system, then what produced it."""
    ppl, bpb, ch = results["ppl"], results["bits_per_byte"], results["chosen"]

    def pct(x):
        return f"{100 * (x / ppl['base'] - 1):+.2f}%"

    lines = [f"Held-out test perplexity ({results['tokens_scored']:,} tokens; lambda/T chosen on "
             f"{results['validation_tokens']:,} validation tokens)", "",
             "| system | test PPL | vs base | bits/byte | setting |", "|---|---|---|---|---|",
             f"| base LM | {ppl['base']:.3f} | | {bpb['base']:.4f} | |",
             f"| + kNN-LM | {ppl['knn_lm']:.3f} | {pct(ppl['knn_lm'])} | {bpb['knn_lm']:.4f} | "
             f"lambda={ch['knn_lm']['lambda']}, T={ch['knn_lm']['T']:.3g}, k={ch['knn_lm']['k']} |",
             f"| + MLP memory | {ppl['mlp_memory']:.3f} | {pct(ppl['mlp_memory'])} | {bpb['memory']:.4f} | "
             f"lambda={ch['mlp_memory']['lambda']} |"]
    if ppl.get("rag") is not None:
        r = ch["rag"]
        lines.append(f"| + RAG (in-context) | {ppl['rag']:.3f} | {pct(ppl['rag'])} | {bpb['rag']:.4f} | BM25 top-"
                     f"{r['n_passages']} of {r['passages']:,} passages, every {r['retrieve_every']} tokens, "
                     f"query {r['query_tokens']} tokens |")
    for key, label in (("cpt", "+ CPT"), ("lora", "+ LoRA")):  # trained by `mlpmem finetune`
        if ppl.get(key) is not None:
            ft = results.get("finetuned", {}).get(key, {})
            lines.append(f"| {label} | {ppl[key]:.3f} | {pct(ppl[key])} | {bpb.get(key, float('nan')):.4f} | "
                         f"{ft.get('tokens_trained', 0):,} tokens, {ft.get('trainable_params', 0):,} trained params"
                         + (f", rank {ft['lora_rank']}" if ft.get("lora_rank") else "") + " |")
    lines += ["", *ood_table(results.get("out_of_domain") or {}, results["tokens_scored"], ppl)]
    m = results["memory"]
    rows = [
        ("model", results["model"]),
        ("corpus tokens (train / held-out)", f"{results['tokens']['train']:,} / {results['tokens']['heldout']:,}"),
        ("datastore rows", f"{results['datastore_rows']:,}"),
        ("kNN key site / memory-input site", f"layer {results['key_site']['layer']} / layer "
                                              f"{(results['mem_site'] or {}).get('layer')}"),
        ("index", f"{results['index']['factory']} (recall@64 {results['index']['recall']:.3f})"),
        ("targets", f"k={results['targets']['k']}, T={results['targets']['temperature']:.3g} (auto), "
                    f"{results['targets']['mean_nonzeros']:.1f} tokens/row"),
        ("memory", f"{m['blocks']} blocks, {m['params'] / 1e6:.1f}M params, {m['steps']} steps, "
                   f"validation KL {m['validation']['kl']:.3f} / CE {m['validation']['ce']:.3f}"),
        ("memory alone (test PPL)", f"{ppl['memory_alone']:.2f}"),
    ]
    if (ch.get("rag") or {}).get("seconds") is not None:
        rows.append(("+RAG test pass",
                     f"{ch['rag']['seconds']:.1f}s (retrieval {ch['rag']['retrieval_seconds']:.2f}s)"))
    order = [CORPUS, DATASTORE, TUNE, INDEX, TARGETS, MEMORY, RAG_BM25, EVAL_TEST, EVAL, EVAL_OOD]
    times = results["stage_seconds"]
    rows += [(f"time: {k}", f"{times[k]:.1f}s")
             for k in sorted(times, key=lambda k: order.index(k) if k in order else 99)]
    w = max(len(r[0]) for r in rows)
    lines += [f"| {'':<{w}} | |", f"|{'-' * (w + 2)}|---|"] + [f"| {a:<{w}} | {b} |" for a, b in rows]
    return "\n".join(lines)
