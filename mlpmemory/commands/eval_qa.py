"""`mlpmem eval-qa`: open-domain QA (exact match / token F1) of base, +MLP memory, +kNN-LM and +RAG.

Why it is built this way:

- **Coverage groups say what the memory could know.** A memory can only help on facts in its
  datastore, so every question whose passage is known (the default corpus's Natural Questions,
  or any data with ``doc_id``) is placed by the run's ``corpus/documents.jsonl``: ``in_memory``
  (its passage lies wholly inside the datastore's train tokens), ``heldout`` (the passage's group
  is in the held-out split: never in the datastore, no same-article leakage) or
  ``not_in_memory`` (a train-split passage beyond the token cap). ``in_memory`` is the headline;
  the other two show whether a gain is recall of stored facts or a general shift.
- **Lambda is chosen on a dev split only.** Dev, few-shot and reported questions are disjoint
  and fixed by a hash of the question (not by file order, ``qa_limit`` or the run), and dev is
  stratified over the reported groups so it mirrors the reported mix. The default criterion is
  the dev gold answers' log-likelihood: one scoring pass caches each component's answer-token
  log-probs and every lambda is a numpy mix of them (``mix_logprobs``), so the whole grid costs
  one pass, not one generation per lambda; ``qa_lambda_select=em`` generates per lambda instead.
- **Metrics are SQuAD v1.1's** (``normalize_answer``, ``f1_score``, ``exact_match_score`` of
  the official evaluate script, max over gold answers), so numbers compare with the literature.
- **Accuracy and latency are measured apart.** Accuracy runs batched (``qa_batch``); latency
  runs at batch size 1 on a few questions after a warm-up, so time to first token is per question
  and retrieval (BM25 for RAG, FAISS search + distribution for kNN-LM) is reported on its own.
- **Resumable and idempotent.** Predictions are appended per batch with their settings key beside
  them; a rerun skips written ids, a changed setting restarts that system only, and a finished
  evaluation (``qa.json`` with the same inputs and every prediction present) only prints its table.

Metrics, data loading, coverage groups and splits (pure functions, no model) are in
:mod:`mlpmemory.qa_data`.
"""

from __future__ import annotations

import json
import os
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .. import distributed
from ..config import opt
from ..errors import MLPMemError
from ..io import atomic_write_json, check_name, read_json, read_manifest, sha256_json
from ..log import logger
from ..qa_data import (
    coverage_groups,
    dedupe,
    exact_match_score,
    f1_score,
    load_data,
    make_splits,
    max_over_ground_truths,
)
from ..systems import names, tuned

SYSTEMS = tuple(names())
COVERAGE = ("in_memory", "heldout", "not_in_memory")
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
COMPONENT_KEY = {cls.name: cls.component for cls in tuned()}  # system -> score_continuations key
_VERSION = 3  # in every settings key: bump when prompts, scoring or the dev criterion change


def _csv(s) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


