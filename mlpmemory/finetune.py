"""Fine-tuning baselines of the MLP memory: continued pretraining (CPT) and LoRA of the base LM itself.

Why they are trained this way:

- **Same data, same budget as the memory.** Both read the run's train-split token stream through the
  datastore's own windows (:func:`mlpmemory.corpus.sliding_windows` with its block and stride, the
  tokenizer's BOS before each window) and take the causal-LM loss on exactly the positions each window
  scores in the datastore: the (context, next token) pairs the memory learns from. The budget is the
  memory's: its manifest's ``steps x batch_rows`` (one datastore row is one predicted token); optimizer
  steps of ``windows_per_step`` windows are added until that many target tokens are trained, so the last
  step overshoots by less than one step (``tokens_trained`` in the manifest).
- **LoRA matched in size.** peft adapters on every attention and MLP projection (q/k/v/o/gate/up/down;
  GPT-2's c_attn/c_proj/c_fc), rank chosen so the adapter's parameter count is the closest to the
  memory's non-head parameters (its blocks and norms: what the memory adds beside its copy of the head).
- **Resumable and exact.** The window order is a pure function of (seed, epoch, step); a checkpoint holds
  the trainable weights (float32 masters), the AdamW moments, torch's RNG state (dropout) and the step, so
  a killed run resumed ends with the same weights as an uninterrupted one.
- **Safetensors + a manifest.** CPT is saved as a plain Hugging Face model folder in the base LM's dtype
  (``from_pretrained`` loads it as is); LoRA as a peft adapter folder (the adapter only, float32). The
  manifest names the base model's fingerprint, which :mod:`mlpmemory.finetuned` checks before any use.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import torch

from .errors import MLPMemError
from .io import atomic_path, atomic_write_json, read_json, read_manifest, remove_path, sha256_json
from .log import log
from .stage import Stage, run_stage

METHODS = ("cpt", "lora")
DIRS = {"cpt": "finetune_cpt", "lora": "finetune_lora"}
DEFAULT_LR = {"cpt": 5e-5, "lora": 5e-4}
# projection names whose weights LoRA adapts: Llama-like (Mistral, Qwen, Gemma, SmolLM) and GPT-2
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj",
                "c_fc")
CHECKPOINT = "checkpoint"
FILES = {"cpt": ("model.safetensors", "config.json"), "lora": ("adapter_model.safetensors", "adapter_config.json")}


@dataclass
class FinetuneSettings:
    """How a fine-tune is trained (None: derived from the run's memory, or the method's default)."""

    lr: float | None = None
    tokens: int | None = None
    windows_per_step: int = 8
    micro_windows: int = 2  # windows per forward/backward (gradients accumulated): bounds the activations' RAM
    warmup: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    lora_rank: int | None = None
    lora_alpha: float | None = None
    autocast: str = "auto"

    def validate(self) -> None:
        for name in ("windows_per_step", "micro_windows", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MLPMemError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "tokens", "lora_rank", "lora_alpha"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise MLPMemError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0 or not self.grad_clip > 0 or self.weight_decay < 0:
            raise MLPMemError("warmup must be in [0, 1), grad_clip > 0 and weight_decay >= 0")


# ---------------------------------------------------------------------------------------------
# What is trained: windows, budget, LoRA size.
# ---------------------------------------------------------------------------------------------


class Schedule:
    """The windows of every step: per epoch a permutation drawn from (seed, epoch), cut into steps."""

    def __init__(self, windows, per_step: int, seed: int, budget: int):
        self.windows, self.per_step, self.seed = windows, int(per_step), int(seed)
        if not windows:
            raise MLPMemError("the datastore's token stream has no window to train on")
        self.per_epoch = math.ceil(len(windows) / self.per_step)
        self.order = lru_cache(maxsize=2)(self._order)
        self.total, self.tokens = 0, 0
        while self.tokens < budget:
            self.tokens += sum(w.n_rows for w in self.at(self.total))
            self.total += 1

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def at(self, step: int) -> list:
        epoch, b = divmod(step, self.per_epoch)
        return [self.windows[i] for i in self.order(epoch)[b * self.per_step:(b + 1) * self.per_step]]


def lora_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the projections LoRA adapts: Linear / GPT-2 Conv1D leaves named in :data:`LORA_TARGETS`."""
    found = [(n, m) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in LORA_TARGETS and getattr(m, "weight", None) is not None
             and m.weight.ndim == 2]
    if not found:
        raise MLPMemError(f"the base model ({type(model).__name__}) has no projection named "
                          f"{', '.join(LORA_TARGETS)}: LoRA does not know where to put its adapters")
    return found


