"""Perplexity of base / +kNN-LM / +MLP memory on identical windows, with sweeps from cached log-probs.

Why it is written this way:

- **Only the true token's probability is needed.** Every component (base LM, memory, kNN) is a
  normalised distribution, so a mixture's probability of the true token is the same mixture of
  the components' probabilities of that token. One pass over a text therefore stores, per scored
  token, ``log p_LM(w_t)``, ``log p_MLP(w_t)`` and ``log p_kNN(w_t)`` per temperature; any
  ``(lambda, T)`` point is then a vectorised numpy expression over those arrays (milliseconds),
  so lambda and T are swept, not guessed (both silently dominate results; docs/method.md#traps-avoided).
- **Identical windows for every system.** The base pass *is* a datastore build
  (:func:`mlpmemory.datastore.build_datastore` with ``store_lm_logprob=True``) over
  :func:`mlpmemory.corpus.sliding_windows`: same windows, same context for every token, and
  the kNN queries / memory inputs of exactly those positions. It is resumable like any build.
- **Caches know what produced them.** Next to the eval dir's arrays: ``mem_logprob.f32`` (with
  ``mem_logprob.json`` naming the memory's fingerprint) and ``knn_logprob_T{T}.f32`` (with
  ``knn_logprob.json`` naming the index fingerprint and k). A different memory, index, k or a
  rebuilt eval dir recomputes; the same ones are read back untouched. The JSON is removed before
  a data file is replaced and written after, so a crash never leaves a stale pairing.
- **RAG is a separate pass, reported alongside.** In-context RAG changes the LM's context, so
  it is not a mixture of cached components: :mod:`mlpmemory.rag` scores the same test tokens
  (``rag_logprob.f32`` in the test eval dir) and :func:`evaluate_ppl` reports them as the
  ``rag`` system with its settings; it has no lambda to choose.
- **Chosen on validation, reported on test.** :func:`evaluate_ppl` picks the memory's lambda
  and the kNN-LM's (lambda, T) on a validation eval dir and reports test perplexity at exactly
  those values; the two dirs must come from the same model, dtype, sites, block and stride.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from .config import DatastoreSettings, EvalSettings
from .datastore import LM_LOGPROB, MEM_INPUTS, open_datastore
from .errors import MLPMemError
from .inference import KNNLM, _check_lambda, memory_token_logprobs, mix_logprobs
from .io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_manifest,
    sha256_json,
    write_raw_array,
)
from .log import logger
from .systems import names

BASE, MEMORY, KNN_LM, RAG = "base", "memory", "knn_lm", "rag"  # the registry's names (mlpmemory.systems)
SYSTEMS = tuple(names())
DEFAULT_LAMBDAS = tuple(EvalSettings().lambda_list())
MEM_FILE, MEM_META = "mem_logprob.f32", "mem_logprob.json"
KNN_META = "knn_logprob.json"
# Fields two eval dirs must share for their perplexities to be comparable.
MATCH_FIELDS = ("model_fingerprint", "tokenizer_fingerprint", "dtype", "block", "stride", "key_site", "mem_site",
                "dim", "mem_dim", "bos_prefix")


def knn_file(temperature: float) -> str:
    """Cache file of one temperature; ``repr`` keeps T exact (3.0 -> ``knn_logprob_T3.0.f32``)."""
    return f"knn_logprob_T{float(temperature)!r}.f32"


# ---------------------------------------------------------------------------------------------
# Fingerprints and small helpers.
# ---------------------------------------------------------------------------------------------


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(config)
    if isinstance(config, dict):
        return config
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def fingerprint_memory(memory, sample: int = 4096) -> str:
    """Identity of a memory for caches: its config plus, per tensor, name, shape, dtype, sum and a
    strided sample of values (cheap even for a 1B memory; any re-training changes it)."""
    import torch

    h = hashlib.sha256()
    h.update(type(memory).__name__.encode())
    h.update(json.dumps(_config_dict(getattr(memory, "config", None)), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(memory.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:16]


def memory_dir_fingerprint(path) -> str:
    """Identity of a saved memory: its config plus its tensors (names, shapes, dtypes, bytes), hashed; not the
    file's bytes (a safetensors header may list the same tensors in another order) nor anything else in the
    folder (training logs, checkpoints)."""
    from safetensors import safe_open

    from .memory import CONFIG_NAME, WEIGHTS_NAME, tensors_sha256

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise MLPMemError(f"{path} is not a saved memory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt", device="cpu") as f:
            tensors = tensors_sha256(list(f.keys()), get=f.get_tensor)  # one tensor in memory at a time
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise MLPMemError(f"{path / WEIGHTS_NAME} is unreadable ({type(e).__name__}: {e}); the file is corrupted, "
                          "train or save the memory again") from None
    return sha256_json({"config": read_json(path / CONFIG_NAME), "tensors": tensors})


def mean_nll(logp) -> float:
    """Mean negative log-likelihood in nats per token (float64 accumulation)."""
    logp = np.asarray(logp)
    if logp.size == 0:
        raise MLPMemError("no scored tokens: perplexity is undefined")
    return float(-np.mean(logp, dtype=np.float64))


def perplexity(logp) -> float:
    """exp of the mean NLL of per-token log-probs (inf if any token has probability 0)."""
    nll = mean_nll(logp)
    return math.exp(nll) if nll < 709 else math.inf


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Total NLL (nats) over the text's UTF-8 byte count, in bits."""
    if n_bytes <= 0:
        raise MLPMemError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return float(total_nll_nats) / (n_bytes * math.log(2.0))


