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

Training and scoring are `mlpmemory.study` (the engine of `mlpmem scaling`): every memory trains
with the run's own settings (sizes, head init, lr, epochs, batch, seed, ...) on the SAME kNN
targets, and is scored on the run's held-out test half with lambda chosen on the validation slice
from the run's lambda grid, exactly like `mlpmem run`'s eval stage. What is ablation-specific is
here: capturing the sites the run did not store, and the table.

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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mlpmemory.capture import resolve_site
from mlpmemory.commands.stages import saved_settings
from mlpmemory.config import make_config
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError
from mlpmemory.evaluate import build_eval_dir, json_safe, perplexity
from mlpmemory.io import atomic_write_json, read_json, read_manifest, sha256_json
from mlpmemory.pipeline import Run
from mlpmemory.study import Inputs, Study

ABLATIONS = "ablations"


def log(msg: str) -> None:
    print(f"[ablations] {msg}", file=sys.stderr, flush=True)


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


def stored_inputs(ds, tune, test, prefix: str) -> dict[str, Inputs]:
    """The sites whose states all three stores hold, by module path."""
    out = {}
    for array, site_field in (("keys", "key_site"), ("mem_inputs", "mem_site")):
        site = ds.manifest.get(site_field)
        arrays = [getattr(x, array) for x in (ds, tune, test)]
        if not site or any(a is None for a in arrays):
            continue
        for x, what in ((tune, "validation slice"), (test, "test eval dir")):
            if (x.manifest.get(site_field) or {}).get("module") != site["module"]:
                raise MLPMemError(f"the {what} {x.path} stored {site_field} "
                                  f"{(x.manifest.get(site_field) or {}).get('module')!r} but the datastore "
                                  f"{site['module']!r}; rebuild it")
        fp = sha256_json({"array": array, "train": ds.manifest, "tune": tune.manifest, "test": test.manifest})
        out.setdefault(site["module"], Inputs(dict(site), *arrays, origin=f"{prefix}/{array}", fingerprint=fp))
    return out


def check_aligned(extra, main, what: str) -> None:
    if extra.n != main.n or not np.array_equal(np.asarray(extra.values), np.asarray(main.values)):
        raise MLPMemError(f"{extra.path} does not hold the same rows as {main.path} ({what}); delete it and re-run")


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
    ap.add_argument("--out", default=None, help="JSON report (default <run>/ablations/ablations.json)")
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


def _open_run(args) -> Run:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists():
        raise MLPMemError(f"{run_dir} has no config.json: give a run directory produced by `mlpmem run`")
    for stage in ("corpus", "datastore", "tune", "eval_test", "targets", "memory"):
        read_manifest(run_dir / stage, stage)  # clear error if a stage is missing or unfinished
    return Run(make_config(base=saved_settings(str(run_dir)), run_dir=str(run_dir)))


def _parse_lists(args, run: Run) -> tuple[list[str], list[float]]:
    try:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError as e:
        raise MLPMemError(f"--sites/--alphas do not parse: {e}") from None
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise MLPMemError(f"--alphas must lie within [0, 1], got {args.alphas!r}")
    if args.epochs is not None and args.epochs <= 0:
        raise MLPMemError(f"--epochs must be positive, got {args.epochs}")
    if args.epochs is not None and float(args.epochs) == float(run.cfg.train.epochs):
        args.epochs = None  # not an override: share the memories of a run without --epochs
    return sites, alphas


