"""eval-qa: SQuAD metrics, data loading, coverage groups, splits, lambda choice, and the command end to end."""

import json
import math
import random

import numpy as np
import pytest
from helpers import tiny_run_args, write_docs

from mlpmemory.cli import main
from mlpmemory.commands.eval_qa import SYSTEMS, Options, continuation, loglik_curve, make_prompt, pick_lambda
from mlpmemory.errors import MLPMemError
from mlpmemory.qa_data import (
    coverage_groups,
    dedupe,
    exact_match_score,
    f1_score,
    load_qa_file,
    make_splits,
    max_over_ground_truths,
    normalize_answer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------------
# Metrics: values worked by hand from the official SQuAD v1.1 evaluate script's definitions.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, norm", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("An apple a day", "apple day"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("the-end", "theend"),  # punctuation goes first (deleted, not spaced), so no article is left to strip
    ("Don't stop", "dont stop"),
    ("A", ""),
    ("  1,000  people\n", "1000 people"),
    ("Zürich–Bern", "zürich–bern"),  # only ASCII punctuation is removed
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_and_f1():
    assert exact_match_score("the Eiffel tower.", "Eiffel Tower")
    assert not exact_match_score("Eiffel", "Eiffel Tower")
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert f1_score("the cat sat on the mat", "cat on a mat") == pytest.approx(6 / 7)
    assert f1_score("paris paris", "Paris") == pytest.approx(2 / 3)  # clipped counts: 1 in common
    assert f1_score("", "Paris") == 0.0 and not exact_match_score("", "Paris")
    assert exact_match_score("the", "a") and f1_score("the", "a") == 0.0  # v1.1: both empty -> EM 1, F1 0
    assert max_over_ground_truths(exact_match_score, "Paris", ["London", "paris."]) == 1.0
    assert max_over_ground_truths(f1_score, "new york city", ["York", "New York"]) == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------
# Data files.
# --------------------------------------------------------------------------------------------


def test_load_squad_json_and_jsonl(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [
        {"context": "...", "qas": [
            {"id": "q1", "question": " Capital of France? ",
             "answers": [{"text": "Paris"}, {"text": "Paris"}, {"text": "paris "}]},
            {"id": "q2", "question": "Unanswerable?", "answers": [], "is_impossible": True}]},
        {"context": "...", "qas": [{"id": "q3", "question": "River?",
                                    "answers": [{"text": "Seine", "answer_start": 3}]}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    items = load_qa_file(tmp_path / "s.json")
    assert [it["id"] for it in items] == ["q1", "q3"]
    assert items[0] == {"id": "q1", "question": "Capital of France?", "answers": ["Paris", "paris"],
                        "doc_id": "squad:Paris:0", "group": "squad:Paris"}
    assert items[1]["doc_id"] == "squad:Paris:1"
    (tmp_path / "d.jsonl").write_text('{"question": "a?", "answers": ["x", "y"]}\n\n'
                                      '{"question": "b?", "answers": "z", "id": 7, "doc_id": "d:1"}\n')
    items = load_qa_file(tmp_path / "d.jsonl")
    assert items == [{"id": "line1", "question": "a?", "answers": ["x", "y"]},
                     {"id": "7", "question": "b?", "answers": ["z"], "doc_id": "d:1"}]


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "a?", "answers": ["x"]}\n{"question": "b?", "answers": ["y"]\n', "line 2 is not valid JSON"),
    ('{"question": "a?", "answers": ["x"]}\n{"q": "b?", "answers": ["y"]}\n', "line 2 has no 'question'"),
    ('{"question": "a?"}\n', "line 1 has no 'answers'"),
    ('{"question": "a?", "answers": [3]}\n', "line 1: 'answers' must be"),
    ('{"question": "a?", "answers": ["  "]}\n', "line 1: no non-empty answer"),
    ("\n\n", "holds no answerable question"),
])
def test_malformed_jsonl(tmp_path, content, fragment):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(MLPMemError, match=fragment):
        load_qa_file(tmp_path / "bad.jsonl")


def test_malformed_squad_and_paths(tmp_path):
    (tmp_path / "a.json").write_text('{"data": [\n{"title": "x", ]}')
    with pytest.raises(MLPMemError, match="line 2"):
        load_qa_file(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('[{"question": "a", "answers": ["b"]}]')
    with pytest.raises(MLPMemError, match="top-level 'data'"):
        load_qa_file(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": [
        {"question": "q", "answers": ["plain string"]}]}]}]}))
    with pytest.raises(MLPMemError, match=r"data\[0\].paragraphs\[0\].qas\[0\]"):
        load_qa_file(tmp_path / "c.json")
    with pytest.raises(MLPMemError, match="not found"):
        load_qa_file(tmp_path / "none.jsonl")
    (tmp_path / "d.csv").write_text("q,a\n")
    with pytest.raises(MLPMemError, match="SQuAD .json or a .jsonl"):
        load_qa_file(tmp_path / "d.csv")


