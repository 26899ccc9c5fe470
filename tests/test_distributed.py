"""Scale-out: the same pipeline on 2 ranks (a real torchrun, gloo on CPU) equals 1 process.

The 2-rank jobs run as users run them (``mlpmem run --nproc 2``, which launches torchrun), on a
tiny model and synthetic text. What must hold: the datastore files are byte-identical, the index
(IVF, added in shards and merged) returns the same neighbours, the target shards are
byte-identical, the DDP-trained memory equals the one-process memory within float tolerance, and
a rank killed mid-build resumes to identical files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_run_args, write_docs

from mlpmemory import distributed
from mlpmemory.cli import main
from mlpmemory.datastore import ARRAYS

# IVF: the index is built in shards and merged; batch 301 does not divide over 2 ranks evenly; training in
# float32 (--autocast off): under bf16 autocast (auto on CPUs with fast bf16) half-batches round differently
SETTINGS = ("--index-factory", "IVF8,Flat", "--nprobe", "8", "--memory-preset", "tiny", "--train-batch", "301",
            "--epochs", "1", "--checkpoint-every", "5", "--shard-rows", "700", "--autocast", "off", "--no-rag-ppl")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLPMEM_DIST_TIMEOUT_MIN": "5"}


def _mlpmem(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlpmemory", *args], env=_env(), **kw)


def _run_2_ranks(*args: str) -> None:
    proc = _mlpmem(*args, "--nproc", "2", "-q", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_llama):
    """The same tiny run built by one process (in this one) and by 2 ranks under torchrun."""
    root = tmp_path_factory.mktemp("dist")
    write_docs(root / "docs.jsonl", 60)
    one, two = root / "one", root / "two"
    assert main(["run", *tiny_run_args(one, tiny_llama.path, root / "docs.jsonl", *SETTINGS)]) == 0
    _run_2_ranks("run", *tiny_run_args(two, tiny_llama.path, root / "docs.jsonl", *SETTINGS))
    return one, two


def test_spans_cover_every_item_once():
    for n in (0, 1, 5, 31, 1000):
        for parts in (1, 2, 3, 7):
            spans = [distributed.span(n, r, parts) for r in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a <= b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(parts - 1))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_two_rank_datastore_is_byte_identical(two_runs):
    one, two = two_runs
    for stage in ("datastore", "tune", "eval_test"):
        files = [name for name, *_ in ARRAYS.values() if (one / stage / name).exists()]  # not the eval caches
        assert files, stage
        for name in files:
            assert (one / stage / name).read_bytes() == (two / stage / name).read_bytes(), f"{stage}/{name}"
        shards = json.loads((two / stage / "manifest.json").read_text())["shards"]
        assert [s["writer"] for s in shards] == ["rank0", "rank1"]  # one shard per rank, listed
        assert not list((two / stage).glob("progress*"))


def test_two_rank_index_is_sharded_and_finds_the_same_neighbours(two_runs):
    from mlpmemory.datastore import open_datastore
    from mlpmemory.index import load_index

    one, two = two_runs
    m = json.loads((two / "index" / "manifest.json").read_text())
    assert len(m["shards"]) == 2 and m["storage"] == "ram"
    assert not list((two / "index").glob("shard-*")) and not (two / "index" / "trained.faiss").exists()
    q = np.asarray(open_datastore(one / "datastore").keys[:200], dtype=np.float32)
    d1, i1 = load_index(one / "index")[0].search(q, 8)
    d2, i2 = load_index(two / "index")[0].search(q, 8)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_two_rank_targets_are_byte_identical(two_runs):
    one, two = two_runs
    shards = sorted(p.name for p in (one / "targets").glob("shard_*"))
    assert len(shards) >= 2  # split over the ranks
    for shard in shards:
        for f in sorted((one / "targets" / shard).glob("*.npy")):
            assert f.read_bytes() == (two / "targets" / shard / f.name).read_bytes(), f"{shard}/{f.name}"


def test_ddp_training_equals_one_process(two_runs):
    from safetensors.numpy import load_file

    one, two = two_runs
    a, b = load_file(str(one / "memory" / "model.safetensors")), load_file(str(two / "memory" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    ma, mb = (json.loads((r / "memory" / "manifest.json").read_text()) for r in (one, two))
    assert ma["steps"] == mb["steps"] and ma["batch_rows"] == mb["batch_rows"] == 301
    for x, y in zip(ma["log"], mb["log"]):  # the logged loss is the global batch's, on both
        assert x["step"] == y["step"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_two_rank_report_equals_one_process(two_runs):
    one, two = two_runs
    ra, rb = (json.loads((r / "results.json").read_text()) for r in two_runs)
    assert ra["ppl"]["base"] == rb["ppl"]["base"] and ra["ppl"]["knn_lm"] == rb["ppl"]["knn_lm"]
    assert ra["ppl"]["mlp_memory"] == pytest.approx(rb["ppl"]["mlp_memory"], rel=1e-4)
    for r in (ra, rb):
        r["settings"]["run"].pop("run_dir")
    assert ra["settings"] == rb["settings"]  # --nproc is not a run setting


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a rank among the descendants of ``launcher`` (mlpmem --nproc runs torchrun in-process)."""
    todo = list(_children(launcher))
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return pid
        todo += _children(pid)
    return None


def _kill_rank_1_once(args: list[str], marker: Path) -> None:
    """Run ``mlpmem <args> --nproc 2``; SIGKILL rank 1 as soon as ``marker`` exists; the job must fail."""
    proc = _mlpmem(*args, "--nproc", "2", "-q", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and marker.exists(), f"{marker} was never written"
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun stops the job when a rank dies


def test_a_killed_rank_resumes_its_shard_to_identical_files(two_runs, tiny_llama, tmp_path):
    one, _ = two_runs
    def datastore_args(run_dir):  # many small durable steps (batch 1): a kill lands mid-build
        args = tiny_run_args(run_dir, tiny_llama.path, one.parent / "docs.jsonl", "--batch-size", "1",
                             "--max-train-tokens", "1500")
        at = args.index("--k")
        return args[:at] + args[at + 2:]  # a targets setting: the datastore command does not take it

    args = datastore_args(tmp_path / "killed")
    assert main(["datastore", *datastore_args(tmp_path / "reference")]) == 0  # one process, same batches
    _kill_rank_1_once(["datastore", *args], tmp_path / "killed" / "datastore" / "progress-rank1.json")
    assert not (tmp_path / "killed" / "datastore" / "manifest.json").exists()
    _run_2_ranks("datastore", *args)
    for name in ("keys.f16", "values.i32"):
        assert ((tmp_path / "killed" / "datastore" / name).read_bytes()
                == (tmp_path / "reference" / "datastore" / name).read_bytes()), name


def test_a_killed_ddp_training_resumes_from_its_checkpoint(two_runs, tiny_llama, tmp_path):
    import shutil

    _, two = two_runs
    run = tmp_path / "run"
    shutil.copytree(two, run, ignore=shutil.ignore_patterns("memory", "eval*", "results.json", ".*.lock"))
    args = ["train", *tiny_run_args(run, tiny_llama.path, two.parent / "docs.jsonl", *SETTINGS[:-1])]
    _kill_rank_1_once(args, run / "memory" / "checkpoint" / "state.json")
    assert not (run / "memory" / "manifest.json").exists(), "training finished before it could be interrupted"
    _run_2_ranks(*args)
    from safetensors.numpy import load_file

    a, b = load_file(str(two / "memory" / "model.safetensors")), load_file(str(run / "memory" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same 2-rank training, interrupted or not
