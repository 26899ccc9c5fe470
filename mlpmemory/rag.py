"""Retrieval-augmented baseline: BM25 over the memory's own corpus, and in-context RALM perplexity.

Why it is built this way:

- **The same knowledge as the memory.** The passages are exactly the training-split documents
  of ``<run>/corpus/documents.jsonl`` whose tokens the datastore covers (train.i32 tokens
  ``[0, n_tokens.train)``), decoded from those tokens with the run's tokenizer, so RAG reads
  precisely what the memory and the kNN-LM were built from, the cap's truncation included.
  Documents longer than ``passage_tokens`` are cut into consecutive passages of at most that
  many tokens (``doc_id#0``, ``doc_id#1`` ...): a retrieved passage must fit in the context.
- **bm25s, saved without pickle.** Scoring, tokenisation (lower-case, ``\\w\\w+`` words, English
  stopwords, no stemmer: PyStemmer is not a dependency) and saving are bm25s's own; its
  ``save(allow_pickle=False)`` writes ``.npy`` arrays and JSON only (checked in its source), so
  it is used as is. ``<run>/rag_bm25/`` holds ``bm25/`` (bm25s's files), ``passages.jsonl``
  (``doc_id``, ``start``, ``n_tokens``, ``text`` per passage, row i = BM25 document i) and
  ``manifest.json`` (written last) naming the corpus, tokenizer, passage length, bm25s version
  and tokenisation settings. A matching manifest makes :meth:`BM25Retriever.build_or_load` a
  load; any mismatch rebuilds (seconds), never silently reuses.
- **In-context RALM perplexity (Ram et al. 2023; docs/method.md#baselines) on eval-ppl's exact tokens.**
  :func:`ralm_logprobs` walks :func:`mlpmemory.corpus.sliding_windows` like the base pass and
  cuts each window's scored tokens into chunks of ``retrieve_every`` (s) tokens. For a chunk
  starting at token c0, the query is the last ``query_tokens`` (q) tokens before c0 inside the
  window, decoded to text; the top passage's tokens and one EOS (the stream's own document
  separator, so ``passage EOS text`` looks like any document boundary the LM saw) are put
  before the context, after the tokenizer's BOS when it adds one (``BOS passage EOS context``,
  as the base pass puts it before every window), and the chunk is scored. **Trimming:** the input
  is at most ``block`` tokens after that BOS; the oldest context tokens go first, but the query's
  q tokens and the chunk always stay, so a passage that does not fit in what is left is cut to its
  first tokens (never with block 512, s = 32, q = 32, 256-token passages) and dropped when only
  the separator would fit.
  With no passage a chunk sees exactly the base pass's context, so ``n_passages=0`` reproduces
  the base log-probs. Passages with BM25 score 0 (no query word in common) are not used.
- **Batched, left-padded.** Chunk inputs are sorted by length and batched; shorter rows are
  left-padded (attention mask + position ids starting at each row's first real token), so every
  chunk is the tail of its row and the model is asked only for those logits (``logits_to_keep``):
  no (batch, block, vocab) logits tensor. Inputs vary in length (short passages, the first
  window), so batching only equal lengths would mostly run batches of one.
- **Cost decides s.** Every retrieval is one forward of up to ``block`` tokens, so the +RAG pass
  costs about ``block / s`` times the base pass. The paper's s = 4 is out of reach on a CPU;
  the default s = 32 (``--rag-retrieve-every``) costs about ``block / 32`` base passes; a
  larger s is cheaper and retrieves less often. Passages are re-tokenised from their text (what
  a reader of the prompt would feed the LM); with ``n_passages > 1`` they go best first.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import EvalSettings
from .errors import MLPMemError
from .io import (
    MANIFEST_SHA256,
    atomic_write_json,
    file_checksums,
    is_complete,
    read_json,
    read_manifest,
    sha256_json,
    write_manifest,
)

RAG_DIR = "rag_bm25"
BM25_SUBDIR = "bm25"
PASSAGES = "passages.jsonl"
STOPWORDS = "en"
RAG_FILE, RAG_META = "rag_logprob.f32", "rag_logprob.json"


@dataclass
class Passage:
    doc_id: str
    text: str
    score: float


def corpus_passages(corpus_dir, tokenizer, passage_tokens: int = EvalSettings.rag_passage_tokens) -> list[dict]:
    """The datastore's documents as passages: ``{doc_id, start, n_tokens, text}`` in stream order."""
    from .corpus import open_token_stream, read_document_index

    if passage_tokens < 1:
        raise MLPMemError(f"passage_tokens must be >= 1, got {passage_tokens}")
    tokens = open_token_stream(corpus_dir, "train")
    n_train = len(tokens)
    spans = []
    for rec in read_document_index(corpus_dir):
        if rec["split"] != "train" or rec["n_tokens"] <= 0:
            continue
        begin, end = int(rec["start"]), min(int(rec["start"]) + int(rec["n_tokens"]), n_train)
        parts = range(begin, end, passage_tokens)
        for i, s in enumerate(parts):
            doc_id = rec["doc_id"] if len(parts) == 1 else f"{rec['doc_id']}#{i}"
            spans.append((doc_id, s, min(s + passage_tokens, end)))
    texts = tokenizer.batch_decode([tokens[s:e].tolist() for _, s, e in spans], skip_special_tokens=False)
    return [{"doc_id": d, "start": s, "n_tokens": e - s, "text": t} for (d, s, e), t in zip(spans, texts)]


