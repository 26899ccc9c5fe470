"""Training: exact resume, online == offline inputs, NaN stops with the checkpoint kept, no-op rerun."""

import numpy as np
import pytest
import torch

from mlpmemory.capture import resolve_site
from mlpmemory.datastore import build_datastore, open_datastore
from mlpmemory.errors import MLPMemError
from mlpmemory.index import build_index
from mlpmemory.memory import build_memory, memory_config_for
from mlpmemory.targets import build_targets, open_targets
from mlpmemory.train import CHECKPOINT, OfflineInputs, OnlineInputs, TrainSettings, train_memory


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = root / "t.i32"
    np.random.default_rng(0).integers(0, 300, 900).astype(np.int32).tofile(tok)
    build_datastore(tiny_llama, tok, 900, root / "ds", key_site="last", mem_site="0.5", block=64, stride=32,
                    batch_size=4, progress=False)
    build_index(root / "ds", root / "index")
    build_targets(root / "ds", root / "index", root / "targets", k=16, k_explicit=True, temperature=1.0, shard_rows=256)
    return root, tok, open_datastore(root / "ds"), open_targets(root / "targets")


def new_memory(lm):
    torch.manual_seed(0)
    cfg = memory_config_for(lm, resolve_site(lm.model, "0.5"), n_blocks=2)
    return build_memory(lm, cfg)


SETTINGS = TrainSettings(epochs=3, train_batch=128, checkpoint_every=2, val_rows=64, lr=3e-3, autocast="off")


def test_resume_gives_the_same_weights(built, tiny_llama, tmp_path):
    _, _, ds, tg = built
    full = new_memory(tiny_llama)
    m1 = train_memory(full, ds, tg, tmp_path / "a", SETTINGS, progress=False)
    assert m1["steps"] >= 6 and m1["validation"]["loss"] > 0
    assert train_memory(new_memory(tiny_llama), ds, tg, tmp_path / "b", SETTINGS, progress=False,
                        stop_after_steps=3) == {}
    assert (tmp_path / "b" / CHECKPOINT / "state.json").exists()
    resumed = new_memory(tiny_llama)
    torch.nn.init.normal_(resumed.lm_head.weight)  # must be overwritten by the checkpoint
    m2 = train_memory(resumed, ds, tg, tmp_path / "b", SETTINGS, progress=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert m1["validation"] == m2["validation"]
    # A finished run is a no-op.
    again = train_memory(new_memory(tiny_llama), ds, tg, tmp_path / "a", SETTINGS, progress=False)
    assert again["training_fingerprint"] == m1["training_fingerprint"]


def test_online_inputs_equal_offline(built, tiny_llama):
    _, tok, ds, _ = built
    rows = np.array([0, 1, 30, 31, 32, 63, 64, 500, 897])
    off = OfflineInputs(ds)(rows)
    on = OnlineInputs(tiny_llama, ds, tok)(rows)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-3)


def test_nan_loss_stops_and_keeps_the_checkpoint(built, tiny_llama, tmp_path):
    _, _, ds, tg = built
    offline = OfflineInputs(ds)
    calls = {"n": 0}

    def poisoned(rows):
        calls["n"] += 1
        x = offline(rows)
        return x * float("nan") if calls["n"] > 3 else x

    with pytest.raises(MLPMemError, match="checkpoint"):
        train_memory(new_memory(tiny_llama), ds, tg, tmp_path / "n", SETTINGS, inputs=poisoned, progress=False)
    assert (tmp_path / "n" / CHECKPOINT / "model.safetensors").exists()
    assert not (tmp_path / "n" / "manifest.json").exists()


def test_wrong_alpha_is_refused(built, tiny_llama, tmp_path):
    _, _, ds, tg = built
    with pytest.raises(MLPMemError, match="alpha"):
        train_memory(new_memory(tiny_llama), ds, tg, tmp_path, TrainSettings(alpha=1.5), progress=False)


def test_snapshots_hold_the_weights_of_that_step_and_change_nothing(built, tiny_llama, tmp_path):
    """A snapshot at half the training = the weights an interrupted run checkpointed at that step;
    the final weights equal those of a run without snapshots; each snapshot's validation is real."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from mlpmemory.memory import MLPMemory
    from mlpmemory.train import evaluate_loss, snapshot_dir, snapshot_steps, split_rows

    _, _, ds, tg = built
    with_snaps = new_memory(tiny_llama)
    m = train_memory(with_snaps, ds, tg, tmp_path / "s", SETTINGS, progress=False, snapshots=(0.5, 0.25))
    total = m["steps"]
    steps = snapshot_steps((0.5, 0.25), total)
    assert [s["step"] for s in sorted(m["snapshots"], key=lambda s: s["step"])] == steps and steps[0] < steps[1] < total
    half = steps[1]
    snap = next(s for s in m["snapshots"] if s["step"] == half)
    assert snap["rows_seen"] == half * m["batch_rows"] and snap["dir"] == f"snapshots/step_{half:07d}"
    # Oracle for the snapshot: a run without snapshots, checkpointing every step, killed at that step.
    every = replace(SETTINGS, checkpoint_every=1)
    assert train_memory(new_memory(tiny_llama), ds, tg, tmp_path / "k", every, progress=False,
                        stop_after_steps=half) == {}
    killed = load_file(str(tmp_path / "k" / CHECKPOINT / "model.safetensors"))
    loaded = MLPMemory.from_pretrained(snapshot_dir(tmp_path / "s", half))
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, killed[name], rtol=0, atol=0, msg=name)
    _, val_rows = split_rows(ds.n, SETTINGS.val_rows, SETTINGS.seed)
    again = evaluate_loss(loaded.train(), OfflineInputs(ds), tg, val_rows, SETTINGS.alpha, "cpu", None)
    assert again == pytest.approx(snap["validation"], rel=1e-6)
    # Snapshots do not change the training: same final weights as without them.
    plain = new_memory(tiny_llama)
    train_memory(plain, ds, tg, tmp_path / "p", SETTINGS, progress=False)
    for (n, a), (_, b) in zip(plain.state_dict().items(), with_snaps.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    with pytest.raises(MLPMemError, match="snapshot"):
        snapshot_steps((0.0,), 10)