def test_dedupe_merges_answers():
    items = dedupe([{"id": "1", "question": "Who  wrote X?", "answers": ["A"], "doc_id": "d1"},
                    {"id": "2", "question": "who wrote x?", "answers": ["B", "A"], "doc_id": "d2"},
                    {"id": "3", "question": "Other?", "answers": ["C"]}])
    assert [it["id"] for it in items] == ["1", "3"]
    assert items[0]["answers"] == ["A", "B"] and items[0]["doc_id"] == "d1"


# --------------------------------------------------------------------------------------------
# Splits and lambda choice.
# --------------------------------------------------------------------------------------------


def _items(n):
    rng = random.Random(1)
    return [{"id": f"q{i}", "question": f"question number {i}?",
             "answers": [" ".join(["w"] * rng.choice([1, 2, 8]))]} for i in range(n)]


def test_splits_disjoint_deterministic_stratified():
    items = _items(300)
    groups = [("in_memory", "heldout", "not_in_memory")[i % 3] if i < 290 else "partial" for i in range(300)]
    wanted = ["in_memory", "heldout", "not_in_memory"]
    shots, dev, rep = make_splits(items, groups, wanted, n_dev=31, n_shots=4, limit=50)
    reported = [i for g in wanted for i in rep[g]]
    assert len(shots) == 4 and len(dev) == 31 and len(set(shots) | set(dev) | set(reported)) == 4 + 31 + len(reported)
    assert all(len(items[i]["answers"][0].split()) <= 5 for i in shots)  # short answers show the format
    assert sorted(groups[i] for i in dev).count("in_memory") == 11 and all(groups[i] != "partial" for i in dev)
    for g in wanted:
        assert len(rep[g]) == 50 and rep[g] == sorted(rep[g]) and all(groups[i] == g for i in rep[g])
    # the same questions in another file order, or another limit: the same few-shot and dev questions
    perm = list(range(300))
    random.Random(0).shuffle(perm)
    s2, d2, r2 = make_splits([items[i] for i in perm], [groups[i] for i in perm], wanted, 31, 4, limit=7)
    assert [items[perm[i]]["id"] for i in s2] == [items[i]["id"] for i in shots]
    assert {items[perm[i]]["id"] for i in d2} == {items[i]["id"] for i in dev}
    assert all(len(r2[g]) == 7 for g in wanted)
    # dev does not depend on the few-shot count; a tiny group gives at most half of itself to dev
    assert make_splits(items, groups, wanted, n_dev=31, n_shots=0, limit=50)[1] == dev
    _, d3, r3 = make_splits(items[:6], ["all"] * 6, ["all"], n_dev=200, n_shots=0, limit=10)
    assert len(d3) == 3 and len(r3["all"]) == 3


def test_lambda_by_loglik_picks_the_oracle_best():
    rng = np.random.default_rng(0)
    lambdas = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    scores = []  # 30 questions, 1-2 gold answers of 1-4 tokens; the memory is better on some tokens only
    for _ in range(30):
        answers = []
        for _ in range(rng.integers(1, 3)):
            n = int(rng.integers(1, 5))
            p_lm = rng.uniform(0.01, 0.9, n)
            q = np.where(rng.random(n) < 0.7, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.05, n))
            q[0] = 0.0 if rng.random() < 0.2 else q[0]  # a kNN distribution can give a token probability 0
            with np.errstate(divide="ignore"):
                answers.append({"lm": np.log(p_lm), "memory": np.log(q)})
        scores.append(answers)

    def oracle(lam):  # the obvious way: probabilities, products, max over answers, mean of logs
        return np.mean([max(math.log(np.prod((1 - lam) * np.exp(a["lm"]) + lam * np.exp(a["memory"]))) for a in ans)
                        for ans in scores])

    curve = loglik_curve(scores, "memory", lambdas)
    assert [r["lambda"] for r in curve] == lambdas
    for row in curve:
        assert row["loglik"] == pytest.approx(oracle(row["lambda"]), rel=1e-9)
    best = max(lambdas, key=oracle)
    assert 0.0 < best < 0.8 and pick_lambda(curve, "loglik") == best
    assert pick_lambda([{"lambda": 0.3, "em": 5.0}, {"lambda": 0.1, "em": 5.0}, {"lambda": 0.0, "em": 4.0}],
                       "em") == 0.1