def _settings(corpus_manifest: dict, passage_tokens: int) -> dict:
    import bm25s

    return {"kind": "bm25_passages", "corpus_fingerprint": corpus_manifest["corpus_fingerprint"],
            "tokenizer_fingerprint": corpus_manifest["tokenizer_fingerprint"],
            "train_tokens": int(corpus_manifest["n_tokens"]["train"]), "passage_tokens": int(passage_tokens),
            "bm25s_version": bm25s.__version__, "stopwords": STOPWORDS, "stemmer": None, "lower": True,
            "method": "lucene", "k1": 1.5, "b": 0.75}


class BM25Retriever:
    """BM25 over the passages of one corpus; ``retrieve`` is batched and sorted by score."""

    def __init__(self, path: Path, bm25, passages: list[dict], manifest: dict):
        self.path, self._bm25, self.passages, self.manifest = Path(path), bm25, passages, manifest

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def fingerprint(self) -> str:
        # not the build time, nor the integrity records (the manifest's own hash covers the build time)
        volatile = ("seconds", "checksums", MANIFEST_SHA256)
        return sha256_json({k: v for k, v in self.manifest.items() if k not in volatile})

    @classmethod
    def build(cls, corpus_dir, out_dir, tokenizer, *,
              passage_tokens: int = EvalSettings.rag_passage_tokens) -> BM25Retriever:
        """Index the corpus's train passages into ``out_dir`` (replacing what is there)."""
        import bm25s

        corpus_dir, out = Path(corpus_dir), Path(out_dir)
        settings = _settings(read_manifest(corpus_dir, "tokenized corpus"), passage_tokens)
        t0 = time.perf_counter()
        passages = corpus_passages(corpus_dir, tokenizer, passage_tokens)
        if not passages:
            raise MLPMemError(f"the corpus in {corpus_dir} has no training documents to retrieve from")
        (out / "manifest.json").unlink(missing_ok=True)  # whatever follows is incomplete until the end
        shutil.rmtree(out / BM25_SUBDIR, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        words = bm25s.tokenize([p["text"] for p in passages], stopwords=STOPWORDS, stemmer=None, show_progress=False)
        bm25 = bm25s.BM25(method=settings["method"], k1=settings["k1"], b=settings["b"])
        bm25.index(words, show_progress=False)
        bm25.save(out / BM25_SUBDIR, allow_pickle=False, show_progress=False)
        tmp = out / (PASSAGES + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        os.replace(tmp, out / PASSAGES)
        files = [PASSAGES] + sorted(str(f.relative_to(out)) for f in (out / BM25_SUBDIR).rglob("*") if f.is_file())
        manifest = write_manifest(out, {**settings, "n_passages": len(passages),
                                        "seconds": round(time.perf_counter() - t0, 3),
                                        "checksums": file_checksums(out, files)})
        return cls(out, bm25, passages, manifest)

    @classmethod
    def load(cls, out_dir) -> BM25Retriever:
        import bm25s

        out = Path(out_dir)
        manifest = read_manifest(out, "BM25 index")
        try:
            bm25 = bm25s.BM25.load(out / BM25_SUBDIR, load_corpus=False, mmap=False, allow_pickle=False)
            with open(out / PASSAGES, encoding="utf-8") as f:
                passages = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            raise MLPMemError(f"the BM25 index in {out} is unreadable ({e}); delete {out} to rebuild it") from None
        if len(passages) != manifest.get("n_passages") or int(bm25.scores["num_docs"]) != len(passages):
            raise MLPMemError(f"the BM25 index in {out} does not match its passages; delete {out} to rebuild it")
        return cls(out, bm25, passages, manifest)

    @classmethod
    def build_or_load(cls, run) -> BM25Retriever:
        """The run's retriever: loaded when ``<run>/rag_bm25`` matches the corpus and settings, else built."""
        out = run.path(RAG_DIR)
        corpus_dir = run.path("corpus")
        want = _settings(read_manifest(corpus_dir, "corpus"), run.cfg.eval.rag_passage_tokens)
        if is_complete(out) and all(read_json(out / "manifest.json").get(k) == v for k, v in want.items()):
            return cls.load(out)
        lm = run.lm
        if lm.tokenizer_fingerprint != want["tokenizer_fingerprint"]:
            raise MLPMemError(f"the corpus in {corpus_dir} was tokenized with another tokenizer than "
                              f"{run.cfg.run.model}'s; "
                              "use the run's model or another --run-dir")
        return cls.build(corpus_dir, out, lm.tokenizer, passage_tokens=want["passage_tokens"])

    def retrieve(self, queries: list[str], n: int) -> list[list[Passage]]:
        """Top-``n`` passages per query, best first; passages sharing no word with the query are left out."""
        import bm25s

        queries = list(queries)
        if n <= 0 or not queries:
            return [[] for _ in queries]
        words = bm25s.tokenize(queries, stopwords=STOPWORDS, stemmer=None, return_ids=False, show_progress=False)
        ids, scores = self._bm25.retrieve(words, k=min(n, len(self)), show_progress=False, n_threads=0)
        return [[Passage(self.passages[int(i)]["doc_id"], self.passages[int(i)]["text"], float(s))
                 for i, s in zip(row_ids, row_scores) if s > 0] for row_ids, row_scores in zip(ids, scores)]


def rag_prompt(passages: list[Passage], prompt: str) -> str:
    """Plain text: each passage's text (stripped), each followed by a blank line, then the prompt.

    ``rag_prompt([Passage("a", "Paris is in France.", 3.1)], "Q: ...")`` is
    ``"Paris is in France.\\n\\nQ: ..."``; no passages give the prompt unchanged.
    """
    return "".join(p.text.strip() + "\n\n" for p in passages) + prompt


# ---------------------------------------------------------------------------------------------
# In-context RALM perplexity.
# ---------------------------------------------------------------------------------------------


def _chunks(n_tokens: int, block: int, stride: int, every: int) -> list[tuple[int, int, int]]:
    """``(window_begin, c0, c1)`` per chunk of scored targets, in eval-ppl's order."""
    from .corpus import sliding_windows

    return [(w.begin, c0, min(c0 + every, w.end)) for w in sliding_windows(n_tokens, block, stride)
            for c0 in range(w.first_target, w.end, every)]


def _retrieve_for_chunks(retriever, tok, tokens, chunks, query_tokens: int, n_passages: int, progress: bool,
                         st: dict) -> list[list[Passage]]:
    """Passages of every chunk, retrieved in batches for the ``query_tokens`` tokens before it."""
    from tqdm.auto import tqdm

    passages: list[list[Passage]] = [[] for _ in chunks]
    if n_passages > 0 and chunks:
        queries = tok.batch_decode([tokens[max(wb, c0 - query_tokens):c0].tolist() for wb, c0, _ in chunks],
                                   skip_special_tokens=True)
        t0 = time.perf_counter()
        for s in tqdm(range(0, len(queries), 256), desc="RAG retrieval", unit="batch", disable=not progress):
            passages[s:s + 256] = retriever.retrieve(queries[s:s + 256], n_passages)
        st["retrieval_seconds"] = time.perf_counter() - t0
        st["retrievals"] = len(queries)
    return passages


def _chunk_inputs(tok, tokens, chunks, passages, sep: list[int], block: int, query_tokens: int, st: dict,
                  bos: list[int]) -> list:
    """One input per chunk: ``bos`` (the tokenizer's prefix, as in the base pass) + [passages + separators] +
    context, the chunk's targets at its tail; items ``(input ids, out offset, n targets)``."""
    ids_of: dict[str, list[int]] = {}
    items = []
    for (wb, c0, c1), found in zip(chunks, passages):
        prefix: list[int] = []
        for p in found:
            if p.text not in ids_of:
                ids_of[p.text] = tok(p.text, add_special_tokens=False)["input_ids"]
            prefix += ids_of[p.text] + sep
        room = block - (c1 - 1 - max(wb, c0 - query_tokens))  # the query and the chunk always stay
        if len(prefix) > room:
            prefix = prefix[:room - len(sep)] + sep if room > len(sep) else []
        st["chunks_with_passage"] += bool(prefix)
        b = max(wb, c1 - 1 - (block - len(prefix)))
        items.append((bos + prefix + tokens[b:c1 - 1].tolist(), c0 - 1, c1 - c0))
    return items


def _score_chunk_batch(lm, items: list, batch: list[int], tokens, pad: int, keep: bool, out: np.ndarray) -> int:
    """One forward of a batch of chunk inputs, left-padded so every chunk is its row's tail (only the
    chunks' logits are materialised); writes their log-probs into ``out``, returns the tokens scored."""
    import torch

    from .inference import lm_scoring_forward

    width = max(items[i][2] for i in batch)
    length = max(len(items[i][0]) for i in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for r, i in enumerate(batch):
        ids[r, length - len(items[i][0]):] = torch.tensor(items[i][0])
        mask[r, length - len(items[i][0]):] = 1
    kw = {"logits_to_keep": width} if keep else {}
    if not bool(mask.all()):  # padded rows: mask the pads and start positions at each row's first token
        kw.update(attention_mask=mask.to(lm.device), position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(lm.device))
    states, score = lm_scoring_forward(lm.model, input_ids=ids.to(lm.device), use_cache=False, **kw)
    scored = [(r, *items[i][1:]) for r, i in enumerate(batch)]  # (row, out offset, n targets)
    lp = score(torch.cat([states[r, states.shape[1] - m:] for r, _, m in scored]),
               torch.from_numpy(np.concatenate([tokens[off + 1:off + 1 + m] for _, off, m in scored]))).cpu().numpy()
    for (_, off, m), s in zip(scored, np.cumsum([0] + [m for _, _, m in scored])):
        out[off:off + m] = lp[s:s + m]
    return sum(items[i][2] for i in batch)


def ralm_logprobs(lm, retriever, token_path, start: int, n_tokens: int, *, block: int, stride: int,
                  retrieve_every: int = EvalSettings.rag_retrieve_every,
                  query_tokens: int = EvalSettings.rag_query_tokens, n_passages: int = 1, batch_size: int = 8,
                  progress: bool = True, stats: dict | None = None) -> np.ndarray:
    """Per-token ``log p(w_t)`` (float32) with retrieved passages in context, for exactly the
    tokens and order of eval-ppl's windows over ``tokens[start : start + n_tokens]``.

    ``stats``, when given, receives ``retrieval_seconds``, ``forward_seconds``, ``retrievals``,
    ``chunks_with_passage`` and ``forwards``.
    """
    import torch
    from tqdm.auto import tqdm

    from .datastore import read_tokens
    from .models import bos_prefix

    if retrieve_every < 1 or query_tokens < 1 or n_passages < 0 or batch_size < 1:
        raise MLPMemError(f"retrieve_every and query_tokens must be >= 1, n_passages >= 0 and batch_size >= 1, got "
                          f"{retrieve_every}, {query_tokens}, {n_passages}, {batch_size}")
    tokens = read_tokens(token_path, start, start + n_tokens).astype(np.int64)
    chunks = _chunks(n_tokens, block, stride, retrieve_every)
    tok = lm.tokenizer
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else tok("\n\n", add_special_tokens=False)["input_ids"]
    st = {"retrieval_seconds": 0.0, "forward_seconds": 0.0, "retrievals": 0, "chunks_with_passage": 0, "forwards": 0}
    passages = _retrieve_for_chunks(retriever, tok, tokens, chunks, query_tokens, n_passages, progress, st)
    items = _chunk_inputs(tok, tokens, chunks, passages, sep, block, query_tokens, st, bos_prefix(tok))
    # Forwards in batches of similar length.
    keep = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
    pad = tok.pad_token_id if tok.pad_token_id is not None else sep[0]
    out = np.empty(max(0, n_tokens - 1), np.float32)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(out), desc="RAG log-probs", unit="tok", disable=not progress) as bar:
        for batch in batches:
            bar.update(_score_chunk_batch(lm, items, batch, tokens, pad, keep, out))
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    st["forward_seconds"] = time.perf_counter() - t0
    st["forwards"] = len(batches)
    if stats is not None:
        stats.update(st)
    return out


def cached_ralm_logprobs(eval_dir, lm, retriever, token_path, *, retrieve_every: int = EvalSettings.rag_retrieve_every,
                         query_tokens: int = EvalSettings.rag_query_tokens,
                         n_passages: int = 1, batch_size: int = 8, progress: bool = True) -> tuple[np.ndarray, dict]:
    """:func:`ralm_logprobs` over an eval dir's text and windows, cached in it as ``rag_logprob.f32``.

    The sidecar ``rag_logprob.json`` names the eval dir, the retriever and s/q/n; the same ones
    read the file back, anything else recomputes (the JSON is removed before the data file is
    replaced and written after it). Returns the log-probs and the sidecar (with timings).
    """
    from .evaluate import _read_f32, _read_meta, _write_f32

    path = Path(eval_dir)
    em = read_manifest(path, "eval dir")
    n, start, n_tokens = int(em["n"]), int(em.get("token_start", 0)), int(em["n_tokens"])
    want = {"retriever_fingerprint": retriever.fingerprint, "eval_fingerprint": sha256_json(em), "n": n,
            "retrieve_every": int(retrieve_every), "query_tokens": int(query_tokens), "n_passages": int(n_passages)}
    meta = _read_meta(path / RAG_META)
    cached = _read_f32(path / RAG_FILE, n) if all(meta.get(k) == v for k, v in want.items()) else None
    if cached is not None:
        return cached, meta
    (path / RAG_META).unlink(missing_ok=True)
    stats: dict = {}
    t0 = time.perf_counter()
    lp = ralm_logprobs(lm, retriever, token_path, start, n_tokens, block=int(em["block"]), stride=int(em["stride"]),
                       retrieve_every=retrieve_every, query_tokens=query_tokens, n_passages=n_passages,
                       batch_size=batch_size, progress=progress, stats=stats)
    _write_f32(path / RAG_FILE, lp)
    meta = {**want, "seconds": round(time.perf_counter() - t0, 3),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}}
    atomic_write_json(path / RAG_META, meta)
    return lp, meta
