"""`mlpmem bench`: speed and memory of base, +MLP memory, +kNN-LM (exact / IVF-PQ) and +RAG.

Why it is measured this way:

- **Same inputs and code path as real use.** Prompts are windows of the run's held-out test text.
  Memory and kNN-LM run under :func:`mlpmemory.generation.augmented` (the hooks generation uses);
  RAG retrieves with BM25 and prepends passages on every call, so it pays retrieval and the longer
  context; its prefill counts only the original prompt tokens as useful and asks for their logits.
- **Prefill = scoring a text** (one forward; the mixed log-prob of every prompt token, through the
  scoring path of eval-ppl and the harness: chunked heads, targets only). **Decode** = greedy with
  the KV cache, timed step by step (CUDA synchronised before every clock read); time to first
  token runs from the prompt (text, for RAG) to the first token. One untimed warm-up per system,
  then ``bench_repeats`` repeats; medians over repeats are reported, raw timings all kept.
- **Stage split.** StageTimer sections (memory_forward, search, distribution, mixing, and our
  retrieval) are nested in the timed total; ``base_forward`` = total - sections (the frozen LM with
  hook capture, plus Python). The split is the median repeat's, so it sums to that repeat's total.
- **Peak RSS per system, in one process.** Indexes are built first; before a system's components
  load, the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and VmRSS noted
  (base LM + process); the peak is VmHWM after its measurements. Without the reset, ``ru_maxrss``
  since process start is given, flagged ``reset: false``. On CUDA, max_memory_allocated likewise.
- **Datastore-size scaling**: Flat and IVF-PQ indexes over the first N keys, cached in
  ``bench/indexes/N_<factory>/`` with a manifest; kNN-LM decoding is timed at each N next to the
  memory and the base LM, whose cost cannot depend on N (measured anyway, to show it).
- **Overhead model**: FLOPs/token of the base LM and the memory predict the memory's overhead;
  where the measurement differs by > 10%, the stage split says where the time went.

The FLOP / overhead model, the markdown table and the charts are in :mod:`mlpmemory.bench_report`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..bench_report import LABELS, flop_report, memory_flops_per_token, write_outputs
from ..config import opt
from ..errors import MLPMemError
from ..io import atomic_write_json, is_complete, read_manifest, sha256_file, sha256_json, write_manifest
from ..log import log

SYSTEMS = ("base", "memory", "knn_exact", "knn_ivfpq", "rag")
TRAIN_SAMPLES = 100_000  # IVF/PQ training sample (deterministic), enough for >= 39 points per list

@dataclass
class Options:
    bench_systems: str = opt("base,memory,knn_exact,knn_ivfpq,rag", "comma-separated systems to measure: "
                             + ", ".join(SYSTEMS))
    bench_prompts: int = opt(8, "prompts (windows of the held-out test text) per measurement")
    bench_prompt_tokens: int = opt(256, "tokens per prompt")
    bench_decode_tokens: int = opt(32, "greedy tokens generated per prompt for decode latency")
    bench_repeats: int = opt(3, "timed repeats after one warm-up; medians are reported")
    bench_sizes: str = opt("25000,100000,400000", "datastore sizes N for the kNN scaling curve (capped at the "
                           "datastore's rows; empty = skip)")
    bench_k: int = opt(1024, "kNN-LM neighbours per token")
    bench_nprobe: int = opt(32, "IVF lists probed per kNN query")
    bench_rag_n: int = opt(3, "BM25 passages prepended per prompt for +RAG")
    bench_threads: int | None = opt(None, "torch/FAISS CPU threads (default: leave as is)")
    bench_out: str | None = opt(None, "output directory (default: <run>/bench)")

    def systems(self) -> list[str]:
        names = [s.strip() for s in self.bench_systems.split(",") if s.strip()]
        bad = [s for s in names if s not in SYSTEMS]
        if not names or bad:
            raise MLPMemError(f"--bench-systems: {'unknown ' + ', '.join(bad) if bad else 'empty list'}; "
                              f"choose from {', '.join(SYSTEMS)}")
        return names

    def sizes(self) -> list[int]:
        try:
            sizes = [int(float(s)) for s in self.bench_sizes.split(",") if s.strip()]
        except ValueError:
            raise MLPMemError(f"--bench-sizes must be comma-separated integers, got {self.bench_sizes!r}") from None
        if any(n < 1 for n in sizes):
            raise MLPMemError(f"--bench-sizes must be positive, got {self.bench_sizes!r}")
        return sizes

    def validate(self) -> None:
        self.systems(), self.sizes()
        lows = {"bench_prompts": 1, "bench_prompt_tokens": 1, "bench_repeats": 1, "bench_k": 1, "bench_nprobe": 1,
                "bench_rag_n": 1, "bench_decode_tokens": 2, "bench_threads": 1}  # decode: first token + >= 1 step
        for name, low in lows.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise MLPMemError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")


# -------- Statistics, clocks, memory accounting -------------------------------------------------

def _median_index(totals: list[float]) -> int:
    """Index of the (lower) median repeat, so its stage split sums to a reported total."""
    return sorted(range(len(totals)), key=lambda i: totals[i])[(len(totals) - 1) // 2]


def _now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _proc_status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        return next((int(ln.split()[1]) / 1024 for ln in open("/proc/self/status") if ln.startswith(field + ":")), None)
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where that is not possible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the baseline is honest
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        return f.write("5") == 1
    return False


def memory_state(device, reset_ok: bool) -> dict:
    peak = _proc_status_mb("VmHWM") if reset_ok else None
    out = {"peak_rss_mb": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_now_mb": _proc_status_mb("VmRSS"), "reset": bool(reset_ok and peak is not None)}
    if torch.device(device).type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# -------- Indexes over a prefix of the datastore (cached) ---------------------------------------

def prefix_factories(n: int, d: int, train_samples: int = TRAIN_SAMPLES) -> dict:
    """``{"knn_exact": "Flat", "knn_ivfpq": "IVF{nlist},PQ{m}x{bits}"}`` for N keys of dim d.

    nlist: power of two nearest 4 sqrt(N), halved until each list gets >= 39 training points; m:
    the largest divisor of d <= 64 with sub-vectors of >= 4 dims (64-byte codes for d = 576); 8-bit
    codes unless the sample is too small for 256 centroids per sub-quantizer (tiny datastores).
    """
    from ..index import MIN_POINTS_PER_LIST, _pow2_nearest

    n_train = min(n, train_samples)
    nlist = _pow2_nearest(4.0 * math.sqrt(n))
    while nlist > 1 and n_train / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    m = max(x for x in range(1, max(1, min(d // 4, 64)) + 1) if d % x == 0)
    bits = int(min(8, max(1, math.floor(math.log2(max(n_train / MIN_POINTS_PER_LIST, 2))))))
    return {"knn_exact": "Flat", "knn_ivfpq": f"IVF{nlist},PQ{m}x{bits}"}


def prefix_index(ds, n: int, factory: str, root: Path, nprobe: int, seed: int = 0, load: bool = True):
    """(index, manifest) of ``factory`` over datastore rows [0, n), built once into root/N_<factory>."""
    import faiss
    from tqdm.auto import tqdm

    from ..index import INDEX_FILE, _index_params, _sample_rows, load_index, measure_recall, new_index

    out = root / f"{n}_{factory.replace(',', '_')}"
    identity = {"datastore_fingerprint": sha256_json(ds.manifest), "n": int(n), "factory": factory, "seed": seed,
                "train_samples": min(n, TRAIN_SAMPLES)}
    if is_complete(out) and all(read_manifest(out).get(k) == v for k, v in identity.items()):
        return load_index(out, None, nprobe=nprobe) if load else (None, read_manifest(out))
    (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index = new_index(ds.dim, factory)
    if not index.is_trained:
        rows = _sample_rows(n, TRAIN_SAMPLES, seed)
        log(f"bench: training {factory} on {len(rows):,} of {n:,} keys")
        index.train(np.asarray(ds.keys[rows], dtype=np.float32))
    for s in tqdm(range(0, n, 65_536), desc=f"index {n} {factory}", unit="batch"):
        index.add(np.ascontiguousarray(ds.keys[s:min(n, s + 65_536)], dtype=np.float32))
    params = _index_params(index, nprobe)
    if "nlist" in params:
        faiss.extract_index_ivf(index).nprobe = nprobe
    quality = {"recall": 1.0, "recall_k": None}  # Flat is exact by construction
    if factory != "Flat":
        queries = np.asarray(ds.keys[_sample_rows(n, 128, seed + 1)], dtype=np.float32)
        quality = measure_recall(index, ds.keys[:n], queries, 64)
    faiss.write_index(index, str(out / f"{INDEX_FILE}.tmp"))
    os.replace(out / f"{INDEX_FILE}.tmp", out / INDEX_FILE)
    manifest = write_manifest(out, {**identity, "dim": ds.dim, "params": params, **quality,
                                    "build_seconds": time.perf_counter() - t0,
                                    "file_bytes": (out / INDEX_FILE).stat().st_size,
                                    "file_sha256": sha256_file(out / INDEX_FILE)})
    return index, manifest


# -------- Systems and the timed loops -----------------------------------------------------------

@dataclass
class Entry:
    """One measured system: a :mod:`mlpmemory.systems` instance (the kNN-LM variants ``knn_exact`` /
    ``knn_ivfpq`` are the kNN-LM system over another index), its lambda and what the report says of it."""
    name: str
    system: object
    lam: float = 0.0
    info: dict | None = None


class Bench:
    """The LM, the prompts, and the timed prefill / decode loops shared by every system."""

    def __init__(self, lm, prompt_ids: torch.Tensor, rag_n: int):
        from ..models import bos_prefix

        self.lm, self.model, self.device = lm, lm.model, lm.device
        self.prefix = bos_prefix(lm.tokenizer)  # every prompt starts with it, as the windows of eval-ppl do
        head = torch.tensor(self.prefix, dtype=prompt_ids.dtype).expand(len(prompt_ids), -1)
        self.ids = torch.cat([head, prompt_ids], 1).to(self.device)
        self.texts = [lm.tokenizer.decode(row) for row in prompt_ids.tolist()]
        self.rag_n = rag_n
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        self.max_pos = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
        self.rag_truncated = 0
        params = inspect.signature(self.model.forward).parameters  # transformers 5.x renamed past_key_values
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = (lambda n: {"logits_to_keep": n}) if "logits_to_keep" in params else (lambda n: {})

    def timer(self):
        from ..generation import StageTimer

        return StageTimer(self.device)

    def inputs(self, entry: Entry, rows: list[int], timer, room: int = 0):
        """(input_ids, attention_mask, position_ids) of prompts ``rows``; a prompt transform (RAG's
        retrieval) runs here, timed."""
        if not entry.system.transforms_prompt:
            ids = self.ids[rows]
            return ids, torch.ones_like(ids), None
        with timer.section("retrieval"):
            prompts, _ = entry.system.transform_prompts([self.texts[r] for r in rows])
            seqs = [self.lm.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
            limit = self.max_pos - room - len(self.prefix)
            self.rag_truncated += sum(len(s) > limit for s in seqs)
            seqs = [self.prefix + s[-limit:] for s in seqs]  # over the model's window: drop the oldest passage text
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # left padding: every prompt ends at the last column
                ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
            ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill(self, system: Entry, batch: int, n_rows: int) -> dict:
        """One scoring pass over ``n_rows`` prompts (cycled) in batches: seconds, useful tokens, stages."""
        timer, total, useful = self.timer(), 0.0, 0
        rows = [i % len(self.ids) for i in range(n_rows)]
        for s in range(0, len(rows), batch):
            t0 = _now(self.device)
            ids, mask, pos = self.inputs(system, rows[s:s + batch], timer)
            self.score(system, ids, mask, pos, timer)
            total += _now(self.device) - t0
            useful += len(rows[s:s + batch]) * self.ids.shape[1]
        return {"seconds": total, "tokens": useful, "stages": split(total, timer)}

    @torch.inference_mode()
    def score(self, entry: Entry, ids, mask, pos, timer) -> np.ndarray:
        """Scoring a text as eval-ppl and the harness score it: log p(next token) at each prompt position
        under the system at its lambda (float64, (B * (T - 1),)). The base LM's head and the system's
        component run a bounded chunk of rows at a time and only the targets' log-probs are mixed
        (:func:`mlpmemory.inference.mix_logprobs`): no vocabulary-sized mixed tensor is ever built."""
        from ..capture import capture_inputs
        from ..inference import lm_scoring_forward, mix_logprobs, resolve_input_site

        system, width = entry.system, self.ids.shape[1]  # RAG: only the prompt's own positions are scored
        site = resolve_input_site(self.model, system.site()) if system.has_lambda and entry.lam > 0 else None
        with capture_inputs(self.model, [site] if site else []) as cap:
            states, score = lm_scoring_forward(self.model, input_ids=ids, attention_mask=mask, position_ids=pos,
                                               use_cache=False, logits_to_keep=width)
        targets = ids[:, -width + 1:].reshape(-1)
        logp = score(states[:, :-1].reshape(-1, states.shape[-1]), targets).double().cpu().numpy()
        if site is None:
            return logp
        hidden = cap[site.module_path][:, -width:-1]
        with timer.section("memory_forward" if system.name == "memory" else "search"):
            other = system.token_logprobs(hidden.reshape(-1, hidden.shape[-1]), targets)
        with timer.section("mixing"):
            return mix_logprobs(logp, other, entry.lam)

    def decode(self, system: Entry, rows: list[int], steps: int) -> dict:
        """Greedy decoding of ``steps + 1`` tokens with the KV cache: TTFT and per-step latencies."""
        t_pre, t_dec = self.timer(), self.timer()
        t0 = _now(self.device)
        with self.hooks(system, t_pre):
            ids, mask, pos = self.inputs(system, rows, t_pre, room=steps + 1)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.keep(1))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = _now(self.device) - t0
        past, step_s = getattr(out, self.cache_kw), []
        with self.hooks(system, t_dec):
            for _ in range(steps):
                t = _now(self.device)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = self.model(input_ids=nxt, attention_mask=mask, use_cache=True, **{self.cache_kw: past})
                past, nxt = getattr(out, self.cache_kw), out.logits[:, -1].argmax(-1, keepdim=True)
                step_s.append(_now(self.device) - t)
        return {"ttft_s": ttft, "step_s": step_s, "stages": split(sum(step_s), t_dec)}

    def hooks(self, entry: Entry, timer):
        """The exact hooks generation uses: the system's own (none for base and RAG)."""
        return entry.system.hook(self.model, entry.lam, timer)


