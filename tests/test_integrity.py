"""Content integrity: checksums recorded when artifacts are written, checked on load where cheap and by
`mlpmem verify` everywhere; same-size corruption of any artifact is named, never silently used."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlpmemory.cli import main
from mlpmemory.errors import MLPMemError
from mlpmemory.evaluate import memory_dir_fingerprint
from mlpmemory.memory import MLPMemory

# artifact -> (file in the run, a command that loads it and must refuse it, or None: verify only)
CORRUPTIONS = {
    "datastore keys": ("datastore/keys.f16", None),
    "index file": ("index/index.faiss", ["generate", "--system", "knn_lm", "--prompt", "the", "--max-new-tokens", "2"]),
    "targets probs": ("targets/shard_00000/probs.npy", ["train"]),
    "memory weights": ("memory/model.safetensors", ["eval-ppl"]),
    "validation lm_logprob": ("tune/lm_logprob.f32", ["eval-ppl"]),
    "test lm_logprob": ("eval_test/lm_logprob.f32", ["eval-ppl"]),
}


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the shared tiny run (never modify the shared one)."""
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def flip(path, where: float = 0.9) -> None:
    """Flip one byte in place (the size stays the same), near ``where`` of the file (past any header)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    path.write_bytes(bytes(data))


def verify(run_dir, capsys) -> tuple[int, str]:
    code = main(["verify", "--run-dir", str(run_dir)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_untouched_run_verifies(run, capsys):
    code, out = verify(run, capsys)
    assert code == 0, out
    lines = out.strip().splitlines()
    for stage in ("corpus", "datastore", "tune", "index", "targets", "memory", "eval_test"):
        line = next(x for x in lines if x.startswith(stage + " "))
        assert "ok (" in line and "checked" in line, line
    assert "all" in lines[-1] and "match" in lines[-1]


@pytest.mark.parametrize("artifact", list(CORRUPTIONS))
def test_flipped_bytes_are_named(run, capsys, artifact):
    rel, command = CORRUPTIONS[artifact]
    flip(run / rel)
    code, out = verify(run, capsys)
    assert code == 2, out
    assert str(run / rel) in out and "corrupted" in out and "Traceback" not in out
    assert sum("FAILED" in line for line in out.splitlines()) == 1, out
    if command is None:
        return
    if command == ["train"]:
        shutil.rmtree(run / "memory")  # the targets' rows are read only while training
    assert main([command[0], "--run-dir", str(run), *command[1:]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mlpmem: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(run / rel) in errors[0] and "corrupted" in errors[0], err


def test_edited_manifest_is_named(run, capsys):
    path = run / "targets" / "manifest.json"
    m = json.loads(path.read_text())
    m["temperature"] = m["temperature"] * 2  # still valid JSON: only its own hash notices
    path.write_text(json.dumps(m))
    code, out = verify(run, capsys)
    assert code == 2 and str(path) in out and "edited or is corrupted" in out


def test_older_manifests_are_not_errors(run, capsys):
    for stage in ("datastore", "memory"):
        path = run / stage / "manifest.json"
        m = json.loads(path.read_text())
        m.pop("checksums"), m.pop("manifest_sha256")
        path.write_text(json.dumps(m))
    code, out = verify(run, capsys)
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("datastore "))
    assert "no checksum recorded (built by an older version)" in line
    (run / "datastore" / "keys.f16").write_bytes(b"\0" * 3)  # sizes are still checked
    code, out = verify(run, capsys)
    assert code == 2 and "keys.f16 has 3 bytes" in out


def test_nan_keys_are_reported_as_corrupted_data(run, capsys):
    keys = run / "datastore" / "keys.f16"
    keys.write_bytes(np.full(keys.stat().st_size // 2, np.nan, np.float16).tobytes())  # same size, all NaN
    shutil.rmtree(run / "memory")
    assert main(["train", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "keys.f16" in err and "--lr" not in err, err


def test_nan_memory_is_a_one_line_error(run, tmp_path, capsys):
    memory = MLPMemory.from_pretrained(run / "memory")
    with torch.no_grad():
        next(memory.parameters()).view(-1)[3] = float("nan")
    memory.save_pretrained(tmp_path / "nan")  # saved as it is: its checksum matches, its values do not
    with pytest.raises(MLPMemError, match=r"model\.safetensors: tensor .* NaN or inf"):
        MLPMemory.from_pretrained(tmp_path / "nan")
    shutil.copy(tmp_path / "nan" / "model.safetensors", run / "memory" / "model.safetensors")
    assert main(["eval-ppl", "--run-dir", str(run)]) == 2  # not a NaN table
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mlpmem: error:")]
    assert len(errors) == 1 and "Traceback" not in err and "NaN or inf" in errors[0], err
    assert str(run / "memory" / "model.safetensors") in errors[0]


def test_two_saves_of_the_same_memory_have_one_fingerprint(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    memory = MLPMemory.from_pretrained(run / "memory")
    memory.save_pretrained(tmp_path / "again")
    fp = memory_dir_fingerprint(run / "memory")
    assert memory_dir_fingerprint(tmp_path / "again") == fp
    # the same tensors written in another order, with other metadata: still the same weights
    with safe_open(str(run / "memory" / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in reversed(list(f.keys()))}
    (tmp_path / "reordered").mkdir()
    save_file(state, str(tmp_path / "reordered" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(run / "memory" / "config.json", tmp_path / "reordered" / "config.json")
    assert memory_dir_fingerprint(tmp_path / "reordered") == fp
    with torch.no_grad():
        next(memory.parameters()).view(-1)[0] += 1.0
    memory.save_pretrained(tmp_path / "changed")
    assert memory_dir_fingerprint(tmp_path / "changed") != fp


def test_corrupted_caches_are_recomputed_not_used(run, capsys):
    report = json.loads((run / "eval" / "ppl.json").read_text())
    caches = [p for p in sorted((run / "eval_test").glob("*.f32")) if p.name != "lm_logprob.f32"]
    assert {p.name.split("_")[0] for p in caches} >= {"mem", "knn", "rag"}
    for p in caches:
        flip(p, 0.5)
    (run / "eval" / "manifest.json").unlink()  # the report is scored again, from the caches
    assert main(["eval-ppl", "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert all(f"{p} does not match its checksum" in err for p in caches), err
    again = json.loads((run / "eval" / "ppl.json").read_text())["test"]["systems"]
    assert {k: (v["ppl"], v["lambda"]) for k, v in again.items()} == {
        k: (v["ppl"], v["lambda"]) for k, v in report["test"]["systems"].items()}  # the same numbers
