"""Run settings: one dataclass whose field docs become ``--help``, loadable from a config file.

Precedence: built-in defaults < the run directory's saved ``config.json`` (so later commands
on a run keep its settings) < ``--preset`` < ``--config FILE`` (TOML or JSON; flat keys or
``[section]`` tables, section names are ignored) < command-line flags. The effective settings
are saved as ``config.json`` in the run directory so a run can be reproduced from its files.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import MLPMemError


def opt(default, help: str, group: str, choices=None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class Config:
    # -- run ---------------------------------------------------------------------------------
    run_dir: str = opt("runs/default", "directory that receives every stage's artifacts (default: runs/<preset name>, runs/default without one)", "run")
    cache_dir: str | None = opt(None, "cache for downloaded packages and converted models "
                                      "(default: $MLPMEM_CACHE or ~/.cache/mlpmemory)", "run")
    model: str = opt("smollm2-135m", "base causal LM: 'smollm2-135m' (embedded, from PyPI), a Hugging Face id, "
                                     "or a local folder", "run")
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:1, mps", "run")
    dtype: str = opt("auto", "compute dtype of the base LM: auto (bf16 where fast), float32, bfloat16, float16", "run",
                     choices=["auto", "float32", "bfloat16", "float16"])
    # -- corpus ------------------------------------------------------------------------------
    corpus: str = opt("wiki", "'wiki' (NQ passages + SQuAD dev paragraphs from PyPI bigbench) or a path: "
                              ".txt, .jsonl, .parquet, a folder of those, or a datasets folder", "corpus")
    text_field: str = opt("text", "field/column holding the text in JSONL, parquet and datasets corpora", "corpus")
    heldout_fraction: float = opt(0.02, "fraction of documents (by article/group) held out for evaluation", "corpus")
    max_train_tokens: int | None = opt(None, "cap on datastore tokens (None = whole corpus)", "corpus")
    max_heldout_tokens: int | None = opt(None, "cap on held-out tokens kept for evaluation", "corpus")
    skip_bad_utf8: bool = opt(False, "skip documents that are not valid UTF-8 (with a warning) instead of failing", "corpus")
    # -- datastore ---------------------------------------------------------------------------
    key_site: str = opt("last", "kNN key capture site: FFN input of a layer index, depth fraction (0.7), 'last', "
                                "or a module path", "datastore")
    mem_site: str = opt("last", "memory-input capture site (same forms as --key-site). 'last' was measured best for "
                                "SmolLM2 (test PPL 23.42 vs 24.02 at 0.7, 23.77 at 0.85, 24.42 at 0.5; quick preset); "
                                "the paper found ~0.7 best for GPT-2", "datastore")
    store_mem_inputs: bool = opt(True, "also store memory-input hidden states (offline memory training)", "datastore")
    block: int = opt(1024, "window length in tokens", "datastore")
    stride: int = opt(512, "tokens scored per window after the first (context >= block - stride)", "datastore")
    batch_size: int = opt(8, "windows per forward pass", "datastore")
    tune_tokens: int = opt(8192, "held-out validation tokens used to choose T (and later lambda)", "datastore")
    # -- index -------------------------------------------------------------------------------
    index_factory: str = opt("auto", "FAISS factory string, or 'auto' (Flat up to --flat-max-rows, then IVF-Flat, "
                                     "then IVF-PQ)", "index")
    flat_max_rows: int = opt(300_000, "largest datastore searched exactly by 'auto'", "index")
    ivf_flat_max_gb: float = opt(4.0, "above --flat-max-rows, 'auto' uses IVF-Flat while the float32 keys fit in "
                                      "this many GiB, IVF-PQ beyond", "index")
    nprobe: int = opt(32, "IVF lists probed per query", "index")
    use_gpu: bool = opt(False, "build/search with GPU FAISS (needs faiss-gpu and a GPU)", "index")
    # -- targets -----------------------------------------------------------------------------
    k: int | None = opt(None, "neighbours per target (default 1024, capped at N-1)", "targets")
    temperature: str = opt("auto", "softmax temperature over -distance, or 'auto' (grid search by kNN-LM "
                                   "perplexity on the validation slice)", "targets")
    min_prob: float = opt(1e-6, "drop target probabilities below this, then re-normalise", "targets")
    shard_rows: int = opt(16_384, "rows per resumable target shard", "targets")
    search_batch: int = opt(1024, "queries per FAISS search call", "targets")
    # -- memory + training -------------------------------------------------------------------
    memory_preset: str = opt("small", "memory size preset: tiny (2 blocks), small (4), base (8), parity (as many "
                                      "parameters as the base LM); ignored when --memory-blocks/--memory-param-ratio is set",
                             "train", choices=["tiny", "small", "base", "parity"])
    memory_blocks: int | None = opt(None, "number of residual FFN blocks in the memory", "train")
    memory_param_ratio: float | None = opt(None, "size the memory to this many times the base LM's parameters", "train")
    head_init: str = opt("embedding", "memory LM head initialisation: 'embedding' (copy the base LM's output "
                                      "embedding) or 'random'", "train", choices=["embedding", "random"])
    alpha: float = opt(0.4, "loss weight of KL(p_kNN || p_mem); 1 - alpha goes to cross-entropy on the next token", "train")
    lr: float = opt(1e-3, "peak AdamW learning rate (linear warmup, then linear decay)", "train")
    epochs: float = opt(1.0, "passes over the datastore rows (fractions allowed)", "train")
    train_batch: int = opt(1024, "datastore rows per training step", "train")
    warmup: float = opt(0.03, "fraction of steps spent warming up the learning rate", "train")
    weight_decay: float = opt(0.0, "AdamW weight decay", "train")
    grad_clip: float = opt(1.0, "gradient norm clip", "train")
    seed: int = opt(0, "seed of initialisation and data order", "train")
    checkpoint_every: int = opt(100, "steps between resumable checkpoints", "train")
    train_mode: str = opt("offline", "offline: stored hidden states; online: recompute them with the base LM",
                          "train", choices=["offline", "online"])
    val_rows: int = opt(2048, "datastore rows held out of training for the validation loss", "train")
    # -- evaluation --------------------------------------------------------------------------
    lambdas: str = opt("0,0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5,0.6,0.7,0.8,0.9",
                       "comma-separated interpolation weights swept on the validation slice", "eval")
    eval_text: str | None = opt(None, "score this text file/corpus instead of the held-out test half "
                                      "(lambda and T are still chosen on the held-out validation slice)", "eval")
    rag_ppl: bool = opt(True, "also report the in-context RAG baseline (+RAG row): BM25 over the datastore's documents, "
                              "top passage prepended to the context", "eval")
    rag_retrieve_every: int = opt(32, "+RAG: retrieve a new passage every this many scored tokens (each retrieval "
                                      "is one forward of up to --block tokens, so cost grows as 1/s: 32 costs the "
                                      "quick preset ~5 CPU minutes; in-context RALM found s=4 best)", "eval")
    rag_query_tokens: int = opt(32, "+RAG: the query is this many tokens before each retrieval point", "eval")
    rag_passage_tokens: int = opt(256, "+RAG: documents longer than this many tokens are split into passages", "eval")

    def validate(self) -> "Config":
        if not 2 <= self.block:
            raise MLPMemError(f"--block must be >= 2, got {self.block}")
        if not 1 <= self.stride < self.block:
            raise MLPMemError(f"--stride must be in [1, block-1={self.block - 1}], got {self.stride}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise MLPMemError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.k is not None and self.k < 1:
            raise MLPMemError(f"--k must be >= 1, got {self.k}")
        if self.temperature != "auto":
            try:
                if float(self.temperature) <= 0:
                    raise ValueError
            except ValueError:
                raise MLPMemError(f"--temperature must be 'auto' or a positive number, got {self.temperature!r}") from None
        try:
            lams = self.lambda_list()
        except ValueError:
            raise MLPMemError(f"--lambdas must be comma-separated numbers, got {self.lambdas!r}") from None
        if not lams or any(not 0.0 <= x <= 1.0 for x in lams):
            raise MLPMemError(f"--lambdas must be numbers within [0, 1], got {self.lambdas!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MLPMemError(f"--alpha must be within [0, 1], got {self.alpha}")
        if self.epochs <= 0 or self.lr <= 0:
            raise MLPMemError("--epochs and --lr must be positive")
        for name in ("batch_size", "tune_tokens", "shard_rows", "search_batch", "nprobe", "train_batch",
                     "checkpoint_every", "rag_retrieve_every", "rag_query_tokens", "rag_passage_tokens"):
            if getattr(self, name) < 1:
                raise MLPMemError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self

    def lambda_list(self) -> list[float]:
        return [float(x) for x in str(self.lambdas).split(",") if x.strip()]

    def to_dict(self) -> dict:
        return asdict(self)


# Presets: named overrides. "quick" is the README's main job on a 2-core laptop.
PRESETS: dict[str, dict] = {
    # ~5 minutes on 2 CPU cores once the model and corpus are cached
    "quick": {"max_train_tokens": 100_000, "max_heldout_tokens": 24_000, "block": 512, "stride": 256,
              "tune_tokens": 4096},
    # the whole corpus with the paper's windows (2.2M datastore tokens: hours on a laptop CPU)
    "default": {},
    # a real experiment that fits a CPU session (~45 minutes on 2 cores): 500k datastore tokens,
    # IVF-Flat index, the whole held-out split
    "large": {"max_train_tokens": 500_000},
}


def field_names() -> set[str]:
    return {f.name for f in fields(Config)}


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MLPMemError(f"config file {path} not found")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise MLPMemError(f"config file {path} does not parse: {e}") from None
    flat: dict = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    unknown = sorted(set(flat) - field_names())
    if unknown:
        raise MLPMemError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; see `mlpmem <stage> --help`")
    return flat


def make_config(preset: str | None = None, config_file: str | None = None, base: dict | None = None,
                **overrides) -> Config:
    """Defaults < ``base`` (a run directory's saved config.json) < preset < config file < overrides."""
    values: dict = dict(base or {})
    if preset:
        if preset not in PRESETS:
            raise MLPMemError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values).validate()


def defaults() -> dict:
    return {f.name: f.default for f in fields(Config) if f.default is not MISSING}
