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

from ..config import opt
from ..errors import MLPMemError
from ..io import atomic_path, atomic_write_json, is_complete, read_json, sha256_json, write_manifest
from ..log import log

OUT_NAME = "scaling"


@dataclass
class Options:
    scaling_blocks: str = opt("1,2,4,8", "memory sizes to train, comma-separated: block counts and/or memory presets "
                                         "(tiny, small, base, parity)")
    scaling_epochs: float | None = opt(None, "training epochs of every memory in the study "
                                             "(default: the run's --epochs)")
    scaling_checkpoints: str = opt("0.25,0.5,1", "fractions of the largest memory's training at which it is "
                                                 "evaluated (perplexity vs training tokens)")
    scaling_out: str | None = opt(None, "output directory (default: <run-dir>/scaling)")

    def sizes(self) -> list:
        from ..memory import PRESETS

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
            raise MLPMemError(f"--scaling-checkpoints must be comma-separated numbers, "
                              f"got {self.scaling_checkpoints!r}") from None
        if any(not 0.0 < f <= 1.0 for f in fr):
            raise MLPMemError(f"--scaling-checkpoints must be fractions within (0, 1], "
                              f"got {self.scaling_checkpoints!r}")
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
        raise MLPMemError(f"a power-law fit needs at least two finite positive points, "
                          f"got n={n.tolist()}, y={y.tolist()}")
    logn = np.log(n)
    if n.size < 3:  # two points determine a and b only
        a, b, sse = _fit_fixed_c(logn, y, 0.0)
        return {"a": a, "b": b, "c": 0.0, "sse_log": sse, "points": int(n.size),
                "method": "log-space least squares, c fixed at 0"}
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
# The study: one memory per size on the run's targets (mlpmemory.study), then the fits.
# ---------------------------------------------------------------------------------------------


def _size_configs(study, opts: Options) -> dict:
    """{n_blocks: memory config} of the requested sizes (presets resolved to their block counts)."""
    configs = {}
    for size in opts.sizes():
        mcfg = study.memory_config(**({"preset": size} if isinstance(size, str) else {"n_blocks": size}))
        configs[mcfg.n_blocks] = mcfg
    if len(configs) < 2:
        raise MLPMemError(f"--scaling-blocks {opts.scaling_blocks!r} names fewer than two distinct sizes")
    return configs


def _size_row(n: int, mdir: Path, m: dict, run_dir: Path, scores: dict) -> dict:
    return {"blocks": n, "params": int(m["memory_params"]), "head_params": int(m["head_params"]),
            "params_non_head": int(m["memory_params"]) - int(m["head_params"]), "steps": int(m["steps"]),
            "train_rows_seen": int(m["steps"]) * int(m["batch_rows"]), "validation": m.get("validation"),
            "train_rows_per_s": m.get("rows_per_s_this_session"),
            "fraction_of_matmul_peak": m.get("fraction_of_matmul_peak"),
            "dir": os.path.relpath(mdir, run_dir), **scores}


_SCORE_KEYS = ("lambda", "valid_mixed_ppl", "memory_alone_valid_ppl", "memory_alone_test_ppl", "mixed_test_ppl")


def _token_points(study, cache: Path, trained: dict, sizes: list, fractions: list) -> tuple[list, list]:
    """The largest memory at each requested fraction of its training (its snapshots), and the fractions missing."""
    from ..train import snapshot_dir, snapshot_steps

    largest = max(trained)
    big_dir, big = trained[largest]
    snaps, total = {s["step"]: s for s in big.get("snapshots", [])}, int(big["steps"])
    final = next(s for s in sizes if s["blocks"] == largest)
    points, missing = [], []
    for f in fractions:
        step = total if f >= 1.0 else snapshot_steps([f], total)[0]
        if f >= 1.0:
            points.append({"fraction": 1.0, "step": total, "rows_seen": final["train_rows_seen"],
                           "validation": final["validation"], **{k: final[k] for k in _SCORE_KEYS}})
        elif step not in snaps:
            missing.append(f)
        else:
            mem = study.memory_logprobs(cache, f"blocks_{largest}_step_{step}", snapshot_dir(big_dir, step))
            points.append({"fraction": f, "step": step, "rows_seen": int(snaps[step]["rows_seen"]),
                           "validation": snaps[step]["validation"], **_scores(study, mem)})
    if missing:
        log(f"scaling: no snapshots at fractions {missing} in {big_dir} (it was trained without them); "
            "delete that directory to retrain it with snapshots")
    return points, missing


