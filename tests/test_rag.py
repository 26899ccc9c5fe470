"""RAG baseline: BM25 passages are the datastore's documents, the index is saved without pickle and
rebuilt only when its settings change, retrieval finds a query's source, and in-context RALM
log-probs equal a slow per-chunk hand loop (golden) and, without passages, the base eval pass."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synthetic_text

from mlpmemory.config import make_config
from mlpmemory.corpus import open_token_stream, read_document_index, sliding_windows, tokenize_corpus
from mlpmemory.datastore import open_datastore
from mlpmemory.evaluate import build_eval_dir
from mlpmemory.pipeline import Run, stage_corpus
from mlpmemory.rag import (
    RAG_DIR,
    RAG_FILE,
    RAG_META,
    BM25Retriever,
    Passage,
    cached_ralm_logprobs,
    corpus_passages,
    rag_prompt,
    ralm_logprobs,
)


def doc_text(i: int, n_words: int) -> str:
    words = synthetic_text(n_words, seed=100 + i).split()
    for pos in range(0, len(words), 9):  # a word no other document has, every few words
        words.insert(pos, f"name{i}x")
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag_corpus")
    with open(root / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": doc_text(i, 25 + 7 * (i % 5)), "title": f"d{i}"}) + "\n")
    tokenize_corpus(root / "docs.jsonl", tiny_llama.tokenizer, root / "corpus", max_train_tokens=1500,
                    tokenizer_fingerprint=tiny_llama.tokenizer_fingerprint, heldout_fraction=0.2, progress=False)
    return root


@pytest.fixture(scope="module")
def retriever(corpus, tiny_llama):
    return BM25Retriever.build(corpus / "corpus", corpus / "bm25_40", tiny_llama.tokenizer, passage_tokens=40)


def test_passages_are_the_decoded_datastore_documents(corpus, tiny_llama):
    cdir = corpus / "corpus"
    tokens = open_token_stream(cdir, "train")
    records = list(read_document_index(cdir))
    assert any(r["truncated"] for r in records if r["split"] == "train")  # the cap cut the last document
    expected = []
    for r in records:
        if r["split"] != "train":
            continue
        ids = tokens[r["start"]:r["start"] + r["n_tokens"]].tolist()
        parts = [ids[k:k + 16] for k in range(0, len(ids), 16)]
        for k, part in enumerate(parts):
            expected.append((r["doc_id"] if len(parts) == 1 else f"{r['doc_id']}#{k}",
                             tiny_llama.tokenizer.decode(part)))
    got = corpus_passages(cdir, tiny_llama.tokenizer, passage_tokens=16)
    assert [(p["doc_id"], p["text"]) for p in got] == expected
    assert any("#" in d for d, _ in expected) and sum(p["n_tokens"] for p in got) == sum(
        r["n_tokens"] for r in records if r["split"] == "train")
    held = {r["doc_id"] for r in records if r["split"] == "heldout"}
    assert held and not held & {p["doc_id"].split("#")[0] for p in got}
    r = BM25Retriever.build(cdir, corpus / "bm25_16", tiny_llama.tokenizer, passage_tokens=16)
    assert len(r) == len(expected)
    assert [(p["doc_id"], p["text"]) for p in BM25Retriever.load(r.path).passages] == expected


def test_retrieval_finds_the_source_document(corpus, retriever, tiny_llama):
    texts = {p["doc_id"]: p["text"] for p in retriever.passages}
    queries, sources = [], []
    for doc_id, text in texts.items():
        words = text.split()
        if len(words) < 12:
            continue
        queries.append(" ".join(words[2:12]))
        sources.append(doc_id.split("#")[0])
    found = retriever.retrieve(queries, 3)
    assert len(found) == len(queries) >= 10
    for hits, src in zip(found, sources):
        assert 1 <= len(hits) <= 3 and hits[0].doc_id.split("#")[0] == src
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].text == texts[hits[0].doc_id]
    assert retriever.retrieve(queries[:2], 0) == [[], []]
    assert retriever.retrieve(["zzzqqq the of and"], 2) == [[]]  # no word in common: no passage


def test_rag_prompt_format():
    ps = [Passage("a", "  Paris is in France. \n", 2.0), Passage("b", "The Seine.", 1.0)]
    assert rag_prompt(ps, "Q: where?") == "Paris is in France.\n\nThe Seine.\n\nQ: where?"
    assert rag_prompt([], "Q") == "Q"


def make_run(tmp_path, corpus, tiny_llama, **over):
    cfg = make_config(run_dir=str(tmp_path / "run"), model=tiny_llama.path, corpus=str(corpus / "docs.jsonl"),
                      dtype="float32", device="cpu", heldout_fraction=0.2, max_train_tokens=1500, **over)
    run = Run(cfg)
    run._lm = tiny_llama
    stage_corpus(run)
    return run


def test_build_or_load_is_a_noop_then_rebuilds_on_change_without_pickle(tmp_path, corpus, tiny_llama):
    run = make_run(tmp_path, corpus, tiny_llama, rag_passage_tokens=64)
    first = BM25Retriever.build_or_load(run)
    out = run.path(RAG_DIR)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert (out / "bm25").is_dir() and (out / "passages.jsonl").is_file()
    again = BM25Retriever.build_or_load(run)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files  # nothing rewritten
    assert again.fingerprint == first.fingerprint and again.passages == first.passages
    q = [first.passages[0]["text"]]
    assert again.retrieve(q, 2) == first.retrieve(q, 2)

    # No pickle anywhere: every .npy loads with allow_pickle=False and holds numbers; the rest is JSON.
    for p in out.rglob("*"):
        if p.is_file():
            assert p.suffix in (".npy", ".json", ".jsonl"), p
            if p.suffix == ".npy":
                assert np.load(p, allow_pickle=False).dtype.kind in "iuf"
            else:
                for line in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
                    json.loads(line)

    run.cfg.eval.rag_passage_tokens = 16  # another passage length: rebuilt
    small = BM25Retriever.build_or_load(run)
    assert small.manifest["passage_tokens"] == 16 and len(small) > len(first)
    assert small.fingerprint != first.fingerprint
    m = json.loads((out / "manifest.json").read_text())
    m["bm25s_version"] = "0.0.0"  # an index from another bm25s: rebuilt, not reused
    (out / "manifest.json").write_text(json.dumps(m))
    assert BM25Retriever.build_or_load(run).manifest["bm25s_version"] != "0.0.0"


def eval_tokens(corpus, tiny_llama, tmp_path) -> Path:
    """200 tokens of text made of training documents (so retrieval finds something), as an int32 stream."""
    text = " ".join(doc_text(i, 25 + 7 * (i % 5)) for i in (3, 7, 11))
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"][:200]
    path = tmp_path / "eval.i32"
    np.asarray(ids, np.int32).tofile(path)
    return path


def test_no_passage_equals_the_base_eval_pass(tmp_path, corpus, retriever, tiny_llama):
    path = eval_tokens(corpus, tiny_llama, tmp_path)
    n_all = path.stat().st_size // 4
    start, n = 5, n_all - 9
    block, stride = 32, 12
    build_eval_dir(tiny_llama, path, n, tmp_path / "ev", key_site="last", mem_site=None, block=block, stride=stride,
                   batch_size=3, progress=False, token_start=start)
    base = np.asarray(open_datastore(tmp_path / "ev").lm_logprob)
    stats = {}
    lp = ralm_logprobs(tiny_llama, retriever, path, start, n, block=block, stride=stride, retrieve_every=5,
                       query_tokens=6, n_passages=0, batch_size=4, progress=False, stats=stats)
    assert lp.dtype == np.float32 and lp.shape == base.shape == (n - 1,)
    np.testing.assert_allclose(lp, base, atol=2e-5, rtol=0)
    assert stats["retrievals"] == 0 and stats["chunks_with_passage"] == 0


def hand_loop(lm, retriever, tokens, block, stride, s, q):
    """One forward per chunk, full logits, the rule written out plainly."""
    eos = lm.tokenizer.eos_token_id
    out = np.full(len(tokens) - 1, np.nan)
    used = 0
    for w in sliding_windows(len(tokens), block, stride):
        for c0 in range(w.first_target, w.end, s):
            c1 = min(c0 + s, w.end)
            qb = max(w.begin, c0 - q)
            hits = retriever.retrieve([lm.tokenizer.decode(tokens[qb:c0].tolist(), skip_special_tokens=True)], 1)[0]
            prefix = lm.tokenizer(hits[0].text, add_special_tokens=False)["input_ids"] + [eos] if hits else []
            room = block - (c1 - 1 - qb)
            if len(prefix) > room:
                prefix = prefix[:room - 1] + [eos] if room > 1 else []
            used += bool(prefix)
            b = max(w.begin, c1 - 1 - (block - len(prefix)))
            ids = torch.tensor([prefix + tokens[b:c1 - 1].tolist()])
            assert ids.shape[1] <= block
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
            for j in range(c0, c1):
                out[j - 1] = logp[len(prefix) + j - 1 - b, int(tokens[j])].item()
    return out, used


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_ralm_equals_hand_loop(kind, tmp_path, corpus, retriever, tiny_llama, tiny_gpt2):
    lm = tiny_llama if kind == "llama" else tiny_gpt2
    path = eval_tokens(corpus, lm, tmp_path)
    tokens = np.fromfile(path, dtype=np.int32).astype(np.int64)
    block, stride, s, q = 48, 16, 5, 8  # 40-token passages do not always fit: the cut is exercised
    oracle, used = hand_loop(lm, retriever, tokens, block, stride, s, q)
    stats = {}
    lp = ralm_logprobs(lm, retriever, path, 0, len(tokens), block=block, stride=stride, retrieve_every=s,
                       query_tokens=q, n_passages=1, batch_size=3, progress=False, stats=stats)
    assert not np.isnan(oracle).any() and used > 0 and stats["chunks_with_passage"] == used
    np.testing.assert_allclose(lp, oracle, atol=5e-5, rtol=0)
    none = ralm_logprobs(lm, retriever, path, 0, len(tokens), block=block, stride=stride, retrieve_every=s,
                         query_tokens=q, n_passages=0, batch_size=3, progress=False)
    assert np.abs(lp - none).max() > 1e-3  # the passages change the prediction


def test_cached_ralm_logprobs_reuses_and_recomputes(tmp_path, corpus, retriever, tiny_llama):
    path = eval_tokens(corpus, tiny_llama, tmp_path)
    n = path.stat().st_size // 4
    build_eval_dir(tiny_llama, path, n, tmp_path / "ev", key_site="last", mem_site=None, block=32, stride=12,
                   batch_size=3, progress=False)
    kw = dict(retrieve_every=6, query_tokens=6, batch_size=4, progress=False)
    lp, meta = cached_ralm_logprobs(tmp_path / "ev", tiny_llama, retriever, path, **kw)
    mtime = (tmp_path / "ev" / RAG_FILE).stat().st_mtime_ns
    again, meta2 = cached_ralm_logprobs(tmp_path / "ev", tiny_llama, retriever, path, **kw)
    assert (tmp_path / "ev" / RAG_FILE).stat().st_mtime_ns == mtime and meta2 == meta
    np.testing.assert_array_equal(again, lp)
    assert meta["retriever_fingerprint"] == retriever.fingerprint and meta["retrieve_every"] == 6
    other, meta3 = cached_ralm_logprobs(tmp_path / "ev", tiny_llama, retriever, path, **{**kw, "retrieve_every": 4})
    assert meta3["retrieve_every"] == 4 and (tmp_path / "ev" / RAG_FILE).stat().st_mtime_ns != mtime
    assert json.loads((tmp_path / "ev" / RAG_META).read_text())["retrieve_every"] == 4
    direct = ralm_logprobs(tiny_llama, retriever, path, 0, n, block=32, stride=12, retrieve_every=4, query_tokens=6,
                           progress=False)
    np.testing.assert_allclose(other, direct, atol=2e-5, rtol=0)
