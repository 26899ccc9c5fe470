"""Mixing a base LM with a second next-token distribution: the MLP memory, or a kNN retriever.

The one home of the components' log-probs and of mixing: :func:`mix_logprobs` (and
:func:`mix_with_lm`, the mixing step applied to base-LM logits), :func:`memory_logprobs` /
:func:`memory_token_logprobs`, :func:`knn_dense_logprobs`, and :func:`mixing_hook`, the forward
hook that ``generate`` and the benchmarks install. :class:`MemoryAugmentedLM`, the eval-dir caches
(:mod:`mlpmemory.evaluate`) and the systems (:mod:`mlpmemory.systems`) all call these.

Why it is written this way:

- **Mixing happens in log space.** ``log p = logaddexp(log(1-lam) + log p_LM, log(lam) + log q)``
  (docs/method.md#mixing) is the exact log of ``(1-lam) p_LM + lam q`` without ever leaving log space,
  so tiny probabilities neither underflow nor round to zero. ``lam = 0`` returns the base
  log-probs *unchanged* (the same object, bit for bit) and ``lam = 1`` the other's, so "the
  augmented model at lambda 0 is the base model" holds exactly, not to a tolerance. A component
  that gives a token probability 0 contributes ``-inf``, which ``logaddexp`` handles exactly.
- **One base forward per call.** :class:`MemoryAugmentedLM` runs the frozen base LM once, with a
  forward pre-hook (:func:`mlpmemory.capture.capture_inputs`) on the module named by the
  memory's own ``config.input_site["module"]``, so the memory reads the very state it was
  trained on (the public code stores the layer in the checkpoint and never reads it back). No
  ``.cuda()`` anywhere: the wrapper runs wherever its two modules live.
- **The kNN-LM uses the same maths as the training targets.** :class:`KNNLM` calls
  :func:`mlpmemory.targets.knn_distribution` (no self-exclusion: held-out queries are not in the
  datastore; no thresholding: ``min_prob = 0``), so the baseline's ``p_kNN`` is exactly the
  distribution the memory was trained to imitate. There is **no probability floor**: a target
  none of the k neighbours carries gets ``log p_kNN = -inf`` (true value), and mixing with any
  ``lam < 1`` stays finite. Only kNN-alone perplexity (``lam = 1``) can then be infinite, which
  is the honest answer.
- **Vocabulary-sized buffers are sized by bytes.** Per-token scoring (eval, the datastore's
  ``lm_logprob``, RAG, QA, generation scoring) goes through :func:`chunked_target_logprobs`, a
  chunk of :func:`rows_per_chunk` rows at a time, and :func:`lm_scoring_forward` applies the LM head
  only to the scored rows; prefill mixing runs in chunks of the same budget. Memory grows with the bytes
  budget, not with rows x vocabulary (a 262k vocabulary is 1 MiB per float32 row).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from .config import DEFAULT_K
from .errors import MLPMemError


def _check_lambda(lam) -> float:
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise MLPMemError(f"lambda must be a number in [0, 1], got {lam!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise MLPMemError(f"lambda must be in [0, 1], got {lam!r}")
    return value


def mix_logprobs(lm_logp, other_logp, lam):
    """``log((1 - lam) * exp(lm_logp) + lam * exp(other_logp))``, element-wise, in log space.

    Works on torch tensors (result follows ``lm_logp``'s device) and numpy arrays. ``lam = 0``
    returns ``lm_logp`` itself and ``lam = 1`` returns ``other_logp`` itself, so both ends are
    exact. ``-inf`` entries (probability 0) are handled exactly.
    """
    lam = _check_lambda(lam)
    if lam == 0.0:
        return lm_logp
    if lam == 1.0:
        return other_logp
    a, b = math.log1p(-lam), math.log(lam)
    if isinstance(lm_logp, torch.Tensor) or isinstance(other_logp, torch.Tensor):
        ref = lm_logp if isinstance(lm_logp, torch.Tensor) else other_logp
        x = torch.as_tensor(lm_logp, device=ref.device)
        y = torch.as_tensor(other_logp, device=ref.device)
        return torch.logaddexp(x + a, y + b)
    return np.logaddexp(np.asarray(lm_logp) + a, np.asarray(other_logp) + b)


def mix_with_lm(lm_logits, other_logp, lam):
    """The mixing step on a base LM's raw ``logits``: their float32 log-softmax mixed with ``other_logp``.

    Shared by :meth:`MemoryAugmentedLM.forward` and :func:`mixing_hook`. At ``lam = 0`` the result is
    exactly the base log-softmax (``other_logp`` is not read and may be None).
    """
    return mix_logprobs(torch.log_softmax(lm_logits.float(), dim=-1), other_logp, lam)


def section(timer, name: str):
    """``timer.section(name)`` (a :class:`mlpmemory.generation.StageTimer`), or nothing without a timer."""
    return timer.section(name) if timer is not None else nullcontext()


def _module_device_dtype(module: torch.nn.Module, fallback_device=None) -> tuple[torch.device, torch.dtype | None]:
    for p in module.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device(fallback_device or "cpu"), None


def memory_logprobs(memory: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """log-softmax (float32) of ``memory``'s logits on ``hidden``, run on the memory's device and dtype."""
    device, dtype = _module_device_dtype(memory, hidden.device)
    logits = memory(hidden.to(device=device, dtype=dtype or hidden.dtype))
    return torch.log_softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# Vocabulary-sized buffers, sized by bytes: per-token log-probs a chunk of rows at a time.
# ---------------------------------------------------------------------------------------------

LOGPROB_CHUNK_BYTES = 256 << 20  # float32 scratch per chunk: 682 rows of a 49k vocabulary, 128 of 262k
LOGSOFTMAX_TILE_BYTES = 1 << 20  # CPU: float32 rows per log-softmax call, sized to stay in L2 (target_logprobs)


def rows_per_chunk(vocab: int, bytes_budget: int | None = None) -> int:
    """Rows whose float32 scratch in :func:`target_logprobs` (the float32 logits and their log-softmax,
    8 bytes per vocabulary entry) fits in ``bytes_budget`` bytes (default :data:`LOGPROB_CHUNK_BYTES`,
    read at call time); at least 1."""
    budget = LOGPROB_CHUNK_BYTES if bytes_budget is None else bytes_budget
    return max(1, int(budget) // (8 * max(1, int(vocab))))


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())`` at ``targets`` (float32, (N,)) of (N, V) logits.

    The log-softmax kernel itself, on the rows it is given: its result for a row does not depend on
    the other rows, so scoring in chunks is bit for bit the unchunked result (a logsumexp-and-subtract
    version saves one buffer but differs by float32 rounding, ~2e-5 at V = 262k, and would change
    stored numbers). Callers bound N with :func:`rows_per_chunk`.

    On the CPU the rows go through in tiles of :data:`LOGSOFTMAX_TILE_BYTES` of float32 (5 rows of a
    49k vocabulary), which stay in the core's L2 cache: the same numbers bit for bit (each row's
    log-softmax is computed alone either way), 2.4x faster on SmolLM2's vocabulary (a 682-row chunk
    went from 77 ms to 32 ms on a 2-core Xeon), where a whole chunk's float32 copy and result are
    memory-bound passes over 134 MB each. On a GPU the whole chunk is one kernel.
    """
    targets = targets.to(logits.device)
    tile = len(logits) if logits.device.type != "cpu" else max(1, LOGSOFTMAX_TILE_BYTES // (4 * logits.shape[-1]))
    if len(logits) <= tile:
        return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return torch.cat([torch.log_softmax(logits[s:s + tile].float(), -1).gather(-1, targets[s:s + tile, None])[:, 0]
                      for s in range(0, len(logits), tile)])


def chunked_target_logprobs(logits_of, targets, vocab: int, bytes_budget: int | None = None) -> torch.Tensor:
    """log p(targets[i]) (float32, (N,)) of N rows whose logits ``logits_of(start, stop)`` gives, in
    chunks of :func:`rows_per_chunk` rows: no (N, V) buffer is ever built, whatever N and V are.

    ``logits_of`` returns the (stop - start, V) logits of rows ``[start, stop)`` (any dtype); each
    chunk goes through :func:`target_logprobs`. The result is on the logits' device.
    """
    targets = torch.as_tensor(targets, dtype=torch.int64)
    step = rows_per_chunk(vocab, bytes_budget)
    parts = [target_logprobs(logits_of(s, min(len(targets), s + step)), targets[s:s + step])
             for s in range(0, len(targets), step)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32, device=targets.device)


def head_target_logprobs(head, rows: torch.Tensor, targets, vocab: int, bytes_budget: int | None = None,
                         forward_rows: int = 0) -> torch.Tensor:
    """:func:`chunked_target_logprobs` of ``head(rows)`` (``rows``: (N, d) inputs of an output head).

    Every head matmul sees the same row count, ``min(rows_per_chunk, max(N, forward_rows))``, the
    last chunk zero-padded (the padding's logits are dropped): ``forward_rows`` is how many rows the
    model's own forward would have given its head. CPU GEMM kernels are chosen by row count, and
    bf16 logits from another kernel can differ by one unit in the last place; measured on SmolLM2
    in bf16, 682-row chunks give bit for bit the logits of whole-window forwards (4,096 rows), while
    a 257-row tail chunk changed 11 of 4,095 stored log-probs and QA scoring on its ~290 scored rows
    changed 40 of 873 (a padded 682-row chunk: none).
    """
    step = min(rows_per_chunk(vocab, bytes_budget), max(len(rows), int(forward_rows)))

    def logits_of(s: int, e: int) -> torch.Tensor:
        x = rows[s:e]
        if e - s < step:
            x = torch.cat([x, x.new_zeros(step - (e - s), *x.shape[1:])])
        return head(x)[:e - s]

    return chunked_target_logprobs(logits_of, targets, vocab, bytes_budget)


def _memory_head(memory: torch.nn.Module, hidden: torch.Tensor):
    """``(rows, head, vocab)``: ``memory(hidden)`` is ``head(rows)``, in the memory's device and dtype.

    An :class:`mlpmemory.memory.MLPMemory` (``hidden_forward`` + ``lm_head``) runs its blocks on all N
    rows at once, exactly as ``memory(hidden)`` does (their matmuls see the same row count, so the
    same kernels and bits), and only the head per chunk; any other module runs per chunk.
    """
    device, dtype = _module_device_dtype(memory, hidden.device)
    trunk, head = getattr(memory, "hidden_forward", None), getattr(memory, "lm_head", None)
    try:
        x = hidden.to(device=device, dtype=dtype or hidden.dtype)
        if callable(trunk) and isinstance(head, torch.nn.Linear):
            return trunk(x), head, head.out_features
        vocab = getattr(getattr(memory, "config", None), "vocab_size", None) or memory(x[:1]).shape[-1]
    except RuntimeError as err:
        raise _unreadable(hidden, err) from None
    return x, memory, int(vocab)


def _unreadable(hidden: torch.Tensor, err: RuntimeError) -> MLPMemError:
    return MLPMemError(f"the memory cannot read these inputs (width {hidden.shape[-1]}): {str(err).splitlines()[0]}")


def memory_token_logprobs(memory: torch.nn.Module, hidden: torch.Tensor, targets,
                          bytes_budget: int | None = None) -> torch.Tensor:
    """log p_MLP(target) (float32, (N,), on the memory's device) of N hidden states and their N targets,
    the vocabulary-sized work in chunks of :func:`rows_per_chunk` rows (no (N, V) buffer)."""
    device, _ = _module_device_dtype(memory, hidden.device)
    tgt = torch.as_tensor(targets, dtype=torch.int64).to(device)
    if not len(tgt):
        return torch.zeros(0, dtype=torch.float32, device=device)
    rows, head, vocab = _memory_head(memory, hidden)
    if vocab <= int(tgt.max()):
        raise MLPMemError(f"the memory predicts {vocab} tokens but the text holds id {int(tgt.max())}; "
                          "use a memory trained for this base LM")
    try:
        return head_target_logprobs(head, rows, tgt, vocab, bytes_budget)
    except RuntimeError as err:
        raise _unreadable(hidden, err) from None


# Causal LMs whose logits are exactly ``get_output_embeddings()(final hidden state)``, soft-capped by
# ``final_logit_softcapping`` where the config has one (Gemma 2/3). Others (Cohere's logit_scale,
# Granite's logits_scaling ...) are scored from the model's own logits.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                              "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "olmo2",
                              "smollm3"})


