"""`mlpmem plan`: the arithmetic on a hand-worked case, the throughput sources, the CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlpmemory.cli import main
from mlpmemory.commands import plan as P
from mlpmemory.config import check_fields
from mlpmemory.errors import MLPMemError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "plan"

# Hand-worked throughputs: round numbers so every time below is checked by hand.
TP = {"source": "test",
      "datastore": {"rows_per_s": 1000.0, "model_params": 100_000_000},
      "index": {"train_seconds_fixed": 10.0, "train_seconds_per_list": 0.01, "train_samples": 200_000,
                "add_rows_per_s": 10_000.0, "flat_add_rows_per_s": 100_000.0, "read_bytes_per_s": 1e12},
      "search": {"seconds_per_query": 1e-3, "seconds_per_scanned_code": 1e-7, "k": 1024, "nprobe": 32,
                 "flat_seconds_per_row": 1e-9, "ivf_flat_seconds_per_scanned_row": 1e-8},
      "targets_post": {"rows_per_s": 1000.0, "mean_nnz": 266.3, "k": 1024},
      "train": {"rows_per_s": 100.0, "memory_params": 100_000_000}}


def opts(**kw) -> P.Options:
    base = dict(tokens=1_000_001.0, hidden_size=576, layers=30, vocab_size=49_152, params=1e8, k=1024, nprobe=32,
                index_factory="IVF1024,PQ64x8", memory_params=1e8, mean_nnz=250.0, ranks=2)
    o = P.Options(**{**base, **kw})
    check_fields(o)
    return o.validate()


def test_hand_worked_case():
    """N = 1e6 rows (1,000,001 tokens), d = 576, k = 1024, IVF1024,PQ64x8, 250 entries/row, 2 ranks."""
    plan = P.make_plan(opts(), TP)
    s = plan["stages"]
    assert plan["inputs"]["rows"] == 1_000_000
    # datastore: keys 1e6 * 576 * 2 = 1,152,000,000 + values 1e6 * 4
    assert s["datastore"]["disk_bytes"] == 1_152_000_000 + 4_000_000
    # same params as the reference model: 1e6 rows / 1000 rows/s / 2 ranks
    assert s["datastore"]["seconds"] == pytest.approx(500.0)
    # index: codes + ids 1e6 * (64 + 8) + centroids 1024 * 576 * 4 + PQ codebooks 256 * 576 * 4
    assert s["index"]["disk_bytes"] == 72_000_000 + 2_359_296 + 589_824
    # train 10 + 0.01 * 1024 s, add 1e6 / 1e4 s, recall 256 queries x 1e6 rows x 1e-9 s
    # (2 ranks: the add is split in two shards, then merged: see test_scaling_rules)
    assert s["index"]["seconds"] == pytest.approx(20.24 + 50.0 + 72_000_000 / P.DEFAULTS["index"]["merge_bytes_per_s"]
                                                  + 0.256)
    # targets: 62 shards of <= 16,384 rows; offsets 8 * (1e6 + 62), next_token 4e6, 250 x (int32 + fp16)
    # per row, four 128-byte .npy headers per shard
    assert s["targets"]["disk_bytes"] == 8 * (1_000_000 + 62) + 4_000_000 + 1_500_000_000 + 4 * 128 * 62
    # search: 1e-3 + 1e-7 * (32 * 1e6 / 1024 scanned codes) = 4.125 ms/query, post 1 ms/row, / 2 ranks
    assert s["targets"]["seconds"] == pytest.approx(1e6 * (4.125e-3 + 1e-3) / 2)
    # memory: 1e8 params x (final 4 + checkpoint 12) bytes; 1e6 rows / 100 rows/s / 2 ranks
    assert s["train"]["disk_bytes"] == 1_600_000_000
    assert s["train"]["seconds"] == pytest.approx(5000.0)
    total = s["total"]
    assert total["disk_bytes"] == sum(s[k]["disk_bytes"] for k in ("datastore", "index", "targets", "train"))
    assert total["ram_bytes"] == max(s[k]["ram_bytes"] for k in ("datastore", "index", "targets", "train"))


def test_scaling_rules():
    base = P.make_plan(opts(), TP)["stages"]
    # 4x the base params: 4x the forward FLOPs per token, 4x the datastore time; 2x memory params: 2x training
    big = P.make_plan(opts(params=4e8, memory_params=2e8), TP)["stages"]
    assert big["datastore"]["seconds"] == pytest.approx(4 * base["datastore"]["seconds"])
    assert big["train"]["seconds"] == pytest.approx(2 * base["train"]["seconds"])
    # one rank: twice the parallel stages; the index is added by one process, with no merge
    one = P.make_plan(opts(ranks=1), TP)["stages"]
    assert one["targets"]["seconds"] == pytest.approx(2 * base["targets"]["seconds"])
    assert one["index"]["seconds"] == pytest.approx(20.24 + 100.0 + 0.256)
    # two ranks (the hand-worked case): the add in two shards, merged at merge_bytes_per_s
    merge = 72_000_000 / P.DEFAULTS["index"]["merge_bytes_per_s"]
    assert base["index"]["seconds"] == pytest.approx(20.24 + 50.0 + merge + 0.256)
    # lists on disk: a rank's index RAM shrinks (its shard; the searched lists are page cache)
    od = P.make_plan(opts(index_storage="disk"), TP)
    assert od["inputs"]["index"]["storage"] == "disk"
    assert od["stages"]["targets"]["ram_bytes"] < base["targets"]["ram_bytes"]
    assert od["stages"]["index"]["ram_bytes"] <= base["index"]["ram_bytes"]
    # a slow disk: the add and the recall check each read the 1.152 GB of keys at least once
    slow = P.make_plan(opts(ranks=1), {**TP, "index": {**TP["index"], "read_bytes_per_s": 1e7}})["stages"]
    assert slow["index"]["seconds"] == pytest.approx(20.24 + 115.2 + 115.2)
    # auto storage: disk once the lists pass --ondisk-min-gb
    assert P.make_plan(opts(ondisk_min_gb=0.01), TP)["inputs"]["index"]["storage"] == "disk"
    assert P.make_plan(opts(), TP)["inputs"]["index"]["storage"] == "ram"
    # a separate memory-input site stores a second fp16 copy of the rows
    sep = P.make_plan(opts(separate_mem_site=True), TP)["stages"]
    assert sep["datastore"]["disk_bytes"] == 2 * 1_152_000_000 + 4_000_000
    # Flat and IVF-Flat sizes
    flat = P.make_plan(opts(index_factory="Flat"), TP)["stages"]["index"]
    assert flat["disk_bytes"] == 1_000_000 * 576 * 4
    ivf = P.make_plan(opts(index_factory="IVF1024,Flat"), TP)["stages"]["index"]
    assert ivf["disk_bytes"] == 1_000_000 * (576 * 4 + 8) + 1024 * 576 * 4


def test_default_mean_nnz_and_memory_ratio():
    plan = P.make_plan(opts(mean_nnz=None, memory_params=None, memory_ratio=0.5, k=512), TP)
    assert plan["inputs"]["mean_nnz"] == pytest.approx(266.3 / 2)  # the source's 266.3 at k=1024, scaled by k
    assert plan["inputs"]["memory_params"] == 50_000_000


def test_model_configs_of_the_recipes():
    """Parameter estimates from the shipped HF configs match the published counts."""
    gpt2 = P.read_model_config(str(RECIPES / "gpt2-large.json"))
    assert P.estimate_params(gpt2) == 774_030_080  # HF gpt2-large
    assert P.estimate_params(P.read_model_config(str(RECIPES / "llama-2-7b.json"))) == 6_738_415_616
    assert P.estimate_params(P.KNOWN_MODELS["smollm2-135m"]) == 134_515_008


def test_a_folder_without_config_json_is_an_error(tmp_path):
    with pytest.raises(MLPMemError, match="no config.json"):
        P.read_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10}))
    assert P.read_model_config(str(tmp_path))["hidden_size"] == 8


def test_auto_factory_follows_the_index_rule():
    from mlpmemory.index import choose_factory

    plan = P.make_plan(opts(index_factory="auto", tokens=50e6 + 1), TP)
    assert plan["inputs"]["index"]["factory"] == choose_factory(50_000_000, 576, train_samples=200_000)
    assert plan["inputs"]["index"]["nlist"] == 4096  # 200k training keys: at most 200k / 39 lists
    more = P.make_plan(opts(index_factory="auto", tokens=1e9 + 1, train_samples=5_000_000), TP)["inputs"]["index"]
    assert more["nlist"] == 65_536 and more["factory"] == choose_factory(10**9, 576, train_samples=5_000_000)


def test_throughputs_file_and_from_run(tmp_path):
    f = tmp_path / "tp.json"
    f.write_text(json.dumps({"throughputs": {"train": {"rows_per_s": 200.0}}}))  # the scale_sim.json shape
    tp = P.read_throughputs(str(f))
    assert tp["train"]["rows_per_s"] == 200.0 and tp["train"]["memory_params"] == P.DEFAULTS["train"]["memory_params"]
    f.write_text(json.dumps({"train": {"rows_per_s": "fast"}}))
    with pytest.raises(MLPMemError, match="train.rows_per_s"):
        P.read_throughputs(str(f))

    run = tmp_path / "run"
    for stage, manifest in {
        "datastore": {"n": 99_999, "n_tokens": 100_000, "dim": 576},
        "index": {"n": 99_999, "factory": "IVF512,PQ64x8", "params": {"nlist": 512, "nprobe": 32},
                  "train_seconds": 5.12, "add_seconds": 10.0, "settings": {"train_samples": 200_000}},
        "targets": {"n": 99_999, "k": 1024, "mean_nnz": 300.0, "queries_per_s": 2000.0, "search_seconds": 50.0,
                    "settings": {"nprobe": 32}},
        "memory": {"rows_per_s_this_session": 600.0, "memory_params": 40_000_000},
    }.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps(manifest))
    timings = {"datastore": 200.0, "index": 16.0, "targets": 150.0, "memory": 170.0}
    (run / "timings.json").write_text(json.dumps(timings))
    (run / "config.json").write_text(json.dumps({"run": {"model": "smollm2-135m"}}))
    tp = P.throughputs_from_run(str(run), ref_params=134_515_008)
    assert tp["datastore"]["rows_per_s"] == pytest.approx(99_999 / 200.0)
    assert tp["index"]["train_seconds_per_list"] == pytest.approx(0.01)
    assert tp["index"]["add_rows_per_s"] == pytest.approx(9_999.9)
    assert tp["search"]["seconds_per_scanned_code"] == pytest.approx((1 / 2000) / (32 * 99_999 / 512))
    assert tp["targets_post"]["rows_per_s"] == pytest.approx(99_999 / 100.0)
    assert tp["train"] == {"rows_per_s": 600.0, "memory_params": 40_000_000}
    # --from-run alone: the run's corpus size and model (SmolLM2-135M, known without a download)
    plan = P.plan_for(P.Options(from_run=str(run)))
    assert plan["inputs"]["rows"] == 99_999 and plan["inputs"]["model"]["params"] == 134_515_008
    assert plan["inputs"]["mean_nnz"] == pytest.approx(300.0)
    # the run's own model and throughputs reproduce its datastore and training times
    assert plan["stages"]["datastore"]["seconds"] == pytest.approx(200.0)
    assert plan["stages"]["train"]["seconds"] == pytest.approx(99_999 / (600.0 * 40e6 / 134_515_008))


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_table_and_json(capsys, tmp_path):
    f = tmp_path / "tp.json"
    f.write_text(json.dumps(TP))
    argv = ["plan", "--tokens", "1000001", "--hidden-size", "576", "--vocab-size", "49152", "--params", "1e8",
            "--index-factory", "IVF1024,PQ64x8", "--memory-params", "1e8", "--mean-nnz", "250", "--ranks", "2",
            "--throughputs", str(f), "--run-dir", str(tmp_path / "no-run")]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    assert out.splitlines()[2].split("|")[0].strip() == "stage"
    assert "1.2 GB" in out and "| 8.3 min" in out  # the datastore's 1.156 GB and 500 s
    assert not (tmp_path / "no-run").exists()  # no run directory needed, none created
    code, out, err = run_cli(capsys, [*argv, "--json"])
    data = json.loads(out)
    assert data["stages"]["datastore"]["disk_bytes"] == 1_156_000_000


def test_cli_subprocess_recipe_config():
    r = subprocess.run([sys.executable, "-m", "mlpmemory.cli", "plan", "--tokens", "116e6", "--model-config",
                        str(RECIPES / "gpt2-large.json"), "--json"], capture_output=True, text=True, cwd=ROOT,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["inputs"]["model"]["params"] == 774_030_080
    assert data["stages"]["datastore"]["disk_bytes"] == (116_000_000 - 1) * (1280 * 2 + 4)


@pytest.mark.parametrize("extra,needle", [
    (["--tokens", "2"], "--tokens must be >= 3"),
    (["--tokens", "nan"], "--tokens"),
    (["--tokens", "1e999"], "--tokens"),
    (["--tokens", "1e6", "--memory-ratio", "0"], "--memory-ratio"),
    (["--tokens", "1e6"], "give the base model"),
    (["--tokens", "1e6", "--model-config", "/nonexistent/x.json"], "no config.json"),
    (["--tokens", "1e6", "--hidden-size", "576", "--vocab-size", "10", "--params", "1e6", "--index-factory", "HNSW32"],
     "--index-factory"),
    (["--tokens", "1e6", "--hidden-size", "576", "--vocab-size", "10", "--params", "1e6", "--index-factory", "Flat",
      "--index-storage", "disk"], "--index-storage"),
    (["--tokens", "1e6", "--hidden-size", "576", "--vocab-size", "10", "--params", "1e6", "--k", "8",
      "--mean-nnz", "9"], "--mean-nnz"),
    (["--tokens", "1e6", "--hidden-size", "576", "--vocab-size", "10", "--params", "1e6", "--throughputs",
      "/nonexistent.json"], "--throughputs"),
    (["--from-run", "/nonexistent/run"], "--from-run"),
])
def test_bad_input_is_one_line(capsys, tmp_path, extra, needle):
    code, out, err = run_cli(capsys, ["plan", *extra, "--run-dir", str(tmp_path / "run")])
    lines = [ln for ln in err.splitlines() if ln.startswith("mlpmem")]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "run").exists()


def test_without_tokens_it_plans_the_run(capsys, tmp_path):
    """No --tokens / --from-run: the run directory's corpus and model, so a missing run is the usual error."""
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, ["plan", "--run-dir", str(tmp_path / "file")])
    assert code == 2 and str(tmp_path / "file") in err and "no config.json" in err