@dataclass
class Options:
    qa_data: str = opt("nq", "'nq' (the default corpus's Natural Questions, grouped by whether their passage is in "
                             "the memory) or a path: SQuAD JSON (data/paragraphs/qas) or JSONL {question, answers"
                             "[, id, doc_id, group]}")
    qa_name: str | None = opt(None, "results folder <run>/qa/<name> (default: 'nq' or the data file's stem)")
    qa_systems: str = opt("base,memory,knn_lm,rag", "systems to evaluate (comma-separated)")
    qa_groups: str = opt("in_memory,heldout,not_in_memory", "coverage groups reported (data without doc_id: 'all')")
    qa_limit: int = opt(1000, "reported questions per group, in file order after removing dev and few-shot")
    qa_dev: int = opt(200, "dev questions (hash-chosen, stratified over groups; at most half a group) for lambda")
    # 4 shots: on 30 NQ dev questions (SmolLM2-135M) 0-shot left 15 answers empty or malformed, 1/4/8 shots
    # none; 4 had the best gold log-likelihood (-15.11 vs -15.14 / -15.37).
    few_shot: int = opt(4, "few-shot examples in the prompt (hash-chosen, disjoint from dev and reported)")
    qa_lambdas: str = opt("0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6", "lambdas swept on dev")
    qa_lambda_select: str = opt("loglik", "dev criterion: 'loglik' (gold-answer log-likelihood, one scoring pass) or "
                                          "'em' (generate on dev per lambda; ties -> smaller lambda)",
                                choices=["loglik", "em"])
    prompt_template: str = opt(DEFAULT_TEMPLATE, "prompt of one question ({question}); few-shot examples append ' "
                                                 "<answer>' and are joined by blank lines")
    rag_template: str | None = opt(None, "RAG prompt with {passages} and {prompt} (default: rag.rag_prompt)")
    chat: bool = opt(False, "use the tokenizer's chat template (few-shot as user/assistant turns)")
    qa_max_tokens: int = opt(16, "greedy answer length cap (stops at a newline)")
    qa_batch: int = opt(8, "questions per generation batch in the accuracy run")
    qa_nprobe: int | None = opt(None, "IVF lists probed by the kNN-LM (default: the run's --nprobe)")
    rag_n: int = opt(3, "BM25 passages placed before the prompt for RAG")
    latency_questions: int = opt(50, "questions timed one at a time per system (0: no latency table)")

    def validate(self) -> None:
        bad = [s for s in self.systems() if s not in SYSTEMS]
        if bad or not self.systems():
            raise MLPMemError(f"--qa-systems: unknown {bad or 'empty list'}; choose from {','.join(SYSTEMS)}")
        bad = [g for g in self.groups() if g not in COVERAGE + ("all",)]
        if bad or not self.groups():
            raise MLPMemError(f"--qa-groups: unknown {bad or 'empty list'}; choose from {','.join(COVERAGE)}")
        try:
            lams = self.lambdas()
        except ValueError:
            raise MLPMemError(f"--qa-lambdas must be comma-separated numbers, got {self.qa_lambdas!r}") from None
        if not lams or any(not 0.0 <= x < 1.0 for x in lams):
            raise MLPMemError(f"--qa-lambdas must be numbers in [0, 1), got {self.qa_lambdas!r}")
        for name in ("qa_limit", "qa_max_tokens", "qa_batch", "rag_n"):
            if getattr(self, name) < 1:
                raise MLPMemError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("qa_dev", "few_shot", "latency_questions"):
            if getattr(self, name) < 0:
                raise MLPMemError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.qa_dev < 1 and ({"memory", "knn_lm"} & set(self.systems())):
            raise MLPMemError("--qa-dev must be >= 1: lambda of memory / knn_lm is chosen on dev questions")
        _check_template(self.prompt_template, {"question"}, "--prompt-template")
        if self.rag_template is not None:
            _check_template(self.rag_template, {"passages", "prompt"}, "--rag-template")
        if self.qa_name is not None:
            check_name(self.qa_name, "--qa-name")

    def systems(self) -> list[str]:
        return _csv(self.qa_systems)

    def groups(self) -> list[str]:
        return _csv(self.qa_groups)

    def lambdas(self) -> list[float]:
        return sorted({float(x) for x in _csv(self.qa_lambdas)})


def _check_template(template: str, fields: set[str], flag: str) -> None:
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise MLPMemError(f"{flag} is not a valid format string ({e}); write literal braces as {{{{ }}}}") from None
    if used != fields:
        raise MLPMemError(f"{flag} must use exactly the fields {sorted(fields)}, got {sorted(used)}: {template!r}")


# ---------------------------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------------------------


def passages_prompt(passages, prompt: str, rag_template: str | None) -> str:
    """``prompt`` with the RAG system's passages before it (``rag_template``: see ``--rag-template``)."""
    from ..systems import RAGSystem

    return RAGSystem(template=rag_template).prompt_with(prompt, passages)


