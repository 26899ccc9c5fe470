"""Training the MLP Memory to imitate the kNN retriever: alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE.

Why it looks like this:
- Targets stay sparse end to end (CSR rows from ``targets.py``); the KL needs log p_mem only at
  each row's non-zero tokens, so nothing of vocabulary size is built per target (the official
  code materialises dense |V| targets: ~1.6 GB per batch).
- Offline mode reads the memory-input hidden states stored with the datastore; online mode
  recomputes them with the frozen base LM through the same hooks (for corpora whose hidden
  states are too big to store). Both round the states through float16, as the datastore does,
  so the two modes feed the memory identical inputs.
- Resumable and exact: the data order is a pure function of (seed, epoch, step) and a checkpoint
  holds weights, AdamW moments and the step, so a killed run restarted with the same seed ends
  with the same weights as an uninterrupted one. A non-finite loss stops training with the last
  good checkpoint intact.
- Validation: a fixed random slice of datastore rows never trained on, for the loss curve.
- Speed: the head and the loss run fused (:func:`mlpmemory.memory.fused_memory_loss`: one bf16
  head matmul, float32 log-softmax in cache-sized row chunks, dL/dlogits written in the forward),
  and AdamW runs fused where torch has that kernel. At the quick preset's sizes (2 CPU cores,
  38.9M params, batch 1024, 20 steps) this took training from ~695 to ~1150 rows/s, i.e. from
  ~40% to ~67% of the measured bf16 matmul peak; most of what remains is the matmuls. The
  manifest records rows/s and the fraction of the matmul peak of every session.
- Snapshots (``snapshots=(0.25, 0.5)``): the weights at fractions of training, each with its
  validation loss, for loss/perplexity-vs-training-tokens curves without retraining.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .config import TrainSettings
from .errors import MLPMemError
from .io import atomic_path, atomic_write_json, read_json, remove_path, sha256_json
from .stage import Stage, run_stage

__all__ = ["TrainSettings", "train_memory", "OfflineInputs", "OnlineInputs", "training_fingerprint", "evaluate_loss",
           "lr_at", "split_rows", "batch_rows_at", "snapshot_steps", "snapshot_dir", "CHECKPOINT"]

CHECKPOINT = "checkpoint"


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warmup then linear decay to zero (docs/method.md#training)."""
    warm = max(1, int(round(s.warmup * total)))
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (total - step) / max(1, total - warm))