def decoded_bytes(tokenizer, ids, *, skip_special_tokens: bool = True) -> int:
    """UTF-8 byte count of ``tokenizer.decode(ids)``."""
    ids = [int(x) for x in np.asarray(ids).reshape(-1)]
    return len(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).encode("utf-8"))


def text_bytes(tokenizer, tokens, *, skip_special_tokens: bool = True) -> int:
    """UTF-8 bytes of the scored text: targets 1..n-1 of ``tokens`` (token 0 is only context).

    Special tokens (the EOS between documents) are skipped by default: they are predicted (their
    NLL counts) but are not text. A multi-byte character split at the first target decodes as one
    replacement character, a few bytes of error at most.
    """
    return decoded_bytes(tokenizer, np.asarray(tokens).reshape(-1)[1:], skip_special_tokens=skip_special_tokens)


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def json_safe(obj):
    """JSON without NaN/Infinity (which strict parsers reject): non-finite floats become null."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    return _finite_or_none(obj)


def _f32_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()[:16]


def _write_f32(path: Path, arr: np.ndarray) -> None:
    """A cached float32 array, with its sha256 beside it (``<name>.sha256``, written after it)."""
    write_raw_array(path, arr, np.float32)
    atomic_write_text(path.with_name(path.name + ".sha256"), _f32_digest(arr) + "\n")


def _read_f32(path: Path, n: int) -> np.ndarray | None:
    """A cached array of ``n`` floats, or None (absent, another size, or not matching its sha256: recomputed)."""
    if not path.is_file() or path.stat().st_size != 4 * n:
        return None
    arr = np.fromfile(path, dtype=np.float32)
    digest = path.with_name(path.name + ".sha256")
    if digest.is_file() and digest.read_text().strip() != _f32_digest(arr):
        logger.warning(f"{path} does not match its checksum (a corrupted cache); computing it again")
        return None
    return arr


def _read_meta(path: Path) -> dict:
    try:
        return read_json(path) if path.exists() else {}
    except MLPMemError:
        return {}


# ---------------------------------------------------------------------------------------------
# Building an eval dir and scoring its components.
# ---------------------------------------------------------------------------------------------


def build_eval_dir(lm, token_path, n_tokens: int, out_dir, *, key_site: str = "last", mem_site: str | None = "last",
                   block: int = DatastoreSettings.block, stride: int = DatastoreSettings.stride,
                   batch_size: int = DatastoreSettings.batch_size, identity: dict | None = None,
                   progress: bool = True, token_start: int = 0) -> dict:
    """The base LM's pass over a text: a datastore with ``lm_logprob`` (resumable); its manifest.

    The text is ``tokens[token_start : token_start + n_tokens]`` of the int32 stream at ``token_path``.
    """
    from .datastore import build_datastore

    extra = {"token_start": int(token_start)} if token_start else {}
    return build_datastore(lm, token_path, n_tokens, out_dir, key_site=key_site, mem_site=mem_site, block=block,
                           stride=stride, batch_size=batch_size, store_lm_logprob=True,
                           identity={"purpose": "eval", **(identity or {})}, progress=progress, **extra)


def _open_eval_dir(eval_dir):
    ds = open_datastore(eval_dir, "eval dir", check=("lm_logprob",))  # small: its content is checked on load
    if ds.lm_logprob is None:
        raise MLPMemError(f"eval dir {eval_dir} has no {LM_LOGPROB}: build it with store_lm_logprob=True "
                          "(mlpmemory.evaluate.build_eval_dir)")
    return ds


def memory_row_logprobs(memory, inputs, values, batch: int = 4096, progress: bool = True,
                        desc: str = "memory log-probs") -> np.ndarray:
    """log p_MLP(values[i] | inputs[i]) (float32, (N,)) of stored hidden states (any (N, d) array or
    memmap) and their next tokens, batch by batch, in the memory's own dtype and device."""
    import torch
    from tqdm.auto import tqdm

    n = len(values)
    out = np.empty(n, np.float32)
    was_training = memory.training
    memory.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="tok", disable=not progress) as bar:
            for s in range(0, n, batch):
                e = min(n, s + batch)
                x = torch.from_numpy(np.asarray(inputs[s:e], dtype=np.float32))
                out[s:e] = memory_token_logprobs(memory, x, np.asarray(values[s:e], dtype=np.int64)).cpu().numpy()
                bar.update(e - s)
    finally:
        memory.train(was_training)
    return out