def make_prompt(question: str, shots: list[dict], opts: Options, tokenizer=None, passages=None) -> str:
    """The prompt of one question: few-shot examples, then the question (passages first for RAG)."""
    if not opts.chat:
        parts = [opts.prompt_template.format(question=s["question"]) + " " + s["answers"][0] for s in shots]
        prompt = "\n\n".join(parts + [opts.prompt_template.format(question=question)])
        return prompt if passages is None else passages_prompt(passages, prompt, opts.rag_template)
    if getattr(tokenizer, "chat_template", None) is None:
        raise MLPMemError("--chat needs a tokenizer with a chat template; this model has none (drop --chat)")
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answers"][0]}]
    content = question if passages is None else passages_prompt(passages, question, opts.rag_template)
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def continuation(prompt: str, answer: str, chat: bool) -> str:
    """The gold answer as the model would write it after ``prompt``, with the newline that ends it in
    the plain format: greedy EM needs the model to stop there, so the dev likelihood scores that too."""
    if chat:
        return answer
    return ("" if prompt[-1:].isspace() else " ") + answer + "\n"


# ---------------------------------------------------------------------------------------------
# Lambda on dev.
# ---------------------------------------------------------------------------------------------


def loglik_curve(scores: list[list[dict]], key: str, lambdas: list[float]) -> list[dict]:
    """Per lambda: mean over questions of the best gold answer's total log-prob under the mixture.

    ``scores[q]`` holds one :func:`generation.score_continuations` dict per gold answer of dev
    question ``q`` (arrays "lm" and ``key``, one entry per answer token).
    """
    from ..inference import mix_logprobs

    rows = []
    for lam in lambdas:
        best = [max((float(np.sum(mix_logprobs(s["lm"], s[key], lam))), -len(s["lm"])) for s in answers)
                for answers in scores]
        ll = np.array([b[0] for b in best])
        n_tok = -sum(b[1] for b in best)
        rows.append({"lambda": lam, "loglik": float(ll.mean()), "nll_per_token": float(-ll.sum() / max(n_tok, 1))})
    return rows


def pick_lambda(curve: list[dict], metric: str) -> float:
    """The lambda with the highest ``metric``; ties go to the smaller lambda."""
    best = None
    for row in sorted(curve, key=lambda r: r["lambda"]):
        if best is None or row[metric] > best[metric]:
            best = row
    return best["lambda"]


def _em_of(preds: list[str], items: list[dict]) -> float:
    return 100.0 * float(np.mean([max_over_ground_truths(exact_match_score, p, it["answers"])
                                  for p, it in zip(preds, items)]))


def choose_lambdas(lm, dev: list[dict], prompts: list[str], comps: dict, opts: Options, chat: bool) -> dict:
    """{system: {"lambda", "curve"}} of the systems with a lambda (``comps``: name -> :mod:`mlpmemory.systems`
    instance), from dev questions only."""
    from ..generation import generate, score_continuations

    lambdas, out = opts.lambdas(), {}
    if not comps:
        return out
    if opts.qa_lambda_select == "loglik":
        pairs = [(q, p, continuation(p, a, chat))
                 for q, (it, p) in enumerate(zip(dev, prompts)) for a in it["answers"][:8]]
        res = score_continuations(lm, [p for _, p, _ in pairs], [c for _, _, c in pairs], batch_size=opts.qa_batch,
                                  systems=list(comps.values()))
        per_q: list[list[dict]] = [[] for _ in dev]
        for (q, _, _), r in zip(pairs, res):
            per_q[q].append(r)
        for system in comps:
            curve = loglik_curve(per_q, comps[system].component, lambdas)
            out[system] = {"lambda": pick_lambda(curve, "loglik"), "curve": curve}
        return out
    gen = dict(max_new_tokens=opts.qa_max_tokens, stop_strings=["\n"], batch_size=opts.qa_batch)
    base_em = _em_of([t.strip() for t in generate(lm, prompts, **gen).texts], dev) if 0.0 in lambdas else None
    for system, comp in comps.items():
        curve = []
        for lam in lambdas:
            em = base_em if lam == 0.0 else _em_of([t.strip() for t in generate(
                lm, prompts, lam=lam, system=comp, **gen).texts], dev)
            curve.append({"lambda": lam, "em": em})
        out[system] = {"lambda": pick_lambda(curve, "em"), "curve": curve}
    return out


# ---------------------------------------------------------------------------------------------
# Predictions (resumable), latency, report.
# ---------------------------------------------------------------------------------------------


