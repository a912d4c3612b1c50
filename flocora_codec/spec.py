"""What to do with each tensor: :class:`CodecSpec` and per-tensor :class:`Rule` s.

A spec is validated once, at construction, so that a typo fails where it is
written and not in the middle of a training round.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

import torch

__all__ = ["CodecSpec", "Rule"]

GRANULARITIES = ("tensor", "row", "group")
ROUNDINGS = ("nearest", "stochastic")
META_DTYPES = ("float32", "float16")
TOPK_SCOPES = ("tensor", "global")
VALUE_ENCODINGS = ("float32", "float16", "bfloat16", "quantized", "sign")
MAX_GROUP_SIZE = 1 << 31
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_name(value, allowed, what):
    """Accept ``"float16"`` or ``torch.float16``; return the canonical string."""
    if isinstance(value, torch.dtype):
        value = _DTYPE_NAMES.get(value, str(value))
    if value not in allowed:
        raise ValueError(f"CodecSpec: {what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CodecSpec:
    """How the tensors of a message are compressed.

    Parameters
    ----------
    bits : int or None
        1..8: affine quantization to ``bits``-bit codes, bit-packed. ``None``:
        no quantization (raw, or sparse with raw values).
    granularity : {"tensor", "row", "group"}
        One scale/offset pair per tensor, per index of dimension 0 (the output
        channel, as FLoCoRA), or per ``group_size`` consecutive elements.
        0-d and 1-d tensors under ``"row"`` get one pair per tensor.
    group_size : int
        Group length for ``granularity="group"``: a power of two >= 8.
    rounding : {"nearest", "stochastic"}
        Nearest with ties to even, or unbiased stochastic rounding drawn from a
        counter-based generator (reproducible, see ``seed``).
    seed : int
        Stochastic rounding seed; each tensor mixes it with ``crc32c(name)``.
    meta_dtype : {"float32", "float16"}
        Dtype of the per-group scales and offsets.
    density, k : float or int or None
        Top-k sparsification: the fraction (in (0, 1]) or the number (>= 0) of
        elements kept, by largest ``|x|``. At most one of them; both ``None``
        means dense.
    topk_scope : {"tensor", "global"}
        Select ``k`` per tensor, or one ``k`` over all sparse tensors of the
        message (as FLASC); with ``density`` the global ``k`` is
        ``density * (their total size)``.
    values : {"float32", "float16", "bfloat16", "quantized", "sign"}
        How the kept values of a sparse tensor travel; ``"quantized"`` uses
        ``bits``, ``granularity`` (``"row"`` means one group), ``group_size``,
        ``rounding`` and ``meta_dtype`` on the values vector. ``"sign"`` is
        STC's ternary code: one sign bit per kept value and one mean
        magnitude (``meta_dtype``) per tensor, so every kept value decodes
        to ``+mu`` or ``-mu`` (format version 2; ``bits``, ``granularity``
        and ``rounding`` do not apply to it).
    rules : sequence of Rule
        Per-tensor overrides, first match wins; tensors that match no rule use
        this spec. The default keeps 0-d and 1-d tensors (norms, biases) raw.

    Raises
    ------
    ValueError
        On any invalid parameter, naming it and the accepted values.

    Examples
    --------
    >>> spec = CodecSpec(bits=4, granularity="group", group_size=64)
    >>> sparse = CodecSpec(density=0.01, values="quantized", bits=8)
    """

    bits: int | None = 4
    granularity: str = "row"
    group_size: int = 64
    rounding: str = "nearest"
    seed: int = 0
    meta_dtype: str = "float32"
    density: float | None = None
    k: int | None = None
    topk_scope: str = "tensor"
    values: str = "float32"
    rules: tuple = field(default_factory=lambda: (Rule("*", "raw", max_ndim=1),))

    def __post_init__(self):
        if self.bits is not None and (not _is_int(self.bits) or not 1 <= self.bits <= 8):
            raise ValueError(f"CodecSpec: bits must be an integer in 1..8 or None; got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"CodecSpec: granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        g = self.group_size
        if not _is_int(g) or g < 8 or g > MAX_GROUP_SIZE or g & (g - 1):
            raise ValueError(f"CodecSpec: group_size must be a power of two in 8..2**31; got {g!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"CodecSpec: rounding must be one of {', '.join(ROUNDINGS)}; got {self.rounding!r}")
        if not _is_int(self.seed):
            raise ValueError(f"CodecSpec: seed must be an integer; got {self.seed!r}")
        object.__setattr__(self, "meta_dtype", _dtype_name(self.meta_dtype, META_DTYPES, "meta_dtype"))
        object.__setattr__(self, "values", _dtype_name(self.values, VALUE_ENCODINGS, "values"))
        if self.density is not None and self.k is not None:
            raise ValueError("CodecSpec: give density or k, not both")
        if self.density is not None:
            d = self.density
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < d <= 1.0) or math.isnan(d):
                raise ValueError(f"CodecSpec: density must be a number in (0, 1]; got {d!r}")
            object.__setattr__(self, "density", float(d))
        if self.k is not None and (not _is_int(self.k) or self.k < 0):
            raise ValueError(f"CodecSpec: k must be an integer >= 0; got {self.k!r}")
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"CodecSpec: topk_scope must be one of {', '.join(TOPK_SCOPES)}; got {self.topk_scope!r}")
        if self.values == "quantized" and self.bits is None:
            raise ValueError('CodecSpec: values="quantized" needs bits (1..8)')
        rules = self.rules
        if isinstance(rules, Rule):
            rules = (rules,)
        try:
            rules = tuple(rules)
        except TypeError:
            raise ValueError(f"CodecSpec: rules must be a sequence of Rule; got {self.rules!r}") from None
        for r in rules:
            if not isinstance(r, Rule):
                raise ValueError(f"CodecSpec: rules must hold Rule objects; got {r!r}")
        object.__setattr__(self, "rules", rules)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CodecSpec":
        """A spec from plain configuration values: command-line options, a
        TOML table, a run config. The CLI, the FL experiments (``fl``) and
        the bundled Flower app all build their specs here.

        Parameters
        ----------
        config : mapping
            Any of the parameters above except ``rules``, plus:

            ``keep_1d_raw`` (bool, default True)
                The default rule (0-d and 1-d tensors raw); False: no rules.
            ``raw`` (bool, default False)
                :meth:`raw`, whatever the other keys say (they are not
                checked).

            Missing keys take the defaults above; ``bits=None`` means no
            quantization.

        Returns
        -------
        CodecSpec

        Raises
        ------
        ValueError
            An unknown key (naming it and the accepted ones), or any invalid
            value.

        Examples
        --------
        >>> CodecSpec.from_dict({"bits": 2, "granularity": "group", "group_size": 32})
        >>> CodecSpec.from_dict({"bits": None, "density": 0.01, "keep_1d_raw": False})
        """
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"CodecSpec.from_dict: unknown key {unknown[0]!r}; expected any of {', '.join(CONFIG_KEYS)}"
            )
        if config.get("raw", False):
            return cls.raw()
        kw = {k: v for k, v in config.items() if k not in ("raw", "keep_1d_raw")}
        if not config.get("keep_1d_raw", True):
            kw["rules"] = ()
        return cls(**kw)

    @classmethod
    def raw(cls) -> "CodecSpec":
        """No compression at all: every tensor travels as is (the FedAvg baseline).

        Returns
        -------
        CodecSpec
            ``bits=None``, dense, no rules.
        """
        return cls(bits=None, rules=())

    @property
    def sparse(self) -> bool:
        """True when the spec keeps only the top-k elements."""
        return self.density is not None or self.k is not None

    @property
    def is_raw(self) -> bool:
        """True when the spec leaves a tensor untouched."""
        return self.bits is None and not self.sparse

    def replace(self, **changes) -> "CodecSpec":
        """A copy with some fields changed (validated again).

        Parameters
        ----------
        **changes
            Field names and their new values.

        Returns
        -------
        CodecSpec
        """
        return replace(self, **changes)

    def resolve(self, name: str, ndim: int) -> "CodecSpec":
        """The spec that applies to one tensor: the first matching rule's, else this one.

        Parameters
        ----------
        name : str
            Tensor name, matched with :func:`fnmatch.fnmatchcase`.
        ndim : int
            Number of dimensions, compared with each rule's ``max_ndim``.

        Returns
        -------
        CodecSpec
            The effective spec (a rule's ``"raw"`` gives :meth:`raw`); the
            rules of a rule's own spec are not consulted.
        """
        for rule in self.rules:
            if rule.matches(name, ndim):
                return _RAW if rule.spec == "raw" else rule.spec
        return self


@dataclass(frozen=True)
class Rule:
    """A per-tensor override: tensors whose name matches ``pattern`` (and whose
    ``ndim <= max_ndim`` when given) use ``spec`` instead of the message spec.

    Parameters
    ----------
    pattern : str
        :mod:`fnmatch` pattern on the tensor name (case-sensitive), e.g.
        ``"*.lora_B"`` or ``"*"``.
    spec : CodecSpec or "raw"
        What to do with matching tensors; ``"raw"`` sends them as they are.
    max_ndim : int or None
        When set, only tensors with at most this many dimensions match.

    Examples
    --------
    >>> Rule("*", "raw", max_ndim=1)          # norms and biases stay raw
    >>> Rule("fc.*", CodecSpec(bits=8))       # classifier at 8 bits
    """

    pattern: str
    spec: Union[CodecSpec, str] = "raw"
    max_ndim: int | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule: pattern must be a string; got {self.pattern!r}")
        if not (self.spec == "raw" or isinstance(self.spec, CodecSpec)):
            raise ValueError(f'Rule: spec must be a CodecSpec or "raw"; got {self.spec!r}')
        if self.max_ndim is not None and (not _is_int(self.max_ndim) or self.max_ndim < 0):
            raise ValueError(f"Rule: max_ndim must be an integer >= 0 or None; got {self.max_ndim!r}")

    def matches(self, name: str, ndim: int) -> bool:
        """Whether this rule applies to a tensor.

        Parameters
        ----------
        name : str
            Tensor name.
        ndim : int
            Its number of dimensions.

        Returns
        -------
        bool
            ``fnmatchcase(name, pattern)`` and, when ``max_ndim`` is set,
            ``ndim <= max_ndim``.
        """
        if self.max_ndim is not None and ndim > self.max_ndim:
            return False
        return fnmatch.fnmatchcase(name, self.pattern)


_RAW = CodecSpec.raw()

CONFIG_KEYS = (
    *(f.name for f in fields(CodecSpec) if f.name != "rules"),
    "keep_1d_raw",
    "raw",
)
"""The keys :meth:`CodecSpec.from_dict` accepts."""
