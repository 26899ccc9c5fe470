"""Text generation with any system of :mod:`mlpmemory.systems` through Hugging Face ``generate``.

Why it is built with hooks rather than a decoding loop of our own:

- **Every HF decoding strategy for free.** :func:`augmented` puts two hooks on the unchanged base
  model: a forward pre-hook on the module whose input the memory reads (``memory.config.
  input_site``; for the kNN-LM the datastore's key site), and a forward hook on the causal LM
  itself that replaces ``output.logits`` by the mixed log-probabilities
  ``log((1 - lam) p_LM + lam q)``. Log-probs are valid logits, so greedy search, sampling
  (temperature / top-k / top-p), beam search, repetition penalties, stop strings and streamers
  all behave exactly as for any HF model; the public MLP Memory code only did greedy search, with
  an off-by-one token count and a dropped attention mask (docs/method.md#traps-avoided).
- **The base KV cache is the only state.** The memory is stateless per position (no attention): it reads
  one hidden state and returns one distribution, so with the cache the hook sees just the new
  position's hidden state, and the result is exact. It runs only for the positions HF asked
  logits for (``generate`` passes ``logits_to_keep=1``, so the prefill computes the memory for the
  last prompt position only, never for the whole prompt).
- **kNN-LM through the same hook.** ``KNNLM.search`` + ``KNNLM.distribution`` give the sparse
  p_kNN of each new position, scattered into a dense (B, V) row and mixed the same way, so both
  systems are compared by the same decoding code: each system's ``hook`` is
  :func:`mlpmemory.inference.mixing_hook` with its own dense log-probs. :class:`StageTimer` splits the time spent
  in ``memory_forward`` / ``search`` / ``distribution`` / ``mixing`` for the benchmarks.
- **Left padding done by hand.** Prompts are tokenised one by one and left-padded here, so the
  caller's tokenizer is never mutated (padding side, pad token), and the continuation's token ids
  are exactly what the tokenizer gives for the prompt alone.
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MLPMemError

STAGES = ("memory_forward", "search", "distribution", "mixing")


# --------------------------------------------------------------------------------------------------
# Timing and the hooks

class StageTimer:
    """Seconds and calls per named stage. With a CUDA ``device`` each section synchronises before
    starting and before stopping, so asynchronous kernels are charged to the right stage."""

    def __init__(self, device=None):
        device = torch.device(device) if device is not None else None
        self._sync = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self._device = device
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _synchronize(self):
        if self._sync:
            torch.cuda.synchronize(self._device)

    @contextmanager
    def section(self, name: str):
        self._synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t
            self.counts[name] = self.counts.get(name, 0) + 1


def _system_of(memory=None, knn=None, system=None):
    """The :mod:`mlpmemory.systems` instance of a call's ``memory`` / ``knn`` / ``system`` (the base LM without any)."""
    from .systems import BaseLM, KNNLMSystem, MemorySystem

    if sum(x is not None for x in (memory, knn, system)) > 1:
        raise MLPMemError("mix the base LM with the memory or with the kNN-LM, not both at once")
    if system is not None:
        return system
    return MemorySystem(memory) if memory is not None else KNNLMSystem(knn) if knn is not None else BaseLM()


@contextmanager
def augmented(model, *, memory=None, knn=None, lam: float, timer: StageTimer | None = None, system=None):
    """While active, every forward of the HF causal LM ``model`` returns ``logits`` replaced by the
    mixed log-probabilities (float32) at the positions the model returned logits for.

    ``memory`` (an MLP memory), ``knn`` (a :class:`mlpmemory.inference.KNNLM`) or ``system`` (any
    :mod:`mlpmemory.systems` instance) gives ``q``; the hook is the system's own
    (:func:`mlpmemory.inference.mixing_hook`); at ``lam == 0`` or without a mixing system, no hook
    is installed and the model is untouched.
    """
    from .inference import _check_lambda

    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    lam = _check_lambda(lam)
    with _system_of(memory, knn, system).hook(model, lam, timer if timer is not None else StageTimer()) as m:
        yield m


# --------------------------------------------------------------------------------------------------
# generate / score