def _memory_logprobs(ds, memory, batch: int, progress: bool) -> np.ndarray:
    """log p_MLP(true token) (float32, (N,)) of an eval dir's stored memory inputs."""
    if ds.mem_inputs is None:
        raise MLPMemError(f"eval dir {ds.path} has no {MEM_INPUTS}: rebuild it with mem_site set to the memory's "
                          "input site")
    return memory_row_logprobs(memory, ds.mem_inputs, ds.values, batch, progress, f"memory log-probs {ds.path.name}")


def _check_memory_site(ds, memory) -> None:
    """The memory must read the stored site, of the base LM it was built for (when it says so)."""
    base_fp = getattr(getattr(memory, "config", None), "base_fingerprint", None)
    if base_fp and ds.manifest.get("model_fingerprint") and base_fp != ds.manifest["model_fingerprint"]:
        raise MLPMemError(f"the memory was built for base model fingerprint {base_fp} but eval dir {ds.path} "
                          f"was built with {ds.manifest['model_fingerprint']}; rebuild the eval dir with the "
                          "memory's base model (same weights and dtype)")
    site = getattr(getattr(memory, "config", None), "input_site", None)
    module = site.get("module") if isinstance(site, dict) else None
    stored = (ds.manifest.get("mem_site") or {}).get("module")
    if module and stored and module != stored:
        raise MLPMemError(f"the memory reads {module} but eval dir {ds.path} stored inputs of {stored}; "
                          "rebuild the eval dir with the memory's input site")


