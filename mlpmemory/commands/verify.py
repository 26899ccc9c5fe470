"""`mlpmem verify`: every finished stage of a run checked against its manifest, file by file.

Each stage's ``manifest.json`` records, when the stage finishes, the size and sha256 of its files
(``checksums``; the index's ``file_sha256``) and a hash of its own fields (``manifest_sha256``).
This command re-reads every file (the big datastore arrays included: that is why loads leave them to
it) and prints one line per stage directory: ``ok``, or what is wrong and what to delete and re-run.
It exits 0 when everything matches and 2 otherwise. Manifests written by older versions carry no
checksums: their files' sizes are still checked, and the line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MLPMemError
from ..io import MANIFEST, MANIFEST_SHA256, checksum_problem, manifest_digest, read_json

# stage directory -> the command that rebuilds it (anything else: the command that wrote it)
REBUILT_BY = {"corpus": "corpus", "datastore": "datastore", "tune": "datastore", "index": "index",
              "targets": "targets", "memory": "train", "rag_bm25": "eval-ppl", "eval_test": "eval-ppl",
              "eval": "eval-ppl"}
OLDER = "no checksum recorded (built by an older version)"


@dataclass
class Options:
    """Options of `mlpmem verify` (none: it checks every finished stage under --run-dir)."""


def stage_dirs(run_dir: Path) -> list[Path]:
    """Every folder of the run that holds a manifest (stages, eval dirs, reports), in pipeline order first."""
    found = {p.parent for p in run_dir.rglob(MANIFEST)
             if not any(part.startswith(".") or ".tmp" in part for part in p.relative_to(run_dir).parts)}
    order = list(REBUILT_BY)
    return sorted(found, key=lambda d: (order.index(d.name) if d.parent == run_dir and d.name in order else 99,
                                        str(d)))


def _expected_sizes(manifest: dict) -> dict[str, int]:
    """File sizes a manifest implies without checksums (datastore arrays, token streams, the index file)."""
    from ..datastore import ARRAYS

    sizes = {}
    if "arrays" in manifest and "n" in manifest:
        import numpy as np

        for name in manifest["arrays"]:
            fname, dtype, width = ARRAYS.get(name, (None, None, None))
            if fname is not None:
                sizes[fname] = int(manifest["n"]) * np.dtype(dtype).itemsize * int(manifest[width] if width else 1)
    if isinstance(manifest.get("files"), dict) and isinstance(manifest.get("n_tokens"), dict):
        sizes.update({fname: 4 * int(manifest["n_tokens"][split]) for split, fname in manifest["files"].items()})
    if "file_bytes" in manifest:
        sizes["index.faiss"] = int(manifest["file_bytes"])
    return sizes


def _records(manifest: dict) -> dict[str, dict]:
    """What the manifest says each file must be: bytes and (where recorded) sha256."""
    records = {name: {"bytes": size} for name, size in _expected_sizes(manifest).items()}
    if manifest.get("file_sha256"):
        records["index.faiss"]["sha256"] = manifest["file_sha256"]
    for name, rec in (manifest.get("checksums") or {}).items():
        records[name] = {**records.get(name, {}), **rec}
    return records


def check_stage(directory: Path) -> tuple[bool, str]:
    """(ok, message) of one stage directory: its manifest, then every recorded file."""
    try:
        manifest = read_json(directory / MANIFEST)
    except MLPMemError as e:
        return False, str(e)
    if not manifest.get("complete"):
        return True, "not finished (interrupted?): nothing to check yet"
    problems = []
    if manifest.get(MANIFEST_SHA256) and manifest_digest(manifest) != manifest[MANIFEST_SHA256]:
        problems.append(f"{directory / MANIFEST} was edited or is corrupted (its fields do not match its hash)")
    try:
        records = _records(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return False, f"{directory / MANIFEST} is malformed ({type(e).__name__}: {e})"
    problems += [p for name, rec in sorted(records.items()) if (p := checksum_problem(directory, name, rec))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return False, problems[0] + more
    hashed = sum(1 for rec in records.values() if rec.get("sha256"))
    if hashed:
        return True, f"ok ({hashed} file{'s' * (hashed != 1)} checked)"
    if records:
        return True, f"ok (sizes of {len(records)} files); {OLDER}"
    return True, "ok" if manifest.get(MANIFEST_SHA256) else f"ok; {OLDER}"


def main(run, opts: Options) -> None:
    run_dir = run.dir
    dirs = stage_dirs(run_dir)
    if not dirs:
        raise MLPMemError(f"{run_dir} holds no finished stage (no manifest.json) to verify")
    failed = []
    width = max(len(str(d.relative_to(run_dir))) for d in dirs)
    for d in dirs:
        name = str(d.relative_to(run_dir))
        ok, message = check_stage(d)
        if not ok:
            command = REBUILT_BY.get(name, "<the command that wrote it>")
            message += f"; delete {d} and re-run `mlpmem {command} --run-dir {run_dir}`"
            failed.append(name)
        print(f"{name:<{width}}  {'' if ok else 'FAILED: '}{message}", flush=True)
    if failed:
        raise MLPMemError(f"verify: {len(failed)} of {len(dirs)} stage directories do not match their manifests "
                          f"({', '.join(failed)}); delete them and re-run the commands above")
    print(f"verify: all {len(dirs)} stage directories of {run_dir} match their manifests")
