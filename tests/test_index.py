"""FAISS index: factory rule, exact recall for Flat, IVF builds, idempotency, load-time checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mlpmemory.datastore import write_datastore_arrays
from mlpmemory.errors import MLPMemError
from mlpmemory.index import INDEX_FILE, build_index, choose_factory, exact_knn, load_index


def make_store(path, n=2000, d=16, vocab=50, seed=0, **fields):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float16)
    values = rng.integers(0, vocab, n).astype(np.int32)
    return write_datastore_arrays(path, keys, values, model="synthetic", seed=seed, **fields)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    ds = make_store(root / "ds")
    manifest = build_index(root / "ds", root / "idx", recall_queries=64, recall_k=16)
    return root, ds, manifest


def test_choose_factory_rules():
    assert choose_factory(1000, 576) == "Flat"
    assert choose_factory(300_000, 576) == "Flat"
    assert choose_factory(1_000_000, 576) == "IVF4096,Flat"  # 2.3 GB of float32 keys: fits the default 4 GiB
    assert choose_factory(2_000_000, 4096) == "IVF4096,PQ64x8"  # 31 GiB of float32 keys: compressed codes
    assert choose_factory(1_000_000, 576, ivf_flat_max_bytes=0) == "IVF4096,PQ64x8"
    assert choose_factory(1_000_000, 768, train_samples=200_000, ivf_flat_max_bytes=0) == "IVF4096,PQ64x8"
    # 4*sqrt(1e7) ~ 12.6k -> 16384 lists, but 200k training keys allow only 4096 (>= 39 per list)
    assert choose_factory(10_000_000, 4096, train_samples=200_000, ivf_flat_max_bytes=0) == "IVF4096,PQ64x8"
    assert choose_factory(1_000_000, 100, ivf_flat_max_bytes=0) == "IVF4096,PQ50x8"  # largest divisor of d <= 64
    assert choose_factory(1_000_000, 37, ivf_flat_max_bytes=0) == "IVF4096,PQ37x8"  # d <= 64: one dimension per byte
    # prime d > 64: PQ would be 1-byte codes
    assert choose_factory(1_000_000, 67, ivf_flat_max_bytes=0) == "IVF4096,Flat"
    assert choose_factory(1_000_000, 8, ivf_flat_max_bytes=0) == "IVF4096,PQ8x8"
    # too few training points for 8-bit PQ codebooks; nlist shrinks to keep 39 points per list
    assert choose_factory(5000, 16, flat_max_rows=0, ivf_flat_max_bytes=0) == "IVF128,Flat"
    with pytest.raises(MLPMemError):
        choose_factory(0, 16)


def test_flat_is_exact(flat):
    root, ds, manifest = flat
    assert manifest["factory"] == "Flat" and manifest["index_type"] == "IndexFlat"
    assert manifest["recall"] == 1.0 and manifest["search_qps"] > 0
    assert manifest["n"] == 2000 and manifest["dim"] == 16 and manifest["metric"] == "l2"
    index, m2 = load_index(root / "idx", ds.manifest)
    keys = np.asarray(ds.keys, dtype=np.float32)
    q = keys[:50]
    d_faiss, i_faiss = index.search(q, 10)
    full = ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    i_np = np.argsort(full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(i_faiss, i_np)
    np.testing.assert_allclose(d_faiss, np.take_along_axis(full, i_np, 1), rtol=1e-4, atol=1e-4)
    # the chunked brute force used for recall agrees too
    d_ex, i_ex = exact_knn(ds.keys, q, 10, chunk=300)
    np.testing.assert_array_equal(i_ex, i_np)


def test_idempotent_and_mismatch(flat):
    root, ds, manifest = flat
    path = root / "idx" / INDEX_FILE
    mtime = path.stat().st_mtime_ns
    again = build_index(root / "ds", root / "idx", recall_queries=64, recall_k=16)
    assert again == manifest and path.stat().st_mtime_ns == mtime
    with pytest.raises(MLPMemError, match="nprobe"):
        build_index(root / "ds", root / "idx", recall_queries=64, recall_k=16, nprobe=8)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4"])
def test_ivf_build(tmp_path, factory):
    ds = make_store(tmp_path / "ds", n=5000, d=16)
    m = build_index(tmp_path / "ds", tmp_path / "idx", factory=factory, nprobe=2,
                    recall_queries=64, recall_k=32, train_samples=3000)
    assert m["factory"] == factory
    chance = 32 / 5000  # recall@32 of a random answer
    assert 10 * chance < m["recall"] < 1.0  # nprobe 2 of 16 lists: approximate, far better than chance
    full = build_index(tmp_path / "ds", tmp_path / "idx_all", factory=factory, nprobe=16, recall_queries=64,
                       recall_k=32, train_samples=3000)
    assert full["recall"] >= m["recall"]
    if "PQ" not in factory:  # every list probed, exact distances: the exact neighbours
        assert full["recall"] >= 0.99
    assert m["params"]["nlist"] == 16 and m["params"]["nprobe"] == 2
    if "PQ" in factory:
        assert m["params"]["m"] == 4 and m["params"]["nbits"] == 8 and m["index_type"] == "IndexIVFPQ"
    import faiss
    index, _ = load_index(tmp_path / "idx", ds.manifest)
    assert faiss.extract_index_ivf(index).nprobe == 2
    index, _ = load_index(tmp_path / "idx", ds.manifest, nprobe=16)
    assert faiss.extract_index_ivf(index).nprobe == 16
    assert index.ntotal == 5000


def test_auto_factory_small_is_flat(tmp_path):
    make_store(tmp_path / "ds", n=500)
    assert build_index(tmp_path / "ds", tmp_path / "idx")["factory"] == "Flat"


def test_use_gpu_without_gpu(tmp_path):
    import faiss
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    make_store(tmp_path / "ds", n=300)
    with pytest.raises(MLPMemError, match="GPU"):
        build_index(tmp_path / "ds", tmp_path / "idx", use_gpu=True)


def _copy_index(root, dst):
    import shutil
    shutil.copytree(root / "idx", dst)
    return dst


def test_load_truncated(flat, tmp_path):
    root, ds, _ = flat
    idx = _copy_index(root, tmp_path / "idx")
    data = (idx / INDEX_FILE).read_bytes()
    (idx / INDEX_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(MLPMemError, match="truncated"):
        load_index(idx, ds.manifest)
    # the same truncation with the manifest "agreeing" on the size: FAISS's parser must fail cleanly
    man = json.loads((idx / "manifest.json").read_text())
    man["file_bytes"] = len(data) // 2
    (idx / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MLPMemError, match="corrupted"):
        load_index(idx, ds.manifest)


def test_load_garbage(flat, tmp_path):
    root, ds, _ = flat
    idx = _copy_index(root, tmp_path / "idx")
    size = (idx / INDEX_FILE).stat().st_size
    (idx / INDEX_FILE).write_bytes(os.urandom(size))
    with pytest.raises(MLPMemError, match="corrupted"):
        load_index(idx, ds.manifest)


def test_load_flipped_bytes_sha(flat, tmp_path):
    root, ds, _ = flat
    idx = _copy_index(root, tmp_path / "idx")
    data = bytearray((idx / INDEX_FILE).read_bytes())
    data[-5] ^= 0xFF  # inside the stored vectors: parses fine, only the checksum notices
    (idx / INDEX_FILE).write_bytes(bytes(data))
    load_index(idx, ds.manifest)
    with pytest.raises(MLPMemError, match="checksum"):
        load_index(idx, ds.manifest, verify_sha256=True)


def test_load_fingerprint_mismatch(flat, tmp_path):
    root, _, _ = flat
    other = make_store(tmp_path / "other", seed=1)
    with pytest.raises(MLPMemError, match="different datastore"):
        load_index(root / "idx", other.manifest)
    with pytest.raises(MLPMemError):
        load_index(tmp_path / "nothing_here")


def test_storage_rule_and_list_bytes():
    from mlpmemory.index import choose_storage, ivf_bytes

    assert ivf_bytes(1000, 576, "IVF1024,PQ64x8") == 1000 * (64 + 8)
    assert ivf_bytes(1000, 576, "IVF1024,PQ32") == 1000 * (32 + 8)
    assert ivf_bytes(1000, 576, "IVF1024,Flat") == 1000 * (576 * 4 + 8)
    gib = 1 << 30
    assert choose_storage(gib // 72, 576, "IVF65536,PQ64x8", "auto", 1.0) == "ram"  # exactly 1 GiB of lists
    assert choose_storage(gib // 72 + 1, 576, "IVF65536,PQ64x8", "auto", 1.0) == "disk"
    assert choose_storage(10**9, 576, "Flat", "auto", 1.0) == "ram"  # only IVF lists can live on disk
    assert choose_storage(10, 576, "IVF8,Flat", "disk") == "disk"
    with pytest.raises(MLPMemError, match="needs an IVF index"):
        choose_storage(10, 576, "Flat", "disk")


def test_on_disk_index_equals_the_in_ram_one_and_moves_with_its_folder(tmp_path, monkeypatch):
    """Shards (here 6 of at most 1,000 rows) merged with FAISS's merge_ondisk into memory-mapped lists: the
    same search results, bit for bit, as the index built in RAM by sequential adds; the lists file is found
    beside the index after a move."""
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(32, 16)).astype(np.float32)
    keys = (centres[rng.integers(0, 32, 6000)] + 0.3 * rng.normal(size=(6000, 16))).astype(np.float16)
    write_datastore_arrays(tmp_path / "ds", keys, rng.integers(0, 50, 6000))
    ram = build_index(tmp_path / "ds", tmp_path / "ram", factory="IVF32,PQ4x8", storage="ram", train_samples=6000)
    monkeypatch.setattr("mlpmemory.index.SHARD_MAX_ROWS", 1000)
    disk = build_index(tmp_path / "ds", tmp_path / "disk", factory="IVF32,PQ4x8", storage="disk", train_samples=6000)
    assert ram["storage"] == "ram" and disk["storage"] == "disk" and disk["recall"] == ram["recall"]
    names = {p.name for p in (tmp_path / "disk").iterdir()}
    assert {"index.faiss", "index.ivfdata", "manifest.json"} <= names
    assert not [n for n in names if n.startswith(("shard-", "trained"))]  # build files removed
    os.rename(tmp_path / "disk", tmp_path / "moved")
    q = np.asarray(keys[:300], dtype=np.float32)
    a, _ = load_index(tmp_path / "ram")
    b, manifest = load_index(tmp_path / "moved", verify_sha256=True)
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(b).invlists), faiss.OnDiskInvertedLists)
    da, ia = a.search(q, 10)
    db, ib = b.search(q, 10)
    assert np.array_equal(ia, ib) and np.array_equal(da, db)
    (tmp_path / "moved" / "index.ivfdata").write_bytes(b"\0" * 10)
    with pytest.raises(MLPMemError, match="index"):
        load_index(tmp_path / "moved")
