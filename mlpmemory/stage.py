"""The skeleton every stage follows: identity -> already complete? -> resume? -> build -> manifest last.

A stage (corpus, datastore, index, targets, memory) lives in one directory and is described by
its *identity*: the settings and input fingerprints that must match for an existing build to be
reused. :func:`run_stage` is the whole protocol:

1. a complete build with the same identity is returned as it is (nothing is read or locked);
2. a complete build with another identity is refused with a one-line error naming the first
   differing setting (use another ``--run-dir`` or delete the directory), or rebuilt where the
   stage says so (``on_mismatch="rebuild"``);
3. otherwise the stage's lock is taken (a second process waits, or gives up after ``timeout``),
   the check is repeated (the other process may have finished it meanwhile), and ``build`` runs;
   a partial build resumes from the progress record it saved with :meth:`Stage.save_progress`
   when that record has the same identity (:meth:`Stage.resume`);
4. the manifest is written last, so an interrupted build never looks complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import distributed
from .errors import MLPMemError
from .io import (
    MANIFEST,
    atomic_write_json,
    file_checksums,
    is_complete,
    read_json,
    remove_path,
    stage_lock,
    write_manifest,
)
from .log import logger


class Stage:
    """One stage directory and the identity its artifacts must have.

    ``view`` maps a manifest to the dict compared with ``identity`` (default: the manifest's top
    level); keys in ``ignore`` are not compared for a complete build (e.g. a batch size that does
    not change the result but does change how a partial build resumes). ``files`` maps the
    manifest fields to the stage's files (relative paths) whose size and sha256 the manifest
    records under ``checksums`` (checked by ``mlpmem verify``, and on load where cheap).
    """

    def __init__(self, directory: str | os.PathLike, identity: dict, what: str, *,
                 view: Callable[[dict], dict] | None = None, ignore: tuple[str, ...] = (),
                 on_mismatch: str = "error", timeout: float | None = None,
                 files: Callable[[dict], list[str]] | None = None):
        if on_mismatch not in ("error", "rebuild"):
            raise ValueError(f"on_mismatch must be 'error' or 'rebuild', got {on_mismatch!r}")
        self.dir, self.identity, self.what = Path(directory), dict(identity), what
        self.view, self.ignore = view or (lambda m: m), tuple(ignore)
        self.on_mismatch, self.timeout, self.files = on_mismatch, timeout, files

    def difference(self, found: dict, compare: dict | None = None, ignore: tuple[str, ...] = ()) -> str | None:
        """``"key=old but now key=new"`` for the first key of ``compare`` (default: the identity) that differs."""
        for key, value in (self.identity if compare is None else compare).items():
            if key not in ignore and found.get(key) != value:
                return f"{key}={found.get(key)!r} but now {key}={value!r}"
        return None

    def mismatch_error(self, diff: str, where: str = "") -> MLPMemError:
        return MLPMemError(f"{self.what} at {self.dir}{where} was built with {diff}; "
                           f"use a different --run-dir or delete {self.dir} to rebuild it")

    def done(self) -> dict | None:
        """The manifest of a complete build with this identity; None when there is none (or it is to be rebuilt)."""
        if not is_complete(self.dir):
            return None
        manifest = read_json(self.dir / MANIFEST)
        diff = self.difference(self.view(manifest), ignore=self.ignore)
        if diff is None:
            return manifest
        if self.on_mismatch == "error":
            raise self.mismatch_error(diff)
        logger.warning(f"{self.what} at {self.dir} was built with {diff}; rebuilding it")
        return None

    def resume(self, name: str, key: str = "settings", compare: dict | None = None,
               restart: bool = True) -> dict | None:
        """The progress record ``name`` of a partial build, when its ``key`` equals the identity.

        A record of another identity is dropped (``restart``: start over, with a note) or refused.
        """
        path = self.dir / name
        if not path.exists():
            return None
        record = read_json(path)
        diff = self.difference(record.get(key) or {}, compare)
        if diff is None:
            return record
        if not restart:
            raise self.mismatch_error(diff, f" (unfinished: {name})")
        logger.warning(f"{self.dir}: settings changed since the interrupted build; starting over")
        return None

    def save_progress(self, name: str, state: dict, key: str = "settings", compare: dict | None = None) -> None:
        """Record how far a partial build got, with the identity it was made with (atomically)."""
        atomic_write_json(self.dir / name, {**state, key: self.identity if compare is None else compare})

    def finish(self, fields: dict) -> dict:
        """Write the manifest (the last file of the stage), with the checksums of the stage's ``files``."""
        if self.files is not None:
            recorded = {name: rec for name, rec in (fields.get("checksums") or {}).items()
                        if (self.dir / name).is_file()}  # e.g. a shard's, hashed when it was written
            missing = [name for name in self.files(fields) if name not in recorded]
            fields = {**fields, "checksums": {**recorded, **file_checksums(self.dir, missing)}}
        return write_manifest(self.dir, fields)

    def lock(self):
        return stage_lock(self.dir, self.timeout, f"{self.what} at {self.dir}")

    def sweep_temporaries(self) -> None:
        """Remove the ``*.tmp*`` leftovers of a killed build (only while holding the lock)."""
        for leftover in sorted(self.dir.glob("*.tmp*")):
            remove_path(leftover)