def lora_params_per_rank(model) -> int:
    """Adapter parameters per unit of rank: (in + out) per adapted projection."""
    return sum(sum(m.weight.shape) for _, m in lora_modules(model))


def matched_rank(model, memory_manifest: dict) -> tuple[int, int]:
    """(rank whose adapter is closest in size to the memory's non-head parameters, that parameter count)."""
    target = int(memory_manifest["memory_params"]) - int(memory_manifest.get("head_params") or 0)
    return max(1, round(target / lora_params_per_rank(model))), target


def _budget(settings: FinetuneSettings, mem: dict) -> dict:
    memory_tokens = int(mem["steps"]) * int(mem["batch_rows"])
    return {"memory_steps": int(mem["steps"]), "memory_batch_rows": int(mem["batch_rows"]),
            "memory_tokens": memory_tokens, "tokens": int(settings.tokens or memory_tokens),
            "rule": "memory steps x rows per step (one datastore row = one predicted token)"
            if settings.tokens is None else "given"}


# ---------------------------------------------------------------------------------------------
# Model, loss, checkpoints.
# ---------------------------------------------------------------------------------------------


def _peft():
    try:
        import peft
    except ImportError:
        raise MLPMemError("LoRA fine-tuning needs the peft package: pip install 'peft>=0.13'") from None
    return peft


def lora_config(model, rank: int, alpha: float):
    mods = lora_modules(model)
    conv1d = any(type(m).__name__ == "Conv1D" for _, m in mods)  # GPT-2 stores weights (in, out)
    return _peft().LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                      target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in mods}), fan_in_fan_out=conv1d)


def trainable_model(lm, method: str, rank: int | None = None, alpha: float | None = None):
    """(float32 copy of the base HF model to train, its peft model or None); only the trained part requires grad."""
    model = copy.deepcopy(lm.model).to(torch.float32)
    model.train()
    if method == "cpt":
        model.requires_grad_(True)
        return model, None
    peft_model = _peft().get_peft_model(model, lora_config(model, rank, alpha))  # injects into ``model`` in place
    return model, peft_model


def _batch(token_path, start: int, windows, prefix, device):
    """(input ids, row and column of each scored position, its target) of a batch of windows."""
    from .datastore import window_ids

    ids = window_ids(token_path, start, windows, prefix)
    rb, rt = [], []
    for i, w in enumerate(windows):
        shift = len(prefix) - w.begin  # stream position j sits at column j + shift
        cols = np.arange(w.first_target - 1 + shift, w.end - 1 + shift)
        rb.append(np.full(len(cols), i))
        rt.append(cols)
    rb, rt = np.concatenate(rb), np.concatenate(rt)
    return (torch.from_numpy(ids).to(device), torch.from_numpy(rb).to(device), torch.from_numpy(rt).to(device),
            torch.from_numpy(ids[rb, rt + 1]).to(device))


