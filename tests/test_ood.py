"""Out-of-domain perplexity next to the in-domain test: the overlap filter, and eval-ppl's OOD rows equal a
plain --eval-text report of the same text (same lambdas, same numbers)."""

import json
import shutil

import pytest
from helpers import synthetic_text

from mlpmemory.cli import main
from mlpmemory.errors import MLPMemError
from mlpmemory.ood import SHINGLE_WORDS, exclude_overlap, resolve


def test_exclude_overlap_drops_paragraphs_sharing_13_words_with_the_corpus():
    corpus = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    copied = "Intro words here. One, two three four five six seven eight nine ten eleven twelve thirteen!"
    near = "one two three four five six seven eight nine ten eleven twelve and something else entirely"
    fresh = "a completely different paragraph about rivers and kings"
    kept, dropped = exclude_overlap([copied, near, fresh, fresh, "  "], corpus)
    assert SHINGLE_WORDS == 13
    assert kept == [near, fresh] and dropped == 1  # 12 shared words are not an overlap; duplicates and blanks go


def test_resolve(tmp_path):
    assert resolve("none", "wiki") == {} and resolve("auto", str(tmp_path)) == {}  # auto: only with the default corpus
    f = tmp_path / "news.txt"
    f.write_text("some text")
    assert resolve(str(f), str(tmp_path)) == {"news": f}
    with pytest.raises(MLPMemError, match="neither a shipped set"):
        resolve("nytimes", "wiki")


def test_eval_ppl_reports_out_of_domain_sets_at_the_test_lambdas(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text(300, seed=7).replace("river", "spaceship"))
    assert main(["eval-ppl", "--run-dir", str(run), "--ood", str(other), "--ood-tokens", "100000"]) == 0
    out = capsys.readouterr().out
    assert "Out-of-domain perplexity" in out and "| + MLP memory |" in out
    ood = json.loads((run / "eval" / "ood.json").read_text())
    test = json.loads((run / "eval" / "ppl.json").read_text())["test"]["systems"]
    row = ood["other"]["systems"]
    assert set(row) == set(test) and all(row[k]["lambda"] == test[k].get("lambda") for k in test)
    # the same text as a one-off --eval-text: the same numbers (its whole text fits in --ood-tokens)
    assert main(["eval-ppl", "--run-dir", str(run), "--eval-text", str(other)]) == 0
    reports = [json.loads(p.read_text()) for p in (run / "eval_text").glob("*/ppl.json")]
    plain = next(r for r in reports if r["test"]["tokens_scored"] == ood["other"]["tokens_scored"])
    assert {k: v["ppl"] for k, v in plain["test"]["systems"].items()} == {k: v["ppl"] for k, v in row.items()}
    assert main(["run", "--run-dir", str(run)]) == 0  # the main job's table shows it too
    assert "Out-of-domain perplexity" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["out_of_domain"]["other"]["systems"]["base"]["ppl"] == row["base"]["ppl"]
    # a cap: the first --ood-tokens tokens only
    assert main(["eval-ppl", "--run-dir", str(run), "--ood-tokens", "50"]) == 0
    capped = json.loads((run / "eval" / "ood.json").read_text())["other"]
    assert capped["tokens_scored"] < ood["other"]["tokens_scored"]
    capsys.readouterr()
    assert main(["eval-ppl", "--run-dir", str(run), "--ood", "none"]) == 0
    assert "Out-of-domain" not in capsys.readouterr().out
    assert main(["run", "--run-dir", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["out_of_domain"] == {}
