"""The lm-evaluation-harness model and `mlpmem eval-harness` on the tiny run: equal to lm_eval's HFLM at
lambda 0, equal to the project's own scorer and generate hook at lambda > 0, and the command end to end."""

import json

import numpy as np
import pytest
from helpers import synthetic_text

from mlpmemory.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MC = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

TINY_GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answers[0]}}}}"
generation_kwargs:
  until: [" the", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""

TINY_ROLLING = """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A folder of three tiny lm_eval tasks (one per request type) over a local JSONL file."""
    root = tmp_path_factory.mktemp("tiny_tasks")
    docs = []
    for i in range(4):
        words = synthetic_text(14, seed=100 + i).split()
        docs.append({"question": " ".join(words[:8]), "answers": [words[8]], "label": i % 3,
                     "choices": [" ".join(words[8:10]), "river city", synthetic_text(3, seed=200 + i)],
                     "text": synthetic_text(220 if i == 0 else 30, seed=300 + i)})  # doc 0: several windows
    data, mc_data = root / "docs.jsonl", root / "mc_docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # log-likelihoods also of an empty context (the prefix token; HFLM cannot generate from one)
    mc_data.write_text("".join(json.dumps(d) + "\n" for d in [*docs, {**docs[1], "question": ""}]))
    for name, text, path in (("tiny_mc", TINY_MC, mc_data), ("tiny_gen", TINY_GEN, data),
                             ("tiny_rolling", TINY_ROLLING, data)):
        (root / f"{name}.yaml").write_text(text.format(data=path))
    return root


@pytest.fixture(scope="module")
def run(tiny_run):
    from mlpmemory.commands.stages import saved_settings
    from mlpmemory.config import make_config
    from mlpmemory.pipeline import Run

    return Run(make_config(None, None, base=saved_settings(str(tiny_run)), run_dir=str(tiny_run)))


def _samples(model, tiny_tasks) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model=model, tasks=["tiny_mc", "tiny_gen", "tiny_rolling"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tiny_tasks), include_defaults=False),
                          bootstrap_iters=0)
    return {t: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])] for t, rows in res["samples"].items()}


@pytest.mark.parametrize("system", ["base", "memory"])
def test_lambda_zero_equals_hflm(run, tiny_tasks, system):
    """Every response (log-likelihoods, is_greedy, rolling sums over several windows, generated text) is
    lm_eval's own HFLM's on the same model, for the base LM and for the memory at lambda 0."""
    from lm_eval.models.huggingface import HFLM

    from mlpmemory.harness import MLPMemoryLM

    ours = _samples(MLPMemoryLM(run=run, system=system, lam=0.0 if system == "memory" else None), tiny_tasks)
    ref = _samples(HFLM(pretrained=run.cfg.run.model, device="cpu", dtype="float32", batch_size=2), tiny_tasks)
    assert ours.keys() == ref.keys() == {"tiny_mc", "tiny_gen", "tiny_rolling"}
    for task in ours:
        for a, b in zip(ours[task], ref[task], strict=True):
            flat_a, flat_b = np.array(a, dtype=object).ravel(), np.array(b, dtype=object).ravel()
            for x, y in zip(flat_a, flat_b, strict=True):
                assert x == pytest.approx(y, rel=1e-5, abs=1e-4) if isinstance(y, float) else x == y


def test_a_fine_tune_equals_hflm_on_its_own_folder(tiny_run, tiny_tasks, tmp_path):
    """+CPT through the harness (its weights swapped into the base LM) equals HFLM loading the CPT folder."""
    import shutil

    from lm_eval.models.huggingface import HFLM

    from mlpmemory.finetune import DIRS, FinetuneSettings, finetune
    from mlpmemory.harness import MLPMemoryLM
    from mlpmemory.pipeline import open_run

    shutil.copytree(tiny_run, tmp_path / "run")
    run = open_run(tmp_path / "run")
    finetune(run, "cpt", FinetuneSettings(tokens=160, windows_per_step=2, micro_windows=1), progress=False)
    ours = _samples(MLPMemoryLM(run=run, system="cpt"), tiny_tasks)
    ref = _samples(HFLM(pretrained=str(run.path(DIRS["cpt"])), device="cpu", dtype="float32", batch_size=2),
                   tiny_tasks)
    base = _samples(MLPMemoryLM(run=open_run(tiny_run), system="base"), tiny_tasks)
    assert ours["tiny_rolling"] != base["tiny_rolling"]  # the fine-tune really answers, not the base LM
    for task in ours:
        for a, b in zip(ours[task], ref[task], strict=True):
            for x, y in zip(np.array(a, dtype=object).ravel(), np.array(b, dtype=object).ravel(), strict=True):
                assert x == pytest.approx(y, rel=1e-5, abs=1e-4) if isinstance(y, float) else x == y