def _check_knn(ds, knn: KNNLM) -> None:
    if knn.index.d != ds.dim:
        raise MLPMemError(f"eval dir {ds.path} has keys of width {ds.dim} but the index {knn.index.d}; "
                          "build the eval dir at the datastore's key site with the same model")
    ref = knn.datastore_manifest
    if ref:
        for field in ("model_fingerprint", "key_site"):
            if ref.get(field) != ds.manifest.get(field):
                raise MLPMemError(f"eval dir {ds.path} was built with {field}={ds.manifest.get(field)!r} but the kNN "
                                  f"datastore with {ref.get(field)!r}; rebuild the eval dir to match")


def memory_eval_logprobs(ds, memory, fingerprint: str, batch: int = 4096, progress: bool = True) -> np.ndarray:
    """log p_MLP(true token) (float32, (N,)) of an open eval dir, cached there under ``fingerprint``."""
    _check_memory_site(ds, memory)
    want = {"memory_fingerprint": fingerprint, "eval_fingerprint": sha256_json(ds.manifest), "n": ds.n}
    meta = _read_meta(ds.path / MEM_META)
    cached = _read_f32(ds.path / MEM_FILE, ds.n) if all(meta.get(k) == v for k, v in want.items()) else None
    if cached is None:
        (ds.path / MEM_META).unlink(missing_ok=True)
        t0 = time.perf_counter()
        cached = _memory_logprobs(ds, memory, batch, progress)
        _write_f32(ds.path / MEM_FILE, cached)
        atomic_write_json(ds.path / MEM_META, {**want, "seconds": round(time.perf_counter() - t0, 3)})
    return cached


def _knn_search_logprobs(ds, knn: KNNLM, temps: list[float], batch: int, progress: bool) -> dict[float, np.ndarray]:
    """log p_kNN(true token) (float32) of every eval-dir token at each T, one search per batch for all T."""
    from tqdm.auto import tqdm

    new = {t: np.empty(ds.n, np.float32) for t in temps}
    with tqdm(total=ds.n, desc=f"kNN log-probs {ds.path.name}", unit="tok", disable=not progress) as bar:
        for s in range(0, ds.n, batch):
            e = min(ds.n, s + batch)
            dists, ids = knn.search(np.asarray(ds.keys[s:e], dtype=np.float32))
            tgt = np.asarray(ds.values[s:e], dtype=np.int64)
            for t in temps:
                new[t][s:e] = knn.logprob_from_search(dists, ids, tgt, t)
            bar.update(e - s)
    return new


def knn_eval_logprobs(ds, knn: KNNLM, temperatures, batch: int = 4096, progress: bool = True) -> dict:
    """``{T: log p_kNN(true token)}`` (float64, (N,)) of an open eval dir, each T cached there
    (``knn_logprob_T{T}.f32``, all named in ``knn_logprob.json`` with the index fingerprint and k)."""
    _check_knn(ds, knn)
    temps = [float(t) for t in temperatures]
    if not temps or any(not t > 0 for t in temps):
        raise MLPMemError(f"temperatures must be a non-empty list of numbers > 0, got {temperatures!r}")
    path, n = ds.path, ds.n
    want = {"knn_fingerprint": knn.fingerprint, "k": knn.k, "eval_fingerprint": sha256_json(ds.manifest), "n": n}
    meta = _read_meta(path / KNN_META)
    done: dict[str, float] = {}
    if all(meta.get(k) == v for k, v in want.items()):
        done = {name: float(t) for name, t in meta.get("temperatures", {}).items()}
    else:  # another index/k/eval dir: nothing cached is valid
        for name in meta.get("temperatures", {}):
            (path / name).unlink(missing_ok=True)
    found: dict[float, np.ndarray] = {}
    for t in dict.fromkeys(temps):
        arr = _read_f32(path / knn_file(t), n) if done.get(knn_file(t)) == t else None
        if arr is not None:
            found[t] = arr
    missing = [t for t in dict.fromkeys(temps) if t not in found]
    if missing:
        (path / KNN_META).unlink(missing_ok=True)
        t0 = time.perf_counter()
        new = _knn_search_logprobs(ds, knn, missing, batch, progress)
        for t in missing:
            _write_f32(path / knn_file(t), new[t])
            done[knn_file(t)] = t
            found[t] = new[t]
        atomic_write_json(path / KNN_META, {**want, "temperatures": done,
                                            "seconds_last": round(time.perf_counter() - t0, 3)})
    return {t: found[t].astype(np.float64) for t in dict.fromkeys(temps)}