def split(total: float, timer) -> dict:
    """Stage seconds: the timer's sections, and base_forward = total minus all of them."""
    parts = {k: float(v) for k, v in timer.totals.items() if v}
    return {"base_forward": total - sum(parts.values()), **parts, "total": total}


def _rate_summary(runs: list[dict], tokens_key: str) -> dict:
    rates = [r[tokens_key] / r["seconds"] for r in runs]
    mid = runs[_median_index([r["seconds"] for r in runs])]
    per_tok = {k: v / mid[tokens_key] for k, v in mid["stages"].items()}
    return {"tokens_per_s": float(np.median(rates)), "stage_s_per_token": per_tok, "repeats": len(runs), "runs": runs}


def decode_runs(bench: Bench, system: Entry, groups: list[list[int]], steps: int, repeats: int) -> dict:
    """Repeated greedy decoding of every group of prompts (one batch each): tokens/s, latency, TTFT."""
    runs = []
    for _ in range(repeats):
        rs = [bench.decode(system, g, steps) for g in groups]
        runs.append({"seconds": sum(sum(r["step_s"]) for r in rs), "tokens": steps * sum(map(len, groups)),
                     "step_ms": [1e3 * s for r in rs for s in r["step_s"]], "ttft_ms": [1e3 * r["ttft_s"] for r in rs],
                     "stages": {k: sum(r["stages"].get(k, 0.0) for r in rs)
                                for k in {k for r in rs for k in r["stages"]}}})
    out = _rate_summary(runs, "tokens")
    for name, key in (("latency", "step_ms"), ("ttft", "ttft_ms")):
        for q in (50, 95):
            out[f"{name}_ms_p{q}"] = float(np.median([np.percentile(r[key], q) for r in runs]))
    return {**out, "batch": len(groups[0]), "new_tokens_per_prompt": steps + 1}


