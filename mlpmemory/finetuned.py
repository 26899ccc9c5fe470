"""Using a finished fine-tune (:mod:`mlpmemory.finetune`): its weights on the run's base LM, and its eval-ppl pass.

Why it works this way:

- **Weights swapped in place, restored after.** Both fine-tunes become a dict ``{parameter name: tensor}``
  in the base LM's dtype and device: CPT's saved weights, and for LoRA the merged weights
  ``W + scaling * B @ A`` (peft's own merge formula, ``fan_in_fan_out`` transposed for GPT-2) of the
  adapted projections only. :func:`swapped_parameters` points each parameter's ``.data`` at them while
  active and back at the original tensors after: nothing is copied, the base weights are never rewritten
  (a merge then unmerge in bf16 would not give them back bit for bit), every HF decoding strategy works
  unchanged, and a token costs exactly a base LM forward (no adapter matmuls). Tied weights are one
  parameter, so swapping the embedding swaps the head with it.
- **Refused on another base model.** The manifest's ``base_model_fingerprint`` must equal the run's base
  LM's, or loading stops with a one-line error.
- **Scored like RAG in eval-ppl.** A fine-tuned model is not a mixture of cached components, so its own
  LM pass over the eval dir's windows (the base pass's windows, BOS and batches) gives its per-token
  log-probs, cached in the eval dir as ``<name>_logprob.f32`` with a sidecar naming the fine-tune's
  fingerprint; eval-ppl reports them as extra rows with no lambda.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import MLPMemError
from .finetune import DIRS, FILES, METHODS
from .io import atomic_write_json, check_checksums, is_complete, read_json, read_manifest, sha256_json


def finetune_fingerprint(manifest: dict) -> str:
    """Identity of a finished fine-tune: its training fingerprint and its weight files' checksums."""
    return sha256_json({"training": manifest.get("training_fingerprint"), "files": manifest.get("checksums")})


def finetuned_fingerprints(run) -> dict:
    """``{method: fingerprint}`` of the run's finished fine-tunes (empty when it has none)."""
    return {m: finetune_fingerprint(read_json(run.path(DIRS[m]) / "manifest.json"))
            for m in METHODS if is_complete(run.path(DIRS[m]))}


def load_finetuned(run, method: str) -> tuple[dict, dict]:
    """(``{parameter name: tensor}`` to swap into the run's base LM, the manifest) of its ``method`` fine-tune."""
    folder = run.path(DIRS[method])
    if not is_complete(folder):
        raise MLPMemError(f"no finished {method} fine-tune in {folder}; train it with "
                          f"`mlpmem finetune --run-dir {run.dir} --method {method}`")
    manifest = read_manifest(folder, f"{method} fine-tune")
    lm = run.lm
    if manifest.get("base_model_fingerprint") != lm.fingerprint:
        raise MLPMemError(f"the {method} fine-tune in {folder} was trained from base model fingerprint "
                          f"{manifest.get('base_model_fingerprint')} but {run.cfg.run.model} ({run.cfg.run.dtype}) "
                          f"here is {lm.fingerprint}; use it on the run it was trained on or fine-tune again")
    check_checksums(folder, manifest, FILES[method], f"{method} fine-tune")
    tensors = cpt_weights(lm.model, folder) if method == "cpt" else lora_weights(lm.model, folder)
    return tensors, manifest


def _params(model) -> dict:
    return dict(model.named_parameters())


