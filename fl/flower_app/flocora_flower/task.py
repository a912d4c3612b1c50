"""Glue between Flower's run config and the repository's ``fl`` experiment code.

Nothing here trains or evaluates: models, data, LoRA, local training and
evaluation all come from ``fl`` (``fl.loop.setup`` builds the same method
object the ``fl`` round loop uses). This module only turns the app's run
config into an ``fl`` config and codec specs, and moves tensors in and out of
Flower ``ArrayRecord`` s.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
from flwr.app import ArrayRecord

import flocora_codec as fc

# The experiment code: `flocora_fl` when flocora-codec is installed (a wheel
# or `pip install -e .` of the checkout), else the checkout's `fl` on
# PYTHONPATH. One of the two, never both, so every module comes from one place.
try:
    from flocora_fl.config import CONFIG_DIR, Choice, ConfigError, load_config, validate
    from flocora_fl.loop import setup as fl_setup
    from flocora_fl.lora import set_tensors
except ImportError:
    try:
        from fl.config import CONFIG_DIR, Choice, ConfigError, load_config, validate
        from fl.loop import setup as fl_setup
        from fl.lora import set_tensors  # noqa: F401  for server_app
    except ImportError as exc:  # pragma: no cover - environment problem, not logic
        raise ImportError(
            "flocora_flower needs the FL experiment code: pip install 'flocora-codec[flower,experiments]' "
            "(from a checkout: pip install --no-build-isolation -e '.[flower,experiments]'), or put the "
            "repository root on PYTHONPATH for every Flower process"
        ) from exc

SUPPORTED_METHODS = ("fedavg", "flocora")
_APP_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def default_run_config() -> dict:
    """The ``[tool.flwr.app.config]`` table of this app's pyproject.toml.

    ``flwr run`` hands these to the apps itself; ``run_simulation`` (the
    Python API) does not, so the apps fall back on them.
    """
    with open(_APP_PYPROJECT, "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


# String settings with a fixed set of values; every other key's type is the
# type of its default in pyproject.toml.
_APP_CHOICES = {
    "codec-granularity": ("tensor", "row", "group"),
    "codec-rounding": ("nearest", "stochastic"),
    "codec-mode": ("delta", "arrays"),
}


def app_schema() -> dict:
    """Run config key -> type (or choice), from the app's pyproject defaults."""
    schema = {}
    for key, default in default_run_config().items():
        if key in _APP_CHOICES:
            schema[key] = Choice(*_APP_CHOICES[key])
        else:
            schema[key] = float if isinstance(default, float) else type(default)
    return schema


def app_config(run_config, overrides: dict | None = None) -> dict:
    """pyproject defaults < Flower run config < ``overrides``, validated: an
    unknown key or a value of the wrong type raises ``ConfigError`` naming the
    key and the closest valid one, before anything trains."""
    cfg = default_run_config()
    cfg.update(dict(run_config or {}))
    cfg.update(overrides or {})
    try:
        return validate(cfg, app_schema())
    except ConfigError as exc:
        raise ConfigError(f"Flower run config: {exc}".replace("config key", "run config key")) from None


def fl_config(appcfg: dict) -> dict:
    """The ``fl`` experiment config named by ``fl-config`` plus ``fl-overrides``."""
    path = Path(str(appcfg["fl-config"]))
    if not path.is_absolute():  # "configs/x.toml": the checkout's, or the installed copy
        path = CONFIG_DIR.parent / path
    cfg = load_config(path, str(appcfg.get("fl-overrides", "")).split())
    name = cfg["method"].get("name", "fedavg")
    if name not in SUPPORTED_METHODS:
        raise ValueError(
            f"the Flower app runs fl methods {', '.join(SUPPORTED_METHODS)} (one global model averaged by "
            f"Flower's FedAvg); got method.name={name!r}"
        )
    return cfg


def codec_specs(appcfg: dict) -> tuple[fc.CodecSpec | None, fc.CodecSpec | None]:
    """(uplink spec, downlink spec); ``None`` where the app sends plain arrays.

    1-D tensors (norms, biases) stay raw in both, as in FLoCoRA.
    """

    def spec(bits: int) -> fc.CodecSpec | None:
        if int(bits) <= 0:
            return None
        return fc.CodecSpec.from_dict(
            {
                "bits": int(bits),
                "granularity": str(appcfg["codec-granularity"]),
                "group_size": int(appcfg["codec-group-size"]),
                "rounding": str(appcfg["codec-rounding"]),
            }
        )

    return spec(appcfg["codec-bits"]), spec(appcfg["downlink-bits"])


_METHODS: dict[str, tuple] = {}


def method_for(cfg: dict):
    """``fl.loop.setup(cfg)`` once per process and config: (method, device).

    Simulation workers and SuperNodes call the ClientApp many times; data
    loading and model construction happen once.
    """
    key = json.dumps(cfg, sort_keys=True)
    if key not in _METHODS:
        _METHODS[key] = fl_setup(cfg)
    return _METHODS[key]


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors (any device) -> ArrayRecord of numpy arrays, names kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})


def from_record(record: ArrayRecord, device) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors on ``device``."""
    return {k: torch.from_numpy(a.numpy().copy()).to(device) for k, a in record.items()}