def read_predictions(path: Path) -> dict[str, dict]:
    """Rows written so far; a torn last line (crash mid-write) is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    rows = {}
    for line in keep.decode("utf-8").splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    return rows


def _score_row(it: dict, group: str, prediction: str, **extra) -> dict:
    return {"id": it["id"], "question": it["question"], "answers": it["answers"], "group": group,
            "prediction": prediction, "em": max_over_ground_truths(exact_match_score, prediction, it["answers"]),
            "f1": max_over_ground_truths(f1_score, prediction, it["answers"]), **extra}


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _start_file(out: Path, system: str, key: str) -> Path:
    """The system's predictions file; restarted when it was written with other settings."""
    path, meta = out / f"predictions.{system}.jsonl", out / f"predictions.{system}.json"
    if path.exists() and (not meta.exists() or read_json(meta).get("key") != key):
        logger.warning(f"qa {system}: settings changed since {path.name} was written; starting it again")
        path.unlink()
    if not meta.exists() or read_json(meta).get("key") != key:
        atomic_write_json(meta, {"key": key, "system": system})
    return path


def _percentiles(x: list[float]) -> dict:
    a = np.asarray(x, dtype=np.float64) * 1000.0
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def group_metrics(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0, "em": None, "f1": None}
    return {"n": len(rows), "em": 100.0 * float(np.mean([r["em"] for r in rows])),
            "f1": 100.0 * float(np.mean([r["f1"] for r in rows]))}


def format_table(result: dict) -> str:
    cols = result["groups"] + (["overall"] if len(result["groups"]) > 1 else [])
    systems = result["systems"]
    sel = result["lambda_selection"]
    lines = [f"QA on {result['data']['name']}: EM / F1 (%), greedy, {result['settings']['few_shot']}-shot; lambda "
             f"chosen on {sel['n_dev']} dev questions by {sel['method']}", "",
             "| system | lambda | " + " | ".join(f"{c} (n={systems[next(iter(systems))][c]['n']})" for c in cols)
             + f" | EM vs base ({cols[0]}) |", "|---|---|" + "---|" * (len(cols) + 1)]
    for name in result["system_order"]:
        s = systems[name]
        cells = ["-" if s[c]["em"] is None else f"{s[c]['em']:.1f} / {s[c]['f1']:.1f}" for c in cols]
        d = s.get("em_vs_base", {}).get(cols[0])
        rel = "" if not d or name == "base" else f"{d['points']:+.1f} pts" + (
            f" ({d['relative'] * 100:+.1f}%)" if d["relative"] is not None else "")
        lam = "" if s.get("lambda") is None else f"{s['lambda']:g}"
        lines.append(f"| {name} | {lam} | " + " | ".join(cells) + f" | {rel} |")
    lat = result.get("latency") or {}
    if lat:
        lines += ["", f"Latency at batch size 1 ({next(iter(lat.values()))['n']} questions, ms):", "",
                  "| system | TTFT mean | TTFT p50 | TTFT p95 | tokens/s | retrieval / question | memory / question |",
                  "|---|---|---|---|---|---|---|"]
        for name in [n for n in result["system_order"] if n in lat]:
            m = lat[name]
            ret = "" if m.get("retrieval_ms") is None else f"{m['retrieval_ms']:.1f}"
            mem = "" if m.get("memory_ms") is None else f"{m['memory_ms']:.1f}"
            lines.append(f"| {name} | {m['ttft_ms']['mean']:.1f} | {m['ttft_ms']['p50']:.1f} | "
                         f"{m['ttft_ms']['p95']:.1f}"
                         f" | {m['tokens_per_s']:.1f} | {ret} | {mem} |")
    return "\n".join(lines)


def _component_fingerprints(run, systems: list[str], nprobe) -> dict:
    from ..evaluate import memory_dir_fingerprint

    ds = read_manifest(run.path("datastore"), "datastore")
    fps = {"model": run.cfg.run.model, "dtype": run.cfg.run.dtype, "model_fingerprint": ds.get("model_fingerprint"),
           "datastore": sha256_json(ds)}
    if "memory" in systems:
        fps["memory"] = memory_dir_fingerprint(run.path("memory"))
    if "knn_lm" in systems:
        tg = read_manifest(run.path("targets"), "targets")
        fps["knn"] = sha256_json({"index": read_manifest(run.path("index"), "index"), "k": tg.get("k"),
                                  "T": tg.get("temperature"), "nprobe": nprobe})
    from ..finetuned import finetuned_fingerprints

    fps.update({m: fp for m, fp in finetuned_fingerprints(run).items() if m in systems})  # cpt / lora
    return fps