def output_head(model):
    """``hidden (N, d) -> logits (N, V)`` equal to the HF causal LM ``model``'s own logits, or None when
    they cannot be reproduced from its output embeddings (then score :func:`lm_scored_logprobs`'s way)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = model.config
    if (not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model
            or getattr(cfg, "model_type", None) not in PLAIN_HEAD_TYPES):
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(hidden: torch.Tensor) -> torch.Tensor:  # the op order of Gemma2/3ForCausalLM.forward
        logits = head(hidden) / cap
        return torch.tanh(logits) * cap

    return capped


def lm_scoring_forward(model, bytes_budget: int | None = None, **inputs):
    """One forward of the HF causal LM ``model`` on ``inputs`` for per-token scoring: ``(states, score)``.

    Where :func:`output_head` reproduces the model's logits, only the backbone runs and ``states`` are
    its final hidden states (B, T, d), so no (B, T, V) logits exist; otherwise ``states`` are the
    model's own logits (B, T, V). ``score(rows, targets)`` gives log p_LM(target) (float32, (N,)) of
    N rows picked from ``states``, :func:`rows_per_chunk` rows at a time. Forward hooks on the
    model's modules (captures) fire either way. ``inputs``: ``input_ids``, ``attention_mask`` ...; an
    int ``logits_to_keep`` (n > 0: the last n positions) applies to ``states`` in both cases.
    """
    head = output_head(model)
    if head is None:
        logits = model(**inputs).logits
        return logits, lambda x, t: chunked_target_logprobs(lambda s, e: x[s:e], t, x.shape[-1], bytes_budget)
    vocab = model.get_output_embeddings().weight.shape[0]
    keep = int(inputs.pop("logits_to_keep", 0) or 0)
    hidden = model.base_model(**inputs)[0]
    hidden = hidden[:, -keep:] if keep else hidden

    def score(rows: torch.Tensor, targets) -> torch.Tensor:
        return head_target_logprobs(head, rows, targets, vocab, bytes_budget, hidden.shape[0] * hidden.shape[1])

    return hidden, score


def memory_dense_logprobs(memory: torch.nn.Module, hidden: torch.Tensor, vocab: int, timer=None) -> torch.Tensor:
    """Dense log p_MLP (float32, (N, V)) of N hidden states, checked against the base LM's vocabulary."""
    with section(timer, "memory_forward"):
        q = memory_logprobs(memory, hidden)
    if q.shape[-1] != vocab:
        raise MLPMemError(f"the memory gives {q.shape[-1]} log-probs per position but the base LM {vocab}; "
                          "the memory's vocabulary must equal the base LM's")
    return q


