"""`mlpmem scaling` end to end on a tiny run (against an independent numpy oracle), its no-op rerun,
option errors, and the numpy power-law fit on synthetic data with known a, b, c."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_run_args, write_docs

from mlpmemory.cli import main
from mlpmemory.commands.scaling import fit_power_law, power_law
from mlpmemory.datastore import open_datastore
from mlpmemory.memory import MLPMemory, MLPMemoryConfig, count_parameters


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("scaling")
    write_docs(root / "docs.jsonl", 28)
    args = tiny_run_args(root / "run", tiny_llama.path, root / "docs.jsonl", "--train-batch", "256",
                         "--memory-blocks", "2", "--lambdas", "0,0.1,0.3,0.5,0.7")
    assert main(["run", *args]) == 0
    return root / "run", ["--run-dir", str(root / "run")]  # later commands read the run's saved settings


def memory_logprobs(memory_dir, eval_dir):
    """The oracle: log p_mem(true token) of every scored position, straight from the stored arrays."""
    memory = MLPMemory.from_pretrained(memory_dir)
    ds = open_datastore(eval_dir)
    with torch.no_grad():
        logits = memory(torch.from_numpy(np.asarray(ds.mem_inputs, dtype=np.float32))).double()
    tgt = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))
    return torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0].numpy(), np.asarray(ds.lm_logprob, np.float64)


def oracle_scores(memory_dir, run_dir, lambdas):
    mv, lv = memory_logprobs(memory_dir, run_dir / "tune")
    mt, lt = memory_logprobs(memory_dir, run_dir / "eval_test")

    def ppl(lm, mem, lam):
        return math.exp(-np.mean(np.log((1 - lam) * np.exp(lm) + lam * np.exp(mem))))

    lam = min(lambdas, key=lambda x: ppl(lv, mv, x))  # first of ties = smallest lambda
    return {"lambda": lam, "memory_alone_test_ppl": math.exp(-mt.mean()), "mixed_test_ppl": ppl(lt, mt, lam)}


def test_scaling_end_to_end_then_noop(tiny_run, capsys):
    run_dir, args = tiny_run
    capsys.readouterr()
    argv = ["scaling", *args, "--scaling-blocks", "1,2,3", "--scaling-checkpoints", "0.5,1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "| blocks | params |" in out.out and "fit (memory alone): PPL(N) =" in out.out
    assert "= the run's own memory" in out.err  # 2 blocks, same settings: the run's memory is reused
    sdir = run_dir / "scaling"
    result = json.loads((sdir / "scaling.json").read_text())
    assert (sdir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = MLPMemoryConfig.from_dict(json.loads((run_dir / "memory" / "config.json").read_text()))
    sizes = result["sizes"]
    assert [s["blocks"] for s in sizes] == [1, 2, 3]
    assert sizes[1]["dir"] == "memory" and sizes[0]["dir"] == "scaling/blocks_1"
    lambdas = [0.0, 0.1, 0.3, 0.5, 0.7]
    for s in sizes:
        assert s["params"] == count_parameters(cfg, s["blocks"])
        assert s["params_non_head"] == s["params"] - cfg.vocab_size * cfg.hidden_size
        assert s["train_rows_seen"] == s["steps"] * 256 and s["validation"]["kl"] > 0
        want = oracle_scores(run_dir / s["dir"], run_dir, lambdas)
        assert s["lambda"] == want["lambda"]
        assert s["memory_alone_test_ppl"] == pytest.approx(want["memory_alone_test_ppl"], rel=1e-4)
        assert s["mixed_test_ppl"] == pytest.approx(want["mixed_test_ppl"], rel=1e-5)
    base = json.loads((run_dir / "eval" / "ppl.json").read_text())["test"]["systems"]
    assert result["base"]["test_ppl"] == pytest.approx(base["base"]["ppl"])
    assert sizes[1]["mixed_test_ppl"] == pytest.approx(base["memory"]["ppl"], rel=1e-5)  # the same memory as eval-ppl
    fit = result["fit"]["memory_alone"]
    assert fit["points"] == 3 and 0 <= fit["c"] < min(s["memory_alone_test_ppl"] for s in sizes)
    # Against training tokens: the 3-block memory at half its training (a snapshot) and at the end.
    points = result["tokens"]["points"]
    assert result["tokens"]["blocks"] == 3 and [p["fraction"] for p in points] == [0.5, 1.0]
    assert points[0]["rows_seen"] < points[1]["rows_seen"] == sizes[2]["train_rows_seen"]
    half = oracle_scores(run_dir / "scaling" / "blocks_3" / "snapshots" / f"step_{points[0]['step']:07d}",
                         run_dir, lambdas)
    assert points[0]["memory_alone_test_ppl"] == pytest.approx(half["memory_alone_test_ppl"], rel=1e-4)
    assert points[1]["memory_alone_test_ppl"] == sizes[2]["memory_alone_test_ppl"]
    # A second call changes nothing on disk and prints the same table.
    mtimes = {p: p.stat().st_mtime_ns for p in sdir.rglob("*") if p.is_file()}
    assert main(argv) == 0
    again = capsys.readouterr()
    assert "already complete" in again.err and again.out.strip() == out.out.strip().split("\n\nscaling:")[0].strip()
    assert {p: p.stat().st_mtime_ns for p in sdir.rglob("*") if p.is_file()} == mtimes


@pytest.mark.parametrize("flags, fragment", [
    (["--scaling-blocks", "4"], "at least two sizes"),
    (["--scaling-blocks", "1,x"], "--scaling-blocks"),
    (["--scaling-checkpoints", "0,1"], "--scaling-checkpoints"),
    (["--scaling-epochs", "-1"], "--scaling-epochs"),
])
def test_bad_options_are_one_line_errors(tmp_path, flags, fragment, capsys):
    assert main(["scaling", "--run-dir", str(tmp_path / "r"), *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mlpmem: error: ") and fragment in last


def test_power_law_fit_recovers_known_parameters():
    n = np.geomspace(1e5, 1e9, 7)
    for a, b, c in ((300.0, 0.3, 20.0), (55.0, 0.15, 0.0), (4e3, 0.5, 9.5)):
        fit = fit_power_law(n, a * n ** -b + c)
        assert fit["a"] == pytest.approx(a, rel=1e-3) and fit["b"] == pytest.approx(b, rel=1e-3)
        assert fit["c"] == pytest.approx(c, rel=1e-3, abs=1e-3)
        np.testing.assert_allclose(power_law(n, fit), a * n ** -b + c, rtol=1e-5)
    # Noisy points: still close, and the floor stays below the smallest perplexity.
    y = (300.0 * n ** -0.3 + 20.0) * np.exp(np.random.default_rng(0).normal(0, 0.002, n.size))
    fit = fit_power_law(n, y)
    assert fit["b"] == pytest.approx(0.3, rel=0.1) and 0 <= fit["c"] < y.min()
    two = fit_power_law([1e6, 1e7], [40.0, 20.0])  # two points: c fixed at 0, exact line in log-log
    assert two["c"] == 0.0 and two["b"] == pytest.approx(math.log10(2)) and two["points"] == 2


def test_ablations_script_on_the_study_engine(tiny_run, capsys):
    """benchmarks/ablations.py trains and scores through mlpmemory.study: the memory at the run's own site
    and alpha reproduces the run's memory exactly, a site the run did not store gets its own pass."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    run_dir, _ = tiny_run
    argv = ["--run-dir", str(run_dir), "--sites", "1,last", "--alphas", "0,0.4"]
    assert ablations.main(argv) == 0
    report = json.loads((run_dir / "ablations" / "ablations.json").read_text())
    assert report["complete"] and len(report["rows"]) == 4
    assert report["reproduces_run_memory"]["relative_diff"] == 0.0
    assert set(report["extra_datastores"]) == {"ds_L1"}
    by_setting = {(r["ablation"], r["alpha"], r["input_site"]["layer"]): r for r in report["rows"]}
    last = max(r["input_site"]["layer"] for r in report["rows"])
    assert by_setting[("input layer", 0.4, last)]["name"] == by_setting[("alpha", 0.4, last)]["name"]  # trained once
    assert all(1.0 < r["test_ppl"] < 1000 for r in report["rows"])
    assert "| alpha | alpha=0 |" in capsys.readouterr().out
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "ablations").rglob("*")
              if p.is_file() and "json" not in p.name}
    assert ablations.main(argv) == 0  # resumable: nothing trained or scored again
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
