"""The CLI end to end on a tiny local model, and every bad input: one-line error, exit status 2."""

import json
import re

import numpy as np
import pytest
from helpers import synthetic_text, tiny_run_args, write_docs

from mlpmemory.cli import main


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_docs(d / "docs.jsonl", 40)
    return d


def accepted_flags(command: str) -> set[str]:
    """The ``--flags`` of the settings groups ``command`` reads."""
    from dataclasses import fields

    from mlpmemory.commands.stages import STAGE_READS
    from mlpmemory.config import GROUPS

    return {"--" + f.name.replace("_", "-") for g in STAGE_READS[command] for f in fields(GROUPS[g])}


def args_for(command, run_dir, model, corpus, *extra) -> list[str]:
    """``command`` plus the tiny-run flags it accepts (a stage takes only the groups it reads), then ``extra``."""
    base = tiny_run_args(run_dir, model, corpus)
    ok = accepted_flags(command)
    kept = [x for i in range(0, len(base), 2) if base[i] in ok for x in base[i:i + 2]]
    return [command, *kept, *extra]


def fails(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("mlpmem: error: "), err
    for frag in fragments:
        assert frag in last, last
    return last


def test_run_end_to_end_then_noop(tmp_path, tiny_llama, corpus_dir, capsys):
    # passages fit block 32
    rag = ["--rag-retrieve-every", "4", "--rag-query-tokens", "6", "--rag-passage-tokens", "16"]
    argv = args_for("run", tmp_path / "run", tiny_llama.path, corpus_dir, *rag)
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
    assert main(args_for("run", tmp_path / "run", tiny_llama.path, corpus_dir, *rag[:-2],
                         "--rag-retrieve-every", "8")) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["chosen"]["rag"]["retrieve_every"] == 8 and again["ppl"]["base"] == results["ppl"]["base"]
    assert again["ppl"]["rag"] != results["ppl"]["rag"]
    # A one-off --eval-text reports on its own and changes neither the settings nor results.json.
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text(400, seed=99))
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.json", "results.json")}
    assert main(["eval-ppl", "--run-dir", str(tmp_path / "run"), "--eval-text", str(other)]) == 0
    printed = capsys.readouterr().out
    reports = list((tmp_path / "run" / "eval_text").glob("*/ppl.json"))
    assert len(reports) == 1 and "eval_text" in printed
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    text_ppl = json.loads(reports[0].read_text())["test"]["systems"]["base"]["ppl"]
    assert text_ppl != again["ppl"]["base"]
    assert main(["run", "--run-dir", str(tmp_path / "run")]) == 0  # the saved settings, not a preset
    assert f"| base LM | {again['ppl']['base']:.3f} |" in capsys.readouterr().out
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    # A setting a finished stage refuses is not saved: the run keeps working with its own settings.
    fails(capsys, ["run", "--run-dir", str(tmp_path / "run"), "--block", "64"], "block")
    fails(capsys, ["eval-ppl", "--run-dir", str(tmp_path / "run"), "--eval-text", str(tmp_path / "typo.txt")],
          "typo.txt")
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_help_shows_exactly_the_groups_each_command_reads(capsys):
    from dataclasses import fields

    from mlpmemory.commands.stages import STAGE_READS
    from mlpmemory.config import GROUPS

    every = {"--" + f.name.replace("_", "-"): f for cls in GROUPS.values() for f in fields(cls)}
    for command, _groups in STAGE_READS.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        shown = {flag for flag in every if re.search(rf"(?<![\w-]){flag}(?![\w-])", out)}
        assert shown == accepted_flags(command), command
        for flag in shown:  # each field's own help text is there
            assert " ".join(every[flag].metadata["help"].split()[:4]) in " ".join(out.split()), flag
    assert {"run", "corpus"} == set(STAGE_READS["corpus"])


def test_a_setting_of_another_stage_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["corpus", "--alpha", "0.9"])
    assert e.value.code == 2 and "--alpha" in capsys.readouterr().err


def test_missing_corpus(tmp_path, tiny_llama, capsys):
    fails(capsys, args_for("datastore", tmp_path / "r", tiny_llama.path, tmp_path / "nope.jsonl"), "nope.jsonl")


