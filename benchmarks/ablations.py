"""Ablations of a finished run: which input layer the memory reads, and how much of its loss imitates retrieval.

Why these two:

- **alpha (KL weight).** The memory is trained on ``alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE``.
  At ``alpha = 0`` it never sees the retriever: it is a plain MLP head fine-tuned on the corpus's
  next tokens. That is the control that separates "imitating kNN retrieval helps" from "any
  extra capacity trained on in-domain text helps" (our calibration run had no such control;
  docs/method.md#measured-on-this-project). ``alpha = 1`` is pure imitation; the paper uses 0.4, its code 0.5.
- **Input layer.** The paper reports ~70% of decoder depth as best at every GPT-2 scale, while the
  released code hard-wires the last layer, and in our calibration run (SmolLM2-135M) the last
  layer's FFN input beat 0.7 depth. The best layer is a property of the base model, so it is
  measured per model: depth 0.5, 0.7, 0.85 and the last layer's FFN input.

Everything else is the run's own memory training (sizes, head init, lr, epochs, batch, seed,
...), read from ``<run>/config.json``, on the SAME kNN targets (``<run>/targets``). Every memory
is scored on the run's held-out test half with lambda chosen on the validation slice from the
run's ``lambdas`` grid, exactly like ``mlpmem run``'s eval stage; the base LM's log-probs are the
ones cached in ``tune/`` and ``eval_test/``.

Hidden states at sites other than the run's two (keys at ``key_site``, memory inputs at
``mem_site``) are not stored, so one extra datastore pass per pair of missing sites is built over
the train stream, the validation slice and the test half (``<run>/ablations/ds_050_085{,_tune,_test}``
for the default 0.5 / 0.85). Memories go to ``<run>/ablations/<L{layer}_a{alpha}>/``; a memory
shared by both ablations (0.7 depth at the run's alpha) is trained once. Everything is resumable:
re-running skips finished datastores, trainings and evaluations.

Usage (the report is printed as Markdown and saved as JSON)::

    python benchmarks/ablations.py --run-dir runs/quick [--only layer|alpha] [--sites 0.5,0.7,0.85,last]
                                   [--alphas 0,0.4,0.7,1] [--epochs E] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mlpmemory.capture import CaptureSite, resolve_site
from mlpmemory.config import defaults, flatten
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError
from mlpmemory.evaluate import build_eval_dir, choose, json_safe, memory_dir_fingerprint, perplexity, sweep
from mlpmemory.inference import mix_logprobs
from mlpmemory.manifest import atomic_write_json, read_json, read_manifest, sha256_json
from mlpmemory.memory import MLPMemory, build_memory, memory_config_for
from mlpmemory.models import load_model
from mlpmemory.targets import open_targets
from mlpmemory.train import TrainSettings, train_memory

ABLATIONS = "ablations"


def log(msg: str) -> None:
    print(f"[ablations] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Stored hidden states of one capture site, on the three row sets (train / validation / test).
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    site: dict  # CaptureSite.to_dict() of the module whose input was stored
    train: np.ndarray  # (N_train, d) memmap, rows aligned with the run's datastore / targets
    tune: np.ndarray  # (N_valid, d) memmap, rows aligned with <run>/tune
    test: np.ndarray  # (N_test, d) memmap, rows aligned with the run's test eval dir
    origin: str  # e.g. "datastore/keys" or "ablations/ds_050_085/mem_inputs"
    fingerprint: str  # identity of the three stores it reads, for the caches


class RowInputs:
    """Memory inputs read by row from any stored (N, d) float16 memmap (like train.OfflineInputs)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[rows], dtype=np.float32))


def site_tag(spec: str) -> str:
    """Short file-name tag of a site spec: 0.5 -> 050, 0.85 -> 085, last -> last, 12 -> L12."""
    s = str(spec).strip()
    if s == "last":
        return "last"
    try:
        x = float(s)
    except ValueError:
        return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")
    if "." in s or "e" in s.lower():
        return f"{int(round(x * 100)):03d}"
    return f"L{int(x)}"


def site_label(spec: str, site: dict) -> str:
    layer, n = site.get("layer"), site.get("n_layers")
    return f"{spec} (layer {layer}/{n})" if layer is not None else f"{spec} ({site['module']})"


