"""kNN targets: the distribution against a brute-force oracle, self-exclusion, shards, resume, T."""

from __future__ import annotations

import numpy as np
import pytest

import mlpmemory.targets as targets_mod
from mlpmemory.datastore import write_datastore_arrays
from mlpmemory.errors import MLPMemError
from mlpmemory.index import build_index, load_index
from mlpmemory.targets import build_targets, choose_temperature, knn_distribution, open_targets

VOCAB = 50


def clustered(n, d=16, seed=0, n_clusters=40):
    """Keys around cluster centres; each cluster prefers a few tokens (so kNN is informative)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((n_clusters, d)) * 2.0
    c = rng.integers(0, n_clusters, n)
    keys = (centres[c] + rng.standard_normal((n, d))).astype(np.float16)
    values = np.where(rng.random(n) < 0.6, c % VOCAB, rng.integers(0, VOCAB, n)).astype(np.int32)
    return keys, values


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    keys, values = clustered(2000)
    ds = write_datastore_arrays(root / "ds", keys, values, model="synthetic")
    build_index(root / "ds", root / "idx", recall_queries=32, recall_k=16)
    index, _ = load_index(root / "idx", ds.manifest)
    hk, hv = clustered(300, seed=7)
    write_datastore_arrays(root / "heldout", hk, hv, lm_logprob=np.full(300, np.log(1 / VOCAB)), model="synthetic")
    return root, ds, index


def dense(offsets, toks, probs, vocab=VOCAB):
    out = np.zeros((len(offsets) - 1, vocab))
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    np.add.at(out, (rows, toks), probs)
    return out


def oracle(keys, values, qids, k, t, min_prob):
    keys = keys.astype(np.float64)
    d = ((keys[qids][:, None, :] - keys[None]) ** 2).sum(-1)
    d[np.arange(len(qids)), qids] = np.inf  # self, by id
    out = np.zeros((len(qids), VOCAB))
    for r in range(len(qids)):
        nn = np.argsort(d[r], kind="stable")[:k]
        w = np.exp(-(d[r, nn] - d[r, nn].min()) / t)
        p = np.bincount(values[nn], weights=w / w.sum(), minlength=VOCAB)
        p[(p < min_prob) & (p < p.max())] = 0
        out[r] = p / p.sum()
    return out


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("t_scale", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("min_prob", [0.0, 1e-3])
def test_matches_oracle(store, k, t_scale, min_prob):
    _, ds, index = store
    keys = np.asarray(ds.keys, dtype=np.float32)
    qids = np.arange(0, 2000, 37)
    dists, ids = index.search(keys[qids], k + 1)
    t = t_scale * float(np.median(dists[:, 1]))
    off, tok, p = knn_distribution(dists, ids, qids, ds.values, k, t, min_prob)
    assert off.dtype == np.int64 and tok.dtype == np.int32 and p.dtype == np.float32
    assert off[0] == 0 and off[-1] == len(tok) == len(p)
    for r in range(len(qids)):  # sorted by token id within each row
        assert np.all(np.diff(tok[off[r]:off[r + 1]]) > 0)
    np.testing.assert_allclose(dense(off, tok, p), oracle(keys, np.asarray(ds.values), qids, k, t, min_prob),
                               atol=2e-5)
    np.testing.assert_allclose(np.diff(off) > 0, True)
    np.testing.assert_allclose(np.bincount(np.repeat(np.arange(len(qids)), np.diff(off)), weights=p), 1.0,
                               atol=1e-5)


def test_self_excluded_by_id_with_duplicates():
    values = np.array([3, 7, 9, 11, 13], np.int32)
    # rows 0 and 1 have identical keys; FAISS lists the duplicate *first* for query 0
    dists = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]], np.float32)
    ids = np.array([[1, 0, 2], [0, 1, 3]], np.int64)
    off, tok, p = knn_distribution(dists, ids, np.array([0, 1]), values, 1, 1.0, 0.0)
    assert off.tolist() == [0, 1, 2] and tok.tolist() == [7, 3] and p.tolist() == [1.0, 1.0]
    off, tok, p = knn_distribution(dists, ids, np.array([0, 1]), values, 2, 1.0, 0.0)
    assert tok[:2].tolist() == [7, 9] and tok[2:].tolist() == [3, 11]
    w = np.exp([0.0, -1.0]) / np.exp([0.0, -1.0]).sum()
    np.testing.assert_allclose(p[:2], w, rtol=1e-6)


def test_self_absent_and_missing_ids():
    values = np.arange(10, dtype=np.int32)
    dists = np.array([[1.0, 3.0, 2.0], [1.0, 2.0, 9.0]], np.float32)
    ids = np.array([[4, 6, 5], [8, -1, -1]], np.int64)
    off, tok, p = knn_distribution(dists, ids, np.array([0, 1]), values, 2, 1.0, 0.0)
    assert tok[off[0]:off[1]].tolist() == [4, 5]  # self absent: the farthest (6) dropped
    assert tok[off[1]:off[2]].tolist() == [8] and p[off[1]] == 1.0  # -1 = missing, fewer than k
    # all missing: an empty row, not a crash
    off, tok, p = knn_distribution(np.zeros((1, 3), np.float32), np.full((1, 3), -1), None, values, 2, 1.0, 0.0)
    assert off.tolist() == [0, 0] and len(tok) == 0


def test_shuffled_neighbour_order(store):
    _, ds, index = store
    qids = np.arange(0, 2000, 11)
    dists, ids = index.search(np.asarray(ds.keys[qids], dtype=np.float32), 33)
    perm = np.argsort(np.random.default_rng(0).random(dists.shape), axis=1)
    a = knn_distribution(dists, ids, qids, ds.values, 32, 5.0, 1e-4)
    b = knn_distribution(np.take_along_axis(dists, perm, 1), np.take_along_axis(ids, perm, 1), qids,
                         ds.values, 32, 5.0, 1e-4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_min_prob_above_every_probability_keeps_the_mode():
    values = np.array([1, 2, 2, 3], np.int32)
    off, tok, p = knn_distribution(np.array([[0.0, 1.0, 1.0, 1.0]]), np.array([[0, 1, 2, 3]]), np.array([0]),
                                   values, 3, 100.0, 0.9)
    assert tok.tolist() == [2] and p.tolist() == [1.0]


def _build(root, ds_root, name, **kw):
    opts = dict(k=32, temperature=4.0, min_prob=0.0, shard_rows=300, batch=128)
    opts.update(kw)
    return build_targets(ds_root / "ds", ds_root / "idx", root / name, **opts)


def test_round_trip_across_shards(store, tmp_path):
    root, ds, index = store
    m = _build(tmp_path, root, "t")
    assert m["n_shards"] == 7 and m["n"] == 2000 and m["k"] == 32 and m["temperature"] == 4.0
    t = open_targets(tmp_path / "t", ds.manifest)
    assert len(t) == 2000
    keys = np.asarray(ds.keys, dtype=np.float32)
    dists, ids = index.search(keys, 33)
    off, tok, p = knn_distribution(dists, ids, np.arange(2000), ds.values, 32, 4.0, 0.0)
    assert m["nnz"] == len(tok)
    ref = dense(off, tok, p)

    o, tk, pr, nt = t.get_rows(250, 950)  # spans shards 0..3
    assert o[0] == 0 and pr.dtype == np.float32
    np.testing.assert_array_equal(tk, tok[off[250]:off[950]])
    np.testing.assert_allclose(dense(o, tk, pr), ref[250:950], atol=1e-3)
    np.testing.assert_array_equal(nt, np.asarray(ds.values[250:950]))

    idx = np.array([1999, 0, 299, 300, 301, 1500, 0, 899, 900])
    o, tk, pr, nt = t.get(idx)
    np.testing.assert_allclose(dense(o, tk, pr), ref[idx], atol=1e-3)
    np.testing.assert_array_equal(nt, np.asarray(ds.values)[idx])
    # every row a distribution (fp16 storage)
    o, tk, pr, _ = t.get_rows(0, 2000)
    sums = np.add.reduceat(pr, o[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)


def test_default_min_prob_rows_sum_to_one(store, tmp_path):
    root, ds, _ = store
    m = _build(tmp_path, root, "t", min_prob=1e-2, temperature=1.0)
    assert m["mean_nnz"] < 32
    o, _, pr, _ = open_targets(tmp_path / "t").get_rows(0, 2000)
    np.testing.assert_allclose(np.add.reduceat(pr, o[:-1]), 1.0, atol=2e-3)


def test_resume_after_crash_is_identical(store, tmp_path, monkeypatch):
    root, _, _ = store
    _build(tmp_path, root, "clean")
    real = targets_mod._write_shard

    def crash_after_shard_1(targets_dir, s, arrays, info):
        if s == 2:
            raise KeyboardInterrupt("simulated kill")
        real(targets_dir, s, arrays, info)

    monkeypatch.setattr(targets_mod, "_write_shard", crash_after_shard_1)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, root, "resumed")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard_*")) == ["shard_00000", "shard_00001"]
    (tmp_path / "resumed" / "shard_00002.tmp").mkdir()  # a half-written shard from the kill
    (tmp_path / "resumed" / "shard_00002.tmp" / "probs.npy").write_bytes(b"junk")
    _build(tmp_path, root, "resumed")
    assert not list((tmp_path / "resumed").glob("*.tmp"))
    for s in range(7):
        for name in ("offsets", "token_ids", "probs", "next_token"):
            a = (tmp_path / "clean" / f"shard_{s:05d}" / f"{name}.npy").read_bytes()
            b = (tmp_path / "resumed" / f"shard_{s:05d}" / f"{name}.npy").read_bytes()
            assert a == b, (s, name)


def test_idempotent_and_mismatch(store, tmp_path):
    root, _, _ = store
    m = _build(tmp_path, root, "t")
    assert _build(tmp_path, root, "t") == m
    assert _build(tmp_path, root, "t", temperature="4.0") == m  # a CLI string is the same setting
    with pytest.raises(MLPMemError, match="temperature"):
        _build(tmp_path, root, "t", temperature="warm")
    with pytest.raises(MLPMemError, match="temperature"):
        _build(tmp_path, root, "t", temperature=0)
    with pytest.raises(MLPMemError, match="min_prob"):
        _build(tmp_path, root, "t", min_prob=1e-3)


def test_k_limits(tmp_path, capsys):
    keys, values = clustered(50)
    write_datastore_arrays(tmp_path / "ds", keys, values)
    build_index(tmp_path / "ds", tmp_path / "idx", recall_queries=8, recall_k=8)
    with pytest.raises(MLPMemError, match="larger than the datastore"):
        build_targets(tmp_path / "ds", tmp_path / "idx", tmp_path / "t", k=50, temperature=1.0, k_explicit=True)
    m = build_targets(tmp_path / "ds", tmp_path / "idx", tmp_path / "t", temperature=1.0)  # default k=1024
    assert m["k"] == 49 and "capped" in capsys.readouterr().err  # progress notes go to stderr
    o, tk, pr, _ = open_targets(tmp_path / "t").get_rows(0, 50)
    assert len(o) == 51


def test_auto_temperature(store, tmp_path):
    root, ds, index = store
    with pytest.raises(MLPMemError, match="held-out"):
        _build(tmp_path, root, "t", temperature="auto")
    m = _build(tmp_path, root, "t", temperature="auto", heldout_dir=root / "heldout")
    sel = m["temperature_selection"]
    temps = [g["T"] for g in sel["grid"]]
    assert len(temps) == 8 and m["temperature"] in temps
    assert m["temperature"] == min(sel["grid"], key=lambda g: g["knn_lm_ppl"])["T"]
    np.testing.assert_allclose(temps, sel["median_d1"] * 2.0 ** np.arange(-6, 2))
    np.testing.assert_allclose(sel["base_ppl"], VOCAB, rtol=1e-5)
    best = min(g["knn_lm_ppl"] for g in sel["grid"])
    assert best < sel["base_ppl"]  # clustered data: the kNN helps
    assert all(g["knn_only_ppl"] > 0 and g["best_lambda"] > 0 for g in sel["grid"])


def test_choose_temperature_requires_logprob(store):
    root, ds, index = store
    with pytest.raises(MLPMemError, match="lm_logprob"):
        choose_temperature(index, ds.values, ds, k=8)


def test_open_targets_checks(store, tmp_path):
    root, ds, _ = store
    _build(tmp_path, root, "t")
    other = write_datastore_arrays(tmp_path / "other", *clustered(100, seed=3))
    with pytest.raises(MLPMemError, match="different datastore"):
        open_targets(tmp_path / "t", other.manifest)
    f = tmp_path / "t" / "shard_00003" / "token_ids.npy"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(MLPMemError, match="shard"):
        open_targets(tmp_path / "t")
