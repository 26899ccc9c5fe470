"""The datastore: one row per corpus token after the first, key = hidden state, value = next token.

Layout of a datastore directory (all raw little-endian arrays, C order, no pickle):

- ``keys.f16``       float16 (N, d): the kNN keys (hidden state at the key capture site)
- ``values.i32``     int32 (N,): the true next token of each row
- ``mem_inputs.f16`` float16 (N, d_mem), optional: hidden states at the memory-input site, so the
                     memory can be trained offline without re-running the base LM (absent
                     when that site is the key site: the keys serve as memory inputs)
- ``lm_logprob.f32`` float32 (N,), optional: the base LM's log-prob of the true next token
                     (stored for held-out slices, where it is used to pick T and lambda)
- ``progress.json``  how many window batches are durably written (resume point)
- ``manifest.json``  what produced it; ``complete`` only after the last byte is on disk
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from . import distributed
from .config import DatastoreSettings
from .errors import MLPMemError
from .io import check_checksums, check_file_size, file_checksums, read_manifest, write_manifest, write_raw_array
from .stage import Stage, run_stage

KEYS = "keys.f16"
VALUES = "values.i32"
MEM_INPUTS = "mem_inputs.f16"
LM_LOGPROB = "lm_logprob.f32"

# (file name, dtype, width field in manifest or None for 1-D)
ARRAYS = {
    "keys": (KEYS, np.float16, "dim"),
    "values": (VALUES, np.int32, None),
    "mem_inputs": (MEM_INPUTS, np.float16, "mem_dim"),
    "lm_logprob": (LM_LOGPROB, np.float32, None),
}


@dataclass
class Datastore:
    """Read-only view of a finished datastore (memory-mapped; nothing is loaded whole)."""

    path: Path
    manifest: dict
    keys: np.ndarray
    values: np.ndarray
    mem_inputs: np.ndarray | None
    lm_logprob: np.ndarray | None

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return self.n


def _shape(manifest: dict, width_field: str | None) -> tuple[int, ...]:
    n = int(manifest["n"])
    return (n,) if width_field is None else (n, int(manifest[width_field]))


def _same_site(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and a.get("module") == b.get("module")


def array_files(manifest: dict) -> list[str]:
    """The array files of a datastore (what its manifest's ``checksums`` cover)."""
    return [ARRAYS[name][0] for name in manifest.get("arrays", []) if name in ARRAYS]


def open_datastore(path: str | os.PathLike, what: str = "datastore", check: tuple[str, ...] = ()) -> Datastore:
    """Open a complete datastore, checking every file's size against its manifest, and the content
    (sha256) of the arrays named in ``check`` (small ones, e.g. ``("lm_logprob",)``; the big keys are
    left to ``mlpmem verify``)."""
    path = Path(path)
    manifest = read_manifest(path, what)
    check_checksums(path, manifest, [ARRAYS[name][0] for name in check], f"{what} at {path}")
    arrays: dict[str, np.ndarray | None] = {}
    for name, (fname, dtype, width) in ARRAYS.items():
        if name not in manifest.get("arrays", []):
            arrays[name] = None
            continue
        shape = _shape(manifest, width)
        check_file_size(path / fname, int(np.prod(shape)) * np.dtype(dtype).itemsize, what)
        arrays[name] = (np.memmap(path / fname, dtype=dtype, mode="r", shape=shape) if shape[0]
                        else np.zeros(shape, dtype))
    if arrays["keys"] is None or arrays["values"] is None:
        raise MLPMemError(f"{what} at {path} lacks keys or values; rebuild it")
    if arrays["mem_inputs"] is None and _same_site(manifest.get("mem_site"), manifest.get("key_site")):
        arrays["mem_inputs"] = arrays["keys"]  # memory reads the key site: stored once
    return Datastore(path=path, manifest=manifest, **arrays)  # type: ignore[arg-type]


def write_datastore_arrays(path: str | os.PathLike, keys: np.ndarray, values: np.ndarray,
                           mem_inputs: np.ndarray | None = None, lm_logprob: np.ndarray | None = None,
                           **manifest_fields) -> Datastore:
    """Write in-memory arrays as a complete datastore (small data, tests, imports)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    keys = np.ascontiguousarray(keys, dtype=np.float16)
    values = np.ascontiguousarray(values, dtype=np.int32)
    if keys.ndim != 2 or values.shape != (keys.shape[0],):
        raise MLPMemError(f"keys must be (N, d) and values (N,), got {keys.shape} and {values.shape}")
    fields = dict(manifest_fields)
    fields.update(n=int(keys.shape[0]), dim=int(keys.shape[1]), arrays=["keys", "values"])
    write_raw_array(path / KEYS, keys, np.float16)
    write_raw_array(path / VALUES, values, np.int32)
    if mem_inputs is not None:
        write_raw_array(path / MEM_INPUTS, mem_inputs, np.float16)
        fields["mem_dim"] = int(mem_inputs.shape[1])
        fields["arrays"].append("mem_inputs")
    if lm_logprob is not None:
        write_raw_array(path / LM_LOGPROB, lm_logprob, np.float32)
        fields["arrays"].append("lm_logprob")
    write_manifest(path, {**fields, "checksums": file_checksums(path, array_files(fields))})
    return open_datastore(path)


# ---------------------------------------------------------------------------------------------
# Building: stream windows through the frozen LM, write rows with positional writes, resume.
# ---------------------------------------------------------------------------------------------

PROGRESS = "progress.json"  # one process, before ranks kept their own records
RANK_PROGRESS = "progress-rank{rank}.json"


def read_tokens(path: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of a raw int32 stream, read with a plain positional read.

    A memmap would be simpler, but every page it touches stays in the process's resident set:
    over a long build that is RAM growing with the corpus, which this stage must not do.
    """
    count = stop - start
    with open(path, "rb") as f:
        f.seek(start * 4)
        buf = f.read(count * 4)
    if len(buf) != count * 4:
        raise MLPMemError(f"{path} is shorter than its manifest says (wanted tokens {start}..{stop}); "
                          "rebuild the corpus stage")
    return np.frombuffer(buf, dtype=np.int32)


def window_ids(token_path, token_start: int, windows, prefix=()) -> np.ndarray:
    """Model inputs of equal-length windows, (n, len(prefix) + length) int64: per window ``prefix`` (the
    tokenizer's BOS, :func:`mlpmemory.models.bos_prefix`) then ``tokens[begin:end]``; stream position j
    of window w sits at column ``j - w.begin + len(prefix)``."""
    head = np.asarray(prefix, dtype=np.int64)
    return np.stack([np.concatenate([head, read_tokens(token_path, token_start + w.begin, token_start + w.end)])
                     for w in windows]).astype(np.int64, copy=False)


def _preallocate(path: Path, nbytes: int) -> None:
    with open(path, "ab") as f:
        f.truncate(nbytes)


def _datastore_identity(lm, n_tokens: int, key_site, mem_site, block: int, stride: int, batch_size: int,
                        store_lm_logprob: bool, identity: dict | None, token_start: int):
    """(settings that must match, key site, memory-input site or None) of a datastore build."""
    from .capture import resolve_site
    from .models import bos_prefix

    model = lm.model
    ksite = resolve_site(model, key_site)
    msite = resolve_site(model, mem_site) if mem_site is not None else None
    n = max(0, n_tokens - 1)
    if n == 0:
        raise MLPMemError(f"cannot build a datastore from {n_tokens} token(s): the corpus split is empty")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = cfg.hidden_size
    prefix = bos_prefix(lm.tokenizer)  # put before every window, never scored
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if prefix and max_pos and block + len(prefix) > max_pos:
        raise MLPMemError(f"block {block} + the tokenizer's BOS exceed the model's {max_pos} positions; lower --block")
    separate_mem = msite is not None and msite.module_path != ksite.module_path  # else mem_inputs are the keys
    arrays = (["keys", "values"] + (["mem_inputs"] if separate_mem else [])
              + (["lm_logprob"] if store_lm_logprob else []))
    settings = {
        "model": lm.name, "model_fingerprint": lm.fingerprint, "tokenizer_fingerprint": lm.tokenizer_fingerprint,
        "bos_prefix": prefix,
        "key_site": ksite.to_dict(), "mem_site": msite.to_dict() if msite else None,
        "dtype": str(lm.dtype).replace("torch.", ""), "key_dtype": "float16",
        "block": block, "stride": stride, "batch_size": batch_size, "n": n, "n_tokens": n_tokens,
        "dim": hidden, "mem_dim": hidden if msite else None, "arrays": arrays, "token_start": token_start,
        **(identity or {}),
    }
    return settings, ksite, (msite if separate_mem else None)


def _open_arrays(out: Path, settings: dict) -> dict:
    """Preallocated array files of the datastore: name -> (write fd, bytes per row)."""
    files = {}
    for name in settings["arrays"]:
        fname, dtype, width = ARRAYS[name]
        row_bytes = np.dtype(dtype).itemsize * (settings[width] if width else 1)
        _preallocate(out / fname, settings["n"] * row_bytes)
        files[name] = (os.open(out / fname, os.O_WRONLY), row_bytes)
    return files


def _batch_rows(lm, batch, token_path, token_start: int, ksite, msite, store_lm_logprob: bool,
                prefix: list[int], width: int) -> dict:
    """The rows of one batch of windows, per array: one forward pass of the frozen LM over ``prefix`` +
    each window (:func:`window_ids`); the prefix is never scored. Captures must be (batch, seq, ``width``)."""
    import torch

    from .capture import capture_inputs, check_captured, run_captured
    from .inference import lm_scoring_forward

    sites = [ksite] + ([msite] if msite is not None else [])
    ids = window_ids(token_path, token_start, batch, prefix)
    # with lm_logprob: final hidden states (the head runs later, on scored rows only), else stop at the last site
    forward = partial(lm_scoring_forward, lm.model) if store_lm_logprob else lm.model.base_model
    with torch.inference_mode(), capture_inputs(lm.model, sites, stop_early=not store_lm_logprob) as cap:
        result = run_captured(forward, input_ids=torch.from_numpy(ids).to(lm.device), use_cache=False)
    for site, role in ((ksite, "key site"), (msite, "memory-input site")):
        if site is not None:  # before any row is written: a wrong site is an error, not a datastore of zeros
            check_captured(cap, site, ids.shape, width, role)
    rows: dict[str, list] = {"keys": [], "values": [], "mem_inputs": [], "lm_logprob": []}
    for wi, w in enumerate(batch):
        shift = len(prefix) - w.begin  # stream position j sits at column j + shift
        pos = slice(w.first_target - 1 + shift, w.end - 1 + shift)
        target = ids[wi, w.first_target + shift: w.end + shift]
        rows["keys"].append(cap[ksite.module_path][wi, pos].to(torch.float16).cpu().numpy())
        rows["values"].append(target.astype(np.int32))
        if msite is not None:
            rows["mem_inputs"].append(cap[msite.module_path][wi, pos].to(torch.float16).cpu().numpy())
        if store_lm_logprob:
            rows["lm_logprob"].append(result[0][wi, pos])
    if store_lm_logprob:  # log p_LM(value) of every row, rows_per_chunk rows at a time
        with torch.inference_mode():
            lp = result[1](torch.cat(rows["lm_logprob"]), torch.from_numpy(np.concatenate(rows["values"])))
        rows["lm_logprob"] = [lp.cpu().numpy().astype(np.float32)]
    return rows


def _done_batches(stage: Stage) -> set[int]:
    """Batches durably written by any rank of any earlier session (their progress records)."""
    done: set[int] = set()
    legacy = stage.resume(PROGRESS)  # one process, before ranks had records of their own
    if legacy is not None:
        done.update(range(int(legacy.get("batches_done", 0))))
    for path in sorted(stage.dir.glob(RANK_PROGRESS.format(rank="*"))):
        record = stage.resume(path.name) or {}
        for a, b in record.get("done", []):
            done.update(range(int(a), int(b)))
    return done


def _add_interval(intervals: list[list[int]], bi: int) -> None:
    if intervals and intervals[-1][1] == bi:
        intervals[-1][1] = bi + 1
    else:
        intervals.append([bi, bi + 1])


def _fill_datastore(lm, stage: Stage, token_path, ksite, msite, store_lm_logprob: bool, progress: bool) -> dict:
    """Write this rank's batches of windows not yet durable (positional writes, fsync, progress record).

    Under torchrun the batches still to do are split into contiguous runs, one per rank; every
    rank writes its rows at their final offsets in the shared array files (its *shard*: no data
    goes through another rank) and keeps its own progress record, so a killed rank resumes its
    shard, with any number of ranks. Batch composition does not depend on the ranks, so the
    files are byte-identical to a one-process build. Returns the manifest fields.
    """
    from tqdm.auto import tqdm

    from .corpus import sliding_windows

    out, settings = stage.dir, stage.identity
    windows = sliding_windows(settings["n_tokens"], settings["block"], settings["stride"])
    bs = settings["batch_size"]
    batches = [windows[i:i + bs] for i in range(0, len(windows), bs)]
    done = _done_batches(stage)
    distributed.barrier()  # every rank has read the records before any is rewritten
    mine = distributed.my_share([bi for bi in range(len(batches)) if bi not in done])
    record_name = RANK_PROGRESS.format(rank=distributed.rank())
    intervals = [list(x) for x in (stage.resume(record_name) or {}).get("done", [])]
    files: dict = {}  # opened (preallocated) once the first batch's captures have passed their checks
    bar = tqdm(total=sum(w.n_rows for bi in mine for w in batches[bi]), unit="tok",
               desc=f"datastore {out.name}", disable=not progress, smoothing=0.05)
    try:
        for bi in mine:
            rows = _batch_rows(lm, batches[bi], token_path, settings["token_start"], ksite, msite, store_lm_logprob,
                               settings["bos_prefix"], settings["dim"])
            files = files or _open_arrays(out, settings)
            first_row = batches[bi][0].first_target - 1
            for name, (fd, row_bytes) in files.items():
                os.pwrite(fd, np.ascontiguousarray(np.concatenate(rows[name])).tobytes(), first_row * row_bytes)
            for fd, _ in files.values():
                os.fsync(fd)
            _add_interval(intervals, bi)
            stage.save_progress(record_name, {"done": intervals})
            bar.update(sum(w.n_rows for w in batches[bi]))
    finally:
        bar.close()
        for fd, _ in files.values():
            os.close(fd)
    if not files:  # nothing was left to this rank: the files still get their full size
        _close_all(_open_arrays(out, settings))
    distributed.barrier()  # every shard is on disk: the records say who wrote which rows
    return {**settings, "shards": _shard_rows(stage, batches)}


def _close_all(files: dict) -> None:
    for fd, _ in files.values():
        os.close(fd)


def _shard_rows(stage: Stage, batches) -> list[dict]:
    """Row ranges per writer, from the progress records (what the manifest lists as the shards)."""
    shards = []
    for path in sorted(stage.dir.glob(RANK_PROGRESS.format(rank="*"))):
        record = stage.resume(path.name) or {}
        rows = [[batches[a][0].first_target - 1, batches[b - 1][-1].end - 1] for a, b in record.get("done", [])]
        shards.append({"writer": path.stem.replace("progress-", ""), "rows": rows})
    return shards


def build_datastore(lm, token_path: str | os.PathLike, n_tokens: int, out_dir: str | os.PathLike, *,
                    key_site: str = DatastoreSettings.key_site, mem_site: str | None = DatastoreSettings.mem_site,
                    block: int = DatastoreSettings.block, stride: int = DatastoreSettings.stride,
                    batch_size: int = DatastoreSettings.batch_size, store_lm_logprob: bool = False,
                    identity: dict | None = None, progress: bool = True, token_start: int = 0) -> dict:
    """Build (or finish, or verify) the datastore of one token stream.

    ``lm`` is a :class:`mlpmemory.models.LoadedModel`. ``identity`` holds what else must match
    for an existing datastore to be reused (corpus fingerprint, split ...). Re-running a complete
    datastore with the same settings is a no-op; an interrupted one continues from the last
    durable batch and ends byte-identical to an uninterrupted build (same batch composition, same
    kernels). ``token_start`` selects the stream ``tokens[token_start : token_start + n_tokens]``.
    """
    out = Path(out_dir)
    settings, ksite, msite = _datastore_identity(lm, n_tokens, key_site, mem_site, block, stride, batch_size,
                                                 store_lm_logprob, identity, token_start)
    # batch_size changes how a partial build resumes, not what a complete one holds; a manifest from
    # before windows had a prefix was built with none
    stage = Stage(out, settings, "datastore", ignore=("batch_size",), view=lambda m: {"bos_prefix": [], **m},
                  files=array_files)

    manifest = run_stage(stage,
                         lambda: _fill_datastore(lm, stage, token_path, ksite, msite, store_lm_logprob, progress),
                         verify=lambda found: open_datastore(out) is not None,  # size checks
                         parallel=True)
    _remove_progress(out)
    return manifest


def _remove_progress(out: Path) -> None:
    """After the manifest (a crash in between leaves harmless records); rank 0 only, as it wrote the manifest."""
    if not distributed.is_main():
        return
    for path in [out / PROGRESS, *out.glob(RANK_PROGRESS.format(rank="*"))]:
        if path.exists():  # (unlinking a missing file fails on a read-only filesystem)
            path.unlink()