def test_prompt_format():
    opts = Options()
    shots = [{"question": "Capital of France?", "answers": ["Paris", "paris"]}]
    assert make_prompt("Who?", shots, opts) == "Question: Capital of France?\nAnswer: Paris\n\nQuestion: Who?\nAnswer:"
    assert continuation("Answer:", "Paris", chat=False) == " Paris\n" and continuation("A: ", "x", False) == "x\n"
    assert continuation("<|im_start|>assistant\n", "Paris", chat=True) == "Paris"
    with pytest.raises(MLPMemError, match="prompt-template"):
        Options(prompt_template="Q: {q}").validate()
    with pytest.raises(MLPMemError, match="qa-systems"):
        Options(qa_systems="base,gpt4").validate()


# --------------------------------------------------------------------------------------------
# A tiny run: coverage groups against the token streams, and the command end to end.
# --------------------------------------------------------------------------------------------

N_DOCS = 40


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("qa")
    texts = write_docs(d / "docs.jsonl", N_DOCS, n_words=40, seed0=100)
    run = d / "run"
    argv = ["run", *tiny_run_args(run, tiny_llama.path, d / "docs.jsonl", "--tune-tokens", "64", "--max-train-tokens",
                                  "900", "--train-batch", "64", "--val-rows", "64")]
    assert main(argv) == 0
    return d, run, texts


def _contains(stream, seq) -> bool:
    return any(np.array_equal(stream[s:s + len(seq)], seq) for s in np.flatnonzero(stream == seq[0]))


def test_coverage_groups_match_the_token_streams(tiny_run, tiny_llama):
    """Oracle: where each document's tokens really are in the token streams (documents are stored in
    file order, so the first train-split document not stored whole is the one the cap cut)."""
    from mlpmemory.corpus import open_token_stream, split_of

    d, run, texts = tiny_run
    items = [{"id": str(i), "question": f"q{i}", "answers": ["a"], "doc_id": f"docs.jsonl:{i + 1}", "group": f"doc{i}"}
             for i in range(N_DOCS)]
    got = coverage_groups(items, run / "corpus", 0.3)
    train, heldout = open_token_stream(run / "corpus", "train"), open_token_stream(run / "corpus", "heldout")
    tok = tiny_llama.tokenizer
    want, cut_seen = [], False
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False).input_ids
        if _contains(heldout, ids):
            want.append("heldout")
        elif _contains(train, ids + [tok.eos_token_id]):
            want.append("in_memory")
        elif split_of(f"doc{i}", 0.3) == "train" and not cut_seen:
            cut_seen = True
            want.append("partial" if any(np.array_equal(train[-k:], ids[:k]) for k in range(1, len(ids) + 1))
                        else "not_in_memory")
        else:
            want.append("heldout" if split_of(f"doc{i}", 0.3) == "heldout" else "not_in_memory")
    assert got == want
    assert {"in_memory", "heldout", "not_in_memory"} <= set(got)
    assert coverage_groups([{"question": "x", "answers": ["y"]}], run / "corpus", 0.3) == ["all"]


def _qa_file(d, texts):
    path = d / "qa.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"q{i}", "question": f"what comes after {' '.join(t.split()[:3])}?",
                                "answers": [next(w for w in t.split()[3:] if len(w) > 3)],
                                "doc_id": f"docs.jsonl:{i + 1}", "group": f"doc{i}"}) + "\n")
    return path


