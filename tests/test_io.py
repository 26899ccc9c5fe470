"""The I/O module and the stage skeleton: atomic writes, locks, complete / mismatch / resume."""

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from mlpmemory import cache
from mlpmemory.errors import MLPMemError
from mlpmemory.io import (
    atomic_path,
    atomic_write_json,
    is_complete,
    lock_path,
    read_manifest,
    read_raw_array,
    stage_lock,
    write_raw_array,
)
from mlpmemory.stage import Stage, run_stage

# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})  # fails while serialising
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')  # a partial write, then a crash
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "big.json"
    payloads = [{"x": [i] * 200_000} for i in range(2)]
    atomic_write_json(path, payloads[0])
    stop, seen = threading.Event(), []

    def read():
        while not stop.is_set():
            seen.append(json.loads(path.read_text())["x"][0])  # a torn file would not parse

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(6):
            atomic_write_json(path, payloads[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= {0, 1}


def test_raw_arrays_round_trip_and_size_check(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_raw_array(tmp_path / "a.f16", arr, np.float16)
    assert (tmp_path / "a.f16").stat().st_size == 4 * 3 * 2
    np.testing.assert_array_equal(read_raw_array(tmp_path / "a.f16", np.float16, (4, 3)), arr)
    with pytest.raises(MLPMemError, match="truncated"):
        read_raw_array(tmp_path / "a.f16", np.float16, (5, 3))


# ---------------------------------------------------------------------------------------------
# Locks (real filelock, held by another process or thread)
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from mlpmemory.io import stage_lock
    with stage_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold_in_subprocess(stage_dir, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(stage_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_refuses_with_a_timeout(tmp_path):
    stage_dir = tmp_path / "run" / "datastore"
    proc = _hold_in_subprocess(stage_dir, 30)
    try:
        with pytest.raises(MLPMemError) as e:
            with stage_lock(stage_dir, timeout=0.2):
                pass
    finally:
        proc.kill()
        proc.wait()
    msg = str(e.value)
    assert "\n" not in msg and str(lock_path(stage_dir)) in msg and "another process" in msg
    assert not stage_dir.exists()  # the lock lives beside the stage directory, never inside it
    with stage_lock(stage_dir, timeout=5):  # released by the OS when its holder died (kill -9)
        pass


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_second_process_waits_and_says_so(tmp_path):
    stage_dir = tmp_path / "corpus"
    records = _Records()
    logging.getLogger("mlpmemory").addHandler(records)  # the CLI's handler may stop propagation to the root
    try:
        proc = _hold_in_subprocess(stage_dir, 1.0)
        with stage_lock(stage_dir):
            assert proc.wait(timeout=5) == 0  # the holder finished before we got the lock
    finally:
        logging.getLogger("mlpmemory").removeHandler(records)
    assert any("waiting for another process" in m and str(lock_path(stage_dir)) in m for m in records.messages)


def test_a_thread_waits_for_the_holder(tmp_path):
    order = []
    held = threading.Event()

    def holder():
        with stage_lock(tmp_path / "s"):
            held.set()
            time.sleep(0.3)
            order.append("holder done")

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    with stage_lock(tmp_path / "s"):
        order.append("second in")
    t.join()
    assert order == ["holder done", "second in"]


def test_download_cache_is_locked(tmp_path, monkeypatch):
    """Two processes (here threads) fetching the same file: one downloads, the other waits and reuses it."""
    monkeypatch.setenv("MLPMEM_CACHE", str(tmp_path / "cache"))
    calls = []

    def slow_download(package, version, dest):
        calls.append(package)
        time.sleep(0.3)
        out = dest / f"{package}-{version}.tar.gz"
        out.write_bytes(b"archive")
        return out

    monkeypatch.setattr(cache, "_download", slow_download)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch_pypi_distribution("pkg", "1.0")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["pkg"] and len(results) == 2 and results[0] == results[1]


# ---------------------------------------------------------------------------------------------
# The stage skeleton
# ---------------------------------------------------------------------------------------------


def _stage(tmp_path, **identity):
    return Stage(tmp_path / "stage", {"model": "m1", "block": 16, **identity}, "test stage")


def test_complete_and_matching_returns_without_work(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"model": "m1", "block": 16, "rows": 7}

    m1 = run_stage(_stage(tmp_path), build)
    assert m1["rows"] == 7 and m1["complete"] and calls == [1]
    assert run_stage(_stage(tmp_path), build) == m1 and calls == [1]


def test_complete_with_other_identity_is_refused_or_rebuilt(tmp_path):
    run_stage(_stage(tmp_path), lambda: {"model": "m1", "block": 16})
    with pytest.raises(MLPMemError) as e:
        run_stage(_stage(tmp_path, block=32), lambda: pytest.fail("must not build"))
    msg = str(e.value)
    assert "block=16 but now block=32" in msg and "--run-dir" in msg and "delete" in msg and "\n" not in msg
    stage = Stage(tmp_path / "stage", {"model": "m1", "block": 32}, "test stage", on_mismatch="rebuild")
    assert run_stage(stage, lambda: {"model": "m1", "block": 32})["block"] == 32


def test_ignored_keys_and_verify(tmp_path):
    run_stage(_stage(tmp_path, batch=4), lambda: {"model": "m1", "block": 16, "batch": 4})
    stage = Stage(tmp_path / "stage", {"model": "m1", "block": 16, "batch": 8}, "test stage", ignore=("batch",))
    assert run_stage(stage, lambda: pytest.fail("must not build"))["batch"] == 4
    rebuilt = run_stage(stage, lambda: {"model": "m1", "block": 16, "batch": 8}, verify=lambda m: False)
    assert rebuilt["batch"] == 8


def test_partial_build_resumes_with_the_same_identity(tmp_path):
    done = []

    def build(stage, crash_at=None):
        start = (stage.resume("progress.json") or {}).get("steps", 0)
        for step in range(start, 4):
            if step == crash_at:
                raise KeyboardInterrupt("killed")
            done.append(step)
            stage.save_progress("progress.json", {"steps": step + 1})
        return dict(stage.identity)

    stage = _stage(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, lambda: build(stage, crash_at=2))
    assert not is_complete(stage.dir) and done == [0, 1]
    (stage.dir / "part.bin.tmp1234").write_bytes(b"junk")  # a killed write
    run_stage(stage, lambda: build(stage))
    assert done == [0, 1, 2, 3] and read_manifest(stage.dir)["complete"]
    assert not list(stage.dir.glob("*.tmp*"))


def test_partial_build_of_another_identity_restarts_or_is_refused(tmp_path):
    stage = _stage(tmp_path)
    stage.dir.mkdir()
    stage.save_progress("progress.json", {"steps": 3})
    other = _stage(tmp_path, block=32)
    assert other.resume("progress.json") is None  # starts over
    with pytest.raises(MLPMemError, match="unfinished: progress.json.*block=16 but now block=32"):
        other.resume("progress.json", restart=False)
    assert stage.resume("progress.json")["steps"] == 3


def test_build_that_stops_early_writes_no_manifest(tmp_path):
    stage = _stage(tmp_path)
    assert run_stage(stage, lambda: None) == {}
    assert not is_complete(stage.dir)