def split_rows(n: int, val_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    val = np.sort(perm[: min(val_rows, n // 10)])
    train = np.sort(perm[len(val):])
    return train, val


def batch_rows_at(train_rows: np.ndarray, step: int, batch: int, seed: int) -> np.ndarray:
    """The rows of a global step: a pure function of (seed, epoch, step) so resume is exact."""
    per_epoch = max(1, len(train_rows) // batch)
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(train_rows))
    return np.sort(train_rows[order[b * batch:(b + 1) * batch]])


def measure_matmul_peak(device: torch.device, dtype: torch.dtype | None, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in the training dtype on this device: the roofline we compare to."""
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast or none: float16 is never used (the fused loss's per-logit gradients, ~softmax / B,
    underflow in float16 without a loss scaler)."""
    if name in ("off", "float32"):
        return None
    if name == "bfloat16":
        return torch.bfloat16
    from .models import resolve_dtype

    return torch.bfloat16 if resolve_dtype("auto", device) == torch.bfloat16 else None


class OfflineInputs:
    """Memory inputs read from the datastore's stored hidden states."""

    def __init__(self, datastore):
        if datastore.mem_inputs is None:
            raise MLPMemError(f"datastore {datastore.path} has no stored memory inputs; rebuild it with "
                              "--store-mem-inputs or train with --train-mode online")
        self.mem = datastore.mem_inputs
        same = datastore.mem_inputs is datastore.keys
        self.source = str(datastore.path / ("keys.f16" if same else "mem_inputs.f16"))  # named in corruption errors

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.mem[rows], dtype=np.float32))


class OnlineInputs:
    """Memory inputs recomputed by the frozen base LM over the windows that contain the rows."""

    def __init__(self, lm, datastore, token_path: str | os.PathLike):
        from .capture import resolve_site
        from .corpus import sliding_windows

        m = datastore.manifest
        if m.get("mem_site") is None:
            raise MLPMemError("the datastore records no memory-input site; rebuild it with --mem-site")
        self.lm, self.token_path, self.start = lm, token_path, int(m.get("token_start", 0))
        self.prefix = list(m.get("bos_prefix", []))  # what the datastore put before every window
        self.site = resolve_site(lm.model, m["mem_site"]["module"])
        self.windows = sliding_windows(int(m["n_tokens"]), int(m["block"]), int(m["stride"]))
        # row r (target position r+1) lives in the window whose scored range holds r+1
        self.first_rows = np.array([w.first_target - 1 for w in self.windows], dtype=np.int64)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        from .capture import capture_inputs, run_captured
        from .datastore import window_ids

        win_of = np.searchsorted(self.first_rows, rows, side="right") - 1
        needed = np.unique(win_of)
        ids = window_ids(self.token_path, self.start, [self.windows[w] for w in needed], self.prefix)
        with torch.inference_mode(), capture_inputs(self.lm.model, [self.site], stop_early=True) as cap:
            run_captured(self.lm.model.base_model, input_ids=torch.from_numpy(ids).to(self.lm.device), use_cache=False)
        states = cap[self.site.module_path].to(torch.float16).float().cpu()
        slot = {w: i for i, w in enumerate(needed)}
        out = torch.empty(len(rows), states.shape[-1])
        for j, (r, w) in enumerate(zip(rows, win_of)):
            out[j] = states[slot[w], r - self.windows[w].begin + len(self.prefix)]  # position r (predicts r+1)
        return out


def training_fingerprint(settings: TrainSettings, memory_config, targets, identity: dict | None = None) -> str:
    """What a trained memory depends on: settings, memory config, the targets' settings, ``identity``
    (e.g. the datastore's fingerprint). Equal fingerprints = the same training, bit for bit."""
    return sha256_json({"settings": asdict(settings), "memory_config": memory_config.to_dict(),
                        "targets": targets.manifest.get("settings"), **(identity or {})})


def snapshot_steps(fractions, total: int) -> list[int]:
    """Global steps at which ``fractions`` (0 < f <= 1) of ``total`` steps are done (deduplicated)."""
    steps = []
    for f in fractions or ():
        if not 0.0 < float(f) <= 1.0:
            raise MLPMemError(f"snapshot fractions must be within (0, 1], got {f}")
        steps.append(max(1, min(total, int(round(float(f) * total)))))
    return sorted(set(steps))


def snapshot_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / "snapshots" / f"step_{step:07d}"


def _make_optimizer(memory, s: TrainSettings, device: torch.device):
    decay, no_decay = [], []
    for _, p in memory.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel: one pass over the parameters instead of ~10 (60 ms of a 1 s CPU step).
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), **fused)


def _step_loss(memory, x, offsets, ids, probs, nxt, alpha: float, device, amp):
    """The training objective of one batch, head and loss fused (no (B, V) float32 tensor)."""
    from .memory import fused_memory_loss

    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        hidden = memory.hidden_forward(x)
    weight = memory.lm_head.weight
    return fused_memory_loss(hidden, weight, torch.from_numpy(offsets), torch.from_numpy(ids).to(device),
                             torch.from_numpy(probs).to(device), torch.from_numpy(nxt.astype(np.int64)).to(device),
                             alpha=alpha, compute_dtype=amp or weight.dtype)


class _Objective(torch.nn.Module):
    """The training objective as a module, so DDP can wrap it (its hooks average the gradients over ranks)."""

    def __init__(self, memory):
        super().__init__()
        self.memory = memory

    def forward(self, x, offsets, ids, probs, nxt, alpha: float, device, amp):
        return _step_loss(self.memory, x, offsets, ids, probs, nxt, alpha, device, amp)


def _objective(memory, device: torch.device):
    """``_step_loss`` for one process; under torchrun the same objective wrapped in DDP."""
    if not distributed.is_distributed():
        return partial(_step_loss, memory)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(_Objective(memory), device_ids=ids)  # also broadcasts rank 0's weights


def _local_rows(rows: np.ndarray) -> tuple[np.ndarray, float]:
    """This rank's slice of a global batch, and the weight of its mean loss in the global mean.

    DDP averages gradients over ranks, so a rank's loss is scaled by its rows * ranks / global rows:
    the result is the gradient of the global batch's mean loss, as in one process, also when the
    batch does not divide evenly.
    """
    a, b = distributed.span(len(rows))
    return rows[a:b], (b - a) * distributed.world_size() / max(1, len(rows))


def _save_checkpoint(out: Path, memory, optimizer, state: dict) -> None:
    """Weights, AdamW moments and the step, swapped in atomically (the previous one kept as .old until then)."""
    final, old = out / CHECKPOINT, out / (CHECKPOINT + ".old")
    if final.exists():  # else .old is the only checkpoint (a crash between the renames): kept until replaced
        remove_path(old)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        # No copies of the tensors (the memory's tensors share no storage), and the optimizer's moments
        # one kind per file: safetensors serialises a file's tensors at once, so this bounds the transient.
        save_file({k: v.detach().contiguous() for k, v in memory.state_dict().items()}, str(tmp / "model.safetensors"))
        opt = optimizer.state_dict()
        by_key: dict[str, dict] = {}
        for pid, st in opt["state"].items():
            for key, val in st.items():
                by_key.setdefault(key, {})[f"{pid}.{key}"] = torch.as_tensor(val).detach().contiguous()
        for key, tensors in by_key.items():
            save_file(tensors, str(tmp / f"optimizer.{key}.safetensors"))
        atomic_write_json(tmp / "optimizer.json", {"param_groups": opt["param_groups"], "state_keys": sorted(by_key)})
        atomic_write_json(tmp / "state.json", state)
        if final.exists():
            remove_path(old)
            os.replace(final, old)  # a crash before the rename below leaves .old, which resume reads
    remove_path(old)


def _load_checkpoint(out: Path, memory, optimizer) -> dict | None:
    ck = out / CHECKPOINT
    if not (ck / "state.json").exists():
        old = out / (CHECKPOINT + ".old")  # crash between the two renames
        if not (old / "state.json").exists():
            return None
        ck = old
    memory.load_state_dict(load_file(str(ck / "model.safetensors")))
    meta = read_json(ck / "optimizer.json")
    state: dict = {}
    files = [ck / f"optimizer.{kind}.safetensors" for kind in meta.get("state_keys") or []]
    for f in files or [ck / "optimizer.safetensors"]:  # one file per moment; older checkpoints: one file
        for name, val in load_file(str(f)).items():
            pid, key = name.split(".", 1)
            state.setdefault(int(pid), {})[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return read_json(ck / "state.json")


def _schedule(datastore, s: TrainSettings, snapshots) -> dict:
    """Rows held out for validation, rows trained on, the batch, the number of steps and the snapshot steps."""
    train_rows, val_rows = split_rows(datastore.n, s.val_rows, s.seed)
    if len(train_rows) < 1:
        raise MLPMemError("the datastore is too small to train on")
    batch = min(s.train_batch, len(train_rows))
    total = max(1, int(math.ceil(s.epochs * (len(train_rows) // batch or 1))))
    return {"train_rows": train_rows, "val_rows": val_rows, "batch": batch, "total": total,
            "snap_steps": snapshot_steps(snapshots, total)}


def _resume_state(stage: Stage, memory, optimizer, fingerprint: str) -> dict:
    """The state of an interrupted training with this fingerprint (weights and moments loaded), else a fresh one."""
    out = stage.dir
    loaded = _load_checkpoint(out, memory, optimizer)
    if loaded is None:  # a fresh start: snapshots of an earlier, other training are stale
        if distributed.is_main():
            shutil.rmtree(out / "snapshots", ignore_errors=True)
        return {"step": 0, "fingerprint": fingerprint, "log": []}
    if loaded.get("fingerprint") != fingerprint:
        raise stage.mismatch_error(f"training_fingerprint={loaded.get('fingerprint')!r} but now "
                                   f"training_fingerprint={fingerprint!r}", f" (unfinished: {CHECKPOINT})")
    return loaded


def _train_step(memory, optimizer, inputs, targets, rows, step: int, plan: dict, s: TrainSettings, device, amp,
                out: Path) -> dict:
    """One optimizer step on ``rows``; its loss terms, gradient norm and learning rate."""
    rows, weight = _local_rows(rows)
    offsets, ids, probs, nxt = targets.get(rows)
    x = inputs(rows).to(device)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, plan["total"], s)
    loss, kl, ce = plan["objective"](x, offsets, ids, probs, nxt, s.alpha, device, amp)
    if not torch.isfinite(loss):
        kept = (f"the last good checkpoint (step {(step // s.checkpoint_every) * s.checkpoint_every}) is kept in "
                f"{out / CHECKPOINT}")
        _check_batch_data(inputs, targets, rows, x, probs, kept)  # corrupted data is not a learning-rate problem
        raise MLPMemError(f"training loss became {loss.item()} at step {step}; {kept}; lower --lr or check the targets")
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    gnorm = torch.nn.utils.clip_grad_norm_(memory.parameters(), s.grad_clip)
    optimizer.step()
    share = weight / distributed.world_size()  # the global batch's mean of each term
    loss_v, kl_v, ce_v = distributed.all_reduce_sum([loss.item() * share, kl.item() * share, ce.item() * share])
    return {"step": step + 1, "loss": loss_v, "kl": kl_v, "ce": ce_v, "grad_norm": float(gnorm),
            "lr": optimizer.param_groups[0]["lr"]}


def _check_batch_data(inputs, targets, rows, x: torch.Tensor, probs: np.ndarray, kept: str) -> None:
    """After a non-finite loss: refuse non-finite memory inputs or target probabilities as corrupted data,
    naming the rows and the file, rather than suggesting a lower learning rate."""
    bad_x = rows[~torch.isfinite(x.float()).all(dim=-1).cpu().numpy()]
    source = getattr(inputs, "source", "the memory inputs")
    if len(bad_x):
        raise MLPMemError(f"memory inputs of datastore rows {_few(bad_x)} hold NaN or inf values: corrupted data in "
                          f"{source}, not a learning-rate problem; {kept}; run `mlpmem verify`, then delete the "
                          "datastore and rebuild it")
    if not np.isfinite(probs).all():
        where = getattr(targets, "path", "the targets")
        raise MLPMemError(f"the kNN targets of datastore rows {_few(rows)} hold NaN or inf probabilities: a shard of "
                          f"{where} is corrupted; {kept}; run `mlpmem verify`, then delete it and rebuild the targets")


def _few(rows) -> str:
    rows = sorted({int(r) for r in rows})
    return ", ".join(map(str, rows[:5])) + (f" ... ({len(rows)} rows)" if len(rows) > 5 else "")


def _memory_files(manifest: dict) -> list[str]:
    """The saved memory's files (and its snapshots'), whose checksums the memory manifest records."""
    from .memory import CONFIG_NAME, WEIGHTS_NAME

    return [f"{d}{name}" for d in [""] + [f"{x['dir']}/" for x in manifest.get("snapshots") or []]
            for name in (CONFIG_NAME, WEIGHTS_NAME)]


def _snapshot(memory, inputs, targets, plan: dict, state: dict, s: TrainSettings, device, amp, out: Path) -> None:
    """Save the weights at this step with their validation loss (recorded in ``state``)."""
    snap = {"step": state["step"], "rows_seen": state["step"] * plan["batch"],
            "validation": evaluate_loss(memory, inputs, targets, plan["val_rows"], s.alpha, device, amp)}
    if distributed.is_main():
        memory.save_pretrained(snapshot_dir(out, state["step"]))
    state["snapshots"] = [x for x in state.get("snapshots", []) if x["step"] != snap["step"]] + [snap]


def _train_loop(memory, optimizer, inputs, targets, plan: dict, state: dict, s: TrainSettings, device, amp,
                out: Path, progress: bool, stop_after_steps: int | None) -> dict | None:
    """Steps until the end (checkpoints and snapshots on the way); None when stopped by ``stop_after_steps``."""
    from tqdm.auto import tqdm

    total, snap_steps = plan["total"], plan["snap_steps"]
    bar = tqdm(total=total, initial=state["step"], desc="train memory", unit="step", disable=not progress)
    t0, rows_done, last = time.perf_counter(), 0, {}
    try:
        while state["step"] < total:
            step = state["step"]
            if stop_after_steps is not None and step >= stop_after_steps:
                return None
            rows = batch_rows_at(plan["train_rows"], step, plan["batch"], s.seed)
            last = _train_step(memory, optimizer, inputs, targets, rows, step, plan, s, device, amp, out)
            state["step"] = step + 1
            rows_done += len(rows)
            last["rows_per_s"] = rows_done / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last['loss']:.3f}", kl=f"{last['kl']:.3f}", ce=f"{last['ce']:.3f}",
                            tok_s=f"{last['rows_per_s']:.0f}", refresh=False)
            bar.update(1)
            if state["step"] in snap_steps:  # before the checkpoint: a crash in between redoes this step
                tick = time.perf_counter()
                _snapshot(memory, inputs, targets, plan, state, s, device, amp, out)
                t0 += time.perf_counter() - tick  # keep rows/s about training only
            if state["step"] % s.checkpoint_every == 0 or state["step"] == total or state["step"] in snap_steps:
                state["log"].append(last)
                if distributed.is_main():  # every rank holds the same weights and moments
                    _save_checkpoint(out, memory, optimizer, state)
                distributed.barrier()  # no rank runs ahead of the last durable checkpoint
    finally:
        bar.close()
    return {"last": last, "rows_done": rows_done, "loop_seconds": time.perf_counter() - t0}


def _train(memory, datastore, targets, stage: Stage, s: TrainSettings, inputs, device, progress: bool,
           identity: dict | None, stop_after_steps: int | None, snapshots, init_check: dict | None) -> dict | None:
    """Train (or resume) and save the memory; returns the manifest fields, or None when stopped early."""
    out, fingerprint = stage.dir, stage.identity["training_fingerprint"]
    inputs = inputs or OfflineInputs(datastore)
    plan = _schedule(datastore, s, snapshots)
    torch.manual_seed(s.seed)
    memory.to(device).train()
    optimizer = _make_optimizer(memory, s, device)
    state = _resume_state(stage, memory, optimizer, fingerprint)
    plan["objective"] = _objective(memory, device)
    amp = autocast_dtype(s.autocast, device)
    flops_per_row = 6 * sum(p.numel() for p in memory.parameters())  # forward + backward, dense matmuls
    # a 2048-cube matmul is far from a datacenter GPU's peak (an H200 needs ~8192 to approach it)
    peak = (measure_matmul_peak(device, amp, n=8192 if device.type == "cuda" else 2048)
            if state["step"] < plan["total"] else None)
    run = _train_loop(memory, optimizer, inputs, targets, plan, state, s, device, amp, out, progress, stop_after_steps)
    if run is None:
        return None
    del optimizer  # its moments (2x the memory) and the last gradients are not needed any more
    memory.zero_grad(set_to_none=True)
    val = evaluate_loss(memory, inputs, targets, plan["val_rows"], s.alpha, device, amp)
    memory.eval()
    if distributed.is_main():
        memory.save_pretrained(out)
    rows_per_s = run["rows_done"] / run["loop_seconds"] if run["rows_done"] else None
    return {
        "training_fingerprint": fingerprint, "settings": asdict(s), "steps": plan["total"], "batch_rows": plan["batch"],
        "train_rows": int(len(plan["train_rows"])), "val_rows": int(len(plan["val_rows"])), "final_train": run["last"],
        "validation": val, "memory_params": int(sum(p.numel() for p in memory.parameters())),
        "head_params": int(memory.config.vocab_size * memory.config.hidden_size),
        "rows_per_s_this_session": rows_per_s, "flops_per_row": flops_per_row,
        "achieved_flops_per_s": flops_per_row * rows_per_s if rows_per_s else None,
        "matmul_peak_flops_per_s": peak, "autocast": str(amp).replace("torch.", "") if amp else "off",
        "fraction_of_matmul_peak": (flops_per_row * rows_per_s / peak) if rows_per_s and peak else None,
        "log": state["log"],
        "snapshots": [{**x, "dir": str(snapshot_dir(out, x["step"]).relative_to(out))}
                      for x in state.get("snapshots", [])],
        "init_check": init_check,
        **(identity or {}),
    }


def train_memory(memory, datastore, targets, out_dir: str | os.PathLike, settings: TrainSettings, *,
                 inputs=None, device: torch.device | str = "cpu", progress: bool = True,
                 identity: dict | None = None, stop_after_steps: int | None = None, snapshots=(),
                 init_check: dict | None = None) -> dict:
    """Train ``memory`` on (datastore inputs, kNN targets); save it to ``out_dir``; return its manifest.

    Re-running a finished training with the same settings is a no-op; with other settings it is
    trained again. An interrupted one resumes from its last checkpoint. ``stop_after_steps`` ends
    the process early, as a kill would (tests), and returns ``{}``.
    ``snapshots``: fractions of the training (e.g. ``(0.25, 0.5)``) after which the weights are
    saved to ``out_dir/snapshots/step_<n>/`` (a loadable memory) with their validation loss; the
    manifest lists them under ``"snapshots"``. They do not change the training or its fingerprint.
    ``init_check``: how the initial memory was checked (:func:`mlpmemory.memory.calibrate_final_norm`),
    recorded in the manifest.
    """
    s = settings
    if not 0.0 <= s.alpha <= 1.0:
        raise MLPMemError(f"--alpha must be within [0, 1], got {s.alpha}")
    if len(targets) != datastore.n:
        raise MLPMemError(f"targets have {len(targets)} rows but the datastore has {datastore.n}; rebuild the targets")
    fingerprint = training_fingerprint(s, memory.config, targets, identity)
    stage = Stage(out_dir, {"training_fingerprint": fingerprint}, "memory", on_mismatch="rebuild",
                  files=_memory_files)
    manifest = run_stage(stage, lambda: _train(memory, datastore, targets, stage, s, inputs, torch.device(device),
                                               progress, identity, stop_after_steps, snapshots, init_check),
                         parallel=True)  # DDP under torchrun
    # the checkpoint (weights + AdamW moments, ~3x the memory's size) only serves an unfinished run
    if manifest and distributed.is_main():
        shutil.rmtree(stage.dir / CHECKPOINT, ignore_errors=True)
    return manifest


@torch.no_grad()
def evaluate_loss(memory, inputs, targets, rows: np.ndarray, alpha: float, device, amp, batch: int = 1024) -> dict:
    device = torch.device(device)
    memory.eval()
    tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        offsets, ids, probs, nxt = targets.get(r)
        loss, kl, ce = _step_loss(memory, inputs(r).to(device), offsets, ids, probs, nxt, alpha, device, amp)
        for k, v in (("loss", loss), ("kl", kl), ("ce", ce)):
            tot[k] += v.item() * len(r)
    memory.train()
    return {k: v / max(1, len(rows)) for k, v in tot.items()}