def score_components(eval_dir, *, memory=None, memory_fingerprint: str | None = None, knn: KNNLM | None = None,
                     temperatures=None, batch: int = 4096, progress: bool = True, systems=None,
                     choices: dict | None = None) -> dict:
    """Per-token log-probs of the true next token, per component, computed once and cached.

    Returns ``{"lm": (N,), "memory": (N,) if a memory is given, "knn": {T: (N,)} if a kNN-LM is
    given}`` (float64): one entry per system (:mod:`mlpmemory.systems`), keyed by its ``component``.
    ``systems`` defaults to those the components given provide; ``temperatures`` defaults to
    ``[knn.temperature]``. The memory is run in ``torch.inference_mode`` in its own dtype/device;
    its result is cached under ``memory_fingerprint`` (default: :func:`fingerprint_memory` of the
    module). ``choices``: ``{system: validation row}`` to score each system at (e.g. the chosen T).
    """
    from .systems import systems_for

    ds = _open_eval_dir(eval_dir)
    if systems is None:
        systems = systems_for(memory=memory, memory_fingerprint=memory_fingerprint, knn=knn, temperatures=temperatures)
    out: dict = {"lm": np.asarray(ds.lm_logprob, dtype=np.float64)}
    for system in systems:
        if system.component != "lm":
            out[system.component] = system.eval_logprobs(ds, choice=(choices or {}).get(system.name), batch=batch,
                                                         progress=progress)
    return out


# ---------------------------------------------------------------------------------------------
# Sweeps and the validation -> test protocol.
# ---------------------------------------------------------------------------------------------


def _row(system: str, lam, t, logp) -> dict:
    nll = mean_nll(logp)
    return {"system": system, "lambda": lam, "T": t, "ppl": math.exp(nll) if nll < 709 else math.inf, "nll": nll}


def sweep(components: dict, lambdas=DEFAULT_LAMBDAS, temperatures=None) -> list[dict]:
    """Rows ``{system, lambda, T, ppl, nll}`` (nll: mean nats/token): the base LM, then each system
    with a lambda (:func:`mlpmemory.systems.tuned`: the memory per lambda, then the kNN-LM per
    (T, lambda)) whose component is in ``components``. ``temperatures`` defaults to every T in
    ``components["knn"]``. lambda = 0 rows are the base LM's perplexity exactly."""
    from .systems import tuned

    lm = components["lm"]
    rows = [_row(BASE, None, None, lm)]
    lams = [float(x) for x in lambdas]
    for lam in lams:
        _check_lambda(lam)  # refuse a bad grid before any work
    for cls in tuned():
        if components.get(cls.component) is None:
            continue
        for t, scored in cls.variants(components[cls.component], temperatures).items():
            rows += [_row(cls.name, lam, t, mix_logprobs(lm, scored, lam)) for lam in lams]
    return rows


def choose(validation_rows: list[dict], system: str) -> dict:
    """The row of ``system`` with the lowest validation perplexity (ties: the first, i.e. smaller lambda)."""
    rows = [r for r in validation_rows if r["system"] == system]
    if not rows:
        raise MLPMemError(f"no validation rows for system {system!r} "
                          f"(have {sorted({r['system'] for r in validation_rows})})")
    return dict(min(rows, key=lambda r: r["ppl"]))


