"""Run settings: one dataclass per stage, nested in :class:`Config`; field docs are the ``--help``.

Why it is shaped this way:

- **One home per default.** Every setting a stage reads is a field of that stage's group
  (``cfg.datastore.block``, ``cfg.train.lr``); library functions take their defaults from these
  classes (``block: int = DatastoreSettings.block``), so a default is written once.
- **A command accepts only what it reads.** ``mlpmem corpus`` reads the run and corpus groups,
  ``mlpmem index`` everything up to the index (it may have to build the stages before it), and so
  on; ``mlpmem corpus --alpha 0.9`` is an error, not a silently saved setting. Flag names are the
  field names (unique across groups), so ``--lr`` stays ``--lr``.
- **Run settings are saved, invocation options are not.** The effective ``Config`` is saved as
  ``config.json`` in the run directory, so later commands on the run reuse it. Options that
  describe one invocation (which text to score, QA/bench sizes, output paths) live in each
  command's own ``Options`` and never enter ``config.json``.

Precedence: field defaults < the run directory's saved ``config.json`` < ``--preset`` <
``--config FILE`` (TOML or JSON; flat keys or ``[group]`` tables) < command-line flags.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import MLPMemError

try:  # Python 3.11+; the tomli backport on 3.10
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def opt(default, help: str, choices=None, minimum=None):
    """A settings field: its default, its ``--help`` text, allowed ``choices``, a ``minimum``."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(obj, f, flag: str):
    """The field's value as its annotated type (``int``, ``float``, ``str``, ``bool``, optionally ``| None``);
    a config file's ``block = "abc"`` or ``block = 64.5`` is an error here, never a saved setting."""
    value, names = getattr(obj, f.name), [s.strip() for s in str(f.type).split("|")]
    if value is None and "None" in names:
        return value
    want = next(n for n in names if n != "None")
    ok = isinstance(value, _TYPES[want]) and not (want != "bool" and isinstance(value, bool))
    if not ok:
        raise MLPMemError(f"{flag} must be {'a number' if want == 'float' else 'an integer' if want == 'int' else want}"
                          f"{' or none' if 'None' in names else ''}, got {value!r}")
    if want == "float" and not isinstance(value, float):
        setattr(obj, f.name, float(value))