def _scores(study, mem: dict) -> dict:
    return {k: v for k, v in study.score(mem).items() if k in _SCORE_KEYS}


def _result(study, settings, sizes: list, points: list, missing: list) -> dict:
    from ..evaluate import json_safe

    params = [s["params"] for s in sizes]
    largest = max(s["blocks"] for s in sizes)
    return json_safe({
        "model": study.run.cfg.run.model, "run_dir": str(study.run.dir), "mem_site": study.ds.manifest["mem_site"],
        "settings": asdict(settings), "validation_tokens": int(len(study.lm_logprobs["valid"])),
        "test_tokens": int(len(study.lm_logprobs["test"])), "valid_dir": str(study.eval_dirs["valid"]),
        "test_dir": str(study.eval_dirs["test"]), "lambdas": study.lambdas, "base": study.base(), "sizes": sizes,
        "fit": {"memory_alone": fit_power_law(params, [s["memory_alone_test_ppl"] for s in sizes]),
                "mixed": fit_power_law(params, [s["mixed_test_ppl"] for s in sizes]),
                "formula": "PPL(N) = a * N^(-b) + c, N = memory parameters (head included)"},
        "tokens": {"blocks": largest, "params": next(s["params"] for s in sizes if s["blocks"] == largest),
                   "points": points, "missing_fractions": missing},
        "plot": "scaling.png",
    })


def main(run, opts: Options) -> None:
    from .. import pipeline
    from ..study import Study

    opts.validate()
    # The study needs the targets and both eval dirs, not the run's eval report (whose RAG and
    # kNN-LM passes may be long): build the pipeline only when one of them is missing.
    if not all(is_complete(run.path(s)) for s in (pipeline.TARGETS, pipeline.TUNE, pipeline.EVAL_TEST)):
        pipeline.stage_eval(run)
    study = Study(run)
    epochs = float(opts.scaling_epochs if opts.scaling_epochs is not None else run.cfg.train.epochs)
    settings = study.with_settings(epochs=epochs)
    out = Path(opts.scaling_out) if opts.scaling_out else run.dir / OUT_NAME
    configs, fractions = _size_configs(study, opts), opts.fractions()
    trained = {n: study.train(out / f"blocks_{n}", configs[n], settings,
                              snapshots=[f for f in fractions if f < 1.0] if n == max(configs) else [])
               for n in sorted(configs)}
    key = sha256_json({"trained": {n: [str(d), m.get("training_fingerprint")] for n, (d, m) in trained.items()},
                       "snapshots": sorted(s["step"] for s in trained[max(configs)][1].get("snapshots", [])),
                       "fractions": fractions, "lambdas": study.lambdas, **study.manifests(), "version": 2})
    if is_complete(out) and (out / "scaling.json").exists() and read_json(out / "manifest.json").get("inputs") == key:
        log(f"scaling: already complete ({out / 'scaling.json'})")
        print(format_scaling_table(read_json(out / "scaling.json")))
        return
    cache = out / "logprobs"
    sizes = [_size_row(n, mdir, m, run.dir, _scores(study, study.memory_logprobs(cache, f"blocks_{n}", mdir)))
             for n, (mdir, m) in sorted(trained.items())]
    result = _result(study, settings, sizes, *_token_points(study, cache, trained, sizes, fractions))
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
             "| blocks | params | non-head params | training rows | val KL | val CE | memory alone PPL | "
             "+ memory PPL | lambda |",
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
                         f"{f((p.get('validation') or {}).get('kl'), '.3f')} | "
                         f"{f(p['memory_alone_test_ppl'], '.2f')} | "
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