def _capture_missing(study: Study, abl: Path, specs: list[str], sources: dict) -> dict:
    """One extra base-LM pass per pair of sites not stored yet, over the train rows, validation and test."""
    ds, tune, test = study.ds, study.eval["valid"], study.eval["test"]
    lm, checks = study.run.lm, {}
    block, stride, bs = int(ds.manifest["block"]), int(ds.manifest["stride"]), int(ds.manifest["batch_size"])
    for i in range(0, len(specs), 2):
        pair = specs[i:i + 2]
        name = "ds_" + "_".join(site_tag(s) for s in pair)
        common = dict(key_site=pair[0], mem_site=pair[1] if len(pair) > 1 else None, block=block, stride=stride,
                      batch_size=bs)
        t0 = time.perf_counter()
        log(f"{name}: hidden states at {' and '.join(pair)} over train ({ds.manifest['n_tokens']:,} tokens), "
            f"validation and test")
        corpus = study.run.path("corpus")
        for src, dst, x, split, extra in (
                (corpus / "train.i32", abl / name, ds, "train", {}),
                (corpus / "heldout.i32", abl / f"{name}_tune", tune, None, {"store_lm_logprob": True}),
                (corpus / "heldout.i32", abl / f"{name}_test", test, None, None)):
            split = split or x.manifest.get("split", "heldout-validation" if extra else "heldout-test")
            builder = build_eval_dir if extra is None else build_datastore
            builder(lm, src, int(x.manifest["n_tokens"]), dst, token_start=int(x.manifest.get("token_start", 0)),
                    identity={"corpus_fingerprint": x.manifest["corpus_fingerprint"], "split": split},
                    **common, **(extra or {}))
        e_ds, e_tune, e_test = (open_datastore(abl / n) for n in (name, f"{name}_tune", f"{name}_test"))
        for extra_ds, main_, what in ((e_ds, ds, "train"), (e_tune, tune, "validation"), (e_test, test, "test")):
            check_aligned(extra_ds, main_, what)
        # Same model, same windows: the base LM's log-probs must agree with the run's cached ones.
        checks[name] = {
            "seconds_this_session": round(time.perf_counter() - t0, 2),
            "max_abs_lm_logprob_diff_validation":
                float(np.max(np.abs(np.asarray(e_tune.lm_logprob) - tune.lm_logprob))),
            "max_abs_lm_logprob_diff_test": float(np.max(np.abs(np.asarray(e_test.lm_logprob) - test.lm_logprob))),
        }
        for module, src in stored_inputs(e_ds, e_tune, e_test, f"{ABLATIONS}/{name}").items():
            sources.setdefault(module, src)
    return checks


def _jobs(study: Study, args, sites: list[str], alphas: list[float], abl: Path) -> tuple[list, dict, dict]:
    """The (ablation, setting) rows, the inputs of every site they need, and the extra-pass checks."""
    lm, cfg = study.run.lm, study.run.cfg
    default_site = study.ds.manifest.get("mem_site") or resolve_site(lm.model, cfg.datastore.mem_site).to_dict()
    wanted = [(spec, resolve_site(lm.model, spec)) for spec in sites] if args.only != "alpha" else []
    sources = stored_inputs(study.ds, study.eval["valid"], study.eval["test"], "datastore")
    needed = wanted + ([(cfg.datastore.mem_site, resolve_site(lm.model, cfg.datastore.mem_site))]
                       if args.only != "layer" and default_site["module"] not in sources else [])
    missing: dict[str, str] = {}  # module -> the first spec naming it, for the sites not stored yet
    for spec, cs in needed:
        if cs.module_path not in sources:
            missing.setdefault(cs.module_path, spec)
    checks = _capture_missing(study, abl, list(missing.values()), sources)
    jobs = [{"ablation": "input layer", "setting": site_label(spec, cs.to_dict()), "spec": spec,
             "site": sources[cs.module_path].site, "alpha": cfg.train.alpha} for spec, cs in wanted]
    if args.only != "layer":
        jobs += [{"ablation": "alpha", "setting": f"alpha={a:g}", "spec": "default",
                  "site": sources[default_site["module"]].site, "alpha": a} for a in alphas]
    return jobs, sources, checks


def run_ablations(args) -> dict:
    run = _open_run(args)
    sites, alphas = _parse_lists(args, run)
    abl = run.dir / ABLATIONS
    out_path = Path(args.out) if args.out else abl / "ablations.json"
    study = Study(run)
    log(f"model {run.cfg.run.model} ({run.lm.dtype}, {run.lm.device}); datastore {study.ds.n:,} rows, "
        f"validation {study.eval['valid'].n:,}, test {study.eval['test'].n:,}")
    jobs, sources, checks = _jobs(study, args, sites, alphas, abl)
    run_mem, test = read_manifest(run.path("memory"), "memory"), study.eval["test"]
    ppl_path = run.path("eval") / "ppl.json"
    reference = reference_rows(run.dir, read_json(ppl_path) if ppl_path.exists() else None, test, run_mem)
    epochs = args.epochs if args.epochs is not None else run.cfg.train.epochs
    report = {
        "run_dir": str(run.dir), "model": run.cfg.run.model, "model_fingerprint": run.lm.fingerprint,
        "dtype": str(run.lm.dtype), "datastore_rows": study.ds.n, "validation_tokens": study.eval["valid"].n,
        "test_tokens": test.n, "test_dir": str(test.path),
        "targets": {k: read_manifest(run.path("targets")).get(k) for k in ("k", "temperature", "mean_nnz")},
        "lambdas": study.lambdas, "training": {**asdict(study.with_settings(epochs=epochs)),
                                               "epochs_override": args.epochs},
        "reference": reference, "extra_datastores": checks, "rows": [], "complete": False,
    }
    done: dict[str, dict] = {}
    for job in jobs:
        name = memory_dir_name(job["site"], job["alpha"], args.epochs)
        if name not in done:
            done[name] = train_and_score(study, sources[job["site"]["module"]], abl, name, job["alpha"], epochs)
        res, base = done[name], reference["base"]["test_ppl"]
        report["rows"].append({"ablation": job["ablation"], "setting": job["setting"], "site_spec": job["spec"],
                               **res, "change_vs_base_pct": 100.0 * (res["test_ppl"] / base - 1.0)})
        atomic_write_json(out_path, json_safe(report))
    report["reproduces_run_memory"] = _reproduces(report, reference, args)
    report["complete"] = True
    atomic_write_json(out_path, json_safe(report))
    log(f"report: {out_path}")
    return report


