"""Memory studies on one finished run: memories trained on the run's own kNN targets, scored by the
eval-ppl protocol. The engine of `mlpmem scaling` (memory size) and `benchmarks/ablations.py`
(input site, alpha).

Why one engine:

- **Only the memory changes.** Every memory of a study trains with the run's settings
  (``cfg.train``, overridable per memory), on the run's datastore rows and targets, from the same
  seed, so a curve measures the one thing varied. A memory whose training would be identical to
  the run's own ``memory/`` (same training fingerprint) is that memory, reused.
- **The same protocol as ``eval-ppl``.** Lambda is chosen per memory on the run's validation slice
  (``tune/``) from the run's lambda grid and reported on its test half (``eval_test/``). Memory
  log-probs are cached in the study's own folder, keyed by the memory's weights, the inputs and the
  eval dirs: the eval dirs' one-memory cache belongs to ``eval-ppl``.
- **Any stored inputs.** By default a memory reads the run's stored memory inputs; an ablation
  that moves the memory to another layer passes :class:`Inputs` captured there (the same rows of
  the three row sets), and the inputs' identity joins the training fingerprint.
- **Resumable.** Training resumes from its checkpoint (:func:`mlpmemory.train.train_memory`);
  scores are cached; nothing finished is redone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import MLPMemError
from .io import atomic_write_json, read_json, read_manifest, sha256_json
from .log import log


@dataclass
class Inputs:
    """Hidden states a memory reads, row-aligned with the run's datastore, validation slice and test half."""

    site: dict  # CaptureSite.to_dict() of the module whose input was stored
    train: np.ndarray  # (N_train, d)
    valid: np.ndarray  # (N_valid, d)
    test: np.ndarray  # (N_test, d)
    origin: str  # where they were read, e.g. "datastore/mem_inputs"
    fingerprint: str  # identity of the stores they come from

    def __call__(self, rows: np.ndarray):
        """Training rows as a float32 tensor (the ``inputs=`` callable of ``train_memory``)."""
        import torch

        return torch.from_numpy(np.asarray(self.train[rows], dtype=np.float32))