def memory_dir_name(site: dict, alpha: float, epochs_override: float | None) -> str:
    where = f"L{site['layer']}" if site.get("layer") is not None else re.sub(r"[^A-Za-z0-9]+", "_", site["module"])
    return f"{where}_a{alpha:g}" + (f"_ep{epochs_override:g}" if epochs_override is not None else "")


def stored_sources(ds, tune, test, prefix: str) -> dict[str, Source]:
    """The sites whose states all three stores hold, by module path."""
    out = {}
    for array, site_field in (("keys", "key_site"), ("mem_inputs", "mem_site")):
        site = ds.manifest.get(site_field)
        if not site:
            continue
        arrays = [getattr(x, array) for x in (ds, tune, test)]
        if any(a is None for a in arrays):
            continue
        for x, what in ((tune, "validation slice"), (test, "test eval dir")):
            if (x.manifest.get(site_field) or {}).get("module") != site["module"]:
                raise MLPMemError(f"the {what} {x.path} stored {site_field} "
                                  f"{(x.manifest.get(site_field) or {}).get('module')!r} but the datastore "
                                  f"{site['module']!r}; rebuild it")
        fp = sha256_json({"array": array, "train": ds.manifest, "tune": tune.manifest, "test": test.manifest})
        out.setdefault(site["module"], Source(site=dict(site), train=arrays[0], tune=arrays[1], test=arrays[2],
                                              origin=f"{prefix}/{array}", fingerprint=fp))
    return out


def check_aligned(extra, main, what: str) -> None:
    if extra.n != main.n or not np.array_equal(np.asarray(extra.values), np.asarray(main.values)):
        raise MLPMemError(f"{extra.path} does not hold the same rows as {main.path} ({what}); delete it and re-run")


# ---------------------------------------------------------------------------------------------
# Scoring a memory: log-prob of the true token on validation and test, lambda chosen on validation.
# ---------------------------------------------------------------------------------------------


def memory_logprobs(memory, x: np.ndarray, values: np.ndarray, device, batch: int) -> np.ndarray:
    out = np.empty(len(values), np.float32)
    memory.eval()
    with torch.inference_mode():
        for s in range(0, len(values), batch):
            e = min(len(values), s + batch)
            xb = torch.from_numpy(np.asarray(x[s:e], dtype=np.float32)).to(device)
            tgt = torch.from_numpy(np.asarray(values[s:e], dtype=np.int64)).to(device)
            logits = memory(xb)
            out[s:e] = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt[:, None])[:, 0].cpu().numpy()
    return out


def score_memory(memory, src: Source, tune, test, lambdas: list[float], device, batch: int) -> dict:
    mem_v = memory_logprobs(memory, src.tune, tune.values, device, batch).astype(np.float64)
    mem_t = memory_logprobs(memory, src.test, test.values, device, batch).astype(np.float64)
    lm_v, lm_t = np.asarray(tune.lm_logprob, np.float64), np.asarray(test.lm_logprob, np.float64)
    rows = sweep({"lm": lm_v, "memory": mem_v}, lambdas)
    chosen = choose(rows, "memory")
    lam = chosen["lambda"]
    return {
        "lambda": lam, "validation_ppl": chosen["ppl"], "test_ppl": perplexity(mix_logprobs(lm_t, mem_t, lam)),
        "memory_alone_test_ppl": perplexity(mem_t), "memory_alone_validation_ppl": perplexity(mem_v),
        "validation_sweep": [{"lambda": r["lambda"], "ppl": r["ppl"]} for r in rows if r["system"] == "memory"],
    }