def test_library_validate_does_not_exit():
    """Only the CLI dispatcher's validation prints and exits; a library caller gets the options back."""
    o = P.Options(tokens=1e6, hidden_size=8, vocab_size=10, params=1e6)
    assert o.validate() is o


def test_scale_sim_fit_is_a_throughputs_file(tmp_path):
    """benchmarks/scale_sim.py's fitted section reads back as --throughputs (same schema, no unknown keys)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale_sim
    finally:
        sys.path.pop(0)
    rows = [{"n": n, "factory": f"IVF{nl},PQ64x8", "nlist": nl, "threads": 1, "faiss": "x", "k": 1024, "nprobe": 32,
             "queries": 1000, "train_seconds": 99.0, "add_seconds": 99.0, "search_seconds": 99.0,  # (wall: contended)
             "cpu_seconds": {"train": 10.0 + 0.01 * nl, "add": n / 5000.0},
             "search_cpu_seconds": 1000 * (1e-3 + 1e-7 * 32 * n / nl), "post_cpu_seconds": 1000 / 3000.0,
             "scanned_codes_per_query": 32 * n / nl, "targets_post_rows_per_s": 3000.0, "mean_nnz": 900.0,
             "train_samples": 200_000} for n, nl in ((200_000, 2048), (1_000_000, 4096))]
    fit = scale_sim.fit_throughputs(rows)
    assert fit["search"]["seconds_per_query"] == pytest.approx(1e-3)
    assert fit["search"]["seconds_per_scanned_code"] == pytest.approx(1e-7)
    assert fit["index"]["train_seconds_per_list"] == pytest.approx(0.01)
    assert fit["index"]["add_rows_per_s"] == pytest.approx(5000.0)
    assert fit["targets_post"]["rows_per_s"] == pytest.approx(3000.0)
    for section, values in fit.items():
        if isinstance(values, dict):
            assert set(values) <= set(P.DEFAULTS[section]), section
    f = tmp_path / "scale_sim.json"
    f.write_text(json.dumps({"rows": rows, "throughputs": fit}))
    tp = P.read_throughputs(str(f))
    assert tp["targets_post"]["mean_nnz"] == P.DEFAULTS["targets_post"]["mean_nnz"]  # not the synthetic one
    assert tp["search"]["seconds_per_scanned_code"] == pytest.approx(1e-7)


FUZZ_VALUES = ["", "abc", "-1", "0", "1", "2", "0.5", "1e308", "nan", "inf", "99999999999999999999", "/", ".",
               "auto", "disk", "IVF8,PQ3x8", "True"]


def test_fuzz_plan_options(capsys, tmp_path):
    """Random option values: a plan or a one-line error (status 2), never a traceback, never a file written."""
    import random
    from dataclasses import fields

    rng = random.Random(5)
    names = [f.name for f in fields(P.Options)]
    for i in range(120):
        argv = ["plan"]
        for name in rng.sample(names, rng.randint(1, 5)):
            argv.append(f"--{name.replace('_', '-')}={rng.choice(FUZZ_VALUES)}")
        code, out, err = run_cli(capsys, [*argv, "--run-dir", str(tmp_path / f"run{i}")])
        assert "Traceback" not in err and code in (0, 2), (argv, err)
        if code == 2:
            assert len([ln for ln in err.splitlines() if ln.startswith("mlpmem")]) == 1, (argv, err)
        assert not (tmp_path / f"run{i}").exists()


def test_plan_of_the_run_dir_itself(capsys, tmp_path):
    """No --tokens / --from-run: the dispatcher opens --run-dir and the plan takes its corpus, model and times."""
    from mlpmemory.config import Config

    run = tmp_path / "run"
    (run / "datastore").mkdir(parents=True)
    cfg = Config().to_dict()
    cfg["run"]["run_dir"], cfg["run"]["model"] = str(run), "smollm2-135m"
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "datastore" / "manifest.json").write_text(json.dumps({"n": 99_999, "n_tokens": 100_000, "dim": 576}))
    (run / "timings.json").write_text(json.dumps({"datastore": 100.0}))
    code, out, err = run_cli(capsys, ["plan", "--run-dir", str(run), "--json"])
    assert code == 0, err
    plan = json.loads(out)
    assert plan["inputs"]["rows"] == 99_999 and plan["inputs"]["model"]["source"] == "smollm2-135m"
    assert plan["stages"]["datastore"]["seconds"] == pytest.approx(100.0)  # the run's own datastore rate