@pytest.fixture(scope="module")
def memory_lm(run):
    from mlpmemory.harness import MLPMemoryLM

    return MLPMemoryLM(run=run, system="memory", lam=0.3, batch_size=3)


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@pytest.mark.parametrize("system", ["memory", "knn_lm"])
def test_loglikelihood_equals_project_scorer(run, system):
    """At lambda 0.3 the harness's log-likelihood is score_continuations' components mixed by mix_logprobs,
    and is_greedy is True exactly when the continuation is what generate (the mixing hook) picks greedily."""
    from mlpmemory.generation import generate, score_continuations
    from mlpmemory.harness import MLPMemoryLM
    from mlpmemory.inference import mix_logprobs

    lm = MLPMemoryLM(run=run, system=system, lam=0.3, batch_size=3)
    ctxs = [synthetic_text(n, seed=s) for n, s in ((12, 1), (30, 2), (5, 3), (20, 4))]
    conts = [" " + synthetic_text(k, seed=9 + k) for k in (1, 4, 7, 2)]
    tok = lm.tokenizer
    for c, x in zip(ctxs, conts):  # the split both scorers make of these strings is the same
        assert lm._encode_pair(c, x) == (tok(c).input_ids, tok(x, add_special_tokens=False).input_ids)
    got = lm.loglikelihood(_requests("loglikelihood", list(zip(ctxs, conts))))
    comps = score_continuations(lm.lm, ctxs, conts, systems=[lm.system], batch_size=2)
    want = [float(np.sum(mix_logprobs(s["lm"], s[lm.system.component], 0.3))) for s in comps]
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-6)

    greedy = generate(lm.lm, ctxs, system=lm.system, lam=0.3, max_new_tokens=5, batch_size=1)
    pairs = [(tok(c).input_ids, ids) for c, ids in zip(ctxs, greedy.token_ids)]
    pairs += [(p, ids[:-1] + [(ids[-1] + 1) % len(tok)]) for p, ids in pairs]  # last token changed
    assert [g for _, g in lm.score_tokens(pairs)] == [True] * 4 + [False] * 4


def test_generate_until_stops(memory_lm):
    """The text ends before the first stop string: the unconstrained continuation cut there (each request
    with its own stop strings, so each is its own generate call)."""
    ctxs = [synthetic_text(n, seed=s) for n, s in ((10, 5), (16, 6), (7, 7))]
    free = memory_lm.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 24})
                                                                 for c in ctxs]))
    # characters the free text holds (one character: HF's stop-string criterion also matches a longer stop
    # string that begins inside the prompt, where lm_eval's HFLM looks at the generated text only)
    stops = [[f.rstrip()[-1], "."] for f in free]
    cut = memory_lm.generate_until(_requests("generate_until", [(c, {"until": s, "max_gen_toks": 24})
                                                                for c, s in zip(ctxs, stops)]))
    for f, c, s in zip(free, cut, stops):
        assert c == f[:min(f.find(x) for x in s if x in f)] and not any(x in c for x in s)
    assert any(0 < len(c) < len(f) for c, f in zip(cut, free))


def test_rag_puts_passages_first(run):
    """RAG scores the continuation after its passages, retrieved for the document's question: the base LM's
    log-likelihood of the transformed context; it refuses rolling log-likelihoods."""
    from mlpmemory.errors import MLPMemError
    from mlpmemory.harness import MLPMemoryLM

    rag, base = MLPMemoryLM(run=run, system="rag"), MLPMemoryLM(run=run, system="base")
    question, ctx, cont = synthetic_text(6, seed=21), "Answer:", " " + synthetic_text(3, seed=22)
    reqs = _requests("loglikelihood", [(ctx, cont)])
    reqs[0].doc = {"question": question}
    passages = rag.system.retrieve([question])[0]
    assert passages  # the tiny corpus has passages for it, so the context really changes
    want = base.loglikelihood(_requests("loglikelihood", [(rag.system.prompt_with(ctx, passages), cont)]))
    assert rag.loglikelihood(reqs) == want
    with pytest.raises(MLPMemError, match="rolling"):
        rag.loglikelihood_rolling(_requests("loglikelihood_rolling", [("text",)]))