def test_empty_corpus(tmp_path, tiny_llama, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n")
    fails(capsys, args_for("datastore", tmp_path / "r", tiny_llama.path, tmp_path / "c"), "empty")


def test_non_utf8_reports_byte_offset_or_skips(tmp_path, tiny_llama, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.txt").write_text(synthetic_text(200, 1))
    (tmp_path / "c" / "bad.txt").write_bytes(b"caf\xc3\xa9 ok then \xff broken")
    fails(capsys, args_for("datastore", tmp_path / "r", tiny_llama.path, tmp_path / "c"), "bad.txt", "14")
    with pytest.warns(UserWarning, match="bad.txt"):
        assert main(args_for("corpus", tmp_path / "r2", tiny_llama.path, tmp_path / "c", "--skip-bad-utf8")) == 0


def test_unloadable_model(tmp_path, corpus_dir, capsys):
    fails(capsys, args_for("datastore", tmp_path / "r", tmp_path / "no-model", corpus_dir), "could not load model")


def test_datastore_from_other_model_or_layer_is_refused(tmp_path, tiny_llama, tiny_gpt2, corpus_dir, capsys):
    run = tmp_path / "r"
    assert main(args_for("datastore", run, tiny_llama.path, corpus_dir)) == 0
    fails(capsys, args_for("datastore", run, tiny_gpt2.path, corpus_dir), "model")
    fails(capsys, args_for("datastore", run, tiny_llama.path, corpus_dir, "--key-site", "0"), "key_site")


def test_k_larger_than_datastore(tmp_path, tiny_llama, corpus_dir, capsys):
    fails(capsys, args_for("targets", tmp_path / "r", tiny_llama.path, corpus_dir, "--k", "100000"), "k=100000")


def test_truncated_memmap_and_corrupt_index(tmp_path, tiny_llama, corpus_dir, capsys):
    run = tmp_path / "r"
    assert main(args_for("datastore", run, tiny_llama.path, corpus_dir)) == 0
    keys = run / "datastore" / "keys.f16"
    data = keys.read_bytes()
    keys.write_bytes(data[: len(data) // 2])
    fails(capsys, args_for("index", run, tiny_llama.path, corpus_dir), "truncated")
    keys.write_bytes(data)
    assert main(args_for("index", run, tiny_llama.path, corpus_dir)) == 0
    index_file = run / "index" / "index.faiss"
    raw = bytearray(index_file.read_bytes())
    raw[:64] = np.random.default_rng(0).integers(0, 255, 64, dtype=np.uint8).tobytes()
    index_file.write_bytes(bytes(raw))
    fails(capsys, args_for("targets", run, tiny_llama.path, corpus_dir), "index")


def test_config_file_and_bad_settings(tmp_path, tiny_llama, corpus_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[datastore]\nblock = 32\nstride = 40\n')
    argv = [x for x in args_for("datastore", tmp_path / "r", tiny_llama.path, corpus_dir)
            if x not in ("--stride", "16")]
    fails(capsys, [*argv, "--config", str(cfg)], "--stride")
    cfg.write_text('bogus = 1\n')
    fails(capsys, ["corpus", "--config", str(cfg)], "bogus")


@pytest.mark.parametrize("command", ["generate", "eval-qa", "bench", "scaling"])
def test_tool_commands_refuse_a_run_dir_that_does_not_exist(tmp_path, command, capsys):
    extra = ["--prompt", "x"] if command == "generate" else []
    fails(capsys, [command, "--run-dir", str(tmp_path / "typo"), *extra], "no config.json")
    assert not (tmp_path / "typo").exists()  # nothing built, nothing left behind


def test_a_run_dir_in_the_config_file_names_the_run(tmp_path, tiny_llama, corpus_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nrun_dir = "{tmp_path / "mine"}"\n')
    argv = [x for x in args_for("corpus", tmp_path / "unused", tiny_llama.path, corpus_dir)]
    argv = argv[:1] + argv[3:]  # no --run-dir flag: the file's run_dir applies
    assert "--run-dir" not in argv
    assert main([*argv, "--config", str(cfg)]) == 0
    assert (tmp_path / "mine" / "corpus" / "manifest.json").is_file() and not (tmp_path / "runs").exists()