def test_eval_qa_end_to_end_noop_and_resume(tiny_run, capsys):
    d, run, texts = tiny_run
    argv = ["eval-qa", "--run-dir", str(run), "--qa-data", str(_qa_file(d, texts)), "--qa-limit", "3", "--qa-dev", "6",
            "--few-shot", "1", "--latency-questions", "2", "--qa-max-tokens", "3", "--qa-batch", "2", "--rag-n", "1",
            "--qa-lambdas", "0,0.3,0.6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    qa_dir = run / "qa" / "qa"
    res = json.loads((qa_dir / "qa.json").read_text())
    assert res["system_order"] == ["base", "memory", "knn_lm", "rag"] == sorted(res["systems"], key=SYSTEMS.index)
    assert res["headline"] == "in_memory"
    assert res["groups"] == ["in_memory", "heldout", "not_in_memory"]
    n_rep = sum(res["splits"]["reported"].values())
    assert res["splits"]["n_dev"] == 6 and sum(res["splits"]["dev_by_group"].values()) == 6
    dev = json.loads((qa_dir / "dev.json").read_text())
    for system in ("memory", "knn_lm"):
        curve = dev["systems"][system]["curve"]
        assert [r["lambda"] for r in curve] == [0.0, 0.3, 0.6]
        assert res["systems"][system]["lambda"] == max(curve, key=lambda r: (r["loglik"], -r["lambda"]))["lambda"]
    assert not set(dev["dev_ids"]) & set(res["splits"]["few_shot_ids"])
    for system, s in res["systems"].items():
        rows = [json.loads(x) for x in (qa_dir / f"predictions.{system}.jsonl").read_text().splitlines()]
        assert len(rows) == n_rep == s["overall"]["n"] and not {r["id"] for r in rows} & set(dev["dev_ids"])
        for g in res["groups"]:
            grp = [r for r in rows if r["group"] == g]
            assert s[g]["n"] == len(grp) and s[g]["em"] == pytest.approx(100 * np.mean([r["em"] for r in grp]))
        assert all(r["f1"] >= r["em"] for r in rows)
        lat = res["latency"][system]
        assert lat["n"] == 2 and lat["ttft_ms"]["p50"] > 0 and lat["tokens_per_s"] > 0
    assert res["latency"]["rag"]["retrieval_ms"] > 0 and res["latency"]["knn_lm"]["retrieval_ms"] > 0
    assert all("passages" in json.loads(x) for x in (qa_dir / "predictions.rag.jsonl").read_text().splitlines())
    assert "| knn_lm |" in out and "TTFT p95" in out

    # A second call only prints the table.
    mtimes = {p: p.stat().st_mtime_ns for p in qa_dir.iterdir()}
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in qa_dir.iterdir()} == mtimes

    # Interrupted: the last two rows (one torn mid-line) are written again, the rest is kept.
    path = qa_dir / "predictions.memory.jsonl"
    full = path.read_text()
    lines = full.splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:10])
    assert main(argv) == 0
    capsys.readouterr()
    again = path.read_text().splitlines(keepends=True)
    assert again[:-2] == lines[:-2]
    assert [json.loads(x)["id"] for x in again[-2:]] == [json.loads(x)["id"] for x in lines[-2:]]
    assert [json.loads(x)["prediction"] for x in again[-2:]] == [json.loads(x)["prediction"] for x in lines[-2:]]

    # Another RAG setting restarts RAG only.
    base_mtime = (qa_dir / "predictions.base.jsonl").stat().st_mtime_ns
    assert main(argv[:-4] + ["--rag-n", "2", *argv[-2:]]) == 0
    assert "starting it again" in capsys.readouterr().err
    assert (qa_dir / "predictions.base.jsonl").stat().st_mtime_ns == base_mtime
    assert json.loads((qa_dir / "qa.json").read_text())["settings"]["rag_n"] == 2


def test_eval_qa_on_two_ranks_equals_one_process(tiny_run):
    """`eval-qa --nproc 2` (a real torchrun, gloo): questions split over the ranks, answers merged in question order."""
    import os
    import subprocess
    import sys

    d, run, texts = tiny_run
    argv = ["eval-qa", "--run-dir", str(run), "--qa-data", str(_qa_file(d, texts)), "--qa-limit", "5", "--qa-dev", "4",
            "--few-shot", "1", "--latency-questions", "0", "--qa-max-tokens", "3", "--qa-batch", "1",
            "--qa-systems", "base,memory,knn_lm"]
    assert main([*argv, "--qa-name", "one"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLPMEM_DIST_TIMEOUT_MIN": "5"}
    done = subprocess.run([sys.executable, "-m", "mlpmemory", *argv, "--qa-name", "two", "--nproc", "2", "-q"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = run / "qa" / "one", run / "qa" / "two"
    for system in ("base", "memory", "knn_lm"):
        assert (one / f"predictions.{system}.jsonl").read_text() == (two / f"predictions.{system}.jsonl").read_text()
    assert not list(two.glob("*.rank*.jsonl"))  # the ranks' part files are merged away
    a, b = (json.loads((x / "qa.json").read_text()) for x in (one, two))
    assert a["systems"] == b["systems"] and a["lambda_selection"]["chosen"] == b["lambda_selection"]["chosen"]


def test_eval_qa_bad_options(tiny_run, capsys):
    d, run, _ = tiny_run
    assert main(["eval-qa", "--run-dir", str(run), "--qa-systems", "base,bogus"]) == 2
    assert "qa-systems" in capsys.readouterr().err
    assert main(["eval-qa", "--run-dir", str(run), "--qa-data", str(d / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
