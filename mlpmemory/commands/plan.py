"""`mlpmem plan`: disk, peak RAM per rank and time of every stage of a run of any size, before building it.

Inputs: the corpus size in tokens, the base model (an HF ``config.json``, or ``--hidden-size --layers
--vocab-size [--params]``), k, nprobe, the memory's size and the number of ranks. Output: one row per
stage (datastore, index, targets, train) and a total. Everything is a plain function of
:class:`Options` (:func:`make_plan`), so the arithmetic is testable without a run directory.

**Sizes** follow the files the stages write (``rows = tokens - 1``, one per token after the first):

- datastore: ``keys.f16`` N*d*2, ``values.i32`` N*4, plus ``mem_inputs.f16`` N*d*2 with
  ``--separate-mem-site`` (the memory reads another layer than the keys);
- index (:func:`mlpmemory.index.choose_factory` picks the factory unless ``--index-factory``): Flat
  N*d*4; IVF-Flat N*(d*4 + 8 id bytes) + nlist*d*4 centroids; IVF-PQ m x 8 N*(m + 8) + nlist*d*4
  + 256*d*4 PQ codebooks;
- targets (:mod:`mlpmemory.targets`: shards of ``TargetsSettings.shard_rows`` = 16,384 rows, each four
  ``.npy`` files with a 128-byte header): offsets int64 (rows + 1), next_token int32 (rows), token_ids
  int32 and probs float16 (``mean_nnz`` entries per row);
- memory: the final fp32 weights (4 B/param) + one resumable checkpoint (weights 4 + AdamW moments 8
  B/param).

**Times** are measured throughputs, scaled: the datastore by forward FLOPs (~2 x params per token)
relative to the model they were measured with; training by memory parameters; the index add by
rows/s and its training by a fitted ``a + b * nlist``; target search by a fitted seconds/query
``a + b * scanned codes`` (IVF: scanned = nprobe * N / nlist, ~N^0.5 while the auto nlist grows, ~N once
it is capped at train_samples / 39; Flat: N).
Parallel stages (datastore, targets, train, and the add of an IVF index built in shards: on several
ranks or on disk, then merged) are divided by ``--ranks``. The index's exact recall check (256 queries
against every key) is part of the index time; the add and the recall check each read every fp16 key,
so each takes at least one pass at ``read_bytes_per_s``.

**Throughputs** come from, in order: ``--throughputs FILE`` (schema: :data:`DEFAULTS`; every section
optional, e.g. the ``throughputs`` section that ``benchmarks/scale_sim.py`` writes, or numbers
measured on a GPU machine), else ``--from-run RUN`` (its ``timings.json`` and stage manifests), else
:data:`DEFAULTS`, measured on this project's 2-core CPU machine (sources in each entry). Missing
sections fall back to the next source.

RAM is an estimate of the largest live arrays per rank (documented in each ``_ram_*`` function); a
memory-mapped file's pages are counted when a stage touches them at random (the values during the
targets pass).

Without ``--tokens`` and ``--from-run`` the command plans the run directory's own corpus and model
(so it needs ``--run-dir``, default runs/quick, like the other tools).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import DEFAULT_K, IndexSettings, TargetsSettings, TrainSettings, opt
from ..errors import MLPMemError

NPY_HEADER = 128  # bytes of a .npy v1 header for a 1-D array (np.save pads the header to 128)
RECALL_QUERIES = 256  # build_index's default recall_queries: exact search of these against every key
TRAIN_SAMPLES = 200_000  # build_index's default train_samples
ADD_BATCH = 65_536  # build_index's default add_batch
CHECKPOINT_BYTES_PER_PARAM = 12  # model fp32 + AdamW exp_avg + exp_avg_sq (train._save_checkpoint)
FINAL_BYTES_PER_PARAM = 4  # the saved memory (fp32 safetensors)

# Measured throughputs of this project's reference machine (2 CPU threads, no GPU). The schema of
# --throughputs is this dict; every section and key may be left out (the defaults fill it in).
DEFAULTS: dict = {
    "source": "built-in: 2-core CPU machine of this project (benchmarks/results/*.json)",
    "datastore": {  # benchmarks/results/datastore_overhead.json: SmolLM2-135M, bf16, 2 threads, block 1024/512
        "rows_per_s": 497.6, "model_params": 134_515_008},
    "index": {  # IVF-PQ (k-means + PQ) training on train_samples keys: seconds = fixed + per_list * nlist, and the
        # add rate: benchmarks/results/scale_sim.json, N = 200k and 1M, 1 thread, CPU seconds (the machine was
        # shared); their sum at 200k (146 s) is close to the 2-thread wall-clock build of real SmolLM2 keys
        # (123 s, benchmarks/results/index_search_200k.json), so they stand for this machine as they are
        "factory": "IVF,PQ64x8", "train_seconds_fixed": 53.68, "train_seconds_per_list": 0.02212,
        "train_samples": TRAIN_SAMPLES, "add_rows_per_s": 4190.0,
        # index_search_200k.json: Flat "build" 4.3 s for 200k rows (add only: a copy)
        "flat_add_rows_per_s": 46_700.0,
        # merging the ranks' shards (merge_from in RAM, merge_ondisk on disk): bytes of lists per second.
        # An assumption (sequential read + write of the lists) until scale_sim --ondisk measures it.
        "merge_bytes_per_s": 200e6,
        # reading the fp16 keys (the add and the exact recall check each read all of them): an assumption
        # of ~1 GB/s sequential reads (a local NVMe SSD); a pass takes max(compute, read) time
        "read_bytes_per_s": 1e9},
    "search": {  # IVF-PQ, k=1024+1, nprobe 32: seconds/query = a + b * scanned codes (nprobe * N / nlist). The
        # slope is scale_sim's fit (200k -> 1M rows: a 2.36 ms, b 0.39 us/code, 1 thread on a shared machine),
        # both scaled by 0.111 so that 200k rows / 2048 lists give the 2,504 q/s measured on real SmolLM2 keys
        # with 2 threads on the idle machine (index_search_200k.json)
        "seconds_per_query": 2.628e-4, "seconds_per_scanned_code": 4.369e-8, "k": DEFAULT_K, "nprobe": 32,
        # index_search_200k.json (2 threads, k=1024): Flat 623 q/s over 200k rows; IVF1024,Flat 1,481 q/s
        "flat_seconds_per_row": 1.0 / (623.4 * 200_000),
        "ivf_flat_seconds_per_scanned_row": 1.0 / (1480.7 * 32 * 200_000 / 1024)},
    "targets_post": {  # knn_distribution over the k+1 hits, rows/s (scale_sim.json, CPU seconds, median of 200k
        # and 1M); mean kept entries per row at k=1024, min_prob 1e-6: 266.3, the real targets manifest of
        # benchmarks/results/ablations_quick.json
        "rows_per_s": 5030.0, "mean_nnz": 266.3, "k": DEFAULT_K},
    "train": {  # benchmarks/results/scaling_quick.json: the 4-block memory (38.9M params), bf16 autocast, 2 threads
        "rows_per_s": 647.7, "memory_params": 38_931_264},
}

# Models whose config is known without a download (the run's default model).
KNOWN_MODELS = {"smollm2-135m": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                                 "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                                 "vocab_size": 49152, "tie_word_embeddings": True}}
UNGATED = ("gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom", "falcon", "phi", "codegen", "mpt")


@dataclass
class Options:
    """What to plan: corpus size, base model, k / nprobe / index, memory size, ranks, throughput sources."""

    tokens: float | None = opt(None, "corpus tokens of the datastore, e.g. 116e6 (none: the run's own corpus)")
    model_config: str | None = opt(None, "the base model: a Hugging Face config.json or a folder holding one "
                                         "(none: --hidden-size/--layers/--vocab-size, else the run's model)")
    hidden_size: int | None = opt(None, "base model hidden size d (overrides the config)", minimum=1)
    layers: int | None = opt(None, "base model layers (overrides the config)", minimum=1)
    vocab_size: int | None = opt(None, "base model vocabulary (overrides the config)", minimum=1)
    params: float | None = opt(None, "base model parameters (default: estimated from the config)")
    k: int = opt(DEFAULT_K, "neighbours per target", minimum=1)
    nprobe: int = opt(IndexSettings.nprobe, "IVF lists probed per query", minimum=1)
    index_factory: str = opt("auto", "FAISS factory the plan assumes: 'auto' (the index stage's rule), 'Flat', "
                                     "'IVF<nlist>,Flat' or 'IVF<nlist>,PQ<m>x8'")
    train_samples: int = opt(TRAIN_SAMPLES, "keys the IVF quantizer is trained on (build_index's train_samples): "
                                            "the auto rule's nlist is at most train_samples / 39", minimum=1)
    index_storage: str = opt("auto", "where the IVF lists live (the index stage's --index-storage): ram, disk "
                                     "(merged on disk, memory-mapped when searched), or auto (the stage's rule)",
                             choices=["auto", "ram", "disk"])
    ondisk_min_gb: float = opt(IndexSettings.ondisk_min_gb if hasattr(IndexSettings, "ondisk_min_gb") else 8.0,
                               "'auto' storage: IVF lists above this many GiB stay on disk", minimum=0.0)
    memory_params: float | None = opt(None, "memory parameters (default: --memory-ratio x the base model's)")
    memory_ratio: float = opt(1.0, "memory size as a multiple of the base model's parameters (the paper: ~1)")
    mean_nnz: float | None = opt(None, "mean kept entries per target row (default: the throughput source's, "
                                       "266.3 at k=1024 from a real targets manifest, scaled by k/1024)")
    separate_mem_site: bool = opt(False, "the memory reads another layer than the keys: mem_inputs.f16 is stored "
                                         "too (N*d*2 bytes)")
    epochs: float = opt(TrainSettings.epochs, "memory training passes over the rows")
    ranks: int = opt(1, "processes (GPUs or nodes) the parallel stages are split over", minimum=1)
    block: int = opt(1024, "datastore window length (activation memory of the forward)", minimum=2)
    batch_size: int = opt(8, "datastore windows per forward pass", minimum=1)
    train_batch: int = opt(TrainSettings.train_batch, "memory training rows per step", minimum=1)
    from_run: str | None = opt(None, "take throughputs from a finished run directory (timings.json, manifests)")
    throughputs: str | None = opt(None, "JSON of measured throughputs (schema: mlpmemory.commands.plan.DEFAULTS; "
                                        "benchmarks/scale_sim.py writes one)")
    json: bool = opt(False, "print the plan as JSON instead of a table")

    def validate(self) -> Options:
        if self.tokens is not None and not self.tokens >= 3:
            raise MLPMemError(f"--tokens must be >= 3 (a datastore needs 2 rows), got {self.tokens:g}")
        for name in ("params", "memory_params", "mean_nnz"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise MLPMemError(f"--{name.replace('_', '-')} must be > 0, got {v:g}")
        for name in ("memory_ratio", "epochs"):
            if not getattr(self, name) > 0:
                raise MLPMemError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name):g}")
        if self.mean_nnz is not None and self.mean_nnz > self.k:
            raise MLPMemError(f"--mean-nnz ({self.mean_nnz:g}) cannot exceed --k ({self.k})")
        return self


# ---------------------------------------------------------------------------------------------
# Inputs: model, throughputs
# ---------------------------------------------------------------------------------------------


def read_model_config(path: str) -> dict:
    """A Hugging Face config.json (a file, or a folder holding one) as a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise MLPMemError(f"--model-config {path}: no config.json there; give a config.json or its folder")
    cfg = _json_of(p, "--model-config")
    if not isinstance(cfg, dict):
        raise MLPMemError(f"--model-config {p} must hold a JSON object")
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def _first(cfg: dict, *names):
    return next((cfg[n] for n in names if isinstance(cfg.get(n), (int, float)) and not isinstance(cfg[n], bool)),
                None)