def measure_system(bench: Bench, system: Entry, opts: Options) -> dict:
    """Prefill at batch 1 and 8 and batch-1 decode (latency, TTFT): one warm-up, then the repeats."""
    p, steps = len(bench.ids), opts.bench_decode_tokens - 1
    bench.prefill(system, 1, 1), bench.prefill(system, 8, 8), bench.decode(system, [0], min(steps, 2))  # warm-up
    pre = {"batch_1": [], "batch_8": []}
    for _ in range(opts.bench_repeats):
        for b, n in ((1, p), (8, 8 * math.ceil(p / 8))):  # batch 8: prompts cycled to full batches
            pre[f"batch_{b}"].append(bench.prefill(system, b, n))
    return {"system": system.name, "lambda": system.lam, **(system.info or {}),
            "prefill": {k: _rate_summary(v, "tokens") for k, v in pre.items()},
            "decode": decode_runs(bench, system, [[i] for i in range(p)], steps, opts.bench_repeats)}


def decode_rates(bench: Bench, system: Entry, opts: Options) -> dict:
    """A scaling point: decode tokens/s at batch 1 (every prompt) and batch 8 (prompts cycled)."""
    steps, p = opts.bench_decode_tokens - 1, len(bench.ids)
    bench.decode(system, [0], min(steps, 2))  # warm-up
    return {f"batch_{b}": decode_runs(bench, system, g, steps, opts.bench_repeats)
            for b, g in ((1, [[i] for i in range(p)]), (8, [[i % p for i in range(8)]]))}


