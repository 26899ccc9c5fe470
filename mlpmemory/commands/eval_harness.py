"""`mlpmem eval-harness`: lm-evaluation-harness tasks on one system of a finished run.

Why it is built this way:

- **lm_eval does the tasks, this project the model.** The model is :class:`mlpmemory.harness.MLPMemoryLM`
  (lm_eval's tokenisation, this project's scoring and generation), the tasks are lm_eval's own
  machinery: the offline ones shipped in :mod:`mlpmemory.harness_tasks` (always included), lm_eval's
  built-in ones where their data is reachable, and any folder of task YAMLs given by ``--include-path``.
- **One task at a time.** ``simple_evaluate`` runs once per task on the same loaded model, so the
  report gives each task's own wall-clock time (its data loading included); the model and its memory
  are loaded once.
- **Results say what they measured.** ``<run>/harness/<system>_lam<lambda>.json`` keeps, per task, its
  metrics with standard errors, samples scored, few-shot count, limit and seconds, next to the system,
  lambda and base model; a later invocation with the same system and lambda adds its tasks to the same
  file (a task run again is replaced), and ``.md`` beside it is the same as a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..errors import MLPMemError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..log import log
from ..systems import names

SYSTEMS = tuple(names())


def _csv(s) -> list[str]:
    return [x.strip() for x in str(s or "").split(",") if x.strip()]


@dataclass
class Options:
    """Which system, tasks and samples."""

    system: str = opt("memory", "the system evaluated", choices=list(SYSTEMS))
    tasks: str = opt("mlpmem_nq_open,mlpmem_truthfulqa_mc1,mlpmem_truthfulqa_mc2",
                     "lm_eval tasks, comma-separated (offline ones: mlpmem_nq_open, mlpmem_squad_open, "
                     "mlpmem_truthfulqa_mc1/mc2, mlpmem_halueval_qa/dialogue/summarization)")
    lam: float | None = opt(None, "weight of the memory / kNN distribution (default: the lambda chosen on validation "
                                  "by eval-ppl, else the memory's lambda_default / 0.25 for the kNN-LM)")
    limit: int | None = opt(None, "samples scored per task (default: all)", minimum=1)
    num_fewshot: int | None = opt(None, "few-shot examples per prompt (default: each task's own)", minimum=0)
    harness_batch: int = opt(8, "sequences per forward / generate call", minimum=1)
    halueval: str | None = opt(None, "HaluEval data: its data folder or one *_data.json file (mlpmem_halueval_* tasks)")
    include_path: str | None = opt(None, "another folder of lm_eval task YAMLs")

    def validate(self) -> None:
        if not _csv(self.tasks):
            raise MLPMemError("--tasks is empty; give lm_eval task names, comma-separated")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise MLPMemError(f"--lam must be within [0, 1], got {self.lam}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise MLPMemError(f"--include-path {self.include_path} is not a folder of task YAMLs")


def task_manager(run, opts: Options):
    """lm_eval's TaskManager with the shipped tasks (and ``--include-path``), their data in the run's cache;
    lm_eval's built-in tasks are indexed (seconds) only when a task asked for is none of those."""
    from lm_eval.tasks import TaskManager

    from ..harness_tasks import TASKS_DIR

    paths = [str(TASKS_DIR)] + ([opts.include_path] if opts.include_path else [])
    meta = {k: v for k, v in {"cache_dir": run.cfg.run.cache_dir, "halueval": opts.halueval}.items() if v is not None}
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
    if all(t in tm.all_tasks for t in _csv(opts.tasks)):
        return tm
    tm = TaskManager(include_path=paths, metadata=meta)
    unknown = [t for t in _csv(opts.tasks) if t not in tm.all_tasks]
    if unknown:
        raise MLPMemError(f"unknown lm_eval task {unknown[0]!r}; the offline ones are mlpmem_* "
                          "(`python -m mlpmemory.harness ls tasks` lists all)")
    return tm


def _plain(value):
    """JSON-safe: numbers (numpy's too) as floats, strings (lm_eval's 'N/A') kept, anything else as text."""
    import numbers

    if value is None or isinstance(value, (str, bool)):
        return value
    return float(value) if isinstance(value, numbers.Number) else str(value)


def _task_entry(task: str, res: dict, seconds: float, opts: Options) -> dict:
    metrics = {k: _plain(v) for k, v in (res.get("results") or {}).get(task, {}).items() if k != "alias"}
    if not metrics:
        raise MLPMemError(f"lm_eval returned no result for task {task} (a group? give its tasks by name)")
    n = (res.get("n-samples") or {}).get(task, {})
    shots = (res.get("n-shot") or {}).get(task)
    return {"metrics": metrics, "samples": n.get("effective"), "samples_total": n.get("original"),
            "num_fewshot": shots, "limit": opts.limit, "seconds": round(seconds, 2),
            "higher_is_better": (res.get("higher_is_better") or {}).get(task, {})}


def evaluate_tasks(model, tm, opts: Options) -> dict:
    """{task: entry} of each task of ``opts.tasks``, one ``simple_evaluate`` each."""
    from lm_eval import simple_evaluate

    out = {}
    for task in _csv(opts.tasks):
        t = time.perf_counter()
        res = simple_evaluate(model=model, tasks=[task], task_manager=tm, limit=opts.limit,
                              num_fewshot=opts.num_fewshot, log_samples=False, bootstrap_iters=1000)
        out[task] = _task_entry(task, res, time.perf_counter() - t, opts)
        log(f"eval-harness: {task} done in {out[task]['seconds']:.1f}s")
    return out


def format_table(report: dict) -> str:
    head = (f"lm-evaluation-harness: system {report['system']}, lambda {report['lambda']:g}, "
            f"model {report['model']}\n\n| task | metric | value | stderr | samples | few-shot | limit | seconds |\n"
            "|---|---|---|---|---|---|---|---|\n")
    rows = []
    for task, e in sorted(report["tasks"].items()):
        for metric, value in e["metrics"].items():
            if "," not in metric or "_stderr," in metric or not isinstance(value, float):  # metrics: "name,filter"
                continue
            err = e["metrics"].get(metric.replace(",", "_stderr,", 1))
            cells = [task, metric.split(",")[0], f"{value:.4f}", f"{err:.4f}" if isinstance(err, float) else "",
                     e["samples"], e["num_fewshot"], "all" if e["limit"] is None else e["limit"], f"{e['seconds']:.1f}"]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    return head + "\n".join(rows) + "\n"


def main(run, opts: Options) -> None:
    from ..harness import MLPMemoryLM

    tm = task_manager(run, opts)
    model = MLPMemoryLM(run=run, system=opts.system, lam=opts.lam, batch_size=opts.harness_batch)
    tasks = evaluate_tasks(model, tm, opts)
    path = run.dir / "harness" / f"{opts.system}_lam{model.lam:g}.json"
    old = read_json(path) if path.exists() else {}
    report = {"system": opts.system, "lambda": model.lam, "model": run.cfg.run.model, "run_dir": str(run.dir),
              "tasks": {**old.get("tasks", {}), **tasks}}
    atomic_write_json(path, report)
    table = format_table(report)
    atomic_write_text(path.with_suffix(".md"), table)
    print(table, end="")
    log(f"results: {path} and {path.with_suffix('.md').name}")