def estimate_params(cfg: dict) -> int:
    """Parameters of a decoder-only transformer from its HF config (within ~0.1% for GPT-2, Llama, SmolLM2).

    Per layer: attention q/o (d*d each) + k/v (d*d_kv each, d_kv = d * kv_heads / heads); MLP 3*d*f
    (gated: Llama, Mistral, Qwen, Gemma ...) or 2*d*f (GPT-2-like, with biases); norms. Plus the token
    embedding, an untied output head, and learned positions for GPT-2.
    """
    d, n_layers, vocab = (_first(cfg, "hidden_size", "n_embd", "d_model"),
                          _first(cfg, "num_hidden_layers", "n_layer", "num_layers"), _first(cfg, "vocab_size"))
    if not (d and n_layers and vocab):
        raise MLPMemError("the model config lacks hidden_size / num_hidden_layers / vocab_size; give "
                          "--hidden-size --layers --vocab-size (and --params)")
    d, n_layers, vocab = int(d), int(n_layers), int(vocab)
    mtype = str(cfg.get("model_type", "")).lower()
    gated = mtype not in UNGATED
    ffn = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim") or 4 * d)
    heads = int(_first(cfg, "num_attention_heads", "n_head") or 1)
    kv_heads = int(_first(cfg, "num_key_value_heads") or heads)
    d_kv = d * kv_heads // heads
    attn = 2 * d * d + 2 * d * d_kv
    mlp = 3 * d * ffn if gated else 2 * d * ffn
    bias = 0 if gated else (d + 2 * d_kv + d) + (ffn + d)  # qkv + out, fc + proj biases (GPT-2)
    norms = 2 * d if gated else 4 * d
    total = n_layers * (attn + mlp + bias + norms) + vocab * d + (d if gated else 2 * d)
    if not cfg.get("tie_word_embeddings", True):
        total += vocab * d
    if mtype == "gpt2":
        total += int(_first(cfg, "n_positions", "max_position_embeddings") or 1024) * d
    return int(total)


