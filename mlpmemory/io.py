"""Files: atomic writes, raw arrays, hashes, manifests and locks, shared by every stage.

- **Atomic writes.** Everything a later run trusts is written under a temporary name next to
  its final path, flushed to disk (``fsync``), then renamed over it: readers see the old file or
  the complete new one, never a half-written file. :func:`atomic_path` does this for anything a
  library writes itself (FAISS, safetensors, a whole folder); the ``atomic_write_*`` helpers
  cover JSON, text, bytes and arrays.
- **Manifests last.** Every stage directory holds a ``manifest.json``, written last, carrying
  ``"complete": true`` only when every file of the stage is final, so a half-written stage never
  looks complete. Loading compares the fields that must agree (model fingerprint, tokenizer,
  capture site, dims, corpus hash ...) and refuses with a one-line error naming the first
  mismatch.
- **Checksums.** A manifest records the size and sha256 of its stage's files (``checksums``,
  :func:`file_checksums`) and a hash of its own fields (``manifest_sha256``), so same-size
  corruption is noticed: loads check the small files (:func:`check_checksums`), ``mlpmem verify``
  everything.
- **Locks.** Two processes building the same stage (or downloading the same file) would write
  the same files: :func:`file_lock` / :func:`stage_lock` make the second one wait, saying so,
  or give up after ``timeout`` seconds with an :class:`MLPMemError` naming the lock file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from . import __version__
from .errors import MLPMemError

MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"
logger = logging.getLogger("mlpmemory")

__all__ = [
    "MANIFEST", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
    "atomic_write_array", "write_raw_array", "read_raw_array", "fsync_path", "remove_path", "read_json",
    "write_manifest", "read_manifest", "is_complete", "check_fields", "check_file_size", "sha256_json", "sha256_file",
    "file_checksums", "checksum_problem", "check_checksums", "sha256_verified", "record_verified", "VERIFIED_SUFFIX",
    "manifest_digest", "MANIFEST_SHA256",
    "file_lock", "stage_lock", "lock_path",
]


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file or a folder tree, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike, recursive: bool = True) -> None:
    """Flush a file, or a folder (with every file below it unless not ``recursive``), to disk."""
    path = Path(path)
    if recursive and path.is_dir():
        for child in sorted(path.iterdir()):
            fsync_path(child)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write (a file or a folder); renamed to ``path`` on success.

    On an exception the temporary is removed and ``path`` is left as it was. An existing *folder*
    at ``path`` cannot be replaced by a rename: remove it first (or swap it, as checkpoints do).
    Temporaries are named ``<name>.tmp<pid>``, so a stage can sweep a killed run's leftovers
    with ``glob("<name>.tmp*")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_path(path.parent, recursive=False)  # the rename itself


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that readers see either the old file or the complete new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, sorted keys, final newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_array(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a ``.npy`` file (no pickle) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def write_raw_array(path: str | os.PathLike, arr: np.ndarray, dtype) -> None:
    """Write ``arr`` as raw little-endian C-order bytes of ``dtype`` (no header), atomically."""
    data = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
    with atomic_path(path) as tmp:
        data.tofile(tmp)


def read_raw_array(path: str | os.PathLike, dtype, shape: tuple[int, ...], what: str = "array") -> np.ndarray:
    """A read-only memmap of a raw array written by :func:`write_raw_array`, its size checked first."""
    dtype = np.dtype(dtype)
    check_file_size(path, int(np.prod(shape)) * dtype.itemsize, what)
    if not shape or shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


# ---------------------------------------------------------------------------------------------
# JSON, manifests, checks
# ---------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise MLPMemError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise MLPMemError(f"{path} is not valid JSON ({e}); delete the stage directory and rebuild it") from None


def write_manifest(stage_dir: str | os.PathLike, fields: dict, complete: bool = True) -> dict:
    """Write ``manifest.json`` with ``complete``, the package version and ``manifest_sha256`` (a hash of
    every other field, so ``mlpmem verify`` notices an edited or corrupted manifest)."""
    data = dict(fields)
    data["complete"] = bool(complete)
    data["package_version"] = __version__
    data.pop(MANIFEST_SHA256, None)
    data[MANIFEST_SHA256] = manifest_digest(data)
    atomic_write_json(Path(stage_dir) / MANIFEST, data)
    return data


def manifest_digest(manifest: dict) -> str:
    """The hash a manifest records of itself: every field but ``manifest_sha256``, as stored in JSON."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    return sha256_json(json.loads(json.dumps(body)))  # as read back: tuples are lists, keys are strings