def check_fields(obj, flag_prefix: str = "--") -> None:
    """Generic checks of a settings dataclass: the annotated type, numbers finite, ``minimum`` and
    ``choices`` respected."""
    for f in fields(obj):
        flag = flag_prefix + f.name.replace("_", "-")
        _check_type(obj, f, flag)
        value, meta = getattr(obj, f.name), f.metadata
        if isinstance(value, str) and "\x00" in value:  # no path or name holds a NUL byte
            raise MLPMemError(f"{flag} must not contain a NUL byte, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise MLPMemError(f"{flag} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:  # torch / numpy int64
            raise MLPMemError(f"{flag} is out of range (|value| < 2**63), got {value}")
        if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
            raise MLPMemError(f"{flag} must be >= {meta['minimum']}, got {value}")
        if meta.get("choices") and value not in meta["choices"]:
            raise MLPMemError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")


DEFAULT_K = 1024  # neighbours per kNN distribution when --k is not given (capped at the datastore's N-1)


@dataclass
class RunSettings:
    """Where the run lives and which model it uses."""

    run_dir: str = opt("runs/default", "directory that receives every stage's artifacts (default: runs/<preset "
                                       "name>; without a preset runs/quick for `run` and the tools, runs/default "
                                       "for the other stage commands)")
    cache_dir: str | None = opt(None, "cache for downloaded packages and converted models "
                                      "(default: $MLPMEM_CACHE or ~/.cache/mlpmemory)")
    model: str = opt("smollm2-135m", "base causal LM: 'smollm2-135m' (embedded, from PyPI), a Hugging Face id, "
                                     "or a local folder")
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:1, mps")
    dtype: str = opt("auto", "compute dtype of the base LM: auto (bf16 where fast), float32, bfloat16, float16",
                     choices=["auto", "float32", "bfloat16", "float16"])


@dataclass
class CorpusSettings:
    """Which text becomes the datastore, and how much of it is held out."""

    corpus: str = opt("wiki", "'wiki' (NQ passages + SQuAD dev paragraphs from PyPI bigbench) or a path: "
                              ".txt, .jsonl, .parquet, a folder of those, or a datasets folder")
    text_field: str = opt("text", "field/column holding the text in JSONL, parquet and datasets corpora")
    heldout_fraction: float = opt(0.02, "fraction of documents (by article/group) held out for evaluation")
    max_train_tokens: int | None = opt(None, "cap on datastore tokens (none: the whole corpus)", minimum=2)
    max_heldout_tokens: int | None = opt(None, "cap on held-out tokens kept for evaluation", minimum=2)
    skip_bad_utf8: bool = opt(False, "skip documents that are not valid UTF-8 (with a warning) instead of failing")

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise MLPMemError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class DatastoreSettings:
    """The base LM's pass over the corpus: windows, capture sites, batch size."""

    key_site: str = opt("last", "kNN key capture site: the FFN input of a layer index, a depth fraction (0.7), "
                                "'last', or a module path")
    mem_site: str = opt("last", "memory-input capture site (same forms as --key-site); the README's ablation "
                                "compares depths")
    store_mem_inputs: bool = opt(True, "also store memory-input hidden states (offline memory training)")
    block: int = opt(1024, "window length in tokens", minimum=2)
    stride: int = opt(512, "tokens scored per window after the first (context >= block - stride)", minimum=1)
    batch_size: int = opt(8, "windows per forward pass", minimum=1)
    tune_tokens: int = opt(8192, "held-out validation tokens used to choose T (and later lambda)", minimum=1)

    def validate(self) -> None:
        if not self.stride < self.block:
            raise MLPMemError(f"--stride must be in [1, block-1={self.block - 1}], got {self.stride}")


@dataclass
class IndexSettings:
    """The FAISS index over the datastore keys."""

    index_factory: str = opt("auto", "FAISS factory string, or 'auto' (Flat up to --flat-max-rows, then IVF-Flat, "
                                     "then IVF-PQ)")
    flat_max_rows: int = opt(300_000, "largest datastore searched exactly by 'auto'", minimum=1)
    ivf_flat_max_gb: float = opt(4.0, "above --flat-max-rows, 'auto' uses IVF-Flat while the float32 keys fit in "
                                      "this many GiB, IVF-PQ beyond", minimum=0.0)
    nprobe: int = opt(32, "IVF lists probed per query (every search of the run: targets, kNN-LM, QA, bench)",
                      minimum=1)
    use_gpu: bool = opt(False, "build/search with GPU FAISS (needs faiss-gpu and a GPU)")
    index_storage: str = opt("auto", "where an IVF index's inverted lists live: ram, disk (merged on disk by FAISS "
                                     "and memory-mapped when searched), or auto (disk above --ondisk-min-gb)",
                             choices=("auto", "ram", "disk"))
    ondisk_min_gb: float = opt(8.0, "'auto' index storage: IVF lists (codes + ids) larger than this many GiB stay on "
                                    "disk", minimum=0.0)


@dataclass
class TargetsSettings:
    """The sparse kNN target distribution of every datastore row."""

    k: int | None = opt(None, f"neighbours per target (default {DEFAULT_K}, capped at N-1)", minimum=1)
    temperature: str = opt("auto", "softmax temperature over -distance, or 'auto' (grid search by kNN-LM "
                                   "perplexity on the validation slice)")
    min_prob: float = opt(1e-6, "drop target probabilities below this, then re-normalise", minimum=0.0)
    shard_rows: int = opt(16_384, "rows per resumable target shard", minimum=1)
    search_batch: int = opt(1024, "queries per FAISS search call", minimum=1)

    def validate(self) -> None:
        if self.temperature != "auto":
            try:
                t = float(self.temperature)
            except ValueError:
                t = -1.0
            if not (t > 0 and math.isfinite(t)):
                raise MLPMemError(f"--temperature must be 'auto' or a positive number, got {self.temperature!r}")

    def k_value(self) -> int:
        return self.k if self.k is not None else DEFAULT_K


@dataclass
class TrainSettings:
    """The MLP memory's size and its training (alpha * KL + (1 - alpha) * CE)."""

    memory_preset: str = opt("small", "memory size preset: tiny (2 blocks), small (4), base (8), parity (as many "
                                      "parameters as the base LM); ignored when --memory-blocks/--memory-param-ratio "
                                      "is set", choices=["tiny", "small", "base", "parity"])
    memory_blocks: int | None = opt(None, "number of residual FFN blocks in the memory", minimum=1)
    memory_param_ratio: float | None = opt(None, "size the memory to this many times the base LM's parameters")
    head_init: str = opt("embedding", "memory LM head initialisation: 'embedding' (copy the base LM's output "
                                      "embedding) or 'random'", choices=["embedding", "random"])
    alpha: float = opt(0.4, "loss weight of KL(p_kNN || p_mem); 1 - alpha goes to cross-entropy on the next token")
    lr: float = opt(1e-3, "peak AdamW learning rate (linear warmup, then linear decay)")
    epochs: float = opt(1.0, "passes over the datastore rows (fractions allowed)")
    train_batch: int = opt(1024, "datastore rows per training step", minimum=1)
    warmup: float = opt(0.03, "fraction of steps spent warming up the learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0.0)
    grad_clip: float = opt(1.0, "gradient norm clip (> 0)")
    seed: int = opt(0, "seed of initialisation and data order", minimum=0)
    checkpoint_every: int = opt(100, "steps between resumable checkpoints", minimum=1)
    train_mode: str = opt("offline", "offline: stored hidden states; online: recompute them with the base LM",
                          choices=["offline", "online"])
    val_rows: int = opt(2048, "datastore rows held out of training for the validation loss", minimum=0)
    autocast: str = opt("auto", "training precision: auto (bf16 autocast where bf16 is fast, else float32), off, "
                                "bfloat16", choices=["auto", "off", "bfloat16"])

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MLPMemError(f"--alpha must be within [0, 1], got {self.alpha}")
        for name in ("lr", "epochs", "grad_clip"):
            if not getattr(self, name) > 0:
                raise MLPMemError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise MLPMemError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.memory_param_ratio is not None and not self.memory_param_ratio > 0:
            raise MLPMemError(f"--memory-param-ratio must be > 0, got {self.memory_param_ratio}")

    def sizing(self) -> dict:
        """How the memory is sized: blocks, a parameter ratio, or a preset (first one set wins)."""
        if self.memory_blocks is not None:
            return {"n_blocks": self.memory_blocks}
        if self.memory_param_ratio is not None:
            return {"param_ratio": self.memory_param_ratio}
        return {"preset": self.memory_preset}


@dataclass
class EvalSettings:
    """Perplexity evaluation: the lambda grid and the +RAG row."""

    lambdas: str = opt("0,0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5,0.6,0.7,0.8,0.9",
                       "comma-separated interpolation weights swept on the validation slice")
    rag_ppl: bool = opt(True, "also report the in-context RAG baseline (+RAG row): BM25 over the datastore's "
                              "documents, top passage prepended to the context")
    rag_retrieve_every: int = opt(32, "+RAG: retrieve a new passage every this many scored tokens (each retrieval "
                                      "is one forward of up to --block tokens, so the cost grows as 1/s)", minimum=1)
    rag_query_tokens: int = opt(32, "+RAG: the query is this many tokens before each retrieval point", minimum=1)
    rag_passage_tokens: int = opt(256, "+RAG: documents longer than this many tokens are split into passages",
                                  minimum=1)
    ood: str = opt("auto", "out-of-domain texts scored next to the test text at the same lambdas: comma-separated "
                           "shipped sets (nyt, reddit, amazon: New York Times, Reddit and Amazon-review paragraphs "
                           "sharing no 13 words with the default corpus) or text files; auto: the shipped sets with "
                           "the default corpus, none with another; none: skip")
    ood_tokens: int = opt(4096, "tokens scored from the start of each out-of-domain text", minimum=2)

    def validate(self) -> None:
        try:
            lams = self.lambda_list()
        except ValueError:
            raise MLPMemError(f"--lambdas must be comma-separated numbers, got {self.lambdas!r}") from None
        if not lams or any(not 0.0 <= x <= 1.0 for x in lams):
            raise MLPMemError(f"--lambdas must be numbers within [0, 1], got {self.lambdas!r}")

    def lambda_list(self) -> list[float]:
        return [float(x) for x in str(self.lambdas).split(",") if x.strip()]


# group name -> settings class, in pipeline order: a stage command reads its own group and every
# group before it (it may have to build those stages first).
GROUPS: dict[str, type] = {"run": RunSettings, "corpus": CorpusSettings, "datastore": DatastoreSettings,
                           "index": IndexSettings, "targets": TargetsSettings, "train": TrainSettings,
                           "eval": EvalSettings}


@dataclass
class Config:
    """Every run setting, one group per stage."""

    run: RunSettings = field(default_factory=RunSettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    datastore: DatastoreSettings = field(default_factory=DatastoreSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    targets: TargetsSettings = field(default_factory=TargetsSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> Config:
        for name in GROUPS:
            group = getattr(self, name)
            check_fields(group)
            if hasattr(group, "validate"):
                group.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **flat) -> Config:
        """A copy with settings replaced by field name (``cfg.updated(lr=3e-3)``), validated."""
        by_group = split_by_group(flat)
        return replace(self, **{g: replace(getattr(self, g), **v) for g, v in by_group.items()}).validate()


# Presets: named overrides. "quick" is the README's main job on a 2-core laptop.
PRESETS: dict[str, dict] = {
    # 100k datastore tokens: the README's main table
    "quick": {"max_train_tokens": 100_000, "max_heldout_tokens": 24_000, "block": 512, "stride": 256,
              "tune_tokens": 4096},
    # the whole corpus with the paper's windows (2.2M datastore tokens: hours on a laptop CPU)
    "default": {},
    # 500k datastore tokens, IVF-Flat index, the whole held-out split
    "large": {"max_train_tokens": 500_000},
}

# Names saved by older versions that are no longer run settings (they described one invocation).
RETIRED = {"eval_text"}


def group_of_field() -> dict[str, str]:
    """field name -> group name (names are unique across groups, so flags stay flat)."""
    return {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}


def split_by_group(flat: dict, where: str = "settings") -> dict[str, dict]:
    """``{"lr": 1e-3, "block": 512}`` -> ``{"train": {"lr": 1e-3}, "datastore": {"block": 512}}``."""
    owner = group_of_field()
    unknown = sorted(set(flat) - set(owner))
    if unknown:
        raise MLPMemError(f"{where}: unknown setting(s) {', '.join(unknown)}; see `mlpmem <command> --help`")
    out: dict[str, dict] = {}
    for name, value in flat.items():
        out.setdefault(owner[name], {})[name] = value
    return out


def flatten(raw: dict, where: str) -> dict:
    """Settings from a file, nested by group (what ``config.json`` holds) or flat, as one flat dict."""
    flat: dict = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if isinstance(value, dict):
            if key not in GROUPS:
                raise MLPMemError(f"{where}: unknown section [{key}]; sections are {', '.join(GROUPS)}")
            inner = {k.replace("-", "_"): v for k, v in value.items()}
            wrong = [k for k in inner if group_of_field().get(k, key) != key]
            if wrong:
                raise MLPMemError(f"{where}: {', '.join(wrong)} belong(s) to another section than [{key}]")
            flat.update(inner)
        else:
            flat[key] = value
    for name in RETIRED & set(flat):
        flat.pop(name)
    return flat


def load_config_file(path: str | Path) -> dict:
    """Flat settings from a TOML or JSON file (unknown names are an error)."""
    path = Path(path)
    if not path.is_file():
        raise MLPMemError(f"config file {path} not found")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MLPMemError(f"config file {path} does not parse: {e}") from None
    if not isinstance(raw, dict):
        raise MLPMemError(f"config file {path} must hold a table of settings")
    flat = flatten(raw, f"config file {path}")
    split_by_group(flat, f"config file {path}")  # refuse unknown names here, naming the file
    return flat


def make_config(preset: str | None = None, config_file: str | None = None, base: dict | None = None,
                **overrides) -> Config:
    """Defaults < ``base`` (a run directory's saved config.json) < preset < config file < overrides."""
    values: dict = flatten(base or {}, "saved settings")
    if preset:
        if preset not in PRESETS:
            raise MLPMemError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config().updated(**values)


def defaults() -> dict:
    """Every field's default, flat by name."""
    return {f.name: f.default for cls in GROUPS.values() for f in fields(cls) if f.default is not MISSING}