@dataclass
class GenerationOutput:
    texts: list[str]  # continuation only, cut before the first stop string
    token_ids: list[list[int]]  # generated ids up to and including EOS / the token completing a stop string
    ttft_s: list[float]  # per prompt: from its batch's start to the first generated token
    seconds: float  # wall-clock of all generate calls
    new_tokens: int  # sum of len(token_ids)
    stage_seconds: dict = field(default_factory=dict)  # StageTimer totals (memory_forward, search, ...)


def _first_call_criterion(device: torch.device):
    """A StoppingCriteria that never stops and records its first call: HF calls stopping criteria
    once per step, right after the new token exists, so that call is the first token's time."""
    from transformers import StoppingCriteria

    class FirstToken(StoppingCriteria):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.at is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FirstToken()


def _ids_of(tokenizer, prompt: str, i: int) -> list[int]:
    """The prompt tokenised with the tokenizer's defaults, its BOS (:func:`mlpmemory.models.bos_prefix`)
    exactly once even when the text already starts with it (a chat template's ``{{ bos_token }}``)."""
    from .models import bos_prefix

    ids = list(tokenizer(prompt).input_ids)
    prefix = bos_prefix(tokenizer)
    if prefix and ids[len(prefix):2 * len(prefix)] == prefix:
        ids = ids[len(prefix):]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise MLPMemError(f"prompt {i} is empty and the tokenizer has no BOS token; "
                              "give at least one token of text")
        ids = [tokenizer.bos_token_id]
    return ids


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` ({"role", "content"} dicts) through the tokenizer's chat template, the assistant's
    turn opened; a BOS the template writes is dropped when the tokenizer adds it again."""
    if not getattr(tokenizer, "chat_template", None):
        raise MLPMemError("the tokenizer has no chat template; use plain completions instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(x) for x in ids}


def _finish_row(gen: list[int], tokenizer, eos: set[int], pad: int, stops: list[str]) -> tuple[list[int], str]:
    """Generated ids up to EOS / the token completing a stop string, and the text cut before the stop."""
    end = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    if end == len(gen) and stops and pad not in eos:  # HF fills rows a stop string finished with pad: drop them
        while end and gen[end - 1] == pad:
            end -= 1
    if stops:  # the first prefix whose generated text holds a stop string is where stop_on_generated_text fired
        for n in range(1, end + 1):
            if any(s in tokenizer.decode(gen[:n], skip_special_tokens=True) for s in stops):
                end = n
                break
    text = tokenizer.decode(gen[:end], skip_special_tokens=True)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return gen[:end], text[:cut] if cut >= 0 else text


def _generation_config(model, tok, eos: set[int], *, max_new_tokens, do_sample, sample_temperature, top_k, top_p,
                       num_beams):
    """A copy of the model's generation config with this call's settings; (config, pad id). Stop strings
    are not HF's (:func:`stop_on_generated_text`)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos) if eos else 0
    gc = copy.deepcopy(model.generation_config)
    gc.update(max_new_tokens=int(max_new_tokens), min_new_tokens=None, min_length=0, do_sample=bool(do_sample),
              num_beams=int(num_beams), num_return_sequences=1, pad_token_id=int(pad),
              temperature=float(sample_temperature) if do_sample else None, top_k=top_k if do_sample else None,
              top_p=top_p if do_sample else None, stop_strings=None, return_dict_in_generate=False)
    if gc.eos_token_id is None and eos:
        gc.eos_token_id = sorted(eos)
    return gc, int(pad)


def stop_on_generated_text(tokenizer, stops: list[str], prompt_width: int):
    """A StoppingCriteria: a row is done once its *generated* text holds a stop string. HF's own
    ``stop_strings`` also fire on a stop string that begins inside the prompt (prompt "...of", stop
    "ff": it stops after one "f"), which is not what a caller of a stop string means."""
    from transformers import StoppingCriteria

    class StopOnGeneratedText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [any(s in tokenizer.decode(row[prompt_width:], skip_special_tokens=True) for s in stops)
                    for row in input_ids.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnGeneratedText()


def _left_padded(chunk: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists, left-padded: every prompt ends at the last column."""
    width = max(len(x) for x in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, ids in enumerate(chunk):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        mask[r, width - len(ids):] = 1
    return input_ids, mask


def _generate_batch(model, tok, chunk, gc, pad, eos, stops, streamer, device) -> tuple[list, list, list, float]:
    """One HF generate call: (token ids, texts, time to first token per row, seconds)."""
    from transformers import StoppingCriteriaList

    input_ids, mask = _left_padded(chunk, pad)
    first = _first_call_criterion(device)
    criteria = [first] + ([stop_on_generated_text(tok, stops, input_ids.shape[1])] if stops else [])
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                         stopping_criteria=StoppingCriteriaList(criteria), streamer=streamer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    rows = [_finish_row(row, tok, eos, pad, stops) for row in out[:, input_ids.shape[1]:].tolist()]
    ttft = [(first.at if first.at is not None else t1) - t0] * len(rows)
    return [r[0] for r in rows], [r[1] for r in rows], ttft, t1 - t0


def generate(lm, prompts, *, memory=None, knn=None, lam: float = 0.0, max_new_tokens: int = 32, do_sample: bool = False,
             sample_temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             stop_strings=None, seed: int | None = None, batch_size: int = 8, streamer=None,
             timer: StageTimer | None = None, progress: bool = False, system=None) -> GenerationOutput:
    """Generate continuations of ``prompts`` with HF ``generate`` on the base LM mixed with ``memory``
    or ``knn`` (or any :mod:`mlpmemory.systems` ``system``) at weight ``lam`` (see :func:`augmented`).
    ``lm`` is a LoadedModel (model + tokenizer). Prompts are used as given: a system's prompt
    transform (RAG) is the caller's (``system.transform_prompts``).

    Batches of ``batch_size`` left-padded prompts; at most ``max_new_tokens`` new tokens each (fewer
    only at EOS or a stop string); ``top_k`` / ``top_p`` of None mean no such filtering. ``seed``
    makes sampling reproducible without touching the caller's global RNG state.
    """
    from tqdm.auto import tqdm

    model, tok = lm.model, lm.tokenizer
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_new_tokens < 1 or batch_size < 1 or num_beams < 1:
        raise MLPMemError("max_new_tokens, batch_size and num_beams must be >= 1")
    stops = [stop_strings] if isinstance(stop_strings, str) else [s for s in (stop_strings or []) if s]
    device = next(model.parameters()).device
    timer = timer if timer is not None else StageTimer()
    eos = _eos_ids(model, tok)
    gc, pad = _generation_config(model, tok, eos, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 sample_temperature=sample_temperature, top_k=top_k, top_p=top_p, num_beams=num_beams)
    all_ids = [_ids_of(tok, p, i) for i, p in enumerate(prompts)]
    texts, token_ids, ttft = [], [], []
    seconds = 0.0
    cuda_ids = ([device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda"
                else [])
    rng = torch.random.fork_rng(devices=cuda_ids) if seed is not None else nullcontext()
    with rng, torch.inference_mode(), augmented(model, memory=memory, knn=knn, system=system, lam=lam, timer=timer):
        if seed is not None:
            torch.manual_seed(int(seed))
        for start in tqdm(range(0, len(all_ids), batch_size), desc="generate", unit="batch", disable=not progress,
                          file=sys.stderr):
            ids, txt, tt, sec = _generate_batch(model, tok, all_ids[start:start + batch_size], gc, pad, eos, stops,
                                                streamer, device)
            token_ids += ids
            texts += txt
            ttft += tt
            seconds += sec
    return GenerationOutput(texts=texts, token_ids=token_ids, ttft_s=ttft, seconds=seconds,
                            new_tokens=sum(len(x) for x in token_ids), stage_seconds=dict(timer.totals))


def _right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, s in enumerate(seqs):
        input_ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return input_ids, mask


def _score_batch(model, systems: dict, sites: dict, batch: list[tuple[list[int], list[int]]], pad: int, device) -> list:
    """Per pair of the batch: {"lm": ..., component: ...} log-probs of its continuation's tokens."""
    from .capture import capture_inputs
    from .inference import lm_scoring_forward

    input_ids, mask = _right_padded([p + c for p, c in batch], pad)
    with capture_inputs(model, list(sites.values())) as cap:  # the LM head runs on the scored rows only
        states, score = lm_scoring_forward(model, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                           use_cache=False)
    # (row, position) of every scored token: position t predicts token t + 1.
    rows = [r for r, (_, c) in enumerate(batch) for _ in c]
    pos = [len(p) - 1 + j for p, c in batch for j in range(len(c))]
    if not rows:
        return [{name: np.zeros(0, np.float64) for name in ("lm", *systems)} for _ in batch]
    r_t, p_t = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
    targets = input_ids.to(device)[r_t, p_t + 1]
    comp = {"lm": score(states[r_t, p_t], targets).double().cpu().numpy()}
    for key, system in systems.items():
        comp[key] = system.token_logprobs(cap[sites[key].module_path][r_t, p_t], targets)
    bounds = np.cumsum([0] + [len(c) for _, c in batch])
    return [{name: v[bounds[j]:bounds[j + 1]].copy() for name, v in comp.items()} for j in range(len(batch))]


def score_continuations(lm, prompts, continuations, *, memory=None, knn=None, batch_size: int = 8,
                        systems=None) -> list[dict]:
    """Teacher-forced log-probs of each continuation's tokens, per component, unmixed.

    The sequence is ``tokenizer(prompt).input_ids + tokenizer(continuation, add_special_tokens=False).
    input_ids``; for each pair a dict of float64 arrays (one entry per continuation token): ``"lm"``,
    plus one per system with a lambda (``systems``, default those of ``memory`` / ``knn``), keyed
    by its ``component`` ("memory", "knn"), so callers sweep lambda with ``mix_logprobs``. Batches
    are right-padded (positions unchanged, pads come after every scored token), so batching does not
    change the result.
    """
    from .inference import resolve_input_site
    from .systems import systems_for

    model, tok = lm.model, lm.tokenizer
    if len(prompts) != len(continuations):
        raise MLPMemError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = next(model.parameters()).device
    parts = [(_ids_of(tok, p, i), list(tok(c, add_special_tokens=False).input_ids))
             for i, (p, c) in enumerate(zip(prompts, continuations))]
    if systems is None:
        systems = systems_for(memory=memory, knn=knn)
    by_key = {s.component: s for s in systems if s.has_lambda}
    sites = {key: resolve_input_site(model, s.site()) for key, s in by_key.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    results: list[dict | None] = [None] * len(parts)
    order = sorted(range(len(parts)), key=lambda i: -sum(map(len, parts[i])))  # similar lengths share a batch
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, res in zip(idx, _score_batch(model, by_key, sites, [parts[i] for i in idx], pad, device)):
                results[i] = res
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Loading from a run directory

def load_memory(run):
    """The run's trained MLP memory on the base LM's device and in its dtype (refuses another base model).

    The base dtype, not float32: the memory was trained under the same autocast, and a float32
    memory next to a bf16 base LM doubles its cost per token (measured by ``mlpmem bench``)."""
    from .memory import MLPMemory

    mdir = run.path("memory")
    if not (mdir / "config.json").exists() or not (mdir / "model.safetensors").exists():
        raise MLPMemError(f"no trained memory in {mdir}; run `mlpmem run` or `mlpmem train` first")
    lm = run.lm
    return MLPMemory.from_pretrained(mdir, base=lm, device=lm.device, dtype=lm.dtype)


def load_knn(run, nprobe: int | None = None, index_dir=None):
    """The run's kNN-LM: its index (or ``index_dir``) over its datastore, k and T from the targets."""
    from .inference import KNNLM
    from .io import is_complete, read_manifest

    index_dir = Path(index_dir) if index_dir is not None else run.path("index")
    for stage, path in (("datastore", run.path("datastore")), ("index", index_dir), ("targets", run.path("targets"))):
        if not is_complete(path):
            raise MLPMemError(f"no finished {stage} in {path}; run `mlpmem run` (or `mlpmem targets`) first")
    tg = read_manifest(run.path("targets"), "targets")
    return KNNLM.from_dirs(index_dir, run.path("datastore"), k=int(tg["k"]), temperature=float(tg["temperature"]),
                           nprobe=run.cfg.index.nprobe if nprobe is None else int(nprobe))