def causal_lm_loss(model, ids, rb, rt, targets, amp=None, reduction: str = "mean"):
    """Cross-entropy of the scored positions (mean or sum); only their rows go through the head (no (B, T, V)
    logits)."""
    from .inference import output_head

    head = output_head(model)
    with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
        if head is None:
            logits = model(input_ids=ids, use_cache=False).logits[rb, rt]
        else:
            logits = head(model.base_model(input_ids=ids, use_cache=False)[0][rb, rt])
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save_checkpoint(out, named, optimizer, state: dict, device) -> None:
    """Trainable weights, AdamW moments, RNG state and step, swapped in atomically (as memory checkpoints)."""
    from safetensors.torch import save_file

    final, old = out / CHECKPOINT, out / (CHECKPOINT + ".old")
    if final.exists():
        remove_path(old)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file({n: p.detach().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
        opt = optimizer.state_dict()
        moments = {f"{pid}.{k}": torch.as_tensor(v).detach().contiguous()
                   for pid, st in opt["state"].items() for k, v in st.items()}
        save_file(moments, str(tmp / "optimizer.safetensors"))
        save_file(_rng_state(device), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "optimizer.json", {"param_groups": opt["param_groups"]})
        atomic_write_json(tmp / "state.json", state)
        if final.exists():
            os.replace(final, old)
    remove_path(old)


def _load_checkpoint(out, named, optimizer, device) -> dict | None:
    from safetensors.torch import load_file

    ck = out / CHECKPOINT
    if not (ck / "state.json").exists():
        ck = out / (CHECKPOINT + ".old")  # a crash between the two renames
        if not (ck / "state.json").exists():
            return None
    saved = load_file(str(ck / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])
    state: dict = {}
    for key, val in load_file(str(ck / "optimizer.safetensors")).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = val
    optimizer.load_state_dict({"state": state, "param_groups": read_json(ck / "optimizer.json")["param_groups"]})
    rng = load_file(str(ck / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return read_json(ck / "state.json")


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def _train(run, method: str, stage: Stage, plan: dict, s: FinetuneSettings, progress: bool,
           stop_after_steps: int | None) -> dict | None:
    from tqdm.auto import tqdm

    from .train import autocast_dtype, lr_at

    lm, out, lora = run.lm, stage.dir, plan.get("lora") or {}
    device = lm.device
    torch.manual_seed(s.seed)  # the adapters' initialisation
    model, peft_model = trainable_model(lm, method, lora.get("rank"), lora.get("alpha"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=plan["lr"], betas=(0.9, 0.95),
                                  weight_decay=s.weight_decay)
    state = _load_checkpoint(out, named, optimizer, device)
    if state is not None and state.get("fingerprint") != stage.identity["training_fingerprint"]:
        raise MLPMemError(f"{out} holds an unfinished fine-tune of other settings; delete {out / CHECKPOINT} to "
                          "start this one")
    state = state or {"step": 0, "tokens": 0, "seconds": 0.0, "log": [],
                      "fingerprint": stage.identity["training_fingerprint"]}
    sched, amp = plan["schedule"], autocast_dtype(s.autocast, device)
    sched_lr = SimpleNamespace(lr=plan["lr"], warmup=s.warmup)
    t0, seconds0 = time.perf_counter(), state["seconds"]
    bar = tqdm(total=sched.total, initial=state["step"], desc=f"finetune {method}", unit="step", disable=not progress)
    try:
        while state["step"] < sched.total:
            step = state["step"]
            if stop_after_steps is not None and step >= stop_after_steps:
                return None
            batch = sched.at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, sched.total, sched_lr)
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulate(model, batch, plan, s.micro_windows, device, amp)
            if not math.isfinite(loss):
                raise MLPMemError(f"the {method} loss became {loss} at step {step}; lower the learning rate "
                                  f"(the last checkpoint in {out / CHECKPOINT} is kept)")
            gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in named], s.grad_clip)
            optimizer.step()
            state.update(step=step + 1, tokens=state["tokens"] + sum(w.n_rows for w in batch),
                         seconds=seconds0 + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
            if state["step"] % s.checkpoint_every == 0 or state["step"] == sched.total:
                state["log"].append({"step": state["step"], "loss": loss, "grad_norm": float(gnorm),
                                     "lr": optimizer.param_groups[0]["lr"]})
                _save_checkpoint(out, named, optimizer, state, device)
    finally:
        bar.close()
    return _save_result(run, method, out, model, peft_model, named, state)


def _accumulate(model, batch, plan: dict, micro: int, device, amp) -> float:
    """Gradients of the step's mean loss over all its scored tokens, ``micro`` windows per forward; the loss."""
    n_tokens, total = sum(w.n_rows for w in batch), 0.0
    for i in range(0, len(batch), micro):
        part = _batch(plan["token_path"], plan["token_start"], batch[i:i + micro], plan["prefix"], device)
        loss = causal_lm_loss(model, *part, amp=amp, reduction="sum") / n_tokens
        if not torch.isfinite(loss):
            return float(loss.item())
        loss.backward()
        total += float(loss.item())
    return total


def _save_result(run, method: str, out, model, peft_model, named, state: dict) -> dict:
    """The fine-tuned model (CPT: an HF folder in the base dtype) or adapter (LoRA); the manifest's training fields."""
    from safetensors.torch import save_file

    if method == "cpt":
        model.requires_grad_(False).eval().to(run.lm.dtype)
        model.save_pretrained(str(out))
        run.lm.tokenizer.save_pretrained(str(out))
    else:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(peft_model)
        save_file({k: v.detach().float().contiguous() for k, v in adapter.items()}, str(out / FILES["lora"][0]))
        peft_model.peft_config["default"].save_pretrained(str(out))
    return {"steps": state["step"], "tokens_trained": state["tokens"], "seconds": round(state["seconds"], 2),
            "trainable_params": int(sum(p.numel() for _, p in named)), "log": state["log"],
            "final_loss": state["log"][-1]["loss"] if state["log"] else None}


def _plan(run, method: str, s: FinetuneSettings) -> tuple[dict, dict]:
    """(what the training reads, the manifest's identity fields) from the run's datastore and memory."""
    from .corpus import sliding_windows

    mem = read_manifest(run.path("memory"), "trained memory (its budget and size set the fine-tune's)")
    ds = read_manifest(run.path("datastore"), "datastore")
    lm = run.lm
    if ds["model_fingerprint"] != lm.fingerprint:
        raise MLPMemError(f"the datastore in {run.path('datastore')} was built with another model or dtype than "
                          f"{run.cfg.run.model} ({run.cfg.run.dtype}); fine-tune with the run's own --model/--dtype")
    budget = _budget(s, mem)
    windows = sliding_windows(int(ds["n_tokens"]), int(ds["block"]), int(ds["stride"]))
    plan = {"schedule": Schedule(windows, s.windows_per_step, s.seed, budget["tokens"]),
            "token_path": run.path("corpus") / "train.i32", "token_start": int(ds.get("token_start", 0)),
            "prefix": list(ds.get("bos_prefix") or []), "lr": float(s.lr or DEFAULT_LR[method])}
    if method == "lora":
        rank, target = matched_rank(lm.model, mem)
        rank = int(s.lora_rank or rank)
        plan["lora"] = {"rank": rank, "alpha": float(s.lora_alpha or 2 * rank),
                        "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(lm.model)}),
                        "params": rank * lora_params_per_rank(lm.model), "memory_non_head_params": target,
                        "rank_rule": "closest to the memory's non-head parameters" if s.lora_rank is None else "given"}
    identity = {"method": method, "base_model": run.cfg.run.model, "base_model_fingerprint": lm.fingerprint,
                "tokenizer_fingerprint": lm.tokenizer_fingerprint, "dtype": str(lm.dtype).replace("torch.", ""),
                "settings": {**asdict(s), "lr": plan["lr"]}, "budget": budget, "lora": plan.get("lora"),
                "datastore_fingerprint": sha256_json(ds), "block": int(ds["block"]), "stride": int(ds["stride"]),
                "windows": len(windows), "steps_planned": plan["schedule"].total,
                "tokens_planned": plan["schedule"].tokens}
    return plan, {**identity, "training_fingerprint": sha256_json(identity)}


def finetune(run, method: str, settings: FinetuneSettings | None = None, *, progress: bool = True,
             stop_after_steps: int | None = None) -> dict:
    """Train (or resume, or find finished) the ``method`` fine-tune of the run's base LM; its manifest.

    Output: ``<run>/finetune_cpt/`` or ``<run>/finetune_lora/``. A finished one with the same settings is
    returned as it is; other settings retrain it. ``stop_after_steps`` stops early as a kill would (tests)
    and returns ``{}``.
    """
    if method not in METHODS:
        raise MLPMemError(f"unknown fine-tuning method {method!r}; choose from {', '.join(METHODS)}")
    s = settings or FinetuneSettings()
    s.validate()
    plan, identity = _plan(run, method, s)
    stage = Stage(run.path(DIRS[method]), {"training_fingerprint": identity["training_fingerprint"]},
                  f"{method} fine-tune", on_mismatch="rebuild", files=lambda m: list(FILES[method]))

    def build():
        (stage.dir / "manifest.json").unlink(missing_ok=True)  # another settings' result is being replaced
        log(f"finetune {method}: {plan['schedule'].total} steps of {s.windows_per_step} windows, "
            f"{plan['schedule'].tokens:,} target tokens (budget {identity['budget']['tokens']:,})"
            + (f", LoRA rank {plan['lora']['rank']} ({plan['lora']['params']:,} params; memory non-head "
               f"{plan['lora']['memory_non_head_params']:,})" if method == "lora" else ""))
        fields = _train(run, method, stage, plan, s, progress, stop_after_steps)
        return None if fields is None else {**identity, **fields}

    manifest = run_stage(stage, build)
    if manifest:
        remove_path(stage.dir / CHECKPOINT)  # weights + moments only serve an unfinished run
    return manifest