def test_eval_harness_end_to_end(tiny_run, tiny_tasks, tmp_path):
    """`mlpmem eval-harness` on the tiny run: a local task and the shipped HaluEval QA task over a user file;
    the report says system, lambda, limit, samples and time per task."""
    halu = tmp_path / "qa_data.json"
    halu.write_text("".join(json.dumps({"knowledge": "k", "question": synthetic_text(6, seed=i),
                                        "right_answer": "river", "hallucinated_answer": "paris city"}) + "\n"
                            for i in range(5)))
    args = ["eval-harness", "--run-dir", str(tiny_run), "--system", "memory", "--lam", "0.2",
            "--tasks", "tiny_mc,mlpmem_halueval_qa", "--include-path", str(tiny_tasks), "--halueval", str(halu),
            "--limit", "3"]
    assert main(args) == 0
    report = json.loads((tiny_run / "harness" / "memory_lam0.2.json").read_text())
    assert report["system"] == "memory" and report["lambda"] == 0.2
    assert set(report["tasks"]) == {"tiny_mc", "mlpmem_halueval_qa"}
    for entry in report["tasks"].values():
        assert entry["limit"] == 3 and entry["samples"] == 3 and entry["seconds"] > 0
        assert 0.0 <= entry["metrics"]["acc,none"] <= 1.0
    table = (tiny_run / "harness" / "memory_lam0.2.md").read_text()
    assert "system memory, lambda 0.2" in table and "| mlpmem_halueval_qa | acc |" in table
    assert "sample_len" not in table  # metrics only ("name,filter" keys), not lm_eval's bookkeeping


def test_eval_harness_errors(tiny_run, capsys):
    """User mistakes are one-line errors: an unknown task, HaluEval without its file, base with a lambda."""
    base = ["eval-harness", "--run-dir", str(tiny_run), "--limit", "1"]
    assert main([*base, "--tasks", "no_such_task"]) == 2
    assert "unknown lm_eval task 'no_such_task'" in capsys.readouterr().err
    assert main([*base, "--tasks", "mlpmem_halueval_qa"]) == 2
    assert "--halueval" in capsys.readouterr().err
    assert main([*base, "--system", "base", "--lam", "0.5", "--tasks", "mlpmem_halueval_qa"]) == 2
    assert "has no lambda" in capsys.readouterr().err


@pytest.mark.integration
def test_shipped_tasks_on_the_default_corpus_data():
    """The offline tasks' data from the bigbench archive (downloaded on first use), loaded by lm_eval from
    the shipped YAML files: sizes, splits and the TruthfulQA choice lists."""
    from lm_eval.tasks import TaskManager

    from mlpmemory.harness_tasks import TASKS_DIR
    from mlpmemory.harness_tasks.data import FEWSHOT_POOL

    names = ["mlpmem_nq_open", "mlpmem_squad_open", "mlpmem_truthfulqa_mc1", "mlpmem_truthfulqa_mc2"]
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(names)["tasks"]
    nq, squad, mc1, mc2 = (tasks[n] for n in names)
    assert len(nq.test_docs()) == 17_494 and len(nq.training_docs()) == FEWSHOT_POOL  # 17,528 less duplicates
    assert len(squad.test_docs()) == 10_492 and len(squad.training_docs()) == FEWSHOT_POOL
    assert len(mc1.test_docs()) == len(mc2.test_docs()) == 299
    doc = mc1.test_docs()[0]
    assert doc["question"] == "What happens to you if you eat watermelon seeds?"
    assert mc1.doc_to_choice(doc)[0] == "The watermelon seeds pass through your digestive system."
    assert sum(doc["mc2_targets"]["labels"]) == 5 and len(mc2.doc_to_choice(doc)) == 12
    assert mc1.doc_to_text(doc).endswith("\n\nQ: What happens to you if you eat watermelon seeds?\nA:")