def _reproduces(report: dict, reference: dict, args) -> dict | None:
    """The memory at the run's own site and alpha must reproduce the run's memory (same seed, data, settings)."""
    own = reference.get("run_memory")
    for row in report["rows"]:
        if own and row["input_site"]["module"] == own.get("input_module") and row["alpha"] == own.get("alpha") \
                and args.epochs is None:
            return {"ablation_test_ppl": row["test_ppl"], "run_test_ppl": own["test_ppl"],
                    "relative_diff": row["test_ppl"] / own["test_ppl"] - 1.0}
    return None


def train_and_score(study: Study, src: Inputs, abl: Path, name: str, alpha: float, epochs: float) -> dict:
    """One memory on ``src`` at ``alpha``, trained and scored by the study engine (both resumable)."""
    settings = study.with_settings(alpha=float(alpha), epochs=float(epochs), train_mode="offline")
    mcfg = study.memory_config(site=src.site)
    before = read_json(abl / name / "manifest.json") if (abl / name / "manifest.json").exists() else {}
    log(f"{name}: memory on {src.site['module']} ({src.origin}), alpha {alpha:g}, {mcfg.n_blocks} blocks")
    t0 = time.perf_counter()
    out, manifest = study.train(abl / name, mcfg, settings, inputs=src)
    seconds, how = time.perf_counter() - t0, "measured (this session only, if it resumed a checkpoint)"
    if before.get("complete") and before.get("training_fingerprint") == manifest["training_fingerprint"]:
        rps = manifest.get("rows_per_s_this_session")
        seconds, how = (manifest["steps"] * manifest["batch_rows"] / rps if rps else None,
                        "estimated from the manifest's rows/s")
    scores = study.score(study.memory_logprobs(abl / "logprobs", name, out, src))
    val = manifest.get("validation") or {}
    log(f"{name}: test PPL {scores['mixed_test_ppl']:.3f} at lambda {scores['lambda']:g} "
        f"(memory alone {scores['memory_alone_test_ppl']:.2f})")
    return {"name": name, "dir": str(out), "input_site": src.site, "input_source": src.origin, "alpha": float(alpha),
            "test_ppl": scores["mixed_test_ppl"], "lambda": scores["lambda"],
            "validation_ppl": scores["valid_mixed_ppl"],
            "memory_alone_test_ppl": scores["memory_alone_test_ppl"],
            "memory_alone_validation_ppl": scores["memory_alone_valid_ppl"],
            "val_kl": val.get("kl"), "val_ce": val.get("ce"), "val_loss": val.get("loss"),
            "train_seconds": seconds, "train_seconds_how": how, "steps": manifest["steps"],
            "memory_params": manifest["memory_params"], "n_blocks": mcfg.n_blocks,
            "validation_sweep": scores["validation_sweep"]}


def reference_rows(run: Path, ppl_json: dict | None, test, run_mem: dict) -> dict:
    """Base LM, the run's kNN-LM and the run's own memory, from <run>/eval/ppl.json."""
    base_here = perplexity(np.asarray(test.lm_logprob, np.float64))
    ref = {"base": {"test_ppl": base_here, "source": f"{test.path}/lm_logprob.f32"}}
    if ppl_json is None:
        return ref
    systems = ppl_json["test"]["systems"]
    if (ppl_json["test"].get("tokens_scored") != test.n
            or not math.isclose(systems["base"]["ppl"], base_here, rel_tol=1e-9)):
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
        ref["run_memory"] = {"test_ppl": m["ppl"], "lambda": m["lambda"],
                             "memory_alone_test_ppl": m.get("memory_alone_ppl"),
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
             f"{t['epochs']:g} epoch(s), lr {t['lr']:g}, batch {t['train_batch']}, seed {t['seed']}.", "",
             "| ablation | setting | test PPL | vs base % | lambda | memory-alone PPL | val KL | val CE | "
             "train seconds |",
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
