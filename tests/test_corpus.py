"""Corpus loading, held-out split, tokenisation into EOS-joined streams, sliding windows."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from helpers import synthetic_text

from mlpmemory.corpus import (
    Document,
    iter_documents,
    load_nq_questions,
    open_token_stream,
    read_document_index,
    sliding_windows,
    split_of,
    tokenize_corpus,
)
from mlpmemory.errors import MLPMemError

# ---------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 16, 17, 100, 1000, 1025])
@pytest.mark.parametrize("block,stride", [(2, 1), (4, 1), (4, 3), (8, 4), (16, 5), (16, 15), (1024, 512)])
def test_windows_cover_every_target_once(n, block, stride):
    windows = sliding_windows(n, block, stride)
    targets = []
    for w in windows:
        assert w.end - w.begin == min(block, n)
        assert 0 <= w.begin < w.first_target <= w.end <= n
        assert w.n_rows == w.end - w.first_target
        # every scored target after the first window keeps at least block - stride tokens of context
        if w is not windows[0]:
            assert w.first_target - w.begin >= min(block, n) - stride
        targets.extend(range(w.first_target, w.end))
    assert targets == list(range(1, n)) if n >= 2 else targets == []


@pytest.mark.parametrize("block,stride", [(8, 8), (8, 9), (8, 0), (1, 1)])
def test_windows_reject_bad_stride(block, stride):
    with pytest.raises(ValueError):
        sliding_windows(100, block, stride)


# ---------------------------------------------------------------------------------------------
# Loading user corpora
# ---------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)


def test_txt_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\nline two\n", encoding="utf-8")
    docs = list(iter_documents(str(p)))
    assert docs == [Document(text="line one\nline two\n", doc_id="a.txt", group="a.txt")]


def test_jsonl_text_field_groups_and_blank_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        f.write(json.dumps({"body": "first", "title": "T1"}) + "\n")
        f.write("\n")  # blank line: ignored
        f.write(json.dumps({"body": "   "}) + "\n")  # whitespace-only document: skipped
        f.write(json.dumps({"body": "third", "group": "G", "title": "ignored"}) + "\n")
        f.write(json.dumps({"body": "fourth"}) + "\n")
    docs = list(iter_documents(p, text_field="body"))
    assert [(d.text, d.doc_id, d.group) for d in docs] == [
        ("first", "c.jsonl:1", "T1"), ("third", "c.jsonl:4", "G"), ("fourth", "c.jsonl:5", "c.jsonl:5")]


def test_parquet_streams_batches(tmp_path):
    p = tmp_path / "d.parquet"
    write_parquet(p, {"text": ["a b", None, "", "c d", "e"], "title": ["x", "x", "y", None, "z"]})
    docs = list(iter_documents(str(p)))
    assert [(d.text, d.doc_id, d.group) for d in docs] == [
        ("a b", "d.parquet:0", "x"), ("c d", "d.parquet:3", "d.parquet:3"), ("e", "d.parquet:4", "z")]
    write_parquet(tmp_path / "e.parquet", {"content": ["only"]})
    assert [d.text for d in iter_documents(tmp_path / "e.parquet", text_field="content")] == ["only"]


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "sea"}, {"text": "sea two"}])
    write_parquet(tmp_path / "sub" / "d.parquet", {"text": ["dee"]})
    docs = list(iter_documents(str(tmp_path)))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.txt", "ay"), ("b.txt", "bee"), ("sub/c.jsonl:1", "sea"), ("sub/c.jsonl:2", "sea two"),
        ("sub/d.parquet:0", "dee")]


def test_datasets_folder_needs_datasets(tmp_path, monkeypatch):
    import sys

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(MLPMemError, match="datasets.*not installed"):
        list(iter_documents(tmp_path / "ds"))


def test_datasets_folder_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "", "three"], "title": ["A", "B", "C"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = list(iter_documents(tmp_path / "ds"))
    assert [(d.text, d.doc_id, d.group) for d in docs] == [("one", "ds:0", "A"), ("three", "ds:2", "C")]


# ---------------------------------------------------------------------------------------------
# Bad input: one-line MLPMemErrors that say what is wrong
# ---------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(MLPMemError, match="does not exist") as e:
        list(iter_documents(tmp_path / "nope.jsonl"))
    one_line(e)


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MLPMemError, match="unsupported") as e:
        list(iter_documents(tmp_path / "x.csv"))
    one_line(e)


def test_folder_without_usable_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MLPMemError, match="no usable files"):
        list(iter_documents(tmp_path))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.txt"
    p.write_text("secret")
    p.chmod(0)
    try:
        with pytest.raises(MLPMemError, match="cannot read"):
            list(iter_documents(p))
    finally:
        p.chmod(0o644)


def test_unreadable_parquet(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet at all")
    with pytest.raises(MLPMemError, match="broken.parquet") as e:
        list(iter_documents(p))
    one_line(e)


def test_bad_jsonl_reports_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    with pytest.raises(MLPMemError, match=r"bad.jsonl line 3 is not valid JSON") as e:
        list(iter_documents(p))
    one_line(e)


def test_jsonl_missing_field_reports_line_and_fields(tmp_path):
    p = tmp_path / "m.jsonl"
    write_jsonl(p, [{"text": "fine"}, {"content": "wrong field"}])
    with pytest.raises(MLPMemError, match=r"m.jsonl line 2 has no field 'text' \(fields: 'content'\)"):
        list(iter_documents(p))
    with pytest.raises(MLPMemError, match="no field 'body'"):
        list(iter_documents(p, text_field="body"))


def test_parquet_missing_column(tmp_path):
    p = tmp_path / "m.parquet"
    write_parquet(p, {"content": ["x"]})
    with pytest.raises(MLPMemError, match=r"no column 'text' \(columns: 'content'\)"):
        list(iter_documents(p))


def test_non_utf8_txt_reports_byte_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("café ok ".encode() + b"caf\xe9")
    with pytest.raises(MLPMemError, match=r"latin.txt: not valid UTF-8 at byte offset 12") as e:
        list(iter_documents(p))
    assert "skip_bad_utf8" in one_line(e)


def test_non_utf8_jsonl_reports_file_offset_and_skip(tmp_path):
    p = tmp_path / "mixed.jsonl"
    good1 = json.dumps({"text": "good one"}).encode() + b"\n"
    bad = b'{"text": "bad \xff here"}\n'
    good2 = json.dumps({"text": "good two"}).encode() + b"\n"
    p.write_bytes(good1 + bad + good2)
    offset = len(good1) + bad.index(b"\xff")
    with pytest.raises(MLPMemError, match=rf"mixed.jsonl line 2: not valid UTF-8 at byte offset {offset}\b"):
        list(iter_documents(p))
    with pytest.warns(UserWarning, match=rf"mixed.jsonl line 2: not valid UTF-8 at byte offset {offset}; skipped"):
        docs = list(iter_documents(p, skip_bad_utf8=True))
    assert [d.text for d in docs] == ["good one", "good two"]


def test_non_utf8_txt_skipped_in_folder(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x80bad")
    (tmp_path / "b.txt").write_text("good")
    with pytest.warns(UserWarning, match=r"a.txt: not valid UTF-8 at byte offset 0"):
        docs = list(iter_documents(tmp_path, skip_bad_utf8=True))
    assert [d.doc_id for d in docs] == ["b.txt"]


def test_non_utf8_parquet_value(tmp_path):
    import pyarrow as pa

    p = tmp_path / "b.parquet"
    write_parquet(p, {"text": pa.array([b"fine", b"ab\xffc"], pa.binary()).view(pa.string())})
    with pytest.raises(MLPMemError, match=r"b.parquet row 1 .*byte offset 2"):
        list(iter_documents(p))
    with pytest.warns(UserWarning, match="row 1"):
        assert [d.text for d in iter_documents(p, skip_bad_utf8=True)] == ["fine"]


def test_empty_corpus(tmp_path, tiny_tokenizer):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blank.txt").write_text("  \n\t\n")
    write_jsonl(tmp_path / "c" / "blank.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(MLPMemError, match="is empty") as e:
        tokenize_corpus(tmp_path / "c", tiny_tokenizer, tmp_path / "out", tokenizer_fingerprint="t")
    one_line(e)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------


def test_split_deterministic_and_fraction():
    groups = [f"article {i}" for i in range(20000)]
    first = [split_of(g, 0.1) for g in groups]
    assert first == [split_of(g, 0.1) for g in groups]
    assert [split_of(g, 0.1) for g in reversed(groups)] == first[::-1]
    frac = first.count("heldout") / len(groups)
    assert 0.09 < frac < 0.11
    assert all(split_of(g, 0.0) == "train" for g in groups[:500])
    assert all(split_of(g, 1.0) == "heldout" for g in groups[:500])
    # growing the fraction only moves groups train -> heldout
    assert all(split_of(g, 0.2) == "heldout" for g, s in zip(groups, first) if s == "heldout")
    with pytest.raises(MLPMemError):
        split_of("x", 1.5)


# ---------------------------------------------------------------------------------------------
# Tokenisation into streams
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def small_corpus(tmp_path):
    """60 documents in 30 groups (pairs share a title), JSONL."""
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, [{"text": synthetic_text(20 + (i * 7) % 50, seed=i), "title": f"art{i // 2}"}
                       for i in range(60)])
    return path


def expected_streams(path, tokenizer, fraction):
    streams = {"train": [], "heldout": []}
    docs = {"train": [], "heldout": []}
    for d in iter_documents(path):
        s = split_of(d.group, fraction)
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        docs[s].append((d, len(streams[s]), len(ids)))
        streams[s].extend(ids + [tokenizer.eos_token_id])
    return streams, docs


def test_tokenize_stream_is_docs_plus_eos(tmp_path, small_corpus, tiny_tokenizer):
    out = tmp_path / "tok"
    m = tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny", heldout_fraction=0.3,
                        batch_docs=7)
    streams, docs = expected_streams(small_corpus, tiny_tokenizer, 0.3)
    assert streams["heldout"] and streams["train"], "fixture should populate both splits"
    for s in ("train", "heldout"):
        got = open_token_stream(out, s)
        assert got.dtype == np.int32 and not got.flags.writeable
        assert got.tolist() == streams[s]
        assert m["n_tokens"][s] == len(streams[s])
        assert m["n_docs"][s] == len(docs[s])
    # groups never straddle the split
    index = list(read_document_index(out))
    by_group = {}
    for rec in index:
        by_group.setdefault(rec["group"], set()).add(rec["split"])
    assert all(len(v) == 1 for v in by_group.values())
    # documents.jsonl: offsets and lengths point at each document in its stream
    expected_index = [(d.doc_id, s, start, n) for s in ("train", "heldout") for d, start, n in docs[s]]
    assert sorted((r["doc_id"], r["split"], r["start"], r["n_tokens"]) for r in index) == sorted(expected_index)
    assert m["eos_token_id"] == tiny_tokenizer.eos_token_id
    assert m["dtype"] == "int32" and m["corpus"] == str(small_corpus.resolve())
    assert m["complete"] is True
    assert sorted(os.listdir(out)) == ["documents.jsonl", "heldout.i32", "manifest.json", "train.i32"]


def test_tokenize_fingerprint_tracks_content(tmp_path, small_corpus, tiny_tokenizer):
    a = tokenize_corpus(small_corpus, tiny_tokenizer, tmp_path / "a", tokenizer_fingerprint="t")
    b = tokenize_corpus(small_corpus, tiny_tokenizer, tmp_path / "b", tokenizer_fingerprint="t")
    assert a["corpus_fingerprint"] == b["corpus_fingerprint"]
    with open(small_corpus, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    c = tokenize_corpus(small_corpus, tiny_tokenizer, tmp_path / "c", tokenizer_fingerprint="t")
    assert c["corpus_fingerprint"] != a["corpus_fingerprint"]


def test_tokenize_idempotent(tmp_path, small_corpus, tiny_tokenizer, capsys):
    out = tmp_path / "tok"
    m1 = tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny")
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    capsys.readouterr()
    m2 = tokenize_corpus(str(small_corpus), tiny_tokenizer, out, tokenizer_fingerprint="tiny")
    assert m2 == m1
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == mtimes
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("change", [
    {"tokenizer_fingerprint": "other"}, {"heldout_fraction": 0.5}, {"max_train_tokens": 10},
    {"max_heldout_tokens": 10}, {"text_field": "body"}])
def test_tokenize_settings_mismatch(tmp_path, small_corpus, tiny_tokenizer, change):
    out = tmp_path / "tok"
    kw = {"tokenizer_fingerprint": "tiny"}
    tokenize_corpus(small_corpus, tiny_tokenizer, out, **kw)
    key = next(iter(change))
    with pytest.raises(MLPMemError, match=rf"built with {key}=.*delete") as e:
        tokenize_corpus(small_corpus, tiny_tokenizer, out, **{**kw, **change})
    one_line(e)


def test_tokenize_other_corpus_mismatch(tmp_path, small_corpus, tiny_tokenizer):
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text(50))
    out = tmp_path / "tok"
    tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny")
    with pytest.raises(MLPMemError, match="built with corpus="):
        tokenize_corpus(other, tiny_tokenizer, out, tokenizer_fingerprint="tiny")


@pytest.mark.parametrize("cap_train,cap_held", [(1, None), (37, 5), (100, 1000), (10**9, 10**9)])
def test_tokenize_caps(tmp_path, small_corpus, tiny_tokenizer, cap_train, cap_held):
    out = tmp_path / "tok"
    m = tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny", heldout_fraction=0.3,
                        max_train_tokens=cap_train, max_heldout_tokens=cap_held, batch_docs=4)
    streams, _ = expected_streams(small_corpus, tiny_tokenizer, 0.3)
    for s, cap in (("train", cap_train), ("heldout", cap_held)):
        want = streams[s] if cap is None else streams[s][:cap]  # exactly at the cap
        assert open_token_stream(out, s).tolist() == want
        assert m["n_tokens"][s] == len(want)
    index = list(read_document_index(out))
    for s in ("train", "heldout"):
        recs = [r for r in index if r["split"] == s]
        total = sum(r["n_tokens"] + (0 if r["truncated"] else 1) for r in recs)
        assert total == m["n_tokens"][s]
        assert sum(r["truncated"] for r in recs) <= 1
        if recs and recs[-1]["truncated"]:
            assert m["n_tokens"][s] == (cap_train if s == "train" else cap_held)


def test_tokenize_caps_stop_reading(tmp_path, tiny_tokenizer):
    path = tmp_path / "big.jsonl"
    write_jsonl(path, [{"text": synthetic_text(30, seed=i)} for i in range(200)] + [{"wrong": "field"}])
    # Reading stops once both splits are full, long before the bad last line.
    m = tokenize_corpus(path, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t", heldout_fraction=0.5,
                        max_train_tokens=50, max_heldout_tokens=50, batch_docs=2)
    assert m["n_tokens"] == {"train": 50, "heldout": 50}
    assert m["n_docs_read"] < 20
    with pytest.raises(MLPMemError, match="line 201"):
        tokenize_corpus(path, tiny_tokenizer, tmp_path / "tok2", tokenizer_fingerprint="t")
    assert os.listdir(tmp_path / "tok2") == []  # no temporaries left behind by the failed run


def test_tokenize_empty_split_allowed(tmp_path, tiny_tokenizer):
    p = tmp_path / "one.txt"
    p.write_text(synthetic_text(40))
    m = tokenize_corpus(p, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t", heldout_fraction=0.0)
    assert m["n_tokens"]["heldout"] == 0 and m["n_docs"]["heldout"] == 0
    assert open_token_stream(tmp_path / "tok", "heldout").shape == (0,)
    assert open_token_stream(tmp_path / "tok", "train")[-1] == tiny_tokenizer.eos_token_id


def test_tokenize_skip_bad_utf8(tmp_path, tiny_tokenizer):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_bytes(b"bad \xc3(")
    (d / "b.txt").write_text("good words here")
    with pytest.raises(MLPMemError, match=r"a.txt: not valid UTF-8 at byte offset 4"):
        tokenize_corpus(d, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t")
    with pytest.warns(UserWarning, match="a.txt"):
        m = tokenize_corpus(d, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t", skip_bad_utf8=True)
    assert m["n_skipped_bad_utf8"] == 1 and m["n_docs"]["train"] == 1
    # the stored result skipped a document: reusing it without skip_bad_utf8 would hide that
    with pytest.raises(MLPMemError, match="skip_bad_utf8"):
        tokenize_corpus(d, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t")


def test_open_token_stream_checks_size(tmp_path, small_corpus, tiny_tokenizer):
    out = tmp_path / "tok"
    tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny", heldout_fraction=0.0)
    with open(out / "train.i32", "r+b") as f:
        f.truncate(os.path.getsize(out / "train.i32") - 4)
    with pytest.raises(MLPMemError, match="truncated or corrupted") as e:
        open_token_stream(out, "train")
    one_line(e)
    with pytest.raises(MLPMemError, match="unknown split"):
        open_token_stream(out, "test")
    # a rerun notices the damaged stream and rebuilds it instead of returning the manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_corpus(small_corpus, tiny_tokenizer, out, tokenizer_fingerprint="tiny", heldout_fraction=0.0)
    assert len(open_token_stream(out, "train")) > 0


def test_open_token_stream_requires_complete_stage(tmp_path):
    with pytest.raises(MLPMemError, match="no manifest.json"):
        open_token_stream(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# The real default corpus
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_wiki_corpus_counts():
    docs = list(iter_documents("wiki"))  # downloads bigbench on first use; must not be skipped
    nq = [d for d in docs if d.doc_id.startswith("nq:")]
    squad = [d for d in docs if d.doc_id.startswith("squad:")]
    assert len(nq) + len(squad) == len(docs)
    assert 13_000 <= len(nq) <= 14_000
    assert len(squad) == 2067
    assert len({d.text for d in nq}) == len(nq)
    assert len({d.group for d in squad}) == 48
    assert len({d.group for d in nq}) < len(nq)  # near-identical passages share a group
    assert [d.doc_id for d in docs[:3]] == [d.doc_id for d in iter_documents("wiki")][:3]  # deterministic
    by_id = {d.doc_id: d for d in docs}
    questions = load_nq_questions()
    assert len(questions) == 17_528
    assert all(q["answers"][0] in by_id[q["doc_id"]].text for q in questions)
    assert all(by_id[q["doc_id"]].group == q["group"] for q in questions)
    held = [d for d in docs if split_of(d.group, 0.02) == "heldout"]
    assert 0.005 < len(held) / len(docs) < 0.05