def cpt_weights(model, folder) -> dict:
    """CPT's saved weights of every parameter of ``model``, in its dtype and on its device."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / FILES["cpt"][0]))
    out = {}
    for name, p in _params(model).items():
        if name not in saved or saved[name].shape != p.shape:
            raise MLPMemError(f"the CPT weights in {folder} do not fit the base model ({name} missing or of "
                              "another shape); fine-tune again on this run")
        out[name] = saved[name].to(device=p.device, dtype=p.dtype)
    return out


def lora_weights(model, folder) -> dict:
    """The merged weights ``W + scaling * B @ A`` of every projection the adapter in ``folder`` adapts."""
    from safetensors.torch import load_file

    cfg = read_json(Path(folder) / FILES["lora"][1])
    adapter = load_file(str(Path(folder) / FILES["lora"][0]))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    params, out = _params(model), {}
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    for key, a in adapter.items():
        if not key.endswith(suffix):
            continue
        name = key[len(prefix):-len(suffix)] + ".weight"
        b = adapter.get(key[:-len(suffix)] + ".lora_B.weight")
        if name not in params or b is None:
            raise MLPMemError(f"the LoRA adapter in {folder} does not fit the base model ({name}); fine-tune again")
        delta = b.double() @ a.double()
        delta = delta.T if cfg.get("fan_in_fan_out") else delta
        w = params[name]
        if delta.shape != w.shape:
            raise MLPMemError(f"the LoRA adapter in {folder} adapts {name} with shape {tuple(delta.shape)} but the "
                              f"base model's is {tuple(w.shape)}; fine-tune again")
        out[name] = (w.detach().float() + (delta * scaling).float().to(w.device)).to(w.dtype)
    if not out:
        raise MLPMemError(f"the LoRA adapter in {folder} holds no lora_A/lora_B weights")
    return out


@contextmanager
def swapped_parameters(model, tensors: dict):
    """While active, the parameters of ``model`` named in ``tensors`` hold those tensors; restored after."""
    params = _params(model)
    missing = [n for n in tensors if n not in params]
    if missing:
        raise MLPMemError(f"the fine-tuned weights name parameters this model lacks ({missing[0]} ...)")
    saved = []
    try:
        with torch.inference_mode(False):  # (generate enters the hook inside inference mode)
            for name, t in tensors.items():
                p = params[name]
                saved.append((p, p.data))
                p.data = t
        yield model
    finally:
        with torch.inference_mode(False):
            for p, data in reversed(saved):
                p.data = data


def window_logprobs(lm, token_path, manifest: dict, *, batch_size: int | None = None,
                    progress: bool = True) -> np.ndarray:
    """log p(target) (float32, (n,)) of every scored position of an eval dir's windows, by ``lm.model`` as it is
    now (inside a system's hook: the fine-tuned model), in the base pass's batches."""
    from tqdm.auto import tqdm

    from .corpus import sliding_windows
    from .finetune import _batch
    from .inference import lm_scoring_forward

    windows = sliding_windows(int(manifest["n_tokens"]), int(manifest["block"]), int(manifest["stride"]))
    prefix, start = list(manifest.get("bos_prefix") or []), int(manifest.get("token_start", 0))
    bs = int(batch_size or manifest.get("batch_size") or 8)
    out = np.empty(int(manifest["n"]), np.float32)
    with torch.inference_mode(), tqdm(total=len(out), desc="fine-tuned log-probs", unit="tok",
                                      disable=not progress) as bar:
        for b in range(0, len(windows), bs):
            batch = windows[b:b + bs]
            ids, rb, rt, targets = _batch(token_path, start, batch, prefix, lm.device)
            states, score = lm_scoring_forward(lm.model, input_ids=ids, use_cache=False)
            first = batch[0].first_target - 1  # row of target j is j - 1: a batch's rows are contiguous
            out[first:first + len(targets)] = score(states[rb, rt], targets).float().cpu().numpy()
            bar.update(len(targets))
    return out


def cached_finetuned_logprobs(eval_dir, lm, system, token_path, *, progress: bool = True) -> tuple[np.ndarray, dict]:
    """:func:`window_logprobs` of ``system`` (a loaded fine-tune) over an eval dir, cached in it by fingerprint."""
    from .evaluate import _read_f32, _read_meta, _write_f32

    path = Path(eval_dir)
    em = read_manifest(path, "eval dir")
    if em.get("model_fingerprint") != lm.fingerprint:
        raise MLPMemError(f"eval dir {path} was built with another base model than the run's; rebuild it")
    n = int(em["n"])
    want = {"finetune_fingerprint": system.fingerprint, "eval_fingerprint": sha256_json(em), "n": n}
    data, meta_path = path / f"{system.name}_logprob.f32", path / f"{system.name}_logprob.json"
    meta = _read_meta(meta_path)
    cached = _read_f32(data, n) if all(meta.get(k) == v for k, v in want.items()) else None
    if cached is not None:
        return cached, meta
    meta_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with system.hook(lm.model):
        lp = window_logprobs(lm, token_path, em, progress=progress)
    _write_f32(data, lp)
    meta = {**want, "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_json(meta_path, meta)
    return lp, meta


def finetuned_components(run, test_dir, token_path, progress: bool = True) -> dict:
    """``{method: {"logprob": ..., **report fields}}`` of the run's finished fine-tunes on a test eval dir
    (eval-ppl's components; empty when the run has none)."""
    from .systems import get_system

    out = {}
    for method in finetuned_fingerprints(run):
        system = get_system(method).load(run)
        lp, meta = cached_finetuned_logprobs(test_dir, run.lm, system, token_path, progress=progress)
        out[method] = {"logprob": lp, **system.summary(), "seconds": meta.get("seconds")}
    return out