# -------- The command ---------------------------------------------------------------------------

def load_prompts(run, n: int, length: int) -> torch.Tensor:
    """``n`` consecutive ``length``-token windows of the held-out test half (from the split start if short)."""
    from ..datastore import read_tokens

    total, need = int(read_manifest(run.path("corpus"), "corpus")["n_tokens"]["heldout"]), n * length
    if need > total:
        raise MLPMemError(f"the held-out text has {total:,} tokens, fewer than {n} prompts x {length} tokens; "
                          "lower --bench-prompts or --bench-prompt-tokens")
    start = total // 2 if total - total // 2 >= need else total - need
    toks = read_tokens(run.path("corpus") / "heldout.i32", start, start + need)
    return torch.from_numpy(np.asarray(toks, dtype=np.int64).reshape(n, length).copy())


def machine_info(lm, memory_dtype=None) -> dict:
    import faiss
    import transformers

    from .. import __version__

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "device": str(lm.device), "dtype": str(lm.dtype),
            "memory_dtype": str(memory_dtype), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "mlpmemory": __version__, "platform": platform.platform(),
            **({"gpu": torch.cuda.get_device_name(lm.device)} if lm.device.type == "cuda" else {})}


KNN_VARIANTS = ("knn_exact", "knn_ivfpq")  # the kNN-LM system over a Flat / an IVF-PQ index of a datastore prefix


