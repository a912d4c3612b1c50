"""Run configs: a TOML file plus ``section.key=value`` overrides.

Values of overrides are parsed as TOML (``train.lr=0.05``, ``method.bits=4``,
``faults.raise_clients=[1,2]``); anything that is not valid TOML is taken as
a string (``method.name=flasc``).

Every merged config is checked against :data:`SCHEMA` before anything runs:
an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the key and the closest valid one (``train.roundz`` -> did you mean
``train.rounds``?). The schema is a plain table of types here rather than a
validation library (pydantic, jsonschema): the configs are small, flat
TOML, and the table doubles as the list of every key the code reads, with
no new dependency for the experiments or the Flower app.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The experiment configs: configs/ of the checkout, or the copy installed with
# the package (flocora_fl/configs, see pyproject.toml).
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


class Choice:
    """A string from a fixed set."""

    def __init__(self, *values: str):
        self.values = values


class ListOf:
    def __init__(self, item: type):
        self.item = item


# Every key the fl/ code reads (fl/loop.py, fl/data.py, fl/comm.py,
# fl/methods/*.py, fl/training.py), by section. float accepts integers too.
SCHEMA: dict = {
    "name": str,
    "seed": int,
    "device": str,  # "auto", "cpu", "cuda", "cuda:1", ...
    "threads": int,
    "data": {
        "dataset": Choice("mnist5k", "digits", "cifar10", "cifar100", "npz", "synthetic"),
        "num_clients": int,
        "dirichlet_alpha": float,
        "holdout": float,
        "augment": Choice("none", "crop", "crop_flip"),
        "image_size": int,
        "root": str,  # cifar10/100 directory
        "path": str,  # dataset = "npz"
        "test_fraction": float,  # mnist5k, digits
        "num_samples": int,  # synthetic
        "num_classes": int,  # synthetic
        "source_size": int,  # synthetic
        "channels": int,  # synthetic
    },
    "model": {"arch": Choice("resnet8", "resnet18", "cnn"), "width": int, "seed": int},
    "method": {
        "name": Choice("fedavg", "flocora", "flasc", "fedlora", "stc"),
        "transport": Choice("weights", "delta"),
        # LoRA (flocora, flasc, fedlora)
        "rank": int,
        "alpha": float,
        "mode": int,
        "adapter_epochs": int,
        "share_adapter": bool,
        # codec (fl/comm.py make_spec)
        "bits": int,
        "quantize_download": bool,
        "granularity": Choice("tensor", "row", "group"),
        "group_size": int,
        "rounding": Choice("nearest", "stochastic"),
        "codec_seed": int,
        "meta_dtype": Choice("float32", "float16"),
        "ul_density": float,
        "dl_density": float,
        "ul_density_tiers": ListOf(float),
        "density_decay": float,
        "min_density": float,
        "topk_scope": Choice("tensor", "global"),
        "sparse_values": Choice("float32", "float16", "bfloat16", "quantized", "sign"),
        "keep_1d_raw": bool,
        # server and transport (fl/methods/fedavg.py, fl/transport.py)
        "server_opt": Choice("sgd", "adam", "adamw"),
        "server_lr": float,
        "server_momentum": float,
        "error_feedback": bool,
        "server_error_feedback": bool,
        "flatten": bool,
        "down_mode": Choice("broadcast", "per_client"),
        # compact messages against schemas agreed once (default true)
        "compact": bool,
    },
    "train": {
        "rounds": int,
        "clients_per_round": int,
        "epochs": int,
        "batch_size": int,
        "lr": float,
        "momentum": float,
        "nesterov": bool,
        "weight_decay": float,
        "max_steps": int,
    },
    "eval": {"every": int},
    "server": {"client_timeout_s": float, "max_update_norm_ratio": float},
    "faults": {
        "raise_clients": ListOf(int),
        "corrupt_clients": ListOf(int),
        "bomb_clients": ListOf(int),
        "nan_clients": ListOf(int),
        "scale_clients": ListOf(int),
        "scale_factor": float,
        "hang_clients": ListOf(int),
        "hang_s": float,
    },
}


def _type_name(t) -> str:
    if isinstance(t, Choice):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, ListOf):
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[t.item]
    if isinstance(t, dict):
        return "a section (table)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[t]


def _fits(value, t) -> bool:
    if isinstance(t, Choice):
        return isinstance(value, str) and value in t.values
    if isinstance(t, ListOf):
        return isinstance(value, list) and all(_fits(v, t.item) for v in value)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _closest(word: str, options) -> str | None:
    hits = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return hits[0] if hits else None


def _check(cfg: dict, schema: dict, prefix: str, errors: list[str]) -> None:
    for key, value in cfg.items():
        path = prefix + key
        if key not in schema:
            near = _closest(key, schema)
            hint = f"; did you mean {prefix + near!r}?" if near else ""
            valid = ", ".join(prefix + k for k in schema)
            errors.append(f"unknown config key {path!r}{hint} (valid here: {valid})")
            continue
        t = schema[key]
        if isinstance(t, dict):
            if isinstance(value, dict):
                _check(value, t, path + ".", errors)
            else:
                errors.append(f"config key {path!r} must be a section (table), got {value!r}")
        elif not _fits(value, t):
            hint = ""
            if isinstance(t, Choice) and isinstance(value, str):
                near = _closest(value, t.values)
                hint = f"; did you mean {near!r}?" if near else ""
            errors.append(f"config key {path!r} must be {_type_name(t)}, got {value!r} ({type(value).__name__}){hint}")


def validate(cfg: dict, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Check every key and value of ``cfg`` against ``schema``; return ``cfg``.

    Raises
    ------
    ConfigError
        Listing every unknown key (with the closest valid key, if any) and
        every value of the wrong type or not among the allowed choices (with
        the closest choice).
    """
    errors: list[str] = []
    _check(cfg, schema, prefix, errors)
    if errors:
        raise ConfigError("; ".join(errors) if len(errors) == 1 else "\n  " + "\n  ".join(errors))
    return cfg


