"""Run configs: a TOML file plus ``section.key=value`` overrides.

Values of overrides are parsed as TOML (``train.lr=0.05``, ``method.bits=4``,
``faults.raise_clients=[1,2]``); anything that is not valid TOML is taken as
a string (``method.name=flasc``).
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

DEFAULTS = {
    "name": "run",
    "seed": 1234,
    "device": "auto",
    "data": {"dataset": "mnist5k", "num_clients": 10, "dirichlet_alpha": 0.5, "holdout": 0.0, "augment": "none"},
    "model": {"arch": "resnet8", "width": 64},
    "method": {"name": "fedavg"},
    "train": {"rounds": 10, "clients_per_round": 5, "epochs": 1, "batch_size": 32, "lr": 0.01,
              "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    "eval": {"every": 1},
    # Fault tolerance of the server (docs/experiments.md): 0 switches a check off.
    "server": {"client_timeout_s": 0.0, "max_update_norm_ratio": 0.0},
    # Injected faults (tests, demos): clients that raise, send corrupt bytes or a
    # decompression bomb, put NaN in their update, scale it by scale_factor, or
    # hang for hang_s.
    "faults": {"raise_clients": [], "corrupt_clients": [], "bomb_clients": [], "nan_clients": [], "scale_clients": [],
               "scale_factor": 1000.0, "hang_clients": [], "hang_s": 3600.0},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        path, value = parse_override(item)
        node = cfg
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[path[-1]] = value
    return cfg


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> dict:
    """Defaults < TOML file (or ``base``) < overrides."""
    cfg = _merge(DEFAULTS, base or {})
    if path is not None:
        with open(path, "rb") as f:
            cfg = _merge(cfg, tomllib.load(f))
    return apply_overrides(cfg, overrides)
