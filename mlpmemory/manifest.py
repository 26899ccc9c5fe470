"""Manifests: what produced each artifact, checked again on load.

Every stage directory holds a ``manifest.json``. It is written *last*, atomically (temp file +
rename), and carries ``"complete": true`` only when every file of the stage is final, so a
half-written stage never looks complete. Loading compares the fields that must agree (model
fingerprint, tokenizer, capture site, dims, corpus hash ...) with what the caller has now and
refuses with a one-line error naming the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .errors import MLPMemError

MANIFEST = "manifest.json"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    data = dict(fields)
    data["complete"] = bool(complete)
    data["package_version"] = __version__
    atomic_write_json(Path(stage_dir) / MANIFEST, data)
    return data


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


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()[:16]