def run_stage(stage: Stage, build: Callable[[], dict | None],
              verify: Callable[[dict], bool] | None = None, parallel: bool = False) -> dict:
    """Return the stage's finished manifest, building (or resuming) it under the stage lock first if needed.

    ``build`` writes the stage's files and returns the manifest fields (None: it stopped early
    without finishing, and ``{}`` is returned). ``verify`` may look at a complete, matching build
    and return False to have it rebuilt (e.g. a truncated file).

    Under torchrun (:mod:`mlpmemory.distributed`): a ``parallel`` stage runs ``build`` on every
    rank (each writes its own part; rank 0 holds the lock and writes the manifest once all are
    done); any other stage is built by rank 0 while the others wait, then found complete by them.
    """
    if not distributed.is_distributed():
        return _run_stage_here(stage, build, verify)
    if not parallel:
        return distributed.main_first(lambda: _run_stage_here(stage, build, verify))
    return _run_stage_parallel(stage, build, verify)


def _run_stage_here(stage: Stage, build, verify) -> dict:
    found = _reusable(stage, verify)
    if found is not None:
        return found
    with stage.lock():
        found = _reusable(stage, verify)  # another process may have finished it while we waited
        if found is not None:
            return found
        stage.dir.mkdir(parents=True, exist_ok=True)
        stage.sweep_temporaries()
        fields = build()
        return {} if fields is None else stage.finish(fields)


def _run_stage_parallel(stage: Stage, build, verify) -> dict:
    from contextlib import nullcontext

    found = _reusable(stage, verify)  # every rank decides alike: nothing is written before the barrier below
    distributed.barrier()
    if found is not None:
        return found
    main = distributed.is_main()
    with stage.lock() if main else nullcontext():  # rank 0's lock keeps other jobs out
        if main:
            found = _reusable(stage, verify)
            if found is None:
                stage.dir.mkdir(parents=True, exist_ok=True)
                stage.sweep_temporaries()
        if distributed.broadcast_flag(found is not None):  # another job finished it while rank 0 waited
            return found if main else _reusable(stage, verify)
        fields = build()
        distributed.barrier()  # every rank's part is on disk
        manifest = stage.finish(fields) if main and fields is not None else None
        distributed.barrier()
    if fields is None:
        return {}
    return manifest if main else read_json(stage.dir / MANIFEST)


def _reusable(stage: Stage, verify) -> dict | None:
    found = stage.done()
    if found is not None and verify is not None and not verify(found):
        return None
    return found