def model_spec(opts: Options, run_model: str | None = None) -> dict:
    """{d, layers, vocab, params, source} of the base model from the config, the flags or the run's model."""
    cfg: dict = {}
    source = "flags"
    if opts.model_config:
        cfg, source = read_model_config(opts.model_config), opts.model_config
    elif run_model is not None and None in (opts.hidden_size, opts.vocab_size):
        if run_model in KNOWN_MODELS:
            cfg, source = KNOWN_MODELS[run_model], run_model
        elif (Path(run_model) / "config.json").is_file():
            cfg, source = read_model_config(run_model), run_model
        else:
            raise MLPMemError(f"the run's model {run_model} has no local config.json; give --model-config or "
                              "--hidden-size --layers --vocab-size")
    d = opts.hidden_size or _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = opts.layers or _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = opts.vocab_size or _first(cfg, "vocab_size")
    if not d or not vocab or not (layers or opts.params):
        raise MLPMemError("give the base model: --model-config (an HF config.json) or --hidden-size, --vocab-size "
                          "and --layers (or --params)")
    if opts.params is not None:
        params = int(opts.params)
    else:
        params = estimate_params({**cfg, "hidden_size": d, "num_hidden_layers": layers, "vocab_size": vocab,
                                  **({"n_embd": d, "n_layer": layers} if "n_embd" in cfg else {})})
    return {"hidden_size": int(d), "layers": int(layers) if layers else None, "vocab_size": int(vocab),
            "params": params, "source": source}