def _settings_keys(run, opts: Options, systems: list[str], data_fp, shots, dev, report) -> tuple[dict, str, str, dict]:
    """(common key fields, dev key, whole-evaluation key, component fingerprints)."""
    nprobe = opts.qa_nprobe if opts.qa_nprobe is not None else run.cfg.index.nprobe
    fps = _component_fingerprints(run, systems, nprobe)
    prompt_settings = {k: getattr(opts, k) for k in ("few_shot", "prompt_template", "chat", "qa_dev", "qa_groups")}
    common = {"version": _VERSION, "data": data_fp, "fingerprints": fps, "prompt": prompt_settings,
              "shots": [s["id"] for s in shots]}
    dev_key = sha256_json({**common, "dev": [it["id"] for it in dev], "lambdas": opts.lambdas(),
                           "select": opts.qa_lambda_select,
                           "max_tokens": opts.qa_max_tokens if opts.qa_lambda_select == "em" else None})
    key = sha256_json({**common, "settings": asdict(opts), "reported": [it["id"] for it, _ in report]})
    return common, dev_key, key, fps


def _load_systems(run, names_: list[str], opts: Options) -> dict:
    """The registry's systems named, loaded from the run with this invocation's options."""
    from ..systems import get_system

    nprobe = opts.qa_nprobe if opts.qa_nprobe is not None else run.cfg.index.nprobe
    return {name: get_system(name).load(run, nprobe=nprobe, n_passages=opts.rag_n, rag_template=opts.rag_template)
            for name in names_}


def _dev_lambdas(lm, out: Path, dev_key: str, dev: list[dict], shots: list[dict], systems: dict, opts: Options) -> dict:
    """{system: lambda} of the systems with a lambda, chosen on dev (cached in dev.json under ``dev_key``)."""
    comps = {name: s for name, s in systems.items() if s.has_lambda}
    dev_path = out / "dev.json"
    dev_res = read_json(dev_path) if dev_path.exists() else {}
    if dev_res.get("key") != dev_key or set(comps) - set(dev_res.get("systems", {})):
        t = time.perf_counter()
        chosen = choose_lambdas(lm, dev, [make_prompt(it["question"], shots, opts, lm.tokenizer) for it in dev],
                                comps, opts, opts.chat)
        dev_res = {"key": dev_key, "method": opts.qa_lambda_select, "n_dev": len(dev),
                   "dev_ids": [it["id"] for it in dev],
                   "systems": chosen, "seconds": round(time.perf_counter() - t, 2)}
        atomic_write_json(dev_path, dev_res)
    return {s: dev_res["systems"][s]["lambda"] for s in comps}


class _Prompter:
    """Prompts of a batch of questions as one system reads them (RAG retrieves here, timed)."""

    def __init__(self, lm, shots: list[dict], opts: Options):
        self.lm, self.shots, self.opts = lm, shots, opts

    def __call__(self, batch: list[dict], system) -> tuple[list[str], list, float]:
        tok = self.lm.tokenizer
        if not system.transforms_prompt:
            return [make_prompt(it["question"], self.shots, self.opts, tok) for it in batch], [None] * len(batch), 0.0
        t = time.perf_counter()
        found = system.retrieve([it["question"] for it in batch])
        sec = time.perf_counter() - t
        return ([make_prompt(it["question"], self.shots, self.opts, tok, passages=p)
                 for it, p in zip(batch, found)], found, sec)


