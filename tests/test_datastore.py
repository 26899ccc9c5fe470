"""Datastore: rows equal a slow per-window oracle, resume after kill -9 is byte-identical, checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmemory.capture import capture_inputs, resolve_site
from mlpmemory.corpus import sliding_windows
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError


def write_tokens(path: Path, n: int, vocab: int = 300, seed: int = 0) -> Path:
    np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32).tofile(path)
    return path


def oracle_rows(lm, tokens, block, stride, key_site, mem_site):
    """One window at a time, full forward, rows collected in a plain loop."""
    model = lm.model
    ks, ms = resolve_site(model, key_site), resolve_site(model, mem_site)
    keys, mems, vals, lps = [], [], [], []
    for w in sliding_windows(len(tokens), block, stride):
        ids = torch.tensor(tokens[w.begin:w.end], dtype=torch.long)[None]
        with torch.no_grad(), capture_inputs(model, [ks, ms]) as cap:
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for j in range(w.first_target, w.end):
            p = j - 1 - w.begin
            keys.append(cap[ks.module_path][0, p].numpy())
            mems.append(cap[ms.module_path][0, p].numpy())
            vals.append(tokens[j])
            lps.append(logp[p, tokens[j]].item())
    return np.array(keys), np.array(mems), np.array(vals), np.array(lps)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_datastore_rows_equal_oracle(family, tiny_llama, tiny_gpt2, tmp_path):
    lm = tiny_llama if family == "llama" else tiny_gpt2
    tok_path = write_tokens(tmp_path / "t.i32", 203)
    tokens = np.fromfile(tok_path, dtype=np.int32)
    m = build_datastore(lm, tok_path, len(tokens), tmp_path / "ds", key_site="last", mem_site="0.5",
                        block=32, stride=12, batch_size=3, store_lm_logprob=True, progress=False)
    ds = open_datastore(tmp_path / "ds")
    keys, mems, vals, lps = oracle_rows(lm, tokens, 32, 12, "last", "0.5")
    assert m["n"] == ds.n == len(tokens) - 1 == len(vals)
    np.testing.assert_array_equal(ds.values, tokens[1:])
    np.testing.assert_allclose(ds.keys.astype(np.float32), keys, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ds.mem_inputs.astype(np.float32), mems, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ds.lm_logprob, lps, rtol=1e-4, atol=1e-4)
    assert ds.manifest["key_site"]["layer"] == 2 and ds.manifest["mem_site"]["layer"] == 1


def test_rerun_is_noop_and_mismatch_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    tok_path = write_tokens(tmp_path / "t.i32", 120)
    kw = dict(key_site="last", mem_site=None, block=16, stride=8, batch_size=4, progress=False)
    build_datastore(tiny_llama, tok_path, 120, tmp_path / "ds", **kw)
    mtime = (tmp_path / "ds" / "keys.f16").stat().st_mtime_ns
    build_datastore(tiny_llama, tok_path, 120, tmp_path / "ds", **kw)
    assert (tmp_path / "ds" / "keys.f16").stat().st_mtime_ns == mtime
    with pytest.raises(MLPMemError, match="model"):
        build_datastore(tiny_gpt2, tok_path, 120, tmp_path / "ds", **kw)
    with pytest.raises(MLPMemError, match="key_site"):
        build_datastore(tiny_llama, tok_path, 120, tmp_path / "ds", **{**kw, "key_site": "0"})


def test_truncated_or_incomplete_datastore_is_refused(tiny_llama, tmp_path):
    tok_path = write_tokens(tmp_path / "t.i32", 100)
    build_datastore(tiny_llama, tok_path, 100, tmp_path / "ds", mem_site=None, block=16, stride=8, progress=False)
    with open(tmp_path / "ds" / "keys.f16", "r+b") as f:
        f.truncate(100)
    with pytest.raises(MLPMemError, match="truncated"):
        open_datastore(tmp_path / "ds")
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MLPMemError, match="incomplete"):
        open_datastore(tmp_path / "ds")


def test_empty_stream_is_refused(tiny_llama, tmp_path):
    tok_path = write_tokens(tmp_path / "t.i32", 1)
    with pytest.raises(MLPMemError, match="empty"):
        build_datastore(tiny_llama, tok_path, 1, tmp_path / "ds", progress=False)


BUILD_SCRIPT = """
import sys
from mlpmemory.models import load_model
from mlpmemory.datastore import build_datastore
lm = load_model(sys.argv[1], device="cpu", dtype="float32")
build_datastore(lm, sys.argv[2], int(sys.argv[3]), sys.argv[4], key_site="last", mem_site="0.5",
                block=64, stride=32, batch_size=2, progress=False)
