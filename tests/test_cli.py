"""The CLI end to end on a tiny local model, and every bad input: one-line error, exit status 2."""

import json

import numpy as np
import pytest

from conftest import synthetic_text, tiny_run_args, write_docs
from mlpmemory.cli import main


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_docs(d / "docs.jsonl", 40)
    return d


args_for = tiny_run_args


def fails(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("mlpmem: error: "), err
    for frag in fragments:
        assert frag in last, last
    return last


def test_run_end_to_end_then_noop(tmp_path, tiny_llama, corpus_dir, capsys):
    rag = ["--rag-retrieve-every", "4", "--rag-query-tokens", "6", "--rag-passage-tokens", "16"]  # passages fit block 32
    argv = ["run", *args_for(tmp_path / "run", tiny_llama.path, corpus_dir, *rag)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "+ kNN-LM" in out and "+ MLP memory" in out and "+ RAG (in-context)" in out and "datastore rows" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["ppl"]) >= {"base", "knn_lm", "mlp_memory", "rag"} and results["tokens_scored"] > 0
    assert all(1.0 < results["ppl"][k] < 1000 for k in ("base", "knn_lm", "mlp_memory", "rag"))
    assert results["ppl"]["rag"] != results["ppl"]["base"] and results["bits_per_byte"]["rag"] > 0
    assert results["chosen"]["rag"]["retrieve_every"] == 4 and results["chosen"]["rag"]["passages"] > 0
    ev = json.loads((tmp_path / "run" / "eval" / "ppl.json").read_text())["test"]["systems"]["rag"]
    assert ev["tokens_scored"] == results["tokens_scored"] and ev["settings"]["query_tokens"] == 6
    assert ev["retrieval_seconds"] >= 0 and (tmp_path / "run" / "rag_bm25" / "manifest.json").is_file()
    corpus = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    assert results["datastore_rows"] == corpus["n_tokens"]["train"] - 1
    assert results["targets"]["k"] == 8
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file() and "json" not in p.name}
    assert main(argv) == 0  # every stage already complete: nothing rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert "already complete" in capsys.readouterr().err
    # Another RAG setting re-runs the eval (only the +RAG pass is recomputed; the rest is cached).
    assert main(["run", *args_for(tmp_path / "run", tiny_llama.path, corpus_dir, *rag[:-2], "--rag-retrieve-every", "8")]) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["chosen"]["rag"]["retrieve_every"] == 8 and again["ppl"]["base"] == results["ppl"]["base"]
    assert again["ppl"]["rag"] != results["ppl"]["rag"]


def test_help_documents_every_option(capsys):
    for stage in ("corpus", "datastore", "index", "targets", "run"):
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        out = capsys.readouterr().out
        assert "--run-dir" in out and "--config" in out
    assert "--temperature" in out and "kNN-LM perplexity" in " ".join(out.split())


def test_missing_corpus(tmp_path, tiny_llama, capsys):
    fails(capsys, ["datastore", *args_for(tmp_path / "r", tiny_llama.path, tmp_path / "nope.jsonl")], "nope.jsonl")


def test_empty_corpus(tmp_path, tiny_llama, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n")
    fails(capsys, ["datastore", *args_for(tmp_path / "r", tiny_llama.path, tmp_path / "c")], "empty")


def test_non_utf8_reports_byte_offset_or_skips(tmp_path, tiny_llama, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.txt").write_text(synthetic_text(200, 1))
    (tmp_path / "c" / "bad.txt").write_bytes(b"caf\xc3\xa9 ok then \xff broken")
    fails(capsys, ["datastore", *args_for(tmp_path / "r", tiny_llama.path, tmp_path / "c")], "bad.txt", "14")
    with pytest.warns(UserWarning, match="bad.txt"):
        assert main(["corpus", *args_for(tmp_path / "r2", tiny_llama.path, tmp_path / "c", "--skip-bad-utf8")]) == 0


def test_unloadable_model(tmp_path, corpus_dir, capsys):
    fails(capsys, ["datastore", *args_for(tmp_path / "r", tmp_path / "no-model", corpus_dir)], "could not load model")


def test_datastore_from_other_model_or_layer_is_refused(tmp_path, tiny_llama, tiny_gpt2, corpus_dir, capsys):
    run = tmp_path / "r"
    assert main(["datastore", *args_for(run, tiny_llama.path, corpus_dir)]) == 0
    fails(capsys, ["datastore", *args_for(run, tiny_gpt2.path, corpus_dir)], "model")
    fails(capsys, ["datastore", *args_for(run, tiny_llama.path, corpus_dir, "--key-site", "0")], "key_site")


def test_k_larger_than_datastore(tmp_path, tiny_llama, corpus_dir, capsys):
    fails(capsys, ["targets", *args_for(tmp_path / "r", tiny_llama.path, corpus_dir, "--k", "100000")], "k=100000")


def test_truncated_memmap_and_corrupt_index(tmp_path, tiny_llama, corpus_dir, capsys):
    run = tmp_path / "r"
    assert main(["datastore", *args_for(run, tiny_llama.path, corpus_dir)]) == 0
    keys = run / "datastore" / "keys.f16"
    data = keys.read_bytes()
    keys.write_bytes(data[: len(data) // 2])
    fails(capsys, ["index", *args_for(run, tiny_llama.path, corpus_dir)], "truncated")
    keys.write_bytes(data)
    assert main(["index", *args_for(run, tiny_llama.path, corpus_dir)]) == 0
    index_file = run / "index" / "index.faiss"
    raw = bytearray(index_file.read_bytes())
    raw[:64] = np.random.default_rng(0).integers(0, 255, 64, dtype=np.uint8).tobytes()
    index_file.write_bytes(bytes(raw))
    fails(capsys, ["targets", *args_for(run, tiny_llama.path, corpus_dir)], "index")


def test_config_file_and_bad_settings(tmp_path, tiny_llama, corpus_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[datastore]\nblock = 32\nstride = 40\n')
    fails(capsys, ["datastore", "--config", str(cfg), *args_for(tmp_path / "r", tiny_llama.path, corpus_dir)[:-10]],
          "--stride")
    cfg.write_text('bogus = 1\n')
    fails(capsys, ["corpus", "--config", str(cfg)], "bogus")
