"""`mlpmem scaling`: memories of several sizes trained on the same kNN targets; held-out perplexity
against parameters (with a fitted power law) and against training tokens (the paper's Figure 5).

Why it is written this way:

- **One run, one set of targets.** Every memory is trained with the run's own training settings
  (``run.cfg``) on the run's datastore and targets, and differs only in its number of blocks, so
  the curve measures size, nothing else. ``--scaling-epochs`` may shorten all of them alike.
- **The same protocol as ``eval-ppl``.** Lambda is chosen per memory on the run's validation
  eval dir (``tune/``) and reported on its test eval dir (``eval_test/``, or ``eval_text/``),
  with :func:`mlpmemory.evaluate.sweep` / :func:`~mlpmemory.evaluate.choose` over the run's
  ``--lambdas``. Memory log-probs are cached under ``<out>/logprobs/`` keyed by the memory's
  weights, *not* in the shared eval dirs, whose one-memory cache belongs to ``eval-ppl``.
- **Against training tokens, for free.** The largest memory saves snapshots of its weights at
  fractions of its training (``--scaling-checkpoints``; :func:`mlpmemory.train.train_memory`'s
  ``snapshots``), which are scored like any memory: one training run gives the whole curve.
- **Built on a finished run.** When the run's targets and eval dirs are missing, the pipeline is
  run first (``pipeline.stage_eval``); otherwise the run's own eval report is left alone.
- **Resumable and idempotent.** Each size trains into ``<out>/blocks_<n>/`` through
  ``train_memory`` (resumes from its checkpoint; a finished one is a no-op). A size whose training
  would be identical to the run's own ``memory/`` (same fingerprint) reuses it. A second call with
  nothing changed rewrites nothing and prints the stored table.
- **The power law is fitted with numpy alone** (no scipy): ``PPL(N) = a N^-b + c``. For a fixed
  floor ``c`` the model is linear in log space, ``log(PPL - c) = log a - b log N``, solved by
  least squares; ``c`` is searched on a grid over ``[0, min PPL)`` that is zoomed around the best
  point a few times, minimising the squared error of ``log PPL`` (relative error, so small and
  large memories weigh alike). With fewer than three sizes ``c`` is fixed at 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import opt
from .errors import MLPMemError
from .manifest import atomic_write_json, is_complete, read_json, read_manifest, sha256_json, write_manifest

OUT_NAME = "scaling"


@dataclass
class Options:
    scaling_blocks: str = opt("1,2,4,8", "memory sizes to train, comma-separated: block counts and/or memory presets "
                                         "(tiny, small, base, parity)")
    scaling_epochs: float | None = opt(None, "training epochs of every memory in the study (default: the run's --epochs)")
    scaling_checkpoints: str = opt("0.25,0.5,1", "fractions of the largest memory's training at which it is "
                                                 "evaluated (perplexity vs training tokens)")
    scaling_out: str | None = opt(None, "output directory (default: <run-dir>/scaling)")

    def sizes(self) -> list:
        from .memory import PRESETS

        out = []
        for tok in (t.strip() for t in str(self.scaling_blocks).split(",")):
            if not tok:
                continue
            if tok in PRESETS:
                out.append(tok)
            elif tok.isdigit() and int(tok) >= 1:
                out.append(int(tok))
            else:
                raise MLPMemError(f"--scaling-blocks takes positive block counts or presets ({', '.join(PRESETS)}), "
                                  f"got {tok!r}")
        return out

    def fractions(self) -> list[float]:
        try:
            fr = sorted({float(x) for x in str(self.scaling_checkpoints).split(",") if x.strip()})
        except ValueError:
            raise MLPMemError(f"--scaling-checkpoints must be comma-separated numbers, got {self.scaling_checkpoints!r}") from None
        if any(not 0.0 < f <= 1.0 for f in fr):
            raise MLPMemError(f"--scaling-checkpoints must be fractions within (0, 1], got {self.scaling_checkpoints!r}")
        return fr

    def validate(self) -> None:
        if len(set(self.sizes())) < 2:
            raise MLPMemError(f"--scaling-blocks needs at least two sizes (three to fit the power law's floor), "
                              f"got {self.scaling_blocks!r}")
        self.fractions()
        if self.scaling_epochs is not None and not self.scaling_epochs > 0:
            raise MLPMemError(f"--scaling-epochs must be > 0, got {self.scaling_epochs}")


# ---------------------------------------------------------------------------------------------
# The power law.
# ---------------------------------------------------------------------------------------------


def _fit_fixed_c(logn: np.ndarray, y: np.ndarray, c: float):
    design = np.stack([np.ones_like(logn), -logn], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(design, np.log(y - c), rcond=None)
    pred = c + np.exp(log_a - b * logn)
    return float(np.exp(log_a)), float(b), float(np.sum((np.log(pred) - np.log(y)) ** 2))


def fit_power_law(n, y, *, grid: int = 200, rounds: int = 5) -> dict:
    """Fit ``y = a * n**(-b) + c`` with ``0 <= c < min(y)`` (see the module docstring).

    Returns ``{"a", "b", "c", "sse_log", "points", "method"}``.
    """
    n, y = np.asarray(n, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if n.shape != y.shape or n.size < 2 or not (np.all(np.isfinite(y)) and np.all(y > 0) and np.all(n > 0)):
        raise MLPMemError(f"a power-law fit needs at least two finite positive points, got n={n.tolist()}, y={y.tolist()}")
    logn = np.log(n)
    if n.size < 3:  # two points determine a and b only
        a, b, sse = _fit_fixed_c(logn, y, 0.0)
        return {"a": a, "b": b, "c": 0.0, "sse_log": sse, "points": int(n.size), "method": "log-space least squares, c fixed at 0"}
    top = float(y.min())
    lo, hi, best = 0.0, top, (math.inf, 0.0)
    for _ in range(rounds):
        cs = np.linspace(lo, hi, grid, endpoint=False)
        for c in cs:
            sse = _fit_fixed_c(logn, y, float(c))[2]
            if sse < best[0]:
                best = (sse, float(c))
        step = (hi - lo) / grid
        lo, hi = max(0.0, best[1] - step), min(top * (1 - 1e-12), best[1] + step)
    a, b, sse = _fit_fixed_c(logn, y, best[1])
    return {"a": a, "b": b, "c": best[1], "sse_log": sse, "points": int(n.size),
            "method": "grid over c in [0, min PPL) zoomed 5x, least squares of log(PPL - c) on log N, "
                      "minimising the squared error of log PPL"}


def power_law(n, fit: dict):
    return fit["a"] * np.asarray(n, dtype=np.float64) ** (-fit["b"]) + fit["c"]


# ---------------------------------------------------------------------------------------------
# Training and scoring the memories.
# ---------------------------------------------------------------------------------------------


def _train_size(run, ds, targets, mcfg, settings, out: Path, snapshots: list[float]) -> tuple[Path, dict]:
    """Train one memory (or reuse a finished identical one); its directory and training manifest."""
    import torch

    from .memory import build_memory
    from .pipeline import CORPUS, MEMORY, log
    from .train import OnlineInputs, train_memory, training_fingerprint

    identity = {"datastore_fingerprint": sha256_json(ds.manifest)}
    fp = training_fingerprint(settings, mcfg, targets, identity)
    main_dir = run.path(MEMORY)
    if not snapshots and is_complete(main_dir) and read_json(main_dir / "manifest.json").get("training_fingerprint") == fp:
        log(f"scaling: {mcfg.n_blocks} blocks = the run's own memory ({main_dir}), reused")
        return main_dir, read_json(main_dir / "manifest.json")
    if is_complete(out) and read_json(out / "manifest.json").get("training_fingerprint") == fp:
        return out, read_json(out / "manifest.json")
    torch.manual_seed(run.cfg.train.seed)
    memory = build_memory(run.lm, mcfg)
    log(f"scaling: training {mcfg.n_blocks} blocks ({memory.num_parameters():,} parameters) into {out}")
    inputs = OnlineInputs(run.lm, ds, run.path(CORPUS) / "train.i32") if settings.train_mode == "online" else None
    manifest = train_memory(memory, ds, targets, out, settings, inputs=inputs, device=run.lm.device,
                            identity=identity, snapshots=snapshots)
    return out, manifest


def _memory_logprobs_cached(cache: Path, name: str, memory_dir: Path, eval_dirs: dict, lm) -> dict:
    """{split: (N,) float64 log-probs of the true token} of the memory in ``memory_dir`` on each eval dir."""
    from .evaluate import _check_memory_site, _memory_logprobs, _open_eval_dir, _read_f32, _write_f32, memory_dir_fingerprint
    from .memory import MLPMemory

    want = {"memory_fingerprint": memory_dir_fingerprint(memory_dir),
            "eval": {split: sha256_json(read_manifest(d)) for split, d in eval_dirs.items()}}
    meta_path = cache / f"{name}.json"
    meta = read_json(meta_path) if meta_path.exists() else {}
    out, memory = {}, None
    for split, d in eval_dirs.items():
        ds = _open_eval_dir(d)
        arr = None
        if meta.get("memory_fingerprint") == want["memory_fingerprint"] and meta.get("eval", {}).get(split) == want["eval"][split]:
            arr = _read_f32(cache / f"{name}.{split}.f32", ds.n)
        if arr is None:
            if memory is None:
                memory = MLPMemory.from_pretrained(memory_dir, base=lm, device=lm.device)
            _check_memory_site(ds, memory)
            meta_path.unlink(missing_ok=True)  # the pairing is rewritten after the data
            cache.mkdir(parents=True, exist_ok=True)
            arr = _memory_logprobs(ds, memory, 4096, True)
            _write_f32(cache / f"{name}.{split}.f32", arr)
        out[split] = arr.astype(np.float64)
    if not meta_path.exists():
        atomic_write_json(meta_path, want)
    return out


def _score(mem: dict, lm_lp: dict, lambdas) -> dict:
    """Lambda chosen on validation, perplexities reported on test (as ``evaluate_ppl`` does)."""
    from .evaluate import MEMORY, choose, perplexity, sweep
    from .inference import mix_logprobs

    chosen = choose(sweep({"lm": lm_lp["valid"], "memory": mem["valid"]}, lambdas), MEMORY)
    return {"lambda": chosen["lambda"], "valid_mixed_ppl": chosen["ppl"],
            "memory_alone_valid_ppl": perplexity(mem["valid"]), "memory_alone_test_ppl": perplexity(mem["test"]),
            "mixed_test_ppl": perplexity(mix_logprobs(lm_lp["test"], mem["test"], chosen["lambda"]))}


def _test_dir(run) -> Path:
    from .pipeline import EVAL_TEST

    return run.path(EVAL_TEST)


def main(run, opts: Options) -> None:
    from . import pipeline
    from .evaluate import check_compatible, json_safe, perplexity, score_components
    from .memory import memory_config_for
    from .targets import open_targets
    from .train import snapshot_dir, snapshot_steps

    opts.validate()
    cfg = run.cfg
    # The study needs the targets and both eval dirs, not the run's eval report (whose RAG and
    # kNN-LM passes may be long): build the pipeline only when one of them is missing.
    if not all(is_complete(p) for p in (run.path(pipeline.TARGETS), run.path(pipeline.TUNE), _test_dir(run))):
        pipeline.stage_eval(run)
    lm = run.lm
    ds = pipeline.training_datastore(run)
    targets = open_targets(run.path(pipeline.TARGETS), ds.manifest)
    epochs = float(opts.scaling_epochs if opts.scaling_epochs is not None else cfg.train.epochs)
    settings = pipeline.train_settings(cfg, epochs)
    out = Path(opts.scaling_out) if opts.scaling_out else run.dir / OUT_NAME
    site = ds.manifest["mem_site"]
    configs = {}
    for size in opts.sizes():
        kw = {"preset": size} if isinstance(size, str) else {"n_blocks": size}
        mcfg = memory_config_for(lm, site, head_init=cfg.train.head_init, **kw)
        configs[mcfg.n_blocks] = mcfg
    if len(configs) < 2:
        raise MLPMemError(f"--scaling-blocks {opts.scaling_blocks!r} names fewer than two distinct sizes")
    largest = max(configs)
    fractions = opts.fractions()

    trained = {}
    for n in sorted(configs):
        snaps = [f for f in fractions if f < 1.0] if n == largest else []
        trained[n] = _train_size(run, ds, targets, configs[n], settings, out / f"blocks_{n}", snaps)

    valid_dir, test_dir = run.path(pipeline.TUNE), _test_dir(run)
    vm, tm = read_manifest(valid_dir, "validation eval dir"), read_manifest(test_dir, "test eval dir")
    check_compatible(vm, tm, valid_dir, test_dir)
    eval_dirs = {"valid": valid_dir, "test": test_dir}
    lambdas = cfg.eval.lambda_list()
    big_dir, big_manifest = trained[largest]
    snaps = {s["step"]: s for s in big_manifest.get("snapshots", [])}
    key = sha256_json({"trained": {n: [str(d), m.get("training_fingerprint")] for n, (d, m) in trained.items()},
                       "snapshots": sorted(snaps), "fractions": fractions, "lambdas": lambdas,
                       "valid": vm, "test": tm, "version": 1})
    if is_complete(out) and (out / "scaling.json").exists() and read_json(out / "manifest.json").get("inputs") == key:
        pipeline.log(f"scaling: already complete ({out / 'scaling.json'})")
        print(format_scaling_table(read_json(out / "scaling.json")))
        return

    lm_lp = {split: score_components(d, progress=False)["lm"] for split, d in eval_dirs.items()}
    cache = out / "logprobs"
    sizes = []
    for n, (mdir, m) in sorted(trained.items()):
        mem = _memory_logprobs_cached(cache, f"blocks_{n}", mdir, eval_dirs, lm)
        sizes.append({"blocks": n, "params": int(m["memory_params"]), "head_params": int(m["head_params"]),
                      "params_non_head": int(m["memory_params"]) - int(m["head_params"]), "steps": int(m["steps"]),
                      "train_rows_seen": int(m["steps"]) * int(m["batch_rows"]), "validation": m.get("validation"),
                      "train_rows_per_s": m.get("rows_per_s_this_session"),
                      "fraction_of_matmul_peak": m.get("fraction_of_matmul_peak"),
                      "dir": os.path.relpath(mdir, run.dir), **_score(mem, lm_lp, lambdas)})

    # Against training tokens: the largest memory at each requested fraction of its training.
    tokens, missing = [], []
    total = int(big_manifest["steps"])
    for f in fractions:
        if f >= 1.0:
            final = next(s for s in sizes if s["blocks"] == largest)
            tokens.append({"fraction": 1.0, "step": total, "rows_seen": final["train_rows_seen"],
                           "validation": final["validation"], **{k: final[k] for k in (
                               "lambda", "valid_mixed_ppl", "memory_alone_valid_ppl", "memory_alone_test_ppl",
                               "mixed_test_ppl")}})
            continue
        step = snapshot_steps([f], total)[0]
        if step not in snaps:
            missing.append(f)
            continue
        mem = _memory_logprobs_cached(cache, f"blocks_{largest}_step_{step}", snapshot_dir(big_dir, step), eval_dirs, lm)
        tokens.append({"fraction": f, "step": step, "rows_seen": int(snaps[step]["rows_seen"]),
                       "validation": snaps[step]["validation"], **_score(mem, lm_lp, lambdas)})
    if missing:
        pipeline.log(f"scaling: no snapshots at fractions {missing} in {big_dir} (it was trained without them); "
                     "delete that directory to retrain it with snapshots")

    params = [s["params"] for s in sizes]
    result = {
        "model": cfg.run.model, "run_dir": str(run.dir), "mem_site": site, "settings": {**asdict(settings)},
        "validation_tokens": int(len(lm_lp["valid"])), "test_tokens": int(len(lm_lp["test"])),
        "valid_dir": str(valid_dir), "test_dir": str(test_dir), "lambdas": lambdas,
        "base": {"valid_ppl": perplexity(lm_lp["valid"]), "test_ppl": perplexity(lm_lp["test"])},
        "sizes": sizes,
        "fit": {"memory_alone": fit_power_law(params, [s["memory_alone_test_ppl"] for s in sizes]),
                "mixed": fit_power_law(params, [s["mixed_test_ppl"] for s in sizes]),
                "formula": "PPL(N) = a * N^(-b) + c, N = memory parameters (head included)"},
        "tokens": {"blocks": largest, "params": next(s["params"] for s in sizes if s["blocks"] == largest),
                   "points": tokens, "missing_fractions": missing},
        "plot": "scaling.png",
    }
    result = json_safe(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    _plot(result, out / "scaling.png")
    atomic_write_json(out / "scaling.json", result)
    write_manifest(out, {"inputs": key, "report": "scaling.json"})
    print(format_scaling_table(result))
    print(f"\nscaling: {out / 'scaling.json'}, {out / 'scaling.png'}")


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def format_scaling_table(result: dict) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    base = result["base"]["test_ppl"]
    lines = [f"Memory size vs held-out test perplexity ({result['test_tokens']:,} test tokens; lambda chosen on "
             f"{result['validation_tokens']:,} validation tokens; base LM {base:.3f})", "",
             "| blocks | params | non-head params | training rows | val KL | val CE | memory alone PPL | + memory PPL | lambda |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        v = s.get("validation") or {}
        lines.append(f"| {s['blocks']} | {_params(s['params'])} | {_params(s['params_non_head'])} | "
                     f"{s['train_rows_seen']:,} | {f(v.get('kl'), '.3f')} | {f(v.get('ce'), '.3f')} | "
                     f"{f(s['memory_alone_test_ppl'], '.2f')} | {f(s['mixed_test_ppl'], '.3f')} | {s['lambda']} |")
    for name, fit in (("memory alone", result["fit"]["memory_alone"]), ("+ memory", result["fit"]["mixed"])):
        lines.append(f"\nfit ({name}): PPL(N) = {fit['a']:.4g} * N^({-fit['b']:+.4f}) + {fit['c']:.4g}")
    tk = result["tokens"]
    if tk["points"]:
        lines += ["", f"{tk['blocks']}-block memory ({_params(tk['params'])} params) vs training rows:", "",
                  "| fraction | step | training rows | val KL | memory alone PPL | + memory PPL | lambda |",
                  "|---|---|---|---|---|---|---|"]
        for p in tk["points"]:
            lines.append(f"| {p['fraction']:g} | {p['step']} | {p['rows_seen']:,} | "
                         f"{f((p.get('validation') or {}).get('kl'), '.3f')} | {f(p['memory_alone_test_ppl'], '.2f')} | "
                         f"{f(p['mixed_test_ppl'], '.3f')} | {p['lambda']} |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    base = result["base"]["test_ppl"]
    ax = fig.add_subplot(1, 2, 1)
    n = np.array([s["params"] for s in result["sizes"]], dtype=np.float64)
    grid = np.geomspace(n.min() / 1.3, n.max() * 1.3, 100)
    for key, fit_key, label, color in (("memory_alone_test_ppl", "memory_alone", "memory alone", "tab:blue"),
                                       ("mixed_test_ppl", "mixed", "base + memory", "tab:orange")):
        fit = result["fit"][fit_key]
        ax.plot(n, [s[key] for s in result["sizes"]], "o", color=color, label=label)
        ax.plot(grid, power_law(grid, fit), "-", color=color, linewidth=1,
                label=f"{fit['a']:.3g} N^({-fit['b']:+.3f}) + {fit['c']:.3g}")
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base LM ({base:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")  # memory-alone and mixed perplexities differ by a large factor early on
    ax.set_xlabel("memory parameters N (head included)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"size ({result['settings']['epochs']:g} epochs each)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    pts = result["tokens"]["points"]
    if pts:
        rows = [p["rows_seen"] for p in pts]
        ax.plot(rows, [p["memory_alone_test_ppl"] for p in pts], "o-", color="tab:blue", label="memory alone")
        ax.plot(rows, [p["mixed_test_ppl"] for p in pts], "o-", color="tab:orange", label="base + memory")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base LM ({base:.2f})")
    ax.set_xlabel("training rows seen (datastore tokens)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"training tokens ({result['tokens']['blocks']}-block memory)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