def knn_dense_logprobs(knn, hidden: torch.Tensor, vocab: int, timer=None) -> torch.Tensor:
    """Dense log p_kNN (float32, (N, V), -inf where no neighbour has the token) on ``hidden``'s device."""
    with section(timer, "search"):
        dists, ids = knn.search(hidden)
    with section(timer, "distribution"):
        offsets, toks, probs = knn.distribution(dists, ids)
        if len(toks) and int(toks.max()) >= vocab:
            raise MLPMemError(f"the datastore holds token id {int(toks.max())} but the model's vocabulary has {vocab}; "
                              "the kNN-LM belongs to another tokenizer")
        n = len(offsets) - 1
        rows = torch.from_numpy(np.repeat(np.arange(n), np.diff(offsets))).to(hidden.device)
        dense = torch.zeros(n, vocab, dtype=torch.float32, device=hidden.device)
        dense.index_put_((rows, torch.from_numpy(np.asarray(toks, np.int64)).to(hidden.device)),
                         torch.from_numpy(np.asarray(probs, np.float32)).to(hidden.device), accumulate=True)
        return dense.log()


def resolve_input_site(model, spec):
    """:func:`mlpmemory.capture.resolve_site`, with an error that names the likely cause."""
    from .capture import resolve_site

    try:
        return resolve_site(model, spec)
    except (IndexError, KeyError) as e:  # e.g. "model.layers.40.mlp" on a 30-layer model
        raise MLPMemError(f"model {type(model).__name__} has no module {spec!r} ({e}); the memory or datastore "
                          "was built on another base LM, or pass input_site= explicitly") from None