# ---------------------------------------------------------------------------------------------
# The script.
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a complete run directory produced by `mlpmem run`")
    ap.add_argument("--only", choices=["layer", "alpha"], help="run only one of the two ablations")
    ap.add_argument("--sites", default="0.5,0.7,0.85,last", help="memory input sites of the layer ablation")
    ap.add_argument("--alphas", default="0,0.4,0.7,1", help="KL weights of the alpha ablation")
    ap.add_argument("--epochs", type=float, default=None, help="override the run's training epochs (all memories)")
    ap.add_argument("--eval-batch", type=int, default=1024, help="rows per memory forward when scoring")
    ap.add_argument("--out", default=None, help="JSON report (default <run>/ablations/ablations.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run_ablations(args)
    except MLPMemError as e:
        print(f"ablations: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


def run_ablations(args) -> dict:
    run = Path(args.run_dir)
    if not (run / "config.json").exists():
        raise MLPMemError(f"{run} has no config.json: give a run directory produced by `mlpmem run`")
    # config.json is nested by settings group ({"train": {"alpha": ...}}); older runs saved it flat.
    # Either way, read it as one flat dict over the current defaults.
    cfg = {**defaults(), **flatten(read_json(run / "config.json"), f"{run}/config.json")}
    progress = not args.quiet
    abl = run / ABLATIONS
    out_path = Path(args.out) if args.out else abl / "ablations.json"
    try:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        lambdas = [float(x) for x in str(cfg["lambdas"]).split(",") if x.strip()]
    except ValueError as e:
        raise MLPMemError(f"--sites/--alphas/lambdas do not parse: {e}") from None
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise MLPMemError(f"--alphas must lie within [0, 1], got {args.alphas!r}")
    if args.epochs is not None and args.epochs <= 0:
        raise MLPMemError(f"--epochs must be positive, got {args.epochs}")
    if args.epochs is not None and float(args.epochs) == float(cfg["epochs"]):
        args.epochs = None  # not an override: share the memories of a run without --epochs

    # -- the run's artifacts ------------------------------------------------------------------
    for stage in ("corpus", "datastore", "tune", "targets", "memory"):
        read_manifest(run / stage, stage)  # clear error if a stage is missing or unfinished
    if cfg.get("eval_text"):
        test_dir, test_tokens = run / "eval_text", run / "eval_text_tokens" / "train.i32"
    else:
        test_dir, test_tokens = run / "eval_test", run / "corpus" / "heldout.i32"
    ds = open_datastore(run / "datastore")
    tune = open_datastore(run / "tune", "validation slice")
    test = open_datastore(test_dir, "test eval dir")
    for x, what in ((tune, "validation slice"), (test, "test eval dir")):
        if x.lm_logprob is None:
            raise MLPMemError(f"the {what} {x.path} has no base-LM log-probs; re-run `mlpmem run`")
        if x.manifest.get("model_fingerprint") != ds.manifest["model_fingerprint"]:
            raise MLPMemError(f"the {what} {x.path} was built with another model than the datastore; re-run `mlpmem run`")
    targets = open_targets(run / "targets", ds.manifest)

    lm = load_model(cfg["model"], cache_dir=cfg.get("cache_dir"), device=cfg.get("device", "auto"),
                    dtype=cfg.get("dtype", "auto"))
    if lm.fingerprint != ds.manifest["model_fingerprint"]:
        raise MLPMemError(f"{cfg['model']} loaded as {lm.dtype} has fingerprint {lm.fingerprint} but the run's "
                          f"datastore was built with {ds.manifest['model_fingerprint']} ({ds.manifest.get('dtype')}); "
                          "the ablations must use the run's exact model and dtype (check config.json's model/dtype/device)")
    log(f"model {cfg['model']} ({lm.dtype}, {lm.device}); datastore {ds.n:,} rows, validation {tune.n:,}, test {test.n:,}")

    # -- settings of the run's own memory training -------------------------------------------
    settings = TrainSettings(alpha=float(cfg["alpha"]), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                             warmup=float(cfg["warmup"]),
                             epochs=float(args.epochs if args.epochs is not None else cfg["epochs"]),
                             train_batch=int(cfg["train_batch"]), grad_clip=float(cfg["grad_clip"]), seed=int(cfg["seed"]),
                             val_rows=int(cfg["val_rows"]), checkpoint_every=int(cfg["checkpoint_every"]),
                             train_mode="offline")
    sizing = ({"n_blocks": cfg["memory_blocks"]} if cfg.get("memory_blocks") else
              {"param_ratio": cfg["memory_param_ratio"]} if cfg.get("memory_param_ratio") else
              {"preset": cfg.get("memory_preset") or "small"})
    run_mem = read_manifest(run / "memory", "memory")
    notes = []
    for key in ("alpha", "lr", "weight_decay", "warmup", "epochs", "batch_rows", "grad_clip", "seed", "val_rows"):
        ours, theirs = asdict(settings)[key], (run_mem.get("settings") or {}).get(key)
        if key == "epochs" and args.epochs is not None:
            continue
        if theirs is not None and ours != theirs:
            notes.append(f"config.json {key}={ours} differs from the run's memory training ({theirs}); "
                         "the ablations follow config.json")
    for n in notes:
        log(f"warning: {n}")

    # -- the sites to compare, and the stored states they need ---------------------------------
    default_site = ds.manifest.get("mem_site") or resolve_site(lm.model, cfg["mem_site"]).to_dict()
    wanted: list[tuple[str, CaptureSite]] = []
    if args.only != "alpha":
        wanted = [(spec, resolve_site(lm.model, spec)) for spec in sites]
    sources = stored_sources(ds, tune, test, "datastore")
    needed = list(wanted)
    if args.only != "layer" and default_site["module"] not in sources:  # the run stored no memory inputs
        needed.append((str(cfg["mem_site"]), resolve_site(lm.model, cfg["mem_site"])))
    missing_specs: list[str] = []  # one spec per site not stored yet, in order
    missing_modules: set[str] = set()
    for spec, cs in needed:
        if cs.module_path not in sources and cs.module_path not in missing_modules:
            missing_specs.append(spec)
            missing_modules.add(cs.module_path)
    checks = {}
    block, stride, bs = int(ds.manifest["block"]), int(ds.manifest["stride"]), int(ds.manifest["batch_size"])
    for i in range(0, len(missing_specs), 2):
        pair = missing_specs[i:i + 2]
        key_spec, mem_spec = pair[0], (pair[1] if len(pair) > 1 else None)
        name = "ds_" + "_".join(site_tag(s) for s in pair)
        common = dict(key_site=key_spec, mem_site=mem_spec, block=block, stride=stride, batch_size=bs, progress=progress)
        t0 = time.perf_counter()
        log(f"{name}: hidden states at {' and '.join(pair)} over train ({ds.manifest['n_tokens']:,} tokens), "
            f"validation and test")
        build_datastore(lm, run / "corpus" / "train.i32", int(ds.manifest["n_tokens"]), abl / name,
                        identity={"corpus_fingerprint": ds.manifest["corpus_fingerprint"], "split": "train"},
                        token_start=int(ds.manifest.get("token_start", 0)), **common)
        build_datastore(lm, run / "corpus" / "heldout.i32", int(tune.manifest["n_tokens"]), abl / f"{name}_tune",
                        store_lm_logprob=True, token_start=int(tune.manifest.get("token_start", 0)),
                        identity={"corpus_fingerprint": tune.manifest["corpus_fingerprint"],
                                  "split": tune.manifest.get("split", "heldout-validation")}, **common)
        build_eval_dir(lm, test_tokens, int(test.manifest["n_tokens"]), abl / f"{name}_test",
                       token_start=int(test.manifest.get("token_start", 0)),
                       identity={"corpus_fingerprint": test.manifest["corpus_fingerprint"],
                                 "split": test.manifest.get("split", "heldout-test")}, **common)
        e_ds, e_tune, e_test = (open_datastore(abl / name), open_datastore(abl / f"{name}_tune"),
                                open_datastore(abl / f"{name}_test"))
        for extra, main_, what in ((e_ds, ds, "train"), (e_tune, tune, "validation"), (e_test, test, "test")):
            check_aligned(extra, main_, what)
        # Same model, same windows: the base LM's log-probs must agree with the run's cached ones.
        checks[name] = {
            "seconds_this_session": round(time.perf_counter() - t0, 2),
            "max_abs_lm_logprob_diff_validation": float(np.max(np.abs(np.asarray(e_tune.lm_logprob) - tune.lm_logprob))),
            "max_abs_lm_logprob_diff_test": float(np.max(np.abs(np.asarray(e_test.lm_logprob) - test.lm_logprob))),
        }
        for new_module, src in stored_sources(e_ds, e_tune, e_test, f"{ABLATIONS}/{name}").items():
            sources.setdefault(new_module, src)

    # -- the jobs: (ablation, setting) rows, each a memory keyed by (site, alpha) ---------------
    jobs = []  # dicts: ablation, setting, site, alpha
    if args.only != "alpha":
        for spec, cs in wanted:
            jobs.append({"ablation": "input layer", "setting": site_label(spec, cs.to_dict()), "spec": spec,
                         "site": sources[cs.module_path].site, "alpha": settings.alpha})
    if args.only != "layer":
        for a in alphas:
            jobs.append({"ablation": "alpha", "setting": f"alpha={a:g}", "spec": "default",
                         "site": sources[default_site["module"]].site, "alpha": a})

    ppl_json = read_json(run / "eval" / "ppl.json") if (run / "eval" / "ppl.json").exists() else None
    reference = reference_rows(run, ppl_json, test, run_mem)
    report = {
        "run_dir": str(run), "model": cfg["model"], "model_fingerprint": lm.fingerprint, "dtype": str(lm.dtype),
        "datastore_rows": ds.n, "validation_tokens": tune.n, "test_tokens": test.n, "test_dir": str(test_dir),
        "targets": {k: read_manifest(run / "targets").get(k) for k in ("k", "temperature", "mean_nnz")},
        "lambdas": lambdas,
        "training": {**asdict(settings), "sizing": sizing, "head_init": cfg.get("head_init", "embedding"),
                     "epochs_override": args.epochs},
        "reference": reference, "extra_datastores": checks, "notes": notes, "rows": [], "complete": False,
    }

    done: dict[str, dict] = {}
    for job in jobs:
        name = memory_dir_name(job["site"], job["alpha"], args.epochs)
        if name not in done:
            done[name] = train_and_score(lm, ds, tune, test, targets, sources[job["site"]["module"]], abl, name,
                                         job["alpha"], settings, sizing, cfg, lambdas, args.eval_batch, progress)
        res = done[name]
        base = reference["base"]["test_ppl"]
        report["rows"].append({"ablation": job["ablation"], "setting": job["setting"], "site_spec": job["spec"],
                               **res, "change_vs_base_pct": 100.0 * (res["test_ppl"] / base - 1.0)})
        atomic_write_json(out_path, json_safe(report))
    # The memory at the run's own site and alpha must reproduce the run's memory (same seed, data, settings).
    own = reference.get("run_memory")
    for row in report["rows"]:
        if own and row["input_site"]["module"] == own.get("input_module") and row["alpha"] == own.get("alpha") \
                and args.epochs is None and not notes:
            report["reproduces_run_memory"] = {"ablation_test_ppl": row["test_ppl"], "run_test_ppl": own["test_ppl"],
                                               "relative_diff": row["test_ppl"] / own["test_ppl"] - 1.0}
            break
    report["complete"] = True
    atomic_write_json(out_path, json_safe(report))
    log(f"report: {out_path}")
    return report


def train_and_score(lm, ds, tune, test, targets, src: Source, abl: Path, name: str, alpha: float,
                    base_settings: TrainSettings, sizing: dict, cfg: dict, lambdas, eval_batch: int, progress: bool) -> dict:
    out = abl / name
    settings = TrainSettings(**{**asdict(base_settings), "alpha": float(alpha)})
    torch.manual_seed(settings.seed)  # as the pipeline does before building the memory
    mcfg = memory_config_for(lm, src.site, head_init=cfg.get("head_init", "embedding"), **sizing)
    memory = build_memory(lm, mcfg)
    identity = {"datastore_fingerprint": sha256_json(ds.manifest), "input_source": src.origin,
                "input_fingerprint": src.fingerprint}
    sidecar = abl / f"{name}.result.json"
    side = read_json(sidecar) if sidecar.exists() else {}
    before = read_json(out / "manifest.json") if (out / "manifest.json").exists() else {}
    log(f"{name}: memory on {src.site['module']} ({src.origin}), alpha {alpha:g}, {mcfg.n_blocks} blocks, "
        f"{memory.num_parameters():,} params")
    t0 = time.perf_counter()
    manifest = train_memory(memory, ds, targets, out, settings, inputs=RowInputs(src.train), device=lm.device,
                            progress=progress, identity=identity)
    seconds = time.perf_counter() - t0
    skipped = bool(before.get("complete")) and before.get("training_fingerprint") == manifest["training_fingerprint"]
    if skipped:
        if side.get("training_fingerprint") == manifest["training_fingerprint"] and side.get("train_seconds") is not None:
            seconds, how = side["train_seconds"], side.get("train_seconds_how", "measured")
        else:
            rps = manifest.get("rows_per_s_this_session")
            seconds = manifest["steps"] * manifest["batch_rows"] / rps if rps else None
            how = "estimated from the manifest's rows/s"
        log(f"{name}: already trained")
    else:
        how = "measured (this session only, if it resumed a checkpoint)"
    del memory
    mem_fp = memory_dir_fingerprint(out)
    key = sha256_json({"memory": mem_fp, "input": src.fingerprint, "tune": tune.manifest, "test": test.manifest,
                       "lambdas": lambdas})
    if side.get("eval_key") == key:
        scores = side["scores"]
        log(f"{name}: already scored")
    else:
        memory = MLPMemory.from_pretrained(out, base=lm, device=lm.device)
        if memory.config.input_site.get("module") != src.site["module"]:
            raise MLPMemError(f"{out} reads {memory.config.input_site.get('module')} but was trained on {src.site['module']}")
        scores = score_memory(memory, src, tune, test, lambdas, lm.device, eval_batch)
    val = manifest.get("validation") or {}
    result = {
        "name": name, "dir": str(out), "input_site": src.site, "input_source": src.origin, "alpha": float(alpha),
        "test_ppl": scores["test_ppl"], "lambda": scores["lambda"], "validation_ppl": scores["validation_ppl"],
        "memory_alone_test_ppl": scores["memory_alone_test_ppl"],
        "memory_alone_validation_ppl": scores["memory_alone_validation_ppl"],
        "val_kl": val.get("kl"), "val_ce": val.get("ce"), "val_loss": val.get("loss"),
        "train_seconds": seconds, "train_seconds_how": how, "steps": manifest["steps"],
        "memory_params": manifest["memory_params"], "n_blocks": mcfg.n_blocks,
        "validation_sweep": scores["validation_sweep"],
    }
    atomic_write_json(sidecar, json_safe({"training_fingerprint": manifest["training_fingerprint"],
                                           "train_seconds": seconds, "train_seconds_how": how,
                                           "eval_key": key, "scores": scores}))
    log(f"{name}: test PPL {scores['test_ppl']:.3f} at lambda {scores['lambda']:g} "
        f"(memory alone {scores['memory_alone_test_ppl']:.2f})")
    return result


def reference_rows(run: Path, ppl_json: dict | None, test, run_mem: dict) -> dict:
    """Base LM, the run's kNN-LM and the run's own memory, from <run>/eval/ppl.json."""
    base_here = perplexity(np.asarray(test.lm_logprob, np.float64))
    ref = {"base": {"test_ppl": base_here, "source": f"{test.path}/lm_logprob.f32"}}
    if ppl_json is None:
        return ref
    systems = ppl_json["test"]["systems"]
    if ppl_json["test"].get("tokens_scored") != test.n or not math.isclose(systems["base"]["ppl"], base_here, rel_tol=1e-9):
        ref["warning"] = (f"eval/ppl.json scored {ppl_json['test'].get('tokens_scored')} test tokens at base PPL "
                          f"{systems['base']['ppl']:.4f}, the test eval dir {test.n} at {base_here:.4f}: "
                          "ppl.json is stale; re-run `mlpmem run`")
    if "knn_lm" in systems:
        k = systems["knn_lm"]
        ref["knn_lm"] = {"test_ppl": k["ppl"], "lambda": k["lambda"], "T": k["T"], "k": k.get("k"),
                         "knn_alone_test_ppl": k.get("knn_alone_ppl")}
    if "memory" in systems:
        m = systems["memory"]
        mcfg = read_json(run / "memory" / "config.json")
        timings = read_json(run / "timings.json") if (run / "timings.json").exists() else {}
        ref["run_memory"] = {"test_ppl": m["ppl"], "lambda": m["lambda"], "memory_alone_test_ppl": m.get("memory_alone_ppl"),
                             "input_module": (mcfg.get("input_site") or {}).get("module"),
                             "input_layer": (mcfg.get("input_site") or {}).get("layer"),
                             "alpha": (run_mem.get("settings") or {}).get("alpha"),
                             "val_kl": (run_mem.get("validation") or {}).get("kl"),
                             "val_ce": (run_mem.get("validation") or {}).get("ce"),
                             "train_seconds": timings.get("memory")}
    return ref


def format_table(report: dict) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    def secs(x):
        return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"

    ref = report["reference"]
    base = ref["base"]["test_ppl"]

    def pct(p):
        return "-" if p is None else f"{100 * (p / base - 1):+.2f}%"

    t = report["training"]
    lines = [f"Ablations of {report['run_dir']} ({report['model']}): held-out test perplexity on "
             f"{report['test_tokens']:,} tokens, lambda chosen on {report['validation_tokens']:,} validation tokens; "
             f"memories trained on the run's {report['datastore_rows']:,} kNN targets "
             f"(k={report['targets']['k']}, T={f(report['targets']['temperature'], '.3g')}), "
             f"{t['epochs']:g} epoch(s), lr {t['lr']:g}, batch {t['batch_rows']}, seed {t['seed']}.", "",
             "| ablation | setting | test PPL | vs base % | lambda | memory-alone PPL | val KL | val CE | train seconds |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| reference | base LM | {base:.3f} | | | | | | |"]
    if "knn_lm" in ref:
        k = ref["knn_lm"]
        lines.append(f"| reference | + kNN-LM (T={f(k['T'], '.3g')}, k={k['k']}) | {k['test_ppl']:.3f} | "
                     f"{pct(k['test_ppl'])} | {f(k['lambda'], 'g')} | {f(k['knn_alone_test_ppl'], '.2f')} | | | |")
    if "run_memory" in ref:
        m = ref["run_memory"]
        lines.append(f"| reference | run's memory (layer {m['input_layer']}, alpha={f(m['alpha'], 'g')}) | "
                     f"{m['test_ppl']:.3f} | {pct(m['test_ppl'])} | {f(m['lambda'], 'g')} | "
                     f"{f(m['memory_alone_test_ppl'], '.2f')} | {f(m['val_kl'], '.3f')} | {f(m['val_ce'], '.3f')} | "
                     f"{secs(m['train_seconds'])} |")
    alpha_site = None
    for r in report["rows"]:
        setting = r["setting"] if r["ablation"] == "alpha" else f"{r['setting']}, alpha={r['alpha']:g}"
        if r["ablation"] == "alpha":
            alpha_site = r["input_site"]
        lines.append(f"| {r['ablation']} | {setting} | {r['test_ppl']:.3f} | {pct(r['test_ppl'])} | {r['lambda']:g} | "
                     f"{f(r['memory_alone_test_ppl'], '.2f')} | {f(r['val_kl'], '.3f')} | {f(r['val_ce'], '.3f')} | "
                     f"{secs(r['train_seconds'])} |")
    lines.append("")
    if alpha_site:
        lines.append(f"alpha ablation input: {alpha_site['module']} (layer {alpha_site.get('layer')}/"
                     f"{alpha_site.get('n_layers')}, the run's stored memory inputs). Val KL / CE: the memory's loss "
                     "parts on datastore rows held out of training.")
    by_dir: dict[str, list[str]] = {}
    for r in report["rows"]:
        by_dir.setdefault(r["name"], []).append(f"{r['ablation']} {r['setting']}")
    shared = [f"{' = '.join(v)} ({k})" for k, v in by_dir.items() if len(v) > 1]
    if shared:
        lines.append("same trained memory: " + "; ".join(shared))
    edge = [r["name"] for r in report["rows"] if r["lambda"] in (min(report["lambdas"]), max(report["lambdas"]))]
    if edge:
        lines.append(f"note: lambda was chosen at the edge of the grid for {', '.join(dict.fromkeys(edge))}; "
                     "widen `lambdas` in config.json to see the optimum")
    rep = report.get("reproduces_run_memory")
    if rep:
        lines.append(f"check: the ablation memory at the run's own site and alpha gives {rep['ablation_test_ppl']:.4f} "
                     f"vs the run's {rep['run_test_ppl']:.4f} (relative diff {rep['relative_diff']:+.2e})")
    for name, c in report.get("extra_datastores", {}).items():
        lines.append(f"check: {name} base-LM log-probs vs the run's: max |diff| validation "
                     f"{c['max_abs_lm_logprob_diff_validation']:.2e}, test {c['max_abs_lm_logprob_diff_test']:.2e}")
    if ref.get("warning"):
        lines.append(f"warning: {ref['warning']}")
    for n in report.get("notes", []):
        lines.append(f"warning: {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