def _lambdas(run) -> dict:
    from ..systems import chosen_lambda, tuned

    # lambda = 0 would install no hooks and time the base LM; cost does not depend on its value.
    out = {}
    for cls in tuned():
        lam = chosen_lambda(run, cls.name)
        out[cls.name] = (float(lam), "validation") if lam else (0.25, "default (none chosen)")
    return out


class _Loader:
    """Loads one measured system by its bench name (a registry name, or a kNN-LM variant over N keys)."""

    def __init__(self, run, ds, out: Path, opts: Options):
        self.run, self.ds, self.out, self.opts = run, ds, out, opts
        self.temperature = float(read_manifest(run.path("targets"), "targets")["temperature"])
        self.lams = _lambdas(run)

    def prepare(self, names_: list[str], sizes: list[int]) -> None:
        """Build indexes and retrievers first, so no build is charged to a system's time or RSS."""
        from ..systems import get_system

        ds = self.ds
        todo = {(ds.n, k) for k in KNN_VARIANTS if k in names_} | {(n, k) for n in sizes for k in KNN_VARIANTS}
        for n, k in sorted(todo):
            prefix_index(ds, n, prefix_factories(n, ds.dim)[k], self.out / "indexes", self.opts.bench_nprobe,
                         load=False)
        for name in names_:
            if name not in KNN_VARIANTS and get_system(name).transforms_prompt:
                get_system(name).load(self.run, n_passages=self.opts.bench_rag_n)

    def __call__(self, name: str, n: int | None = None) -> Entry:
        from ..systems import get_system

        if name in KNN_VARIANTS:
            return self.knn(name, self.ds.n if n is None else n)
        system = get_system(name).load(self.run, n_passages=self.opts.bench_rag_n)
        info = {}
        if system.has_lambda:
            info["lambda_source"] = self.lams[name][1]
        if system.transforms_prompt:
            info.update(passages_per_prompt=self.opts.bench_rag_n, bm25_passages=len(system.retriever))
        return Entry(name, system, self.lams[name][0] if system.has_lambda else 0.0, info or None)

    def knn(self, name: str, n: int) -> Entry:
        from ..inference import KNNLM
        from ..systems import KNNLMSystem

        ds, opts, (lam, source) = self.ds, self.opts, self.lams[KNNLMSystem.name]
        factory = prefix_factories(n, ds.dim)[name]
        index, man = prefix_index(ds, n, factory, self.out / "indexes", opts.bench_nprobe)
        knn = KNNLM(index, ds.values[:n], k=opts.bench_k, temperature=self.temperature, lam=lam,
                    fingerprint=sha256_json(man), datastore_manifest=ds.manifest)
        return Entry(name, KNNLMSystem(knn), lam, info={
            "lambda_source": source, "k": knn.k, "temperature": self.temperature,
            "index": {"factory": factory, "n": n, "nprobe": opts.bench_nprobe,
                      **{f: man.get(f) for f in ("recall", "recall_k", "build_seconds", "file_bytes")}}})


