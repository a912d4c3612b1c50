"""Config validation: every key the fl/ code reads is in fl.config.SCHEMA, and
typos fail before training with the closest valid key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import flocora_codec as fc
from fl.config import SCHEMA, ConfigError, load_config, load_sweep, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert cfg["method"]["name"] in SCHEMA["method"]["name"].values


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_every_sweep_validates(path):
    sweep, base, jobs = load_sweep(path)  # loads and validates every run config of the sweep
    assert base.is_file() and len(jobs) == len(sweep["variant"]) * len(sweep.get("seeds") or [None])


def test_every_stored_run_config_validates():
    # `python -m fl run --resume DIR` reloads these
    paths = sorted((ROOT / "docs" / "results").rglob("config.json"))
    for p in paths:
        load_config(None, base=json.loads(p.read_text()))


@pytest.mark.parametrize(
    "overrides, key, near",
    [
        (["train.roundz=1"], "train.roundz", "train.rounds"),
        (["method.nmae=flocora"], "method.nmae", "method.name"),
        (["trian.rounds=2"], "trian", "train"),
        (["data.dirichlet_alpa=0.1"], "data.dirichlet_alpa", "data.dirichlet_alpha"),
    ],
)
def test_unknown_override_names_the_closest_key(overrides, key, near):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "offline_mnist.toml", overrides)
    assert f"unknown config key {key!r}; did you mean {near!r}?" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.rounds=1.5", "'train.rounds' must be an integer, got 1.5"),
        ("train.nesterov=1", "'train.nesterov' must be true or false"),
        ("method.bits=four", "'method.bits' must be an integer, got 'four'"),
        ("method.name=flocra", "did you mean 'flocora'?"),
        ("method.ul_density_tiers=[0.1, 'x']", "'method.ul_density_tiers' must be a list of numbers"),
        ("train=3", "'train' must be a section"),
    ],
)
def test_wrong_types_fail(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_typo_in_a_toml_file_names_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nrounds = 2\nlearning_rate = 0.1\n[method]\nname = "fedavg"\nbitz = 4\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    assert str(p) in text and "'train.learning_rate'" in text and "'method.bitz'; did you mean 'method.bits'?" in text
    assert validate({"train": {"lr": 1}})  # an integer is a valid number


def test_typo_in_a_sweep_variant_fails_before_any_run(tmp_path):
    (tmp_path / "base.toml").write_text((ROOT / "configs" / "offline_mnist.toml").read_text())
    sweep = tmp_path / "s.toml"
    sweep.write_text('base = "base.toml"\n[[variant]]\nname = "a"\noverrides = ["method.name=fedavg"]\n'
                     '[[variant]]\nname = "b"\noverrides = ["method.rnak=4"]\n')  # fmt: skip
    with pytest.raises(ConfigError, match="variant 'b'.*did you mean 'method.rank'"):
        load_sweep(sweep)
    sweep.write_text('base = "base.toml"\nseed = [1]\n[[variant]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="'seed'; did you mean 'seeds'"):
        load_sweep(sweep)


def test_fl_run_exits_2_before_training():
    r = subprocess.run([sys.executable, "-m", "fl", "run", "configs/offline_mnist.toml", "train.roundz=1",
                        "method.nmae=flocora", "--out", "/nonexistent/never-created"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "did you mean 'train.rounds'" in r.stderr and "did you mean 'method.name'" in r.stderr


def test_flower_app_run_config_is_checked(monkeypatch):
    pytest.importorskip("flwr")
    monkeypatch.syspath_prepend(str(ROOT / "fl" / "flower_app"))
    # the app imports the installed flocora_fl (or, without it, this checkout's fl): its own ConfigError
    from flocora_flower.task import ConfigError, app_config, fl_config

    cfg = app_config({"codec-bits": 2, "fraction-train": 1})  # an integer is a valid number
    assert cfg["codec-bits"] == 2
    with pytest.raises(ConfigError, match="'codec-bitz'; did you mean 'codec-bits'"):
        app_config({"codec-bitz": 2})
    with pytest.raises(ConfigError, match="'num-server-rounds' must be an integer, got '3'"):
        app_config({"num-server-rounds": "3"})
    with pytest.raises(ConfigError, match="did you mean 'delta'"):
        app_config({"codec-mode": "delt"})
    with pytest.raises(ConfigError, match="did you mean 'train.rounds'"):  # fl-overrides go through fl.config
        fl_config(app_config({"fl-overrides": "method.name=flocora train.roundz=2"}))


def test_flower_app_codec_specs_keep_their_defaults(monkeypatch):
    # built by CodecSpec.from_dict; the values pin what the app sent before it did
    pytest.importorskip("flwr")
    monkeypatch.syspath_prepend(str(ROOT / "fl" / "flower_app"))
    from flocora_flower.task import app_config, codec_specs

    assert codec_specs(app_config({})) == (fc.CodecSpec(bits=4, granularity="row", group_size=64), None)
    up, down = codec_specs(
        app_config(
            {
                "codec-bits": 2,
                "codec-granularity": "group",
                "codec-group-size": 16,
                "codec-rounding": "stochastic",
                "downlink-bits": 8,
            }
        )
    )
    assert up == fc.CodecSpec(bits=2, granularity="group", group_size=16, rounding="stochastic")
    assert down == fc.CodecSpec(bits=8, granularity="group", group_size=16, rounding="stochastic")