def _accuracy(lm, out: Path, common: dict, report: list, systems: dict, lam: dict, prompts_for, opts: Options) -> dict:
    """{system: prediction rows of the reported questions}: batched, appended per batch, resumable."""
    from tqdm.auto import tqdm

    from ..generation import generate

    rows_by_system = {}
    for name, system in systems.items():
        pkey = sha256_json({**common, "system": name, "lambda": lam.get(name), "max_tokens": opts.qa_max_tokens,
                            "rag": [opts.rag_n, opts.rag_template] if system.transforms_prompt else None})
        path = distributed.main_first(partial(_start_file, out, name, pkey))
        done = {**read_predictions(path), **_read_parts(path)}
        distributed.barrier()  # every rank has read what is done before any rank writes
        todo = distributed.my_share([(it, g) for it, g in report if it["id"] not in done])
        part = _part_file(path, distributed.rank()) if distributed.world_size() > 1 else path
        bar = tqdm(total=len(todo), desc=f"qa {name}", unit="q", file=sys.stderr)
        for b in range(0, len(todo), opts.qa_batch):
            batch = todo[b:b + opts.qa_batch]
            prompts, found, _ = prompts_for([it for it, _ in batch], system)
            texts = generate(lm, prompts, max_new_tokens=opts.qa_max_tokens, stop_strings=["\n"],
                             batch_size=opts.qa_batch, system=system, lam=lam.get(name, 0.0)).texts
            rows = [_score_row(it, g, t.strip(), **({"passages": [p.doc_id for p in f]} if f else {}))
                    for (it, g), t, f in zip(batch, texts, found)]
            _append(part, rows)
            done.update((r["id"], r) for r in rows)
            bar.update(len(batch))
        bar.close()
        distributed.barrier()  # every rank's answers are on disk
        done = distributed.main_first(partial(_merge_parts, path, report))
        rows_by_system[name] = [done[it["id"]] for it, _ in report]
    return rows_by_system


def _part_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}.jsonl")