def _measure(bench: Bench, load: _Loader, name: str, opts: Options) -> tuple[dict, object]:
    """Load one system (peak RSS reset first) and measure it: (result, its memory module or None)."""
    lm = bench.lm
    reset_ok = reset_peak_rss()
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    before, t0 = _proc_status_mb("VmRSS"), time.perf_counter()
    entry = load(name)
    load_s = time.perf_counter() - t0
    log(f"bench: {LABELS[name]} ...")
    bench.rag_truncated = 0
    res = measure_system(bench, entry, opts)
    res.update(load_seconds=load_s, memory={"rss_before_mb": before, **memory_state(lm.device, reset_ok)})
    if entry.system.transforms_prompt:
        res["rag_prompts_truncated_to_model_window"] = bench.rag_truncated
    memory = getattr(entry.system, "memory", None)
    if memory is not None:
        res["memory_flops_per_token"] = memory_flops_per_token(memory)
    return res, memory


def main(run, opts: Options) -> None:
    from ..distributed import thread_count

    opts.validate()
    # Loaded before changing the thread count: models.model_fingerprint sums weights in float, and
    # the sum's rounding depends on torch's thread count (a memory would then refuse its base LM).
    lm = run.lm
    with thread_count(opts.bench_threads):
        _bench(run, lm, opts)