def read_manifest(stage_dir: str | os.PathLike, what: str = "artifact") -> dict:
    """The manifest of a finished stage, or a clear error if it is missing or unfinished."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        raise MLPMemError(f"{what} at {stage_dir} has no {MANIFEST}: build it first")
    data = read_json(path)
    if not data.get("complete"):
        raise MLPMemError(f"{what} at {stage_dir} is incomplete (interrupted?); re-run its stage to finish it")
    return data


def is_complete(stage_dir: str | os.PathLike) -> bool:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return False
    try:
        with open(path) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def check_fields(found: dict, expected: dict, keys: Iterable[str], what: str) -> None:
    """Refuse when a stored artifact was produced with different settings than the current ones."""
    for key in keys:
        if key not in expected:
            continue
        if found.get(key) != expected[key]:
            raise MLPMemError(
                f"{what} was built with {key}={found.get(key)!r} but now {key}={expected[key]!r}; "
                f"use a different --run-dir or delete {what} to rebuild it"
            )


def check_file_size(path: str | os.PathLike, expected_bytes: int, what: str) -> None:
    """Detect truncated or padded binary files before they are memory-mapped."""
    path = Path(path)
    if not path.exists():
        raise MLPMemError(f"{what}: {path} is missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise MLPMemError(
            f"{what}: {path} has {size} bytes but its manifest says {expected_bytes}; "
            "the file is truncated or corrupted, rebuild the stage"
        )


def file_checksums(directory: str | os.PathLike, names: Iterable[str]) -> dict:
    """``{name: {"bytes": size, "sha256": hash}}`` of files below ``directory`` (names relative to it):
    what a manifest records so that same-size corruption is noticed (one extra read of each file)."""
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
            for name in names}


def checksum_problem(directory: str | os.PathLike, name: str, record: dict, hash_content: bool = True) -> str | None:
    """What is wrong with one recorded file (missing, another size, another sha256), or None."""
    path = Path(directory) / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if record.get("bytes") is not None and size != int(record["bytes"]):
        return f"{path} has {size} bytes but its manifest says {record['bytes']} (truncated or corrupted)"
    if hash_content and record.get("sha256") and sha256_file(path) != record["sha256"]:
        return f"{path} does not match the sha256 in its manifest (corrupted)"
    return None


def check_checksums(directory: str | os.PathLike, manifest: dict, names: Iterable[str], what: str) -> None:
    """Refuse files whose content differs from the checksums their manifest recorded (none recorded: no check)."""
    recorded = manifest.get("checksums") or {}
    for name in names:
        if name in recorded and (problem := checksum_problem(directory, name, recorded[name])):
            raise MLPMemError(f"{what}: {problem}; delete {directory} and re-run its stage to rebuild it")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, full: bool = False) -> str:
    """sha256 of a file's bytes: 16 hex digits (an identity), or all 64 with ``full`` (to check a pin)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


VERIFIED_SUFFIX = ".sha256-verified"  # beside a checked file: its size, mtime and digest (a fast path on reuse)


def _stamp(path: Path, expected: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {expected}"


def record_verified(path: str | os.PathLike, expected: str) -> None:
    """Note that ``path`` has sha256 ``expected`` (checked by the caller, e.g. while downloading it)."""
    path = Path(path)
    try:
        atomic_write_text(path.with_name(path.name + VERIFIED_SUFFIX), _stamp(path, expected) + "\n")
    except OSError:  # a read-only directory: the file is simply hashed again next time
        pass


def sha256_verified(path: str | os.PathLike, expected: str) -> bool:
    """Whether ``path``'s sha256 is ``expected`` (16 or 64 hex digits), hashed once: later calls compare
    size and mtime with the record left beside it, so a big file is not re-read on every use."""
    path = Path(path)
    record = path.with_name(path.name + VERIFIED_SUFFIX)
    try:
        if record.read_text().strip() == _stamp(path, expected):
            return True
    except OSError:
        pass
    if sha256_file(path, full=len(expected) == 64) != expected:
        record.unlink(missing_ok=True)
        return False
    record_verified(path, expected)
    return True


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file guarding ``target``: a hidden ``.<name>.lock`` beside it (never inside it)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def file_lock(path: str | os.PathLike, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` (a ``filelock.FileLock``) while the block runs.

    Another process holding it makes this one wait, with a log line saying so; with ``timeout``
    (seconds) it gives up with a one-line :class:`MLPMemError` naming the lock file. The lock is
    released when the holder exits, even on ``kill -9`` (it is an OS lock, not the file's presence).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        limit = "" if timeout is None else f" (up to {timeout:g} s)"
        logger.warning(f"{what}: waiting for another process that holds {path}{limit}")
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise MLPMemError(f"{what} is being built by another process (lock {path} still held after "
                              f"{timeout:g} s); wait for it to finish, or delete {path} if no such process "
                              "is running") from None
    try:
        yield
    finally:
        lock.release()


def stage_lock(stage_dir: str | os.PathLike, timeout: float | None = None, what: str | None = None):
    """The lock of one stage directory (``<run_dir>/.<stage>.lock``); see :func:`file_lock`."""
    return file_lock(lock_path(stage_dir), what or f"stage {stage_dir}", timeout)


def check_name(name: str, what: str) -> str:
    """``name`` when it is safe as one path component (a folder or file name inside a run): letters, digits,
    ``_ . -`` only, not ``.`` or ``..``; else a one-line :class:`MLPMemError` naming ``what`` (e.g. ``--qa-name``)."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or set(name) == {"."}:
        raise MLPMemError(f"{what} must be a plain name (letters, digits, _ . -; not '.' or '..', no '/'), "
                          f"got {name!r}")
    return name