class Study:
    """A finished run's datastore, targets and eval dirs, and the memories trained and scored on them."""

    def __init__(self, run):
        from . import pipeline
        from .datastore import open_datastore
        from .evaluate import check_compatible
        from .targets import open_targets

        self.run = run
        self.ds = pipeline.training_datastore(run)
        self.targets = open_targets(run.path(pipeline.TARGETS), self.ds.manifest)
        self.eval_dirs = {"valid": run.path(pipeline.TUNE), "test": run.path(pipeline.EVAL_TEST)}
        self.eval = {k: open_datastore(d, f"{k} eval dir") for k, d in self.eval_dirs.items()}
        check_compatible(self.eval["valid"].manifest, self.eval["test"].manifest, *self.eval_dirs.values())
        for split, x in self.eval.items():
            if x.lm_logprob is None:
                raise MLPMemError(f"the {split} eval dir {x.path} has no base-LM log-probs; re-run `mlpmem run`")
        self.lm_logprobs = {k: np.asarray(x.lm_logprob, np.float64) for k, x in self.eval.items()}
        self.lambdas = run.cfg.eval.lambda_list()

    def stored_inputs(self) -> Inputs:
        """The run's own memory inputs (``mem_inputs``, or the keys when both sites coincide)."""
        arrays = [self.ds.mem_inputs, self.eval["valid"].mem_inputs, self.eval["test"].mem_inputs]
        if any(a is None for a in arrays):
            raise MLPMemError("the run stored no memory inputs; rebuild it with --store-mem-inputs")
        fp = sha256_json({"train": self.ds.manifest, **{k: x.manifest for k, x in self.eval.items()}})
        return Inputs(dict(self.ds.manifest["mem_site"]), *arrays, origin="datastore/mem_inputs", fingerprint=fp)

    def memory_config(self, site: dict | None = None, **sizing):
        """The memory config of the run's memory on ``site`` (default: the run's) at ``sizing``."""
        from .memory import memory_config_for

        s = self.run.cfg.train
        return memory_config_for(self.run.lm, site or self.ds.manifest["mem_site"], head_init=s.head_init,
                                 **(sizing or s.sizing()))

    def train(self, out: Path, mcfg, settings=None, inputs: Inputs | None = None, snapshots=()) -> tuple[Path, dict]:
        """Train one memory into ``out`` (or reuse the run's identical one); its folder and training manifest."""
        import torch

        from .pipeline import finished_memory, initial_memory
        from .train import OnlineInputs, train_memory

        run, settings = self.run, settings or self.run.cfg.train
        identity = {"datastore_fingerprint": sha256_json(self.ds.manifest)}
        if inputs is not None:
            identity.update(input_source=inputs.origin, input_fingerprint=inputs.fingerprint)
        for folder in ([run.path("memory")] if not snapshots else []) + [Path(out)]:
            done = finished_memory(folder, mcfg, settings, self.targets, identity)
            if done is not None:
                same = "= the run's own memory" if folder == run.path("memory") else "already trained"
                log(f"study: {mcfg.n_blocks} blocks {same} ({folder}), reused")
                return folder, done
        torch.manual_seed(settings.seed)  # as the pipeline does before building the memory
        memory, check = initial_memory(run, mcfg, inputs.valid if inputs is not None else None)
        log(f"study: training {mcfg.n_blocks} blocks ({memory.num_parameters():,} parameters) into {out}")
        if inputs is None and settings.train_mode == "online":
            inputs = OnlineInputs(run.lm, self.ds, run.path("corpus") / "train.i32")
        return Path(out), train_memory(memory, self.ds, self.targets, out, settings, inputs=inputs,
                                       device=run.lm.device, identity=identity, snapshots=snapshots,
                                       init_check=check)

    def memory_logprobs(self, cache: Path, name: str, memory_dir: Path, inputs: Inputs | None = None) -> dict:
        """``{"valid", "test"}``: log p_MLP(true token) (float64) of the memory in ``memory_dir``, cached."""
        from .evaluate import _read_f32, _write_f32, memory_dir_fingerprint, memory_row_logprobs
        from .memory import MLPMemory

        inputs = inputs or self.stored_inputs()
        want = {"memory_fingerprint": memory_dir_fingerprint(memory_dir), "inputs": inputs.fingerprint,
                "eval": {k: sha256_json(x.manifest) for k, x in self.eval.items()}}
        meta_path, meta = cache / f"{name}.json", {}
        if meta_path.exists():
            meta = read_json(meta_path)
        out, memory = {}, None
        for split, x in self.eval.items():
            arr = _read_f32(cache / f"{name}.{split}.f32", x.n) if meta == want else None
            if arr is None:
                if memory is None:
                    memory = MLPMemory.from_pretrained(memory_dir, base=self.run.lm, device=self.run.lm.device)
                    _check_reads(memory, inputs, memory_dir)
                meta_path.unlink(missing_ok=True)  # the pairing is rewritten after the data
                cache.mkdir(parents=True, exist_ok=True)
                arr = memory_row_logprobs(memory, getattr(inputs, split), x.values, desc=f"{name} {split}")
                _write_f32(cache / f"{name}.{split}.f32", arr)
            out[split] = arr.astype(np.float64)
        if not meta_path.exists():
            atomic_write_json(meta_path, want)
        return out

    def score(self, mem: dict) -> dict:
        """Lambda chosen on validation, perplexities reported on test (as ``evaluate_ppl`` does)."""
        from .evaluate import MEMORY, choose, perplexity, sweep
        from .inference import mix_logprobs

        lm = self.lm_logprobs
        rows = sweep({"lm": lm["valid"], "memory": mem["valid"]}, self.lambdas)
        chosen = choose(rows, MEMORY)
        return {"lambda": chosen["lambda"], "valid_mixed_ppl": chosen["ppl"],
                "memory_alone_valid_ppl": perplexity(mem["valid"]), "memory_alone_test_ppl": perplexity(mem["test"]),
                "mixed_test_ppl": perplexity(mix_logprobs(lm["test"], mem["test"], chosen["lambda"])),
                "validation_sweep": [{"lambda": r["lambda"], "ppl": r["ppl"]} for r in rows if r["system"] == MEMORY]}

    def with_settings(self, **changes):
        """The run's training settings with ``changes`` (e.g. ``alpha=0.7``, ``epochs=3``)."""
        return replace(self.run.cfg.train, **changes)

    def base(self) -> dict:
        from .evaluate import perplexity

        return {f"{k}_ppl": perplexity(v) for k, v in self.lm_logprobs.items()}

    def manifests(self) -> dict:
        return {k: read_manifest(d) for k, d in self.eval_dirs.items()}


def _check_reads(memory, inputs: Inputs, memory_dir: Path) -> None:
    module = (memory.config.input_site or {}).get("module")
    if module != inputs.site.get("module"):
        raise MLPMemError(f"{memory_dir} reads {module} but the inputs given are of {inputs.site.get('module')}")
