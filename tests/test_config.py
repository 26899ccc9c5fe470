"""Run settings: nested groups, precedence, old flat files, validation of every numeric field."""

import json
import math
from dataclasses import fields

import pytest

from mlpmemory import MLPMemError
from mlpmemory.config import GROUPS, PRESETS, Config, defaults, group_of_field, load_config_file, make_config


def test_defaults_are_the_dataclass_defaults_and_names_are_unique():
    cfg = make_config()
    flat = {name: getattr(getattr(cfg, group), name) for name, group in group_of_field().items()}
    assert flat == defaults()
    names = [f.name for cls in GROUPS.values() for f in fields(cls)]
    assert len(names) == len(set(names))  # flags stay flat: --lr, --block, --nprobe
    assert list(GROUPS) == [f.name for f in fields(Config)]


def test_precedence_defaults_saved_preset_file_flags(tmp_path):
    saved = {"datastore": {"block": 64, "stride": 32}, "train": {"lr": 0.5}}
    assert make_config(base=saved).datastore.block == 64
    assert make_config("quick", base=saved).datastore.block == PRESETS["quick"]["block"]  # preset over saved
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 0.25\n[datastore]\nblock = 128\nstride = 64\n")
    cfg = make_config("quick", str(f), base=saved, lr=0.125)
    assert cfg.datastore.block == 128 and cfg.train.lr == 0.125  # file over preset, flags over file


def test_saved_config_round_trips_and_old_flat_files_load(tmp_path):
    cfg = make_config("quick", lr=3e-3, k=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert make_config(base=load_config_file(tmp_path / "config.json")) == cfg
    flat = {**defaults(), "lr": 3e-3, "k": 16, "eval_text": "other.txt", **PRESETS["quick"]}
    (tmp_path / "old.json").write_text(json.dumps(flat))  # an older version's flat file, with a one-off option
    assert make_config(base=load_config_file(tmp_path / "old.json")) == cfg


@pytest.mark.parametrize("text, fragment", [
    ("[train]\nblock = 3\n", "another section"),
    ("[bogus]\nx = 1\n", "unknown section"),
    ("alpha_beta = 1\n", "alpha_beta"),
    ("lr = \n", "does not parse"),
])
def test_bad_config_files(tmp_path, text, fragment):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(MLPMemError, match=fragment):
        load_config_file(f)


@pytest.mark.parametrize("setting, value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("epochs", -1.0), ("warmup", math.nan), ("warmup", 1.5),
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("val_rows", -5), ("weight_decay", -1.0), ("memory_blocks", 0),
    ("memory_param_ratio", 0.0), ("alpha", 1.5), ("block", 1), ("stride", 0), ("k", 0), ("nprobe", 0),
    ("temperature", "nan"), ("temperature", "-2"), ("lambdas", "0,1.5"), ("lambdas", "a"),
    ("heldout_fraction", 1.0), ("ivf_flat_max_gb", math.inf), ("dtype", "int8"), ("train_mode", "both"),
    ("block", "abc"), ("block", 64.5), ("block", True), ("lr", "fast"), ("seed", -1), ("rag_ppl", 1),
    ("model", 3), ("k", 2.0), ("autocast", "float16"),
])
def test_every_bad_value_is_a_one_line_error_naming_the_flag(setting, value):
    with pytest.raises(MLPMemError) as e:
        make_config(**{setting: value})
    assert f"--{setting.replace('_', '-')}" in str(e.value) and "\n" not in str(e.value)


def test_updated_copies_and_validates():
    cfg = make_config()
    assert cfg.updated(lr=0.5).train.lr == 0.5 and cfg.train.lr == defaults()["lr"]
    with pytest.raises(MLPMemError, match="unknown setting"):
        cfg.updated(learning_rate=0.5)


def test_a_wrongly_typed_config_file_is_refused_and_never_saved(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[datastore]\nblock = 64.5\n")
    with pytest.raises(MLPMemError, match="--block must be an integer"):
        make_config(config_file=str(f))
    assert make_config(lr=1).train.lr == 1.0 and isinstance(make_config(lr=1).train.lr, float)