"""


def test_resume_after_kill9_gives_identical_files(tiny_llama, tmp_path):
    n = 6000
    tok_path = write_tokens(tmp_path / "t.i32", n)
    args = [sys.executable, "-c", BUILD_SCRIPT, tiny_llama.path, str(tok_path), str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + [str(tmp_path / "clean")], check=True, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + [str(killed)], env=env)
    deadline = time.time() + 120
    while not (killed / "progress-rank0.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the build finished before it could be interrupted"
    done = json.loads((killed / "progress-rank0.json").read_text())["done"]
    assert done and done[0][0] == 0 and done[0][1] >= 1
    with pytest.raises(MLPMemError, match="no manifest"):
        open_datastore(killed)
    subprocess.run(args + [str(killed)], check=True, env=env)
    for name in ("keys.f16", "values.i32", "mem_inputs.f16"):
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert not (killed / "progress-rank0.json").exists()
    a = json.loads((killed / "manifest.json").read_text())
    b = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert a == b


def test_memory_input_at_the_key_site_is_stored_once(tiny_llama, tmp_path):
    tok_path = write_tokens(tmp_path / "t.i32", 80)
    m = build_datastore(tiny_llama, tok_path, 80, tmp_path / "ds", key_site="last", mem_site="-1", block=16,
                        stride=8, progress=False)
    assert "mem_inputs" not in m["arrays"] and not (tmp_path / "ds" / "mem_inputs.f16").exists()
    ds = open_datastore(tmp_path / "ds")
    assert ds.mem_inputs is ds.keys and m["mem_site"] == m["key_site"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stored_lm_logprob_equals_the_models_log_softmax(family, tiny_llama, tiny_gpt2, tmp_path, monkeypatch):
    """lm_logprob = log_softmax(model(window).logits) at the targets, with the head applied to scored rows
    only, a few rows at a time: no (rows, V) buffer beyond the byte budget."""
    import mlpmemory.inference as inf

    lm = tiny_llama if family == "llama" else tiny_gpt2
    vocab = lm.model.config.vocab_size
    shapes, real = [], inf.target_logprobs
    monkeypatch.setattr(inf, "LOGPROB_CHUNK_BYTES", 8 * vocab * 5)  # 5 rows per chunk
    monkeypatch.setattr(inf, "target_logprobs", lambda x, t: (shapes.append(tuple(x.shape)), real(x, t))[1])
    tok_path = write_tokens(tmp_path / "t.i32", 150)
    tokens = np.fromfile(tok_path, dtype=np.int32)
    build_datastore(lm, tok_path, len(tokens), tmp_path / "ds", key_site="last", mem_site=None, block=32, stride=12,
                    batch_size=3, store_lm_logprob=True, progress=False)
    ds = open_datastore(tmp_path / "ds")
    want = []
    for w in sliding_windows(len(tokens), 32, 12):
        ids = torch.tensor(tokens[w.begin:w.end], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0], -1)
        want += [logp[j - 1 - w.begin, tokens[j]].item() for j in range(w.first_target, w.end)]
    np.testing.assert_allclose(ds.lm_logprob, want, rtol=0, atol=1e-5)
    assert shapes and max(s[0] for s in shapes) == 5 and {s[1] for s in shapes} == {vocab}
    assert sum(s[0] for s in shapes) == ds.n