def _merge(base: dict, over: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update({kk: vv for kk, vv in v.items() if vv is not None})
        elif v is not None:
            out[k] = v
    return out


def _json_of(path: Path, flag: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MLPMemError(f"{flag} {path} is not valid JSON ({e})") from None


def read_throughputs(path: str) -> dict:
    """A ``--throughputs`` file: the :data:`DEFAULTS` schema, or a file with a ``throughputs`` section."""
    p = Path(path)
    if not p.is_file():
        raise MLPMemError(f"--throughputs {path} does not exist; give a JSON file (schema: plan.DEFAULTS)")
    data = _json_of(p, "--throughputs")
    if isinstance(data, dict) and isinstance(data.get("throughputs"), dict):
        data = data["throughputs"]
    if not isinstance(data, dict):
        raise MLPMemError(f"--throughputs {path} must hold a JSON object")
    for section, value in data.items():
        if section in DEFAULTS and isinstance(DEFAULTS[section], dict):
            if not isinstance(value, dict):
                raise MLPMemError(f"--throughputs {path}: '{section}' must be an object")
            for key, v in value.items():
                if key in DEFAULTS[section] and isinstance(DEFAULTS[section][key], (int, float)) and not (
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                    raise MLPMemError(f"--throughputs {path}: {section}.{key} must be a number >= 0, got {v!r}")
    return _merge(DEFAULTS, {**data, "source": data.get("source", str(path))})


def _read(run: Path, rel: str) -> dict | None:
    p = run / rel
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MLPMemError(f"{p} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def run_model_name(run_dir: str) -> str | None:
    cfg = _read(Path(run_dir), "config.json") or {}
    return (cfg.get("run") or {}).get("model") if isinstance(cfg.get("run"), dict) else cfg.get("model")


def throughputs_from_run(run_dir: str, ref_params: int | None = None) -> dict:
    """Measured throughputs of a finished run: ``timings.json`` (stage seconds) and the stage manifests.

    datastore rows/s = datastore n / its stage seconds (the model's params from the run's model config);
    index: train seconds over nlist, n / add seconds; search: the targets manifest's queries/s at the
    run's N (proportional model: a = 0); targets post-processing: rows / (targets seconds - search seconds);
    train: the memory manifest's rows/s and parameters. Stages the run lacks keep the defaults.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise MLPMemError(f"--from-run {run_dir} is not a folder; give a finished run directory")
    timings = _read(run, "timings.json") or {}
    ds, ix, tg, mem = (_read(run, f"{s}/manifest.json") for s in ("datastore", "index", "targets", "memory"))
    if not any((timings, ds, ix, tg, mem)):
        raise MLPMemError(f"--from-run {run_dir} holds no timings.json or stage manifests; give a finished run")
    out: dict = {"source": f"run {run_dir}"}
    n = int(ds["n"]) if ds and ds.get("n") else None
    if n and timings.get("datastore") and ref_params:
        out["datastore"] = {"rows_per_s": n / float(timings["datastore"]), "model_params": int(ref_params)}
    if ix and ix.get("n"):
        nlist = (ix.get("params") or {}).get("nlist")
        idx: dict = {}
        if ix.get("add_seconds"):
            key = "add_rows_per_s" if nlist else "flat_add_rows_per_s"
            idx[key] = int(ix["n"]) / max(float(ix["add_seconds"]), 1e-9)
        if nlist and ix.get("train_seconds") is not None:
            idx.update(train_seconds_fixed=0.0, train_seconds_per_list=float(ix["train_seconds"]) / nlist,
                       train_samples=int((ix.get("settings") or {}).get("train_samples", TRAIN_SAMPLES)))
        out["index"] = idx
        if tg and tg.get("queries_per_s"):
            spq = 1.0 / float(tg["queries_per_s"])
            nprobe = (tg.get("settings") or {}).get("nprobe") or (ix.get("params") or {}).get("nprobe") or 32
            factory = str(ix.get("factory", ""))
            if not nlist:
                out["search"] = {"flat_seconds_per_row": spq / int(ix["n"])}
            elif "PQ" in factory:
                out["search"] = {"seconds_per_query": 0.0,
                                 "seconds_per_scanned_code": spq / (nprobe * int(ix["n"]) / nlist)}
            else:
                out["search"] = {"ivf_flat_seconds_per_scanned_row": spq / (nprobe * int(ix["n"]) / nlist)}
            out["search"]["k"] = int(tg.get("k", DEFAULT_K))
    if tg and tg.get("n"):
        post: dict = {"mean_nnz": float(tg.get("mean_nnz") or DEFAULTS["targets_post"]["mean_nnz"]),
                      "k": int(tg.get("k", DEFAULT_K))}
        rest = float(timings.get("targets", 0.0)) - float(tg.get("search_seconds") or 0.0)
        if rest > 0:
            post["rows_per_s"] = int(tg["n"]) / rest
        out["targets_post"] = post
    if mem and mem.get("rows_per_s_this_session") and mem.get("memory_params"):
        out["train"] = {"rows_per_s": float(mem["rows_per_s_this_session"]), "memory_params": int(mem["memory_params"])}
    return out


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def parse_factory(factory: str, n: int, d: int, train_samples: int = TRAIN_SAMPLES) -> dict:
    """{family, nlist, m} of a factory string; ``auto`` resolves with the index stage's own rule."""
    if factory == "auto":
        from ..index import choose_factory  # (imports FAISS)

        factory = choose_factory(n, d, train_samples=train_samples)
    f = factory.replace(" ", "")
    if f == "Flat":
        return {"factory": f, "family": "Flat", "nlist": None, "m": None}
    m = re.fullmatch(r"IVF(\d+),(Flat|PQ(\d+)(?:x8)?)", f)
    if not m or int(m.group(1)) < 1 or (m.group(3) is not None and not 1 <= int(m.group(3)) <= d):
        raise MLPMemError(f"--index-factory must be auto, Flat, IVF<nlist>,Flat or IVF<nlist>,PQ<m>x8, got {factory!r}")
    if m.group(3) is not None and d % int(m.group(3)):
        raise MLPMemError(f"--index-factory {factory}: PQ{m.group(3)} does not divide d={d}")
    fam = "IVF-Flat" if m.group(2) == "Flat" else "IVF-PQ"
    return {"factory": f, "family": fam, "nlist": int(m.group(1)), "m": int(m.group(3)) if m.group(3) else None}


def target_bytes(rows: int, mean_nnz: float, shard_rows: int = TargetsSettings.shard_rows) -> int:
    """Bytes of the targets folder: per shard offsets int64 (r + 1), next_token int32 (r), token_ids int32 and
    probs float16 (nnz each), four 128-byte .npy headers (shard.json and the manifest are not counted)."""
    shards = math.ceil(rows / shard_rows)
    nnz = rows * mean_nnz
    return int(8 * (rows + shards) + 4 * rows + nnz * (4 + 2) + 4 * NPY_HEADER * shards)


def index_bytes(rows: int, d: int, fac: dict) -> int:
    if fac["family"] == "Flat":
        return rows * d * 4
    centroids = fac["nlist"] * d * 4
    if fac["family"] == "IVF-Flat":
        return rows * (d * 4 + 8) + centroids
    return rows * (fac["m"] + 8) + centroids + 256 * d * 4


def search_seconds_per_query(rows: int, fac: dict, nprobe: int, tp: dict, k: int) -> float:
    s = tp["search"]
    k_scale = max(k, 1) / max(int(s.get("k", DEFAULT_K)), 1)  # result handling grows with k (a rough rule)
    if fac["family"] == "Flat":
        return rows * s["flat_seconds_per_row"]
    scanned = nprobe * rows / fac["nlist"]
    if fac["family"] == "IVF-Flat":
        return scanned * s["ivf_flat_seconds_per_scanned_row"]
    return (s["seconds_per_query"] * k_scale) + scanned * s["seconds_per_scanned_code"]


def _ram_datastore(spec: dict, o: Options, mem_sites: int) -> int:
    """bf16 weights (2 B/param) + ~16 B per hidden unit of each token of a batch (activations) + the
    captured fp16 rows of one batch per site."""
    tokens = o.batch_size * o.block
    return int(2 * spec["params"] + 16 * tokens * spec["hidden_size"] + tokens * spec["hidden_size"] * 2 * mem_sites)


def resolve_storage(rows: int, d: int, fac: dict, o: Options) -> str:
    """'ram' or 'disk' for the index's lists, as :func:`mlpmemory.index.choose_storage` decides it."""
    if fac["family"] == "Flat":
        if o.index_storage == "disk":
            raise MLPMemError(f"--index-storage disk needs an IVF index; the plan's index is {fac['factory']}")
        return "ram"
    if o.index_storage != "auto":
        return o.index_storage
    lists = rows * ((fac["m"] or d * 4) + 8)
    return "disk" if lists > o.ondisk_min_gb * (1 << 30) else "ram"


def _ram_index(rows: int, d: int, fac: dict, o: Options, storage: str) -> int:
    """max(training: the float32 sample (train_samples x d) + centroids; adding: the index in RAM (on disk:
    one shard of at most SHARD_MAX_ROWS rows being built; merge_ondisk streams the lists) + one float32 add
    batch)."""
    from ..index import SHARD_MAX_ROWS

    train = min(rows, o.train_samples) * d * 4 + (fac["nlist"] or 0) * d * 4 * 2
    shard_rows = min(math.ceil(rows / o.ranks), SHARD_MAX_ROWS)
    held = index_bytes(shard_rows, d, fac) if storage == "disk" else index_bytes(rows, d, fac)
    return int(max(train, held + ADD_BATCH * d * 4))


def _ram_targets(rows: int, d: int, fac: dict, o: Options, mean_nnz: float, storage: str) -> int:
    """The index (on disk: centroids and codebooks; the memory-mapped lists are page cache, shared by the
    ranks of a machine, and not counted) + one search batch's results
    (k+1 x (float32 + int64)) and ~8 float64/int64 temporaries of knn_distribution + one shard of
    CSR rows + the values memmap (read at random: every page ends up resident)."""
    b, kk = TargetsSettings.search_batch, o.k + 1
    idx = (fac["nlist"] * d * 4 + 256 * d * 4) if storage == "disk" else index_bytes(rows, d, fac)
    return int(idx + b * kk * 12 + b * kk * 8 * 8 + TargetsSettings.shard_rows * mean_nnz * 16 + rows * 4)


def _ram_train(mem_params: int, d: int, vocab: int, o: Options) -> int:
    """fp32 weights, gradients and AdamW moments (16 B/param) + bf16 copies (2 B/param) + activations
    (train_batch x non-head params / d, forward and backward, fp32) + logits, log-softmax, gradient and the
    dense target (train_batch x vocab x 4 x fp32)."""
    non_head = max(mem_params - vocab * d, 0)
    return int(18 * mem_params + o.train_batch * (non_head / d) * 4 * 2 + o.train_batch * vocab * 4 * 4)


def make_plan(opts: Options, tp: dict | None = None, run_model: str | None = None,
              run_tokens: int | None = None) -> dict:
    """The plan as a dict: inputs, throughputs used, and per stage {disk_bytes, ram_bytes, seconds, detail}."""
    tp = _merge(DEFAULTS, tp or {})  # a partial set of throughputs: the defaults fill in the rest
    tokens = int(opts.tokens) if opts.tokens is not None else run_tokens
    if tokens is None:
        raise MLPMemError("give --tokens (the corpus size), or --from-run / --run-dir of a run with a datastore")
    rows = tokens - 1
    if rows < 2:
        raise MLPMemError(f"--tokens must be >= 3 (a datastore needs 2 rows), got {tokens}")
    spec = model_spec(opts, run_model)
    d, vocab = spec["hidden_size"], spec["vocab_size"]
    mem_params = int(opts.memory_params) if opts.memory_params is not None else int(opts.memory_ratio * spec["params"])
    if opts.mean_nnz is not None:
        mean_nnz = float(opts.mean_nnz)
    else:
        post = tp["targets_post"]
        mean_nnz = min(float(opts.k), post["mean_nnz"] * opts.k / max(int(post.get("k", DEFAULT_K)), 1))
    fac = parse_factory(opts.index_factory, rows, d, opts.train_samples)
    storage = resolve_storage(rows, d, fac, opts)
    ranks = opts.ranks
    mem_sites = 2 if opts.separate_mem_site else 1

    # datastore: forward FLOPs ~ 2 * params per token, relative to the model the throughput was measured with
    ds_rate = tp["datastore"]["rows_per_s"] * tp["datastore"]["model_params"] / spec["params"]
    ds = {"disk_bytes": rows * d * 2 * mem_sites + rows * 4, "ram_bytes": _ram_datastore(spec, opts, mem_sites),
          "seconds": rows / ds_rate / ranks,
          "detail": f"keys {rows:,} x {d} fp16" + (" + mem_inputs fp16" if mem_sites == 2 else "")
                    + f" + values int32; {ds_rate:,.1f} rows/s per rank"}

    ti = tp["index"]
    if fac["family"] == "Flat":
        train_s, add_rate = 0.0, ti["flat_add_rows_per_s"]
    else:
        samples = min(rows, opts.train_samples)
        train_s = (ti["train_seconds_fixed"] + ti["train_seconds_per_list"] * fac["nlist"]) * samples / max(
            int(ti.get("train_samples", TRAIN_SAMPLES)), 1)
        add_rate = ti["add_rows_per_s"]
    sharded = fac["family"] != "Flat" and (storage == "disk" or ranks > 1)  # (index.build_index's rule)
    add_ranks = ranks if sharded else 1
    add_s = rows / add_rate / add_ranks
    merge_s = (rows * ((fac["m"] or d * 4) + 8) / ti["merge_bytes_per_s"]) if sharded else 0.0
    read_s = rows * d * 2 / ti["read_bytes_per_s"]  # one pass over the fp16 keys
    add_s = max(add_s, read_s / add_ranks)
    recall_s = max(RECALL_QUERIES * rows * tp["search"]["flat_seconds_per_row"], read_s)
    ix = {"disk_bytes": index_bytes(rows, d, fac), "ram_bytes": _ram_index(rows, d, fac, opts, storage),
          "seconds": train_s + add_s + merge_s + recall_s,
          "detail": f"{fac['factory']} ({'lists on disk' if storage == 'disk' else 'in RAM'}): train {_dur(train_s)}, "
                    f"add {_dur(add_s)} ({add_rate:,.0f} rows/s" + (f" x {add_ranks} ranks" if add_ranks > 1 else "")
                    + ")" + (f", merge {_dur(merge_s)}" if sharded else "") + f", exact recall check {_dur(recall_s)}"}

    spq = search_seconds_per_query(rows, fac, opts.nprobe, tp, opts.k)
    post_s = (1.0 / tp["targets_post"]["rows_per_s"]) * (opts.k / max(int(tp["targets_post"].get("k", DEFAULT_K)), 1))
    tg = {"disk_bytes": target_bytes(rows, mean_nnz), "ram_bytes": _ram_targets(rows, d, fac, opts, mean_nnz, storage),
          "seconds": rows * (spq + post_s) / ranks,
          "detail": f"{mean_nnz:.1f} entries/row; search {1 / spq:,.0f} q/s at k={opts.k}+1, nprobe {opts.nprobe}; "
                    f"post-processing {1 / post_s:,.0f} rows/s"}

    tr_rate = tp["train"]["rows_per_s"] * tp["train"]["memory_params"] / mem_params
    tr = {"disk_bytes": mem_params * (CHECKPOINT_BYTES_PER_PARAM + FINAL_BYTES_PER_PARAM),
          "ram_bytes": _ram_train(mem_params, d, vocab, opts),
          "seconds": opts.epochs * rows / tr_rate / ranks,
          "detail": f"memory {mem_params / 1e6:,.1f}M params, {opts.epochs:g} epoch(s), {tr_rate:,.1f} rows/s per rank"}

    stages = {"datastore": ds, "index": ix, "targets": tg, "train": tr}
    total = {"disk_bytes": sum(s["disk_bytes"] for s in stages.values()),
             "ram_bytes": max(s["ram_bytes"] for s in stages.values()),
             "seconds": sum(s["seconds"] for s in stages.values()), "detail": "disk: every stage kept; RAM: the max"}
    return {"inputs": {**asdict(opts), "tokens": tokens, "rows": rows, "model": spec, "memory_params": mem_params,
                       "mean_nnz": mean_nnz, "index": {**fac, "storage": storage}},
            "throughputs": tp, "stages": {**stages, "total": total}}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"


def _dur(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:,.1f} s"


def format_plan(plan: dict) -> str:
    i = plan["inputs"]
    m = i["model"]
    head = (f"plan: {i['tokens']:,} tokens -> {i['rows']:,} rows; base {m['params'] / 1e6:,.1f}M params "
            f"(d={m['hidden_size']}"
            + (f", {m['layers']} layers" if m["layers"] else "") + f", vocab {m['vocab_size']:,}; {m['source']}); "
            f"memory {i['memory_params'] / 1e6:,.1f}M params; k={i['k']}, nprobe {i['nprobe']}, "
            f"{i['index']['factory']}; {i['ranks']} rank(s)\nthroughputs: {plan['throughputs'].get('source')}")
    rows = [("stage", "disk", "peak RAM/rank", "time", "how")]
    for name, s in plan["stages"].items():
        rows.append((name, _bytes(s["disk_bytes"]), _bytes(s["ram_bytes"]), _dur(s["seconds"]), s["detail"]))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [" | ".join(r[c].ljust(widths[c]) for c in range(4)) + " | " + r[4] for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 4)
    return head + "\n" + "\n".join(lines)


def plan_for(opts: Options, run_dir: str | None = None) -> dict:
    """Resolve the throughput sources and the run's defaults (corpus size, model), then :func:`make_plan`."""
    if opts.from_run and not Path(opts.from_run).is_dir():
        raise MLPMemError(f"--from-run {opts.from_run} is not a folder; give a finished run directory")
    source_run = opts.from_run or run_dir
    run_model = run_model_name(source_run) if source_run else None
    run_tokens = None
    if opts.tokens is None and source_run:
        ds = _read(Path(source_run), "datastore/manifest.json")
        if not ds or not ds.get("n_tokens"):
            raise MLPMemError(f"{source_run} has no finished datastore to take the corpus size from; give --tokens")
        run_tokens = int(ds["n_tokens"])
    tp = DEFAULTS
    if source_run:
        ref = None
        if run_model in KNOWN_MODELS:
            ref = estimate_params(KNOWN_MODELS[run_model])
        elif run_model and (Path(run_model) / "config.json").is_file():
            ref = estimate_params(read_model_config(run_model))
        try:
            tp = _merge(DEFAULTS, throughputs_from_run(source_run, ref))
        except MLPMemError:
            if opts.from_run:  # the run given only for its corpus and model may not be built yet
                raise
    if opts.throughputs:
        tp = _merge(tp, read_throughputs(opts.throughputs))
    return make_plan(opts, tp, run_model=run_model, run_tokens=run_tokens)


def emit(plan: dict, as_json: bool) -> None:
    print(json.dumps(plan, indent=2, default=str) if as_json else format_plan(plan), flush=True)


def needs_run(opts: Options) -> bool:
    """A plan of a given corpus size (``--tokens``) or of another run (``--from-run``) needs no ``--run-dir``."""
    return opts.tokens is None and opts.from_run is None


def main(run, opts: Options) -> None:
    """Plan ``--tokens`` of a corpus, or the run directory's own corpus and model (throughputs from it too
    unless given); ``run`` is None when :func:`needs_run` says no run directory is needed."""
    emit(plan_for(opts, str(run.dir) if run is not None else None), opts.json)
