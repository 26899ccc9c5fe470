"""The datastore: one row per corpus token after the first, key = hidden state, value = next token.

Layout of a datastore directory (all raw little-endian arrays, C order, no pickle):

- ``keys.f16``       float16 (N, d): the kNN keys (hidden state at the key capture site)
- ``values.i32``     int32 (N,): the true next token of each row
- ``mem_inputs.f16`` float16 (N, d_mem), optional: hidden states at the memory-input site, so the
                     memory can be trained offline without re-running the base LM
- ``lm_logprob.f32`` float32 (N,), optional: the base LM's log-prob of the true next token
                     (stored for held-out slices, where it is used to pick T and lambda)
- ``progress.json``  how many window batches are durably written (resume point)
- ``manifest.json``  what produced it; ``complete`` only after the last byte is on disk
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MLPMemError
from .manifest import check_file_size, read_manifest, write_manifest

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


def open_datastore(path: str | os.PathLike, what: str = "datastore") -> Datastore:
    """Open a complete datastore, checking every file's size against its manifest."""
    path = Path(path)
    manifest = read_manifest(path, what)
    arrays: dict[str, np.ndarray | None] = {}
    for name, (fname, dtype, width) in ARRAYS.items():
        if name not in manifest.get("arrays", []):
            arrays[name] = None
            continue
        shape = _shape(manifest, width)
        check_file_size(path / fname, int(np.prod(shape)) * np.dtype(dtype).itemsize, what)
        arrays[name] = np.memmap(path / fname, dtype=dtype, mode="r", shape=shape) if shape[0] else np.zeros(shape, dtype)
    if arrays["keys"] is None or arrays["values"] is None:
        raise MLPMemError(f"{what} at {path} lacks keys or values; rebuild it")
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
    keys.tofile(path / KEYS)
    values.tofile(path / VALUES)
    if mem_inputs is not None:
        mem_inputs = np.ascontiguousarray(mem_inputs, dtype=np.float16)
        mem_inputs.tofile(path / MEM_INPUTS)
        fields["mem_dim"] = int(mem_inputs.shape[1])
        fields["arrays"].append("mem_inputs")
    if lm_logprob is not None:
        np.ascontiguousarray(lm_logprob, dtype=np.float32).tofile(path / LM_LOGPROB)
        fields["arrays"].append("lm_logprob")
    write_manifest(path, fields)
    return open_datastore(path)