def check_compatible(valid_manifest: dict, test_manifest: dict, valid_dir=None, test_dir=None) -> None:
    """Refuse validation/test eval dirs whose perplexities would not be comparable."""
    for field in MATCH_FIELDS:
        if valid_manifest.get(field) != test_manifest.get(field):
            raise MLPMemError(f"validation eval dir {valid_dir} has {field}={valid_manifest.get(field)!r} but test "
                              f"eval dir {test_dir} has {test_manifest.get(field)!r}; build both with the same model, "
                              "dtype, capture sites, block and stride")


def _plot(rows: list[dict], chosen: dict, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = next(r["ppl"] for r in rows if r["system"] == BASE)
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base ({base:.2f})")
    mem = [r for r in rows if r["system"] == MEMORY]
    if mem:
        ax.plot([r["lambda"] for r in mem], [r["ppl"] for r in mem], marker="o", linewidth=2, label="+ MLP memory")
    temps = list(dict.fromkeys(r["T"] for r in rows if r["system"] == KNN_LM))
    for t in temps:
        kr = [r for r in rows if r["system"] == KNN_LM and r["T"] == t]
        ax.plot([r["lambda"] for r in kr], [r["ppl"] for r in kr], marker=".", linewidth=1,
                label=f"+ kNN-LM, T={t:.3g}")
    for c in chosen.values():
        if c is not None and math.isfinite(c["ppl"]):
            ax.plot([c["lambda"]], [c["ppl"]], marker="*", markersize=14, color="red", linestyle="none")
    finite = [r["ppl"] for r in rows if math.isfinite(r["ppl"])]
    if finite:  # keep the interesting range: up to twice the base perplexity
        ax.set_ylim(min(finite) * 0.98, min(max(finite), 2 * base) * 1.02)
    ax.set_xlabel("lambda (weight of the memory / kNN distribution)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _report_row(logp, n_bytes, lam=None, t=None) -> dict:
    nll = mean_nll(logp)
    total = nll * len(logp)
    return {"lambda": lam, "T": t, "ppl": math.exp(nll) if nll < 709 else math.inf, "nll": nll,
            "total_nll": total, "bits_per_byte": bits_per_byte(total, n_bytes) if n_bytes else None}


def _test_systems(systems, tc: dict, chosen: dict, n_bytes) -> dict:
    """Each system's test report at its validation choice, with its change against the base LM."""
    out = {}
    for system in systems:
        c = chosen.get(system.name)
        lam, t = (c["lambda"], c["T"]) if c is not None else (None, None)
        out[system.name] = {**_report_row(system.mixed(tc, lam, t), n_bytes, lam, t), **system.report_fields(tc, c)}
    base_ppl = out[BASE]["ppl"]
    for s in out.values():
        s["change_vs_base_pct"] = 100.0 * (s["ppl"] / base_ppl - 1.0) if math.isfinite(s["ppl"]) else None
    return out


def _open_pair(valid_dir, test_dir) -> tuple[dict, dict]:
    if Path(valid_dir).resolve() == Path(test_dir).resolve():
        raise MLPMemError(f"validation and test eval dirs are the same ({valid_dir}); settings chosen on a text "
                          "must be reported on another one")
    vm = read_manifest(valid_dir, "validation eval dir")
    tm = read_manifest(test_dir, "test eval dir")
    check_compatible(vm, tm, valid_dir, test_dir)
    return vm, tm


def evaluate_ppl(valid_dir, test_dir, out_dir, *, tokenizer=None, memory=None, memory_fingerprint: str | None = None,
                 knn: KNNLM | None = None, lambdas=DEFAULT_LAMBDAS, temperatures=None, batch: int = 4096,
                 progress: bool = True, rag: dict | None = None, systems=None) -> dict:
    """Choose each system's lambda (and the kNN-LM's T) on validation, report every system on test.

    ``systems`` (:mod:`mlpmemory.systems` instances) default to those ``memory``, ``knn`` and ``rag``
    provide, plus the base LM. Writes ``ppl.json`` (the report returned) and ``ppl_validation.png``
    (validation perplexity vs lambda: the memory, one line per T for the kNN-LM, the base as a
    horizontal line) into ``out_dir``. ``temperatures`` defaults to ``knn.temperature * 2**j`` for
    j = -2..2. With a ``tokenizer``, test bits per byte are reported too (UTF-8 bytes of the scored
    text). ``rag``: ``{"logprob": (N,) RAG log-probs of the test tokens, **fields}`` (from
    :func:`mlpmemory.rag.cached_ralm_logprobs`), reported as system ``rag`` with ``fields``
    (settings, seconds) added; it has no lambda and is scored on test only.
    """
    from .systems import get_system, systems_for, tuned

    valid_dir, test_dir, out_dir = Path(valid_dir), Path(test_dir), Path(out_dir)
    vm, tm = _open_pair(valid_dir, test_dir)
    lams = [float(x) for x in lambdas]
    if not lams:
        raise MLPMemError("lambdas must not be empty")
    if systems is None:
        systems = systems_for(memory=memory, memory_fingerprint=memory_fingerprint, knn=knn, temperatures=temperatures,
                              rag=rag)
    systems = [s.for_sweep() for s in systems if s.component != "lm"]
    systems = [get_system(BASE)(), *systems]
    swept = [s for s in systems if s.has_lambda]

    t0 = time.perf_counter()
    vc = score_components(valid_dir, systems=swept, batch=batch, progress=progress)
    vrows = sweep(vc, lams)
    chosen = {cls.name: None for cls in tuned()}
    chosen.update({s.name: choose(vrows, s.name) for s in swept})
    tc = score_components(test_dir, systems=[s for s in systems if s.component != "lm"], choices=chosen, batch=batch,
                          progress=progress)
    n_test = len(tc["lm"])
    n_bytes = decoded_bytes(tokenizer, open_datastore(test_dir).values) if tokenizer is not None else None
    settings = {"lambdas": lams, "temperatures": None, "memory_fingerprint": None, "knn": None}
    for s in systems:
        settings.update(s.settings())
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_name = "ppl_validation.png"
    result = {
        "model": tm.get("model"), "model_fingerprint": tm.get("model_fingerprint"), "dtype": tm.get("dtype"),
        "block": tm.get("block"), "stride": tm.get("stride"), "key_site": tm.get("key_site"),
        "mem_site": tm.get("mem_site"), "settings": settings,
        "validation": {"dir": str(valid_dir), "tokens_scored": len(vc["lm"]), "rows": vrows,
                       "chosen": chosen, "base_ppl": vrows[0]["ppl"]},
        "test": {"dir": str(test_dir), "tokens_scored": n_test, "bytes": n_bytes,
                 "systems": _test_systems(systems, tc, chosen, n_bytes)},
        "plot": plot_name, "seconds": round(time.perf_counter() - t0, 3),
    }
    title = (f"validation: {len(vc['lm']):,} tokens, block {tm.get('block')} / stride {tm.get('stride')}"
             + "".join(s.plot_note() for s in systems))
    _plot(vrows, chosen, out_dir / plot_name, title)
    safe = json_safe(result)
    atomic_write_json(out_dir / "ppl.json", safe)
    return safe


def format_ppl_table(result: dict) -> str:
    """The test systems of an :func:`evaluate_ppl` report as a Markdown table."""
    from .systems import REGISTRY

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| system | lambda | T | test PPL | change | bits/byte |", "|---|---|---|---|---|---|"]
    for name, s in result["test"]["systems"].items():
        name = REGISTRY[name].table_name(s) if name in REGISTRY else name
        lines.append(f"| {name} | {fmt(s['lambda'], 'g')} | {fmt(s['T'], '.4g')} | {fmt(s['ppl'], '.3f')} | "
                     f"{fmt(s['change_vs_base_pct'], '+.2f')}{'%' if s['change_vs_base_pct'] is not None else ''} | "
                     f"{fmt(s['bits_per_byte'], '.4f')} |")
    return "\n".join(lines)
