"""Bad inputs are clear errors, reading is bounded: capture sites checked on the first batch, only regular
files read as corpora, long documents read and tokenized in pieces (same ids), edited corpus files noticed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_text, tiny_run_args, write_docs

from mlpmemory import corpus as corpus_mod
from mlpmemory.cli import main
from mlpmemory.corpus import iter_documents, open_token_stream, read_document_index, tokenize_corpus
from mlpmemory.datastore import build_datastore
from mlpmemory.errors import MLPMemError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Capture sites: floating point, (batch, seq, d), or a one-line error before anything is written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "key_site", "mem_site", "match"), [
    ("llama", "model.embed_tokens", None, r"key site 'model.embed_tokens' receives a int64 tensor .*token ids"),
    ("gpt2", "transformer.wte", None, r"key site 'transformer.wte' .*token ids"),
    ("llama", "lm_head", None, r"key site 'lm_head' did not run"),
    ("gpt2", "lm_head", None, r"key site 'lm_head' did not run"),
    ("llama", "model.layers.1.mlp.down_proj", None, r"shape \(\d+, \d+, 64\), not .*, 32\)"),
    ("gpt2", "transformer.h.1.mlp.c_proj", None, r"shape \(\d+, \d+, 128\), not .*, 32\)"),
    ("llama", "last", "model.embed_tokens", r"memory-input site 'model.embed_tokens' .*token ids"),
])
@pytest.mark.parametrize("store_lm_logprob", [False, True])
def test_bad_capture_site_is_a_clear_error(family, key_site, mem_site, match, store_lm_logprob, tiny_llama,
                                           tiny_gpt2, tmp_path):
    lm = tiny_llama if family == "llama" else tiny_gpt2
    tok_path = tmp_path / "t.i32"
    np.random.default_rng(0).integers(0, 300, 80).astype(np.int32).tofile(tok_path)
    with pytest.raises(MLPMemError, match=match) as e:
        build_datastore(lm, tok_path, 80, tmp_path / "ds", key_site=key_site, mem_site=mem_site, block=16, stride=8,
                        batch_size=2, store_lm_logprob=store_lm_logprob, progress=False)
    assert "\n" not in str(e.value)
    assert not [p.name for p in (tmp_path / "ds").iterdir()]  # nothing written, not even preallocated


def test_explicit_good_site_still_works(tiny_llama, tmp_path):
    tok_path = tmp_path / "t.i32"
    np.random.default_rng(0).integers(0, 300, 60).astype(np.int32).tofile(tok_path)
    m = build_datastore(tiny_llama, tok_path, 60, tmp_path / "ds", key_site="model.layers.2.mlp",
                        mem_site="model.layers.1.post_attention_layernorm", block=16, stride=8, progress=False)
    assert m["complete"] and m["n"] == 59


# ---------------------------------------------------------------------------------------------
# Only regular files: a FIFO or a device is refused at once, never read (run with a timeout)
# ---------------------------------------------------------------------------------------------


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs FIFOs and /dev/zero")
def test_fifo_and_device_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a regular document")
    os.mkfifo(folder / "b.jsonl")
    cases = [tmp_path / "fifo.txt", tmp_path / "zero.txt", folder]
    r = _run_python(f"""
        from mlpmemory.corpus import iter_documents
        from mlpmemory.errors import MLPMemError
        for p in {[str(c) for c in cases]!r}:
            try:
                print("read", len(list(iter_documents(p))))
            except MLPMemError as e:
                print("error", e)
        """, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    assert "fifo.txt is a FIFO (named pipe), not a regular file" in lines[0]
    assert "zero.txt is a device, not a regular file" in lines[1]
    assert "b.jsonl is a FIFO" in lines[2]


# ---------------------------------------------------------------------------------------------
# Long documents: read and tokenized in pieces, same ids as whole, cap applied while reading
# ---------------------------------------------------------------------------------------------


def _long_text(n_words: int) -> str:
    """Synthetic text with the whitespace a tokenizer may join: double spaces, blank lines, digits, accents."""
    parts = []
    for i in range(0, n_words, 40):
        s = synthetic_text(40, seed=i)
        parts.append(s + ("\n" if i % 3 == 0 else "\n\n" if i % 3 == 1 else "  ") + f"{i} café. ")
    return "".join(parts)


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_long_document_in_pieces_gives_the_same_ids(kind, tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_PIECE_CHARS", 997)  # many cuts, odd size
    monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", 1009)  # chunks split multi-byte characters
    text = _long_text(6000) + "x" * 2500 + " tail"  # and one stretch without a cut point (cut hard)
    path = tmp_path / f"doc.{kind}"
    path.write_text(text if kind == "txt" else json.dumps({"text": text}) + "\n", encoding="utf-8")
    m = tokenize_corpus(path, tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t", heldout_fraction=0.0)
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    got = open_token_stream(tmp_path / "tok", "train").tolist()
    head = text.index(" " + "x" * 2500)  # up to the hard cut, ids are those of the whole text
    n_head = len(tiny_tokenizer(text[:head], add_special_tokens=False)["input_ids"])
    assert got[:n_head] == whole[:n_head] and got[-1] == tiny_tokenizer.eos_token_id
    assert m["n_docs"]["train"] == 1 and next(read_document_index(tmp_path / "tok"))["n_tokens"] == len(got) - 1
    assert corpus_mod._cuts_exact(tiny_tokenizer)


def test_long_document_without_hard_cuts_is_identical(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_PIECE_CHARS", 512)
    monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", 300)
    text = _long_text(3000)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    tokenize_corpus(tmp_path / "doc.txt", tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t",
                    heldout_fraction=0.0)
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert open_token_stream(tmp_path / "tok", "train").tolist() == whole


def test_long_txt_bad_utf8_offset_and_cap(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_PIECE_CHARS", 400)
    monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", 256)
    data = ("é" * 700).encode() + b"\xff" + b" more"
    (tmp_path / "bad.txt").write_bytes(data)
    with pytest.raises(MLPMemError, match="bad.txt: not valid UTF-8 at byte offset 1400"):
        tokenize_corpus(tmp_path / "bad.txt", tiny_tokenizer, tmp_path / "tok", tokenizer_fingerprint="t")
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a_bad.txt").write_bytes(data)
    (folder / "b_blank.txt").write_text(" \n" * 600)
    (folder / "c_good.txt").write_text("the king was born in paris")
    with pytest.warns(UserWarning, match="a_bad.txt: not valid UTF-8 at byte offset 1400; skipped"):
        m = tokenize_corpus(folder, tiny_tokenizer, tmp_path / "tok2", tokenizer_fingerprint="t",
                            heldout_fraction=0.0, skip_bad_utf8=True)
    assert m["n_skipped_bad_utf8"] == 1 and m["n_docs"]["train"] == 1  # the bad and the blank one taken back out
    expected = tiny_tokenizer("the king was born in paris", add_special_tokens=False)["input_ids"]
    assert open_token_stream(tmp_path / "tok2", "train").tolist() == expected + [tiny_tokenizer.eos_token_id]
    assert [r["doc_id"] for r in read_document_index(tmp_path / "tok2")] == ["c_good.txt"]
    (folder / "d_long.txt").write_text(_long_text(4000))
    m = tokenize_corpus(folder, tiny_tokenizer, tmp_path / "tok3", tokenizer_fingerprint="t",
                        heldout_fraction=0.0, max_train_tokens=100, skip_bad_utf8=True)
    assert m["n_tokens"]["train"] == 100 and m["n_truncated_docs"]["train"] == 1


def test_long_line_is_tokenized_with_bounded_memory(tmp_path, tiny_llama):
    """A 20 MB single-line .txt with a 1,200-token cap: peak RSS grows by tens of MB, not by gigabytes."""
    path = tmp_path / "line.txt"
    line = (synthetic_text(4000) + " ").encode()
    with open(path, "wb") as f:
        for _ in range(20_000_000 // len(line) + 1):
            f.write(line)
    r = _run_python(f"""
        import resource
        from transformers import AutoTokenizer
        from mlpmemory.corpus import tokenize_corpus
        tok = AutoTokenizer.from_pretrained({tiny_llama.path!r})
        tok("warm up " * 100)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = tokenize_corpus({str(path)!r}, tok, {str(tmp_path / "tok")!r}, tokenizer_fingerprint="t",
                            heldout_fraction=0.0, max_train_tokens=1200, progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(m["n_tokens"]["train"], (after - before) // 1024)
        """, timeout=300)
    assert r.returncode == 0, r.stderr
    n_tokens, grew_mb = map(int, r.stdout.split())
    print(f"peak RSS grew by {grew_mb} MB")
    assert n_tokens == 1200
    assert grew_mb < 200, f"peak RSS grew by {grew_mb} MB for a 20 MB line (whole: gigabytes)"


# ---------------------------------------------------------------------------------------------
# A corpus file edited in place is tokenized again, never reused with the old text
# ---------------------------------------------------------------------------------------------


def _tok(folder: Path, out: Path, tokenizer) -> dict:
    return tokenize_corpus(folder, tokenizer, out, tokenizer_fingerprint="t", heldout_fraction=0.0)


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


@pytest.fixture
def messages():
    handler, logger = _Messages(), logging.getLogger("mlpmemory")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_edited_corpus_file_is_tokenized_again(tmp_path, tiny_tokenizer, messages):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_text("the river and the city")
    (folder / "b.txt").write_text("the king was born in paris")
    out = tmp_path / "tok"
    first = _tok(folder, out, tiny_tokenizer)
    assert [r[0] for r in first["sources"]] == ["a.txt", "b.txt"]
    stream_mtime = (out / "train.i32").stat().st_mtime_ns
    assert _tok(folder, out, tiny_tokenizer)["corpus_fingerprint"] == first["corpus_fingerprint"]  # reused as is
    assert (out / "train.i32").stat().st_mtime_ns == stream_mtime

    st = (folder / "b.txt").stat()
    (folder / "b.txt").write_text("the king was born in Paris")  # same size, other text
    os.utime(folder / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = _tok(folder, out, tiny_tokenizer)
    assert "b.txt changed" in messages.text
    assert second["corpus_fingerprint"] != first["corpus_fingerprint"]
    expected = [t for s in ("the river and the city", "the king was born in Paris")
                for t in tiny_tokenizer(s, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]]
    assert open_token_stream(out, "train").tolist() == expected

    os.utime(folder / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched only
    third = _tok(folder, out, tiny_tokenizer)
    assert third["corpus_fingerprint"] == second["corpus_fingerprint"] and third["sources"] != second["sources"]
    (folder / "c.txt").write_text("a new document")  # a new file in the folder is noticed too
    assert _tok(folder, out, tiny_tokenizer)["n_docs"]["train"] == 3


def test_edited_corpus_is_refused_by_later_stages(tmp_path, tiny_llama, capsys):
    write_docs(tmp_path / "docs.jsonl", 20)
    args = tiny_run_args(tmp_path / "run", tiny_llama.path, tmp_path / "docs.jsonl")
    args = args[:args.index("--k")]  # the datastore command has no --k
    assert main(["datastore", *args]) == 0
    with open(tmp_path / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "an edit made after the datastore was built", "title": "new"}) + "\n")
    capsys.readouterr()
    assert main(["datastore", *args]) == 2  # the corpus is tokenized again; the old datastore is refused
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("mlpmem: error: datastore at") and "was built with" in last, last


def test_public_iter_documents_still_reads_long_txt_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", 64)
    text = synthetic_text(200)
    (tmp_path / "a.txt").write_text(text)
    assert [d.text for d in iter_documents(tmp_path / "a.txt")] == [text]