def _read_parts(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for part in sorted(path.parent.glob(_part_file(path, 0).name.replace("rank0", "rank*"))):
        rows.update(read_predictions(part))
    return rows


def _merge_parts(path: Path, report: list) -> dict[str, dict]:
    """Rank 0 (under torchrun each rank wrote its own part file): the parts' answers appended to the system's
    file in question order, so the file does not depend on the ranks. Returns the merged rows by id."""
    done = read_predictions(path)
    if distributed.is_main():
        parts = _read_parts(path)
        _append(path, [parts[it["id"]] for it, _ in report if it["id"] not in done and it["id"] in parts])
        for part in path.parent.glob(_part_file(path, 0).name.replace("rank0", "rank*")):
            part.unlink()
        done = read_predictions(path)
    return done


def _latency_one(lm, system, lam: float, items: list[dict], prompts_for, opts: Options) -> dict:
    """Batch size 1 on ``items`` after a warm-up: TTFT, tokens/s, retrieval and memory time per question."""
    from ..generation import StageTimer, generate

    prompts, _, _ = prompts_for(items[:1], system)
    generate(lm, prompts, max_new_tokens=2, batch_size=1, system=system, lam=lam)  # warm-up
    retrieval, prompts = [], []
    for it in items:
        p, _, sec = prompts_for([it], system)
        prompts += p
        retrieval.append(sec)
    timer = StageTimer(lm.device)
    g = generate(lm, prompts, max_new_tokens=opts.qa_max_tokens, stop_strings=["\n"], batch_size=1, timer=timer,
                 system=system, lam=lam)
    n, totals = len(items), dict(timer.totals)
    m = {"n": n, "ttft_ms": _percentiles(g.ttft_s), "tokens_per_s": g.new_tokens / max(g.seconds, 1e-9),
         "new_tokens": g.new_tokens, "seconds": g.seconds, "stage_seconds": totals,
         "retrieval_ms": None, "memory_ms": None}
    if system.transforms_prompt:
        m["retrieval_ms"] = 1000.0 * sum(retrieval) / n
        m["ttft_with_retrieval_ms"] = _percentiles([a + b for a, b in zip(g.ttft_s, retrieval)])
    elif "search" in totals:  # a retriever inside the hook (kNN-LM)
        m["retrieval_ms"] = 1000.0 * (totals.get("search", 0.0) + totals.get("distribution", 0.0)) / n
    elif "memory_forward" in totals:
        m["memory_ms"] = 1000.0 * totals.get("memory_forward", 0.0) / n
    return m


def _system_metrics(rows_by_system: dict, cols: list[str], lam: dict) -> dict:
    result_systems = {}
    for system, rows in rows_by_system.items():
        s = {c: group_metrics([r for r in rows if c == "overall" or r["group"] == c]) for c in cols}
        s["lambda"] = lam.get(system)
        result_systems[system] = s
    if "base" in result_systems:
        base = result_systems["base"]
        for s in result_systems.values():
            s["em_vs_base"] = {c: None if s[c]["em"] is None else {
                "points": s[c]["em"] - base[c]["em"],
                "relative": (s[c]["em"] / base[c]["em"] - 1) if base[c]["em"] else None} for c in cols}
    return result_systems


def main(run, opts: Options) -> None:
    t_start = time.perf_counter()
    opts.validate()
    names_ = [s for s in SYSTEMS if s in opts.systems()]
    default_name, raw, data_fp = load_data(opts.qa_data, run.cfg.run.cache_dir)
    items = dedupe(raw)
    groups = coverage_groups(items, run.path("corpus"), run.cfg.corpus.heldout_fraction)
    wanted = ["all"] if groups[:1] == ["all"] else [g for g in opts.groups() if g != "all"]
    shots_i, dev_i, reported_i = make_splits(items, groups, wanted, opts.qa_dev, opts.few_shot, opts.qa_limit)
    shots, dev = [items[i] for i in shots_i], [items[i] for i in dev_i]
    report = [(items[i], g) for g in wanted for i in reported_i[g]]
    if not report:
        raise MLPMemError(f"no question left to report in groups {wanted} (sizes: {dict(Counter(groups))}); "
                          "lower --qa-dev / --few-shot or choose other --qa-groups")
    out = run.dir / "qa" / check_name(opts.qa_name or default_name, "--qa-name (default: the data file's stem)")
    out.mkdir(parents=True, exist_ok=True)
    common, dev_key, key, fps = _settings_keys(run, opts, names_, data_fp, shots, dev, report)
    qa_json = out / "qa.json"
    if qa_json.exists() and read_json(qa_json).get("inputs") == key and all(
            {it["id"] for it, _ in report} <= set(read_predictions(out / f"predictions.{s}.jsonl")) for s in names_):
        if not distributed.is_main():
            return
        print(format_table(read_json(qa_json)))
        print(f"\nqa: already complete ({qa_json})")
        return

    lm = run.lm
    systems = _load_systems(run, names_, opts)
    lam = distributed.main_first(lambda: _dev_lambdas(lm, out, dev_key, dev, shots, systems, opts))
    prompts_for = _Prompter(lm, shots, opts)
    rows_by_system = _accuracy(lm, out, common, report, systems, lam, prompts_for, opts)
    if not distributed.is_main():
        return  # the latency (one process, all cores) and the report are rank 0's
    lat_items = [it for it, _ in report][:opts.latency_questions]
    latency = {name: _latency_one(lm, s, lam.get(name, 0.0), lat_items, prompts_for, opts)
               for name, s in systems.items()} if lat_items else {}

    cols = wanted + (["overall"] if len(wanted) > 1 else [])
    fps["lm_fingerprint"] = lm.fingerprint
    for s in systems.values():
        if getattr(s, "retriever", None) is not None:
            fps["bm25"] = sha256_json(s.retriever.manifest)
    result = {
        "data": {"name": out.name, "spec": opts.qa_data, "fingerprint": data_fp, "n_questions": len(raw),
                 "n_unique": len(items), "group_sizes": dict(Counter(groups))},
        "groups": wanted, "headline": wanted[0],
        "splits": {"few_shot_ids": [s["id"] for s in shots], "n_dev": len(dev),
                   "dev_by_group": dict(Counter(groups[i] for i in dev_i)),
                   "reported": {g: len(reported_i[g]) for g in wanted}},
        "systems": _system_metrics(rows_by_system, cols, lam), "system_order": names_,
        "lambda_selection": {"method": opts.qa_lambda_select, "n_dev": len(dev), "chosen": lam, "curves": "dev.json"},
        "latency": latency, "settings": asdict(opts), "fingerprints": fps, "inputs": key,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    atomic_write_json(qa_json, result)
    print(format_table(result))
    print(f"\nqa: {qa_json}")
