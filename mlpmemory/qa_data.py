"""eval-qa's data side: SQuAD v1.1 answer metrics, QA file loading, coverage groups and splits.

Why these live apart from :mod:`mlpmemory.commands.eval_qa`: they are pure functions of the questions (and, for
coverage groups, of the run's corpus index) with no model, tokenizer or GPU. They fix what is
scored and how, so they are checked on hand-worked values without loading an LM, while ``qa.py``
keeps the options, lambda choice, prompting, the systems, latency and the command. Its docstring
gives the reasons behind the metrics, the coverage groups and the hash-fixed splits.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from pathlib import Path

from .errors import MLPMemError
from .io import read_manifest, sha256_file, sha256_json
from .log import logger

_PUNCT = set(string.punctuation)
_SHOT_MAX_WORDS = 5  # few-shot examples show the short-answer format, so prefer short answers


# ---------------------------------------------------------------------------------------------
# Metrics: the official SQuAD v1.1 evaluate script's definitions.
# ---------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, then the articles a/an/the, then collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:  # v1.1: also when both normalise to nothing (EM is then 1, F1 0)
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(metric, prediction: str, ground_truths: list[str]) -> float:
    return max(float(metric(prediction, g)) for g in ground_truths)


# ---------------------------------------------------------------------------------------------
# Data: NQ of the default corpus, SQuAD JSON, JSONL; dedup; coverage groups; splits.
# ---------------------------------------------------------------------------------------------


def _answers(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise MLPMemError(f"{where}: 'answers' must be a string or a list of strings, got {value!r}")
    answers = list(dict.fromkeys(a.strip() for a in value if a.strip()))
    if not answers:
        raise MLPMemError(f"{where}: no non-empty answer; give at least one gold answer")
    return answers


def _load_jsonl(path: Path) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise MLPMemError(f"{where} is not valid JSON ({e}); one object per line: "
                                  '{"question": ..., "answers": [...]}') from None
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
                raise MLPMemError(f"{where} has no 'question' string; "
                                  f"expected {{\"question\": ..., \"answers\": [...]}}")
            if "answers" not in rec and "answer" not in rec:
                raise MLPMemError(f"{where} has no 'answers' field (a string or a list of strings)")
            item = {"id": str(rec.get("id", f"line{n}")), "question": rec["question"].strip(),
                    "answers": _answers(rec.get("answers", rec.get("answer")), where)}
            for key in ("doc_id", "group"):
                if rec.get(key) is not None:
                    item[key] = str(rec[key])
            items.append(item)
    return items


def _load_squad(path: Path) -> list[dict]:
    """SQuAD JSON; a paragraph's id is the default corpus's (``squad:<title>:<j>``), unanswerable skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MLPMemError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise MLPMemError(f"{path}: expected SQuAD JSON with a top-level 'data' list of articles "
                          "(or use .jsonl with one {question, answers} object per line)")
    items = []
    for a, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs", []), list):
            raise MLPMemError(f"{path}: data[{a}] is not an article with a 'paragraphs' list")
        title = str(article.get("title", "")).strip() or "untitled"
        for j, para in enumerate(article.get("paragraphs", [])):
            if not isinstance(para, dict) or not isinstance(para.get("qas", []), list):
                raise MLPMemError(f"{path}: data[{a}].paragraphs[{j}] is not a paragraph with a 'qas' list")
            for k, qa in enumerate(para.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{j}].qas[{k}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise MLPMemError(f"{where} has no 'question' string")
                if qa.get("is_impossible"):
                    continue
                raw = qa.get("answers")
                if not isinstance(raw, list) or not all(isinstance(x, dict) and "text" in x for x in raw):
                    raise MLPMemError(f"{where}: 'answers' must be a list of {{\"text\": ...}} objects")
                items.append({"id": str(qa.get("id", f"{a}.{j}.{k}")), "question": qa["question"].strip(),
                              "answers": _answers([x["text"] for x in raw], where),
                              "doc_id": f"squad:{title}:{j}", "group": f"squad:{title}"})
    return items


def load_qa_file(path) -> list[dict]:
    """Questions of a SQuAD ``.json`` or a ``.jsonl`` file: dicts with id, question, answers[, doc_id, group]."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MLPMemError(f"QA data {path} not found; pass 'nq', a SQuAD .json or a .jsonl file")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise MLPMemError(f"QA data {path}: use a SQuAD .json or a .jsonl file (one {{question, answers}} per line)")
    try:
        items = _load_squad(path) if path.suffix.lower() == ".json" else _load_jsonl(path)
    except UnicodeDecodeError as e:
        raise MLPMemError(f"QA data {path} is not UTF-8 (byte offset {e.start}); re-encode it") from None
    if not items:
        raise MLPMemError(f"QA data {path} holds no answerable question")
    return items


def load_data(spec: str, cache_dir=None) -> tuple[str, list[dict], str]:
    """(default name, questions, fingerprint) of ``qa_data``."""
    if spec == "nq":
        from .corpus import load_nq_questions

        items = [{"id": f"nq:{i}", **q} for i, q in enumerate(load_nq_questions(cache_dir))]
        return "nq", items, sha256_json(items)
    path = Path(spec).expanduser()
    items = load_qa_file(path)
    return re.sub(r"[^\w.-]", "_", path.stem) or "data", items, sha256_file(path)


def dedupe(items: list[dict]) -> list[dict]:
    """Identical questions (case and spacing ignored) are asked once; their gold answers are merged."""
    seen: dict[str, dict] = {}
    for it in items:
        key = " ".join(it["question"].lower().split())
        if key in seen:
            first = seen[key]
            first["answers"] = list(dict.fromkeys(first["answers"] + it["answers"]))
        else:
            seen[key] = dict(it, answers=list(it["answers"]))
    return list(seen.values())


def coverage_groups(items: list[dict], corpus_dir, heldout_fraction: float) -> list[str]:
    """Per question: in_memory / heldout / not_in_memory / partial (a truncated passage), or 'all' without doc ids."""
    from .corpus import read_document_index, split_of

    if not any("doc_id" in it for it in items):
        return ["all"] * len(items)
    n_train = int(read_manifest(corpus_dir, "corpus")["n_tokens"]["train"])
    wanted = {it.get("doc_id") for it in items}
    docs = {r["doc_id"]: r for r in read_document_index(corpus_dir) if r["doc_id"] in wanted}
    if not docs:
        logger.warning(f"no passage of this QA data is in the run's corpus ({corpus_dir}); "
              "its questions count as heldout / not_in_memory")
    out = []
    for it in items:
        rec = docs.get(it.get("doc_id"))
        if rec is None:  # not stored: held out by its group's split, or beyond the train cap
            group = it.get("group")
            out.append("heldout" if group and split_of(group, heldout_fraction) == "heldout" else "not_in_memory")
        elif rec["split"] == "heldout":
            out.append("heldout")
        elif rec.get("truncated") or rec["start"] + rec["n_tokens"] > n_train:
            out.append("partial")  # partly in the datastore: in no reported group
        else:
            out.append("in_memory")
    return out


def _hash_key(question: str) -> bytes:
    return hashlib.sha256(b"mlpmemory-qa:" + question.encode("utf-8")).digest()


def make_splits(items: list[dict], groups: list[str], wanted: list[str], n_dev: int, n_shots: int,
                limit: int) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(few-shot, dev, reported per group) as indices into ``items``; disjoint and deterministic.

    Questions are ranked by a hash of their text. Dev takes the first ones of each ``wanted``
    group in that order, ``n_dev`` shared evenly across the groups present (never more than half
    a group), so dev depends on neither the few-shot count nor ``limit``; few-shot examples are
    the next ``n_shots`` (short answers first); the rest is reported in file order, ``limit``
    per group.
    """
    order = sorted(range(len(items)), key=lambda i: _hash_key(items[i]["question"]))
    pools = {g: [i for i in order if groups[i] == g] for g in wanted}
    present = [g for g in wanted if pools[g]]
    dev: list[int] = []
    for k, g in enumerate(present):
        quota = n_dev // len(present) + (k < n_dev % len(present))
        dev += pools[g][:min(quota, len(pools[g]) // 2)]
    taken = set(dev)
    rest = [i for i in order if i not in taken]
    short = [i for i in rest if len(items[i]["answers"][0].split()) <= _SHOT_MAX_WORDS]
    short_set = set(short)
    shots = (short + [i for i in rest if i not in short_set])[:n_shots]
    taken |= set(shots)
    reported = {g: [i for i in range(len(items)) if groups[i] == g and i not in taken][:limit] for g in wanted}
    return shots, dev, reported