def _mix_rows(logits: torch.Tensor, hidden: torch.Tensor, component, lam: float, timer) -> torch.Tensor:
    """Mixed log-probs (float32, (N, V)) of N rows of base logits and the component on their hidden
    states, a quarter of :func:`rows_per_chunk` rows at a time: one float32 (N, V) result, bounded
    scratch. A decode step (N = batch, up to 32 rows at V = 262k) is one chunk, computed exactly as
    without chunking."""
    n, vocab = logits.shape
    step = max(1, rows_per_chunk(vocab) // 4)  # ~8 float32 buffers per chunk: both log-softmaxes, logaddexp's terms

    def mix(s: int, e: int) -> torch.Tensor:
        q = component(hidden[s:e], vocab, timer).to(logits.device)
        with section(timer, "mixing"):
            return mix_with_lm(logits[s:e], q, lam)

    if n <= step:
        return mix(0, n)
    out = torch.empty(n, vocab, dtype=torch.float32, device=logits.device)
    for s in range(0, n, step):
        out[s:s + step] = mix(s, min(n, s + step))
    return out


@contextmanager
def mixing_hook(model, site_spec, component, lam: float, timer=None):
    """While active, every forward of the HF causal LM ``model`` returns ``logits`` replaced by the
    mixed log-probabilities (float32) at the positions the model returned logits for.

    ``component(hidden (N, d), vocab, timer)`` gives the other distribution's dense log-probs
    ``(N, V)`` from the input of the module ``site_spec``, captured in the same forward (popped:
    a stale state is never reused). Only the positions HF asked logits for are computed.
    """
    from .capture import capture_inputs

    site = resolve_input_site(model, site_spec)

    def replace_logits(module, args, kwargs, output):
        logits = output.logits if hasattr(output, "logits") else output[0]
        if logits is None:
            return output
        hidden = captured.pop(site.module_path, None)
        if hidden is None:
            raise MLPMemError(f"the base LM never called {site.module_path} in this forward; the memory's input site "
                              "does not belong to this model")
        n_pos = logits.shape[1]
        if hidden.shape[1] < n_pos:
            raise MLPMemError(f"the model returned logits for {n_pos} positions but {site.module_path} saw only "
                              f"{hidden.shape[1]}")
        b, vocab = logits.shape[0], logits.shape[-1]
        h = hidden[:, hidden.shape[1] - n_pos:].reshape(b * n_pos, hidden.shape[-1])  # only where logits are wanted
        mixed = _mix_rows(logits.reshape(b * n_pos, vocab), h, component, lam, timer).reshape(b, n_pos, vocab)
        if hasattr(output, "logits"):
            output.logits = mixed
            return output
        return (mixed, *output[1:])

    with capture_inputs(model, [site]) as captured:
        handle = model.register_forward_hook(replace_logits, with_kwargs=True)
        try:
            yield model
        finally:
            handle.remove()


def memory_input_module(memory) -> str:
    """The base-LM module whose input the memory reads, from ``memory.config.input_site``."""
    site = getattr(getattr(memory, "config", None), "input_site", None)
    module = site.get("module") if isinstance(site, dict) else site
    if not module:
        raise MLPMemError("the memory does not say where its input comes from (config.input_site['module']); "
                          "pass input_site='<module path>' explicitly")
    return str(module)


class MemoryAugmentedLM(torch.nn.Module):
    """A frozen HF causal LM plus an MLP memory, mixed with weight ``lam`` (docs/method.md#mixing).

    ``base`` is a ``transformers`` causal LM (or a :class:`mlpmemory.models.LoadedModel`, whose
    ``.model`` is used); ``memory`` is any module mapping hidden states ``(..., d)`` to logits
    ``(..., V)``. ``lam`` defaults to ``memory.config.lambda_default``; ``input_site`` (a module
    path or a site spec for :func:`mlpmemory.capture.resolve_site`) defaults to
    ``memory.config.input_site["module"]``. Both modules are registered, so ``.to(device)``
    moves the pair. Grad mode is the caller's (wrap evaluation in ``torch.inference_mode()``).
    """

    def __init__(self, base, memory: torch.nn.Module, lam: float | None = None, input_site=None):
        super().__init__()
        self.base = getattr(base, "model", base) if not isinstance(base, torch.nn.Module) else base
        self.memory = memory
        if lam is None:
            lam = getattr(getattr(memory, "config", None), "lambda_default", None)
            if lam is None:
                raise MLPMemError("no lambda given and the memory has no config.lambda_default; pass lam=")
        self.lam = _check_lambda(lam)
        self.site = resolve_input_site(self.base, input_site if input_site is not None else memory_input_module(memory))

    def memory_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log-softmax (float32) of the memory's logits on hidden states from the input site."""
        return memory_logprobs(self.memory, hidden)

    def forward(self, input_ids, attention_mask=None, *, return_base_output: bool = False, **kwargs):
        """Mixed next-token log-probabilities ``(B, T, V)``, float32, on the base LM's device.

        One forward of the base LM (extra ``kwargs`` go to it). With ``return_base_output`` the
        base model's output object (logits, past_key_values ...) comes back too, as a pair.
        At ``lam = 0`` the memory is not run and the result is exactly the base log-softmax.
        """
        from .capture import capture_inputs

        with capture_inputs(self.base, [self.site]) as cap:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mem_logp = None
        if self.lam != 0.0:
            if self.site.module_path not in cap:
                raise MLPMemError(f"the base LM never called {self.site.module_path}; the memory's input site does "
                                  "not belong to this model")
            mem_logp = self.memory_logprobs(cap[self.site.module_path]).to(out.logits.device)
            if mem_logp.shape != out.logits.shape:
                raise MLPMemError(f"memory gives {tuple(mem_logp.shape)} log-probs but the base LM "
                                  f"{tuple(out.logits.shape)}; the memory's vocabulary must equal the base LM's")
        mixed = mix_with_lm(out.logits, mem_logp, self.lam)
        return (mixed, out) if return_base_output else mixed


class KNNLM:
    """A kNN-LM (docs/method.md#baselines): FAISS index over datastore keys + the datastore's next tokens.

    ``index`` searches squared L2 over keys captured at the datastore's key site; ``values`` are
    the datastore's int32 next tokens (a memmap is fine); ``k`` neighbours are softmaxed at
    ``temperature`` over ``-distance``. ``lam`` is the kNN weight when mixing with the base LM.
    ``fingerprint`` identifies index + values for caches; :meth:`from_dirs` derives it from the
    manifests, otherwise it is hashed from the serialised index and the values on first use.
    """

    def __init__(self, index, values, *, k: int = DEFAULT_K, temperature: float = 1.0, lam: float = 0.25,
                 fingerprint: str | None = None, datastore_manifest: dict | None = None,
                 vocab_size: int | None = None, search_batch: int = 1024):
        if k < 1:
            raise MLPMemError(f"k must be >= 1, got {k}")
        if not float(temperature) > 0:
            raise MLPMemError(f"temperature must be > 0, got {temperature}")
        if len(values) != index.ntotal:
            raise MLPMemError(f"the index holds {index.ntotal} keys but there are {len(values)} values; "
                              "use the datastore the index was built from")
        self.index = index
        self.values = values
        self.k = int(min(k, index.ntotal))
        self.temperature = float(temperature)
        self.lam = _check_lambda(lam)
        self.datastore_manifest = datastore_manifest
        self.vocab_size = vocab_size
        self.search_batch = int(search_batch)
        self._fingerprint = fingerprint

    @classmethod
    def from_dirs(cls, index_dir, datastore_dir, *, k: int = DEFAULT_K, temperature: float = 1.0, lam: float = 0.25,
                  nprobe: int | None = None, vocab_size: int | None = None, search_batch: int = 1024) -> KNNLM:
        """Load a built index and its datastore (checked to belong together)."""
        from .datastore import open_datastore
        from .index import index_fingerprint, load_index
        from .io import sha256_json

        ds = open_datastore(datastore_dir)
        index, _ = load_index(index_dir, ds.manifest, nprobe=nprobe, verify_sha256=True)
        fp = sha256_json({"index": index_fingerprint(index_dir), "datastore": sha256_json(ds.manifest),
                          "nprobe": nprobe})
        return cls(index, ds.values, k=k, temperature=temperature, lam=lam, fingerprint=fp,
                   datastore_manifest=ds.manifest, vocab_size=vocab_size, search_batch=search_batch)

    @property
    def fingerprint(self) -> str:
        """Identity of index + values (hashing the serialised index: a full read, done once)."""
        if self._fingerprint is None:
            import faiss

            h = hashlib.sha256()
            h.update(np.ascontiguousarray(faiss.serialize_index(self.index)).tobytes())
            h.update(np.ascontiguousarray(self.values, dtype=np.int32).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def search(self, queries) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest datastore rows of each query: (D float32 (B, k), I int64 (B, k))."""
        from .targets import search_neighbours

        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise MLPMemError(f"kNN queries must be (B, {self.index.d}), got {queries.shape}; "
                              "use hidden states from the datastore's key site")
        return search_neighbours(self.index, queries, self.k, self.search_batch)

    def distribution(self, dists, ids, temperature: float | None = None):
        """Sparse p_kNN of searched queries as CSR (offsets, token_ids, probs); see knn_distribution."""
        from .targets import knn_distribution

        t = self.temperature if temperature is None else float(temperature)
        return knn_distribution(dists, ids, None, self.values, self.k, t, 0.0)

    def logprob_from_search(self, dists, ids, targets, temperature: float | None = None) -> np.ndarray:
        """log p_kNN(target) (float64, (B,)) from a finished search; -inf where no neighbour has it."""
        offsets, toks, probs = self.distribution(dists, ids, temperature)
        b = len(offsets) - 1
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(targets) != b:
            raise MLPMemError(f"{b} queries but {len(targets)} targets")
        rows = np.repeat(np.arange(b), np.diff(offsets))
        hit = toks == targets[rows]
        p = np.bincount(rows[hit], weights=probs[hit].astype(np.float64), minlength=b)
        with np.errstate(divide="ignore"):
            return np.log(p)

    def knn_logprob_of(self, queries, targets, temperature: float | None = None) -> np.ndarray:
        """log p_kNN(target | query) for each of B queries: float64 (B,), ``-inf`` if absent."""
        dists, ids = self.search(queries)
        return self.logprob_from_search(dists, ids, targets, temperature)

    def knn_logprobs_full(self, queries, temperature: float | None = None, vocab_size: int | None = None) -> np.ndarray:
        """Dense log p_kNN over the vocabulary: float32 (B, V), ``-inf`` for tokens no neighbour has."""
        v = vocab_size or self.vocab_size
        if v is None:
            raise MLPMemError("knn_logprobs_full needs the vocabulary size: pass vocab_size= (here or to KNNLM)")
        dists, ids = self.search(queries)
        offsets, toks, probs = self.distribution(dists, ids, temperature)
        if len(toks) and int(toks.max()) >= v:
            raise MLPMemError(f"the datastore holds token id {int(toks.max())} >= vocab_size {v}")
        dense = np.zeros((len(offsets) - 1, v), np.float32)
        dense[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), toks] = probs
        with np.errstate(divide="ignore"):
            return np.log(dense)