def _bench(run, lm, opts: Options) -> None:
    from ..datastore import open_datastore

    out = Path(opts.bench_out) if opts.bench_out else run.dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    systems = opts.systems()
    ds = open_datastore(run.path("datastore"))
    bench = Bench(lm, load_prompts(run, opts.bench_prompts, opts.bench_prompt_tokens), opts.bench_rag_n)
    log(f"bench: {len(bench.ids)} prompts x {bench.ids.shape[1]} tokens, systems {', '.join(systems)}, "
          f"{opts.bench_repeats} repeats, output {out}")
    sizes = sorted({min(n, ds.n) for n in opts.sizes()})
    load = _Loader(run, ds, out, opts)
    load.prepare(systems, sizes)

    results, memory_dtype = {}, None
    with torch.inference_mode():
        for name in systems:
            results[name], memory = _measure(bench, load, name, opts)
            if memory is not None:
                memory_dtype = next(memory.parameters()).dtype
            del memory
        scaling = run_scaling(bench, opts, sizes, load) if sizes else None
    report = {"settings": asdict(opts), "order": systems, "machine": machine_info(lm, memory_dtype),
              "prompts": {"n": len(bench.ids), "tokens": bench.ids.shape[1], "source": "held-out test half"},
              "datastore_rows": ds.n, "systems": results, "scaling": scaling, "how": _HOW,
              "overhead_model": flop_report(lm.model, results, bench.ids.shape[1], opts.bench_decode_tokens,
                                            f"; memory in {memory_dtype}, base LM in {lm.dtype}"
                                            if memory_dtype not in (None, lm.dtype) else "")}
    atomic_write_json(out / "bench.json", report)
    print(write_outputs(out, report))
    print(f"\nbench: {out / 'bench.json'}, {out / 'bench.md'}")


def run_scaling(bench: Bench, opts: Options, sizes: list[int], load) -> dict:
    memory = load("memory")
    points = []
    for n in sizes:
        log(f"bench: scaling: N = {n:,}")
        point = {"n": n, "systems": {}}
        for name in ("base", "memory", "knn_exact", "knn_ivfpq"):
            system = memory if name == "memory" else load(name, n)
            point["systems"][name] = {**decode_rates(bench, system, opts), **(system.info or {})}
        points.append(point)
    last = points[-1]["systems"]
    ratios = {f"memory_over_{k}_batch_{b}":
              last["memory"][f"batch_{b}"]["tokens_per_s"] / last[k][f"batch_{b}"]["tokens_per_s"]
              for k in ("knn_exact", "knn_ivfpq") for b in (1, 8)}
    return {"sizes": sizes, "points": points, "largest_n": sizes[-1], "ratios_at_largest_n": ratios}


_HOW = {"prefill": "scoring: one forward per prompt batch (no cache), the mixed log-prob of every prompt token "
                   "(chunked LM head and component, targets only, then mix_logprobs); tokens/s = useful prompt "
                   "tokens / s; "
                   "RAG: retrieval + passages processed, logits for the prompt tokens only",
        "decode": "greedy with the KV cache under generation.augmented; per-step latency; TTFT = prompt -> first "
                  "token (retrieval and tokenisation included for RAG)",
        "stages": "StageTimer sections nested in the total; base_forward = total - sections; median repeat's split",
        "peak_rss": "VmHWM after resetting it (/proc/self/clear_refs) before the system's components load; "
                    "rss_before_mb = VmRSS then (base LM + process); fallback ru_maxrss (reset false)",
        "medians": "one untimed warm-up per system, then bench_repeats repeats; medians over repeats"}
