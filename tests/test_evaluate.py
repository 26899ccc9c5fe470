"""Evaluation: window scoring equals a hand loop (golden), sweeps equal direct mixtures, caches are
reused or recomputed as they should, the validation -> test protocol refuses mismatched dirs."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mlpmemory.corpus import sliding_windows
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError
from mlpmemory.evaluate import (
    BASE,
    KNN_LM,
    MEM_FILE,
    MEM_META,
    MEMORY,
    RAG,
    bits_per_byte,
    build_eval_dir,
    choose,
    evaluate_ppl,
    format_ppl_table,
    knn_file,
    perplexity,
    score_components,
    sweep,
    text_bytes,
)
from mlpmemory.inference import KNNLM

BLOCK, STRIDE = 32, 12
MEM_SITE = "model.layers.1.mlp"  # what mem_site "0.5" resolves to in the 3-layer tiny llama


def write_tokens(path: Path, n: int, vocab: int, seed: int) -> Path:
    np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32).tofile(path)
    return path


def make_memory(vocab, seed):
    torch.manual_seed(seed)
    mem = torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.Tanh(), torch.nn.Linear(40, vocab))
    mem.config = SimpleNamespace(input_site={"module": MEM_SITE}, lambda_default=0.25)
    return mem.eval()


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    """A 'train' datastore + Flat index (for the kNN-LM), and validation / test eval dirs."""
    from mlpmemory.index import build_index

    root = tmp_path_factory.mktemp("eval")
    vocab = tiny_llama.model.config.vocab_size
    kw = dict(key_site="last", mem_site="0.5", block=BLOCK, stride=STRIDE, batch_size=3, progress=False)
    n_train, n_valid, n_test = 400, 150, 131
    build_datastore(tiny_llama, write_tokens(root / "train.i32", n_train, vocab, 1), n_train, root / "train", **kw)
    build_index(root / "train", root / "index", recall_queries=16, recall_k=8)
    build_eval_dir(tiny_llama, write_tokens(root / "valid.i32", n_valid, vocab, 2), n_valid, root / "valid", **kw)
    build_eval_dir(tiny_llama, write_tokens(root / "test.i32", n_test, vocab, 3), n_test, root / "test", **kw)
    return SimpleNamespace(root=root, vocab=vocab, lm=tiny_llama, kw=kw)


def knn_of(setup, k=20, temperature=2.0):
    return KNNLM.from_dirs(setup.root / "index", setup.root / "train", k=k, temperature=temperature, lam=0.1)


def test_window_scoring_equals_hand_loop(setup):
    """Golden test: the eval dir's base perplexity is the plain sliding-window perplexity."""
    model = setup.lm.model
    tokens = np.fromfile(setup.root / "valid.i32", dtype=np.int32)
    nll, count = 0.0, 0
    for w in sliding_windows(len(tokens), BLOCK, STRIDE):
        ids = torch.tensor(tokens[w.begin:w.end], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for j in range(w.first_target, w.end):
            nll -= logp[j - 1 - w.begin, int(tokens[j])].item()
            count += 1
    comps = score_components(setup.root / "valid", progress=False)
    assert count == len(tokens) - 1 == len(comps["lm"])
    assert perplexity(comps["lm"]) == pytest.approx(math.exp(nll / count), rel=1e-5)
    rows = sweep(comps, [0.0, 0.5])
    assert [r["system"] for r in rows] == [BASE]  # nothing else was scored


def test_sweep_matches_direct_mixtures_and_lambda_zero_is_base(setup):
    mem = make_memory(setup.vocab, seed=0)
    knn = knn_of(setup)
    comps = score_components(setup.root / "valid", memory=mem, knn=knn, temperatures=[1.0, 4.0], progress=False)
    ds = open_datastore(setup.root / "valid")
    lams = [0.0, 0.1, 0.3, 1.0]
    rows = sweep(comps, lams)
    base = next(r for r in rows if r["system"] == BASE)
    for r in rows:
        if r["lambda"] == 0.0:
            assert r["ppl"] == base["ppl"] and r["nll"] == base["nll"]  # exactly

    # Direct, uncached: run the memory on the stored inputs, mix in probability space.
    with torch.no_grad():
        q = torch.log_softmax(mem(torch.from_numpy(np.asarray(ds.mem_inputs, dtype=np.float32))), -1)
        q_true = q.gather(-1, torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[:, None])[:, 0].double().numpy()
    p_lm = np.exp(np.asarray(ds.lm_logprob, dtype=np.float64))
    for r in (r for r in rows if r["system"] == MEMORY):
        direct = math.exp(-np.mean(np.log((1 - r["lambda"]) * p_lm + r["lambda"] * np.exp(q_true))))
        assert r["ppl"] == pytest.approx(direct, rel=1e-6)
    for t in (1.0, 4.0):
        pk = np.exp(knn.knn_logprob_of(np.asarray(ds.keys, dtype=np.float32), ds.values, temperature=t))
        for r in (r for r in rows if r["system"] == KNN_LM and r["T"] == t and r["lambda"] < 1):
            direct = math.exp(-np.mean(np.log((1 - r["lambda"]) * p_lm + r["lambda"] * pk)))
            assert r["ppl"] == pytest.approx(direct, rel=1e-6)
    assert len([r for r in rows if r["system"] == KNN_LM]) == 2 * len(lams)
    best = choose(rows, MEMORY)
    assert best["ppl"] == min(r["ppl"] for r in rows if r["system"] == MEMORY)
    with pytest.raises(MLPMemError, match="T=9"):
        sweep(comps, lams, temperatures=[9.0])
    with pytest.raises(MLPMemError, match="lambda"):
        sweep(comps, [1.2])


def test_caches_are_reused_and_invalidated(setup, tmp_path):
    import shutil

    d = tmp_path / "valid"
    shutil.copytree(setup.root / "valid", d)
    mem_a, mem_b = make_memory(setup.vocab, 0), make_memory(setup.vocab, 1)
    knn = knn_of(setup)
    first = score_components(d, memory=mem_a, knn=knn, temperatures=[2.0], progress=False)
    mtimes = {f: (d / f).stat().st_mtime_ns for f in (MEM_FILE, knn_file(2.0))}
    again = score_components(d, memory=mem_a, knn=knn, temperatures=[2.0, 8.0], progress=False)
    assert {f: (d / f).stat().st_mtime_ns for f in mtimes} == mtimes  # reused, not rewritten
    np.testing.assert_array_equal(first["memory"], again["memory"])
    np.testing.assert_array_equal(first["knn"][2.0], again["knn"][2.0])
    assert (d / knn_file(8.0)).is_file() and sorted(again["knn"]) == [2.0, 8.0]

    other = score_components(d, memory=mem_b, progress=False)  # another memory: recomputed
    assert not np.array_equal(other["memory"], first["memory"])
    assert json.loads((d / MEM_META).read_text())["memory_fingerprint"] != "x"
    explicit = score_components(d, memory=mem_b, memory_fingerprint="x", progress=False)
    np.testing.assert_array_equal(explicit["memory"], other["memory"])
    assert json.loads((d / MEM_META).read_text())["memory_fingerprint"] == "x"

    knn_k = knn_of(setup, k=7)  # another k: every cached temperature is dropped
    score_components(d, knn=knn_k, temperatures=[2.0], progress=False)
    assert not (d / knn_file(8.0)).exists()
    assert (d / knn_file(2.0)).stat().st_mtime_ns != mtimes[knn_file(2.0)]

    wrong_site = make_memory(setup.vocab, 0)
    wrong_site.config.input_site = {"module": "model.layers.2.mlp"}
    with pytest.raises(MLPMemError, match="input site"):
        score_components(d, memory=wrong_site, progress=False)


def test_evaluate_ppl_writes_report_and_plot(setup, tmp_path, tiny_tokenizer):
    mem = make_memory(setup.vocab, 0)
    knn = knn_of(setup)
    lams = [0.0, 0.1, 0.25, 0.5]
    res = evaluate_ppl(setup.root / "valid", setup.root / "test", tmp_path / "out", tokenizer=tiny_tokenizer,
                       memory=mem, knn=knn, lambdas=lams, temperatures=[1.0, 2.0, 4.0], progress=False)
    on_disk = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert on_disk == res
    png = (tmp_path / "out" / "ppl_validation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert res["block"] == BLOCK and res["stride"] == STRIDE
    assert res["validation"]["tokens_scored"] == 149 and res["test"]["tokens_scored"] == 130
    chosen = res["validation"]["chosen"]
    assert chosen[MEMORY]["lambda"] in lams and chosen[KNN_LM]["T"] in (1.0, 2.0, 4.0)
    systems = res["test"]["systems"]
    test_comps = score_components(setup.root / "test", progress=False)
    assert systems[BASE]["ppl"] == perplexity(test_comps["lm"])
    assert systems[MEMORY]["lambda"] == chosen[MEMORY]["lambda"]
    assert systems[KNN_LM]["lambda"] == chosen[KNN_LM]["lambda"] and systems[KNN_LM]["T"] == chosen[KNN_LM]["T"]
    tokens = np.fromfile(setup.root / "test.i32", dtype=np.int32)
    n_bytes = text_bytes(tiny_tokenizer, tokens)
    assert res["test"]["bytes"] == n_bytes > 0
    assert systems[BASE]["bits_per_byte"] == pytest.approx(bits_per_byte(systems[BASE]["total_nll"], n_bytes))
    assert systems[BASE]["total_nll"] == pytest.approx(130 * math.log(systems[BASE]["ppl"]))
    # Only the chosen temperature was scored on the test text.
    assert sorted(p.name for p in (setup.root / "test").glob("knn_logprob_T*.f32")) == [knn_file(chosen[KNN_LM]["T"])]


def test_mismatched_or_identical_dirs_are_refused(setup, tmp_path):
    kw = {**setup.kw, "stride": 8}
    build_eval_dir(setup.lm, setup.root / "test.i32", 131, tmp_path / "test8", **kw)
    with pytest.raises(MLPMemError, match="stride"):
        evaluate_ppl(setup.root / "valid", tmp_path / "test8", tmp_path / "out", progress=False)
    with pytest.raises(MLPMemError, match="same"):
        evaluate_ppl(setup.root / "valid", setup.root / "valid", tmp_path / "out", progress=False)
    # A plain datastore (no base log-probs) is not an eval dir.
    build_datastore(setup.lm, setup.root / "test.i32", 131, tmp_path / "plain", **setup.kw)
    with pytest.raises(MLPMemError, match="store_lm_logprob"):
        score_components(tmp_path / "plain", progress=False)
    assert not (tmp_path / "out" / "ppl.json").exists()


def test_perplexity_helpers(tiny_tokenizer):
    assert perplexity(np.log([0.5, 0.5])) == pytest.approx(2.0)
    assert perplexity(np.array([0.0, -np.inf])) == math.inf
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    ids = tiny_tokenizer("the river city .")["input_ids"]
    assert text_bytes(tiny_tokenizer, ids) == len(tiny_tokenizer.decode(ids[1:]).encode("utf-8"))
    with pytest.raises(MLPMemError):
        perplexity(np.zeros(0))


def test_memory_for_another_base_is_refused(setup):
    mem = make_memory(setup.vocab, 0)
    mem.config.base_fingerprint = "0123456789abcdef"
    with pytest.raises(MLPMemError, match="base model fingerprint"):
        score_components(setup.root / "valid", memory=mem, progress=False)


def test_rag_system_is_reported_on_the_same_tokens(setup, tmp_path, tiny_tokenizer):
    """The +RAG row: RALM log-probs of the test tokens reported as system ``rag``; without a passage
    (n_passages=0) they are the base pass's, so its perplexity is the base perplexity."""
    from mlpmemory.rag import ralm_logprobs

    lp = ralm_logprobs(setup.lm, None, setup.root / "test.i32", 0, 131, block=BLOCK, stride=STRIDE, retrieve_every=5,
                       query_tokens=4, n_passages=0, batch_size=3, progress=False)
    settings = {"retrieve_every": 5, "query_tokens": 4, "n_passages": 0}
    res = evaluate_ppl(setup.root / "valid", setup.root / "test", tmp_path / "out", tokenizer=tiny_tokenizer,
                       lambdas=[0.0, 0.5], progress=False,
                       rag={"logprob": lp, "settings": settings, "retrieval_seconds": 0.0})
    rag = res["test"]["systems"][RAG]
    assert rag["ppl"] == pytest.approx(res["test"]["systems"][BASE]["ppl"], rel=1e-5)
    assert rag["settings"] == settings and rag["tokens_scored"] == 130 and rag["lambda"] is None
    assert rag["bits_per_byte"] == pytest.approx(bits_per_byte(rag["total_nll"], res["test"]["bytes"]))
    assert "rag (BM25 top-0, every 5 tokens)" in format_ppl_table(res)
    with pytest.raises(MLPMemError, match="130"):
        evaluate_ppl(setup.root / "valid", setup.root / "test", tmp_path / "out2", lambdas=[0.0], progress=False,
                     rag={"logprob": lp[:-1]})


def test_registry_systems_give_the_direct_per_token_logprobs(setup, tmp_path):
    """Golden: through the systems registry, every system's per-token log-probs of an eval dir are the
    direct computation's, bit for bit; lambda 0 is the base LM itself."""
    import shutil

    from mlpmemory.inference import memory_logprobs, mix_logprobs
    from mlpmemory.systems import REGISTRY, systems_for

    shutil.copytree(setup.root / "valid", tmp_path / "valid")  # no caches of other tests
    mem, knn = make_memory(setup.vocab, seed=0), knn_of(setup)
    ds = open_datastore(tmp_path / "valid")
    rag = {"logprob": np.asarray(ds.lm_logprob, dtype=np.float32) - 0.5, "settings": {"n_passages": 1}}
    systems = systems_for(memory=mem, knn=knn, rag=rag)
    assert [s.name for s in systems] == list(REGISTRY)[:4] == ["base", "memory", "knn_lm", "rag"]
    comps = score_components(tmp_path / "valid", systems=systems, progress=False)
    with torch.inference_mode():
        q = memory_logprobs(mem, torch.from_numpy(np.asarray(ds.mem_inputs, dtype=np.float32)))
        want_mem = q.gather(-1, torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[:, None])[:, 0].numpy()
    np.testing.assert_array_equal(comps["memory"], want_mem.astype(np.float64))
    want_knn = knn.knn_logprob_of(np.asarray(ds.keys, dtype=np.float32), ds.values).astype(np.float32)
    np.testing.assert_array_equal(comps["knn"][knn.temperature], want_knn.astype(np.float64))
    lm = np.asarray(ds.lm_logprob, dtype=np.float64)
    np.testing.assert_array_equal(comps["lm"], lm)
    by = {s.name: s for s in systems}
    assert by["base"].mixed(comps) is comps["lm"]
    assert (by["memory"].mixed(comps, 0.0) is comps["lm"]
            and by["knn_lm"].mixed(comps, 0.0, knn.temperature) is comps["lm"])
    np.testing.assert_array_equal(by["memory"].mixed(comps, 0.3), mix_logprobs(lm, want_mem.astype(np.float64), 0.3))
    np.testing.assert_array_equal(by["knn_lm"].mixed(comps, 0.3, knn.temperature),
                                  mix_logprobs(lm, want_knn.astype(np.float64), 0.3))
    np.testing.assert_array_equal(by["rag"].mixed(comps), rag["logprob"].astype(np.float64))