DEFAULTS = {
    "name": "run",
    "seed": 1234,
    "device": "auto",
    "data": {"dataset": "mnist5k", "num_clients": 10, "dirichlet_alpha": 0.5, "holdout": 0.0, "augment": "none"},
    "model": {"arch": "resnet8", "width": 64},
    "method": {"name": "fedavg"},
    "train": {
        "rounds": 10,
        "clients_per_round": 5,
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0,
    },
    "eval": {"every": 1},
    # Fault tolerance of the server (docs/experiments.md): 0 switches a check off.
    "server": {"client_timeout_s": 0.0, "max_update_norm_ratio": 0.0},
    # Injected faults (tests, demos): clients that raise, send corrupt bytes or a
    # decompression bomb, put NaN in their update, scale it by scale_factor, or
    # hang for hang_s.
    "faults": {
        "raise_clients": [],
        "corrupt_clients": [],
        "bomb_clients": [],
        "nan_clients": [],
        "scale_clients": [],
        "scale_factor": 1000.0,
        "hang_clients": [],
        "hang_s": 3600.0,
    },
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
    """Defaults < TOML file (or ``base``) < overrides, validated against :data:`SCHEMA`."""
    cfg = _merge(DEFAULTS, base or {})
    if path is not None:
        with open(path, "rb") as f:
            try:
                validate(tomllib.load(f))  # name the file's own typos before merging
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            f.seek(0)
            cfg = _merge(cfg, tomllib.load(f))
    try:
        return validate(apply_overrides(cfg, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (after the overrides {list(overrides)})" if overrides else str(exc)) from None


# A sweep file (configs/sweeps/*.toml): a base config, shared overrides and
# seeds, and one [[variant]] per run, each with a name and its overrides.
SWEEP_SCHEMA: dict = {"base": str, "results": str, "seeds": ListOf(int), "overrides": ListOf(str),
                      "variant": list}  # fmt: skip
VARIANT_SCHEMA: dict = {"name": str, "overrides": ListOf(str)}


def load_sweep(path: str | Path, extra_overrides=()) -> tuple[dict, Path, list[tuple[dict, int | None, list[str]]]]:
    """Read and check a sweep file, and every run config it makes.

    Returns ``(sweep, base_config_path, jobs)``, ``jobs`` as ``(variant, seed,
    overrides)`` in run order (seeds outer). Every job's config is loaded and
    validated here, so a typo in the last variant fails before the first run.
    """
    path = Path(path)
    with open(path, "rb") as f:
        sweep = tomllib.load(f)
    try:
        validate(sweep, SWEEP_SCHEMA)
        if "base" not in sweep or not sweep.get("variant"):
            raise ConfigError("a sweep needs 'base' (a config file) and at least one [[variant]]")
        for i, v in enumerate(sweep["variant"]):
            if not isinstance(v, dict) or "name" not in v:
                raise ConfigError(f"[[variant]] {i + 1} needs a name")
            validate(v, VARIANT_SCHEMA, f"variant[{v['name']}].")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = (path.parent / sweep["base"]).resolve()
    jobs = []
    for seed in sweep.get("seeds") or [None]:
        for v in sweep["variant"]:
            over = list(sweep.get("overrides", [])) + list(v.get("overrides", [])) + [f"name={v['name']}"]
            if seed is not None:
                over.append(f"seed={seed}")
            over += list(extra_overrides)
            try:
                load_config(base, over)
            except ConfigError as exc:
                raise ConfigError(f"{path}, variant {v['name']!r}: {exc}") from None
            jobs.append((v, seed, over))
    return sweep, base, jobs
