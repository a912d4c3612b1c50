"""Wire format v1: byte layout, header (de)serialization and validation.

``docs/FORMAT.md`` is the specification; this module is its executable form.
It knows nothing about kernels: :mod:`flocora_codec.codec` fills and reads the
sections. The parser treats its input as hostile: every count and length is
checked against the bytes actually present and against :class:`DecodeLimits`
*before* anything sized by the message is allocated.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import crc32c as _crc32c
import numpy as np
import torch

from flocora_codec import ops
from flocora_codec.errors import (
    ChecksumError,
    ExpectationError,
    FormatError,
    LimitError,
    UnknownSchemaError,
    UnsupportedVersionError,
)

__all__ = ["DecodeLimits", "CodecRecord", "TensorEntry", "ParsedMessage", "parse", "crc32c", "expectation"]

MAGIC = b"FLoC"
# Version 2 is version 1 plus sign-and-mean top-k values (values = 5). The
# encoder writes the lowest version a message needs, so every message without
# sign values stays a version-1 message, byte for byte. Version 3 is the
# compact message: the tables live in a schema both sides agreed on once,
# and the message names it by hash (FORMAT.md 6).
VERSION = 2
COMPACT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
SCHEMA_MAGIC = b"FLoS"
SCHEMA_VERSION = 1
SCHEMA_ID_SIZE = 16  # bytes of SHA-256 that name a schema
COMPACT_FIXED = 8 + SCHEMA_ID_SIZE  # magic, version, flags, schema id
PREAMBLE = struct.Struct("<4sHHHI")  # magic, version, flags, n_codecs, n_tensors
CODEC_RECORD = struct.Struct("<8B")
CHECKSUM = struct.Struct("<I")
PREAMBLE_SIZE = PREAMBLE.size  # 14
CHECKSUM_SIZE = CHECKSUM.size  # 4
MIN_MESSAGE = PREAMBLE_SIZE + CHECKSUM_SIZE
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U8U8 = struct.Struct("<BB")
_SECTIONS = struct.Struct("<QQQ")
_COUNT = struct.Struct("<QB")
# _COUNT then _SECTIONS, as they follow each other in an entry: the records ops.topk_layout writes
TOPK_FIELDS = struct.Struct("<QBQQQ")
# name_len + dtype + ndim + codec_index + three section lengths
MIN_TENSOR_RECORD = 2 + 1 + 1 + 2 + _SECTIONS.size
MIN_SCHEMA_RECORD = 2 + 1 + 1 + 2  # name_len + dtype + ndim + codec_index
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF
MAX_U64 = (1 << 64) - 1

# codec ids, granularities, roundings, value encodings, top-k scopes
CODEC_RAW, CODEC_AFFINE, CODEC_TOPK = 0, 1, 2
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_AFFINE: "affine", CODEC_TOPK: "topk"}
GRAN_TENSOR, GRAN_ROW, GRAN_GROUP = 0, 1, 2
GRAN_NAMES = {GRAN_TENSOR: "tensor", GRAN_ROW: "row", GRAN_GROUP: "group"}
ROUND_NEAREST, ROUND_STOCHASTIC = 0, 1
ROUND_NAMES = {ROUND_NEAREST: "nearest", ROUND_STOCHASTIC: "stochastic"}
VALUES_NONE, VALUES_F32, VALUES_F16, VALUES_BF16, VALUES_QUANTIZED, VALUES_SIGN = 0, 1, 2, 3, 4, 5
VALUE_NAMES = {VALUES_F32: "float32", VALUES_F16: "float16", VALUES_BF16: "bfloat16", VALUES_QUANTIZED: "quantized",
               VALUES_SIGN: "sign"}  # fmt: skip
VALUE_DTYPES = {VALUES_F32: torch.float32, VALUES_F16: torch.float16, VALUES_BF16: torch.bfloat16}
SCOPE_TENSOR, SCOPE_GLOBAL = 0, 1
SCOPE_NAMES = {SCOPE_TENSOR: "tensor", SCOPE_GLOBAL: "global"}
MIN_GROUP_LOG2, MAX_GROUP_LOG2 = 3, 31

# Table 1 of docs/FORMAT.md; 0 is invalid on purpose.
DTYPE_CODES = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4,
    torch.uint8: 5, torch.int8: 6, torch.int16: 7, torch.int32: 8, torch.int64: 9,
    torch.bool: 10, torch.uint16: 11, torch.uint32: 12, torch.uint64: 13,
    torch.complex64: 14, torch.complex128: 15,
}  # fmt: skip
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
FLOAT_CODES = frozenset({1, 2, 3, 4})
META_CODES = {1: torch.float32, 2: torch.float16}


# From here on the compiled op's threads and parallel chains beat the crc32c
# package's single chain (~30 GB/s), call overhead included (256 KiB: 7.4
# against 8.2 us; a raw ResNet-18 adapter message, 2.4 MB: 23 against 72 us).
_CRC_OP_MIN_BYTES = 256 << 10


def crc32c(data) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, hardware-accelerated."""
    if memoryview(data).nbytes >= _CRC_OP_MIN_BYTES:
        return ops.crc32c(data)
    return _crc32c.crc32c(data)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds a decoder enforces before it allocates anything a message claims.

    Parameters
    ----------
    max_message_bytes : int
        Longest message accepted (default 4 GiB).
    max_tensors : int
        Most tensor records (default 65 536).
    max_total_elements : int
        Most decoded elements over all tensors (default 2**31): the guard
        against a small sparse or 1-bit message that would decode to terabytes.
    max_ndim : int
        Most dimensions per tensor (default 16).
    max_name_bytes : int
        Longest tensor name in UTF-8 bytes (default 1024).
    max_expansion : int
        Most decoded bytes per message byte (default 65 536) when the
        receiver states no expectation (``decode(..., expect=None)``): the
        guard against a tiny top-k message whose shape claims gigabytes. A
        top-k message at density 1e-4 expands about 20 000x; a receiver that
        expects sparser messages raises it, or better, passes ``expect=``.

    Raises
    ------
    ValueError
        If a limit is not a non-negative integer.
    """

    max_message_bytes: int = 1 << 32
    max_tensors: int = 1 << 16
    max_total_elements: int = 1 << 31
    max_ndim: int = 16
    max_name_bytes: int = 1024
    max_expansion: int = 1 << 16

    def __post_init__(self):
        for name in (
            "max_message_bytes",
            "max_tensors",
            "max_total_elements",
            "max_ndim",
            "max_name_bytes",
            "max_expansion",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DecodeLimits: {name} must be an integer >= 0; got {v!r}")


@dataclass(frozen=True)
class CodecRecord:
    """One 8-byte codec record (FORMAT.md 2.2); several tensors may share it."""

    codec: int
    bits: int = 0
    granularity: int = 0
    group_log2: int = 0
    rounding: int = 0
    meta_dtype: int = 0
    values: int = 0
    topk_scope: int = 0

    def pack(self) -> bytes:
        return CODEC_RECORD.pack(
            self.codec, self.bits, self.granularity, self.group_log2, self.rounding,
            self.meta_dtype, self.values, self.topk_scope,
        )  # fmt: skip

    @property
    def quantized(self) -> bool:
        """Whether the record carries affine codes (the tensor itself or its sparse values)."""
        return self.bits > 0

    def describe(self) -> str:
        """Human-readable parameters, e.g. ``affine 4-bit group=64 nearest meta=float16``."""
        if self.codec == CODEC_RAW:
            return "raw"
        parts = [CODEC_NAMES[self.codec]]
        if self.codec == CODEC_TOPK:
            parts.append(f"scope={SCOPE_NAMES[self.topk_scope]} values={VALUE_NAMES[self.values]}")
        if self.values == VALUES_SIGN:
            parts.append(f"meta={str(CODE_DTYPES[self.meta_dtype])[6:]}")
        elif self.bits:
            gran = GRAN_NAMES[self.granularity]
            if self.granularity == GRAN_GROUP:
                gran += f"={1 << self.group_log2}"
            meta = CODE_DTYPES[self.meta_dtype]
            parts.append(f"{self.bits}-bit {gran} {ROUND_NAMES[self.rounding]} meta={str(meta)[6:]}")
        return " ".join(parts)

    def min_version(self) -> int:
        """The first format version that defines this record."""
        return 2 if self.values == VALUES_SIGN else 1

    def validate(self, version: int = VERSION) -> None:
        """Raise :class:`FormatError` unless this is a valid combination (FORMAT.md 2.2)."""
        c = self
        if c.values == VALUES_SIGN:
            # sign-and-mean values (v2): one sign bit per kept value, one mean magnitude per tensor
            ok = (
                version >= 2
                and c.codec == CODEC_TOPK
                and (c.bits, c.granularity, c.group_log2, c.rounding) == (1, GRAN_TENSOR, 0, 0)
                and c.meta_dtype in META_CODES
                and c.topk_scope in SCOPE_NAMES
            )
            if not ok:
                raise FormatError(f"invalid codec record {self} (sign values need version 2, top-k, bits=1, "
                                  f"tensor granularity; message version {version})")  # fmt: skip
            return
        if c.codec == CODEC_RAW:
            ok = (c.bits, c.granularity, c.group_log2, c.rounding, c.meta_dtype, c.values, c.topk_scope) == (0,) * 7
        elif c.codec in (CODEC_AFFINE, CODEC_TOPK):
            if c.codec == CODEC_AFFINE:
                ok = c.values == VALUES_NONE and c.topk_scope == SCOPE_TENSOR and c.bits > 0
                grans = (GRAN_TENSOR, GRAN_ROW, GRAN_GROUP)
            else:
                ok = c.topk_scope in SCOPE_NAMES and (
                    (c.bits == 0 and c.values in VALUE_DTYPES) or (c.bits > 0 and c.values == VALUES_QUANTIZED)
                )
                grans = (GRAN_TENSOR, GRAN_GROUP)
            if c.bits == 0:
                ok = ok and (c.granularity, c.group_log2, c.rounding, c.meta_dtype) == (0, 0, 0, 0)
            else:
                ok = (
                    ok
                    and c.bits <= ops.MAX_BITS
                    and c.granularity in grans
                    and (
                        MIN_GROUP_LOG2 <= c.group_log2 <= MAX_GROUP_LOG2
                        if c.granularity == GRAN_GROUP
                        else c.group_log2 == 0
                    )
                    and c.rounding in ROUND_NAMES
                    and c.meta_dtype in META_CODES
                )
        else:
            raise FormatError(f"unknown codec id {c.codec}")
        if not ok:
            raise FormatError(f"invalid codec record {self}")


RAW_RECORD = CodecRecord(CODEC_RAW)


def affine_group_size(granularity: int, group_log2: int, shape: tuple, numel: int) -> int:
    """Elements per group (FORMAT.md 3.2); always >= 1."""
    if granularity == GRAN_GROUP:
        return 1 << group_log2
    if granularity == GRAN_ROW and len(shape) >= 2 and shape[0] > 0:
        return max(1, numel // shape[0])
    return max(1, numel)


def section_sizes(rec: CodecRecord, dtype: torch.dtype, shape: tuple, numel: int, count: int) -> tuple:
    """(metadata, index, payload) bytes implied by the parameters (FORMAT.md 3)."""
    if rec.codec == CODEC_RAW:
        return 0, 0, numel * dtype.itemsize
    meta_size = CODE_DTYPES[rec.meta_dtype].itemsize if rec.bits else 0
    if rec.codec == CODEC_AFFINE:
        g = affine_group_size(rec.granularity, rec.group_log2, shape, numel)
        return 2 * ops.num_groups(numel, g) * meta_size, 0, ops.packed_nbytes(numel, rec.bits)
    index = ops.index_nbytes(numel, count)
    if rec.values == VALUES_SIGN:  # one mean magnitude, one sign bit per kept value
        return (meta_size if count else 0), index, ops.packed_nbytes(count, 1)
    if rec.values == VALUES_QUANTIZED:
        g = affine_group_size(rec.granularity, rec.group_log2, (count,), count)
        return 2 * ops.num_groups(count, g) * meta_size, index, ops.packed_nbytes(count, rec.bits)
    return 0, index, count * VALUE_DTYPES[rec.values].itemsize


@dataclass(slots=True)
class TensorEntry:
    """One tensor record plus where its sections lie in the message."""

    name: str
    dtype: torch.dtype
    shape: tuple
    codec_index: int
    count: int = 0  # top-k only
    index_code: int = 0  # top-k only
    metadata_len: int = 0
    index_len: int = 0
    payload_len: int = 0
    offset: int = 0  # start of the metadata section in the message
    numel: int = field(default=-1, compare=False)  # product of shape, computed once

    def __post_init__(self):
        if self.numel < 0:
            self.numel = math.prod(self.shape)

    @property
    def index_offset(self) -> int:
        return self.offset + self.metadata_len

    @property
    def payload_offset(self) -> int:
        return self.offset + self.metadata_len + self.index_len

    @property
    def end(self) -> int:
        return self.payload_offset + self.payload_len

    def record_nbytes(self, name_bytes: bytes, codec: int) -> int:
        extra = _COUNT.size if codec == CODEC_TOPK else 0
        return MIN_TENSOR_RECORD + len(name_bytes) + 8 * len(self.shape) + extra


@dataclass
class ParsedMessage:
    """A validated header: the records, the tensor entries and the byte totals."""

    version: int
    flags: int
    records: list
    entries: list
    header_bytes: int
    total_bytes: int
    schema_id: bytes | None = None  # compact messages: the schema their tables come from


# ---- writing ------------------------------------------------------------------
def header_nbytes(records, entries, names_utf8) -> int:
    """Bytes of preamble + codec table + tensor table."""
    n = PREAMBLE_SIZE + CODEC_RECORD.size * len(records)
    for e, nb in zip(entries, names_utf8):
        n += e.record_nbytes(nb, records[e.codec_index].codec)
    return n


_DEFAULT_LIMITS = DecodeLimits()


def write_header(buf, records, entries, names_utf8, count_positions: dict | None = None) -> int:
    """Pack preamble and tables into ``buf`` (writable buffer) at 0; return the end offset.

    ``count_positions``: filled with entry position -> offset of its top-k
    count field (the three section lengths follow it), for patching later."""
    if len(records) > MAX_U16:
        raise ValueError(f"encode: {len(records)} distinct codecs exceed the format's {MAX_U16}")
    if len(entries) > MAX_U32:
        raise ValueError(f"encode: {len(entries)} tensors exceed the format's {MAX_U32}")
    version = max((r.min_version() for r in records), default=1)
    PREAMBLE.pack_into(buf, 0, MAGIC, version, 0, len(records), len(entries))
    pos = PREAMBLE_SIZE
    for r in records:
        CODEC_RECORD.pack_into(buf, pos, *r.pack())
        pos += CODEC_RECORD.size
    for i, (e, nb) in enumerate(zip(entries, names_utf8)):
        # The encoder holds itself to the default decode limits (tighter than
        # the format's u16/u8 fields), so that what it writes, a default
        # decoder accepts.
        if len(nb) > _DEFAULT_LIMITS.max_name_bytes:
            raise ValueError(
                f"encode: tensor name of {len(nb)} UTF-8 bytes exceeds max_name_bytes={_DEFAULT_LIMITS.max_name_bytes}"
            )
        if len(e.shape) > _DEFAULT_LIMITS.max_ndim:
            raise ValueError(
                f"encode: tensor {e.name!r} has {len(e.shape)} dimensions; max_ndim={_DEFAULT_LIMITS.max_ndim}"
            )
        _U16.pack_into(buf, pos, len(nb))
        pos += 2
        buf[pos : pos + len(nb)] = nb
        pos += len(nb)
        _U8U8.pack_into(buf, pos, DTYPE_CODES[e.dtype], len(e.shape))
        pos += 2
        if e.shape:
            struct.pack_into(f"<{len(e.shape)}Q", buf, pos, *e.shape)
            pos += 8 * len(e.shape)
        _U16.pack_into(buf, pos, e.codec_index)
        pos += 2
        if records[e.codec_index].codec == CODEC_TOPK:
            if count_positions is not None:
                count_positions[i] = pos
            _COUNT.pack_into(buf, pos, e.count, e.index_code)
            pos += _COUNT.size
        _SECTIONS.pack_into(buf, pos, e.metadata_len, e.index_len, e.payload_len)
        pos += _SECTIONS.size
    return pos


# ---- reading ------------------------------------------------------------------
class _Reader:
    """Bounds-checked cursor over the header bytes."""

    __slots__ = ("mv", "pos", "end")

    def __init__(self, mv: memoryview, pos: int, end: int):
        self.mv, self.pos, self.end = mv, pos, end

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise FormatError(f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                              f"{max(0, self.end - self.pos)} left")  # fmt: skip

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        self.need(st.size, what)
        v = st.unpack_from(self.mv, self.pos)
        self.pos += st.size
        return v

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        v = self.mv[self.pos : self.pos + n]
        self.pos += n
        return v


def check_envelope(mv: memoryview, limits: DecodeLimits) -> tuple:
    """Steps 1-6 of FORMAT.md section 4: length, magic, version, limit, checksum, flags."""
    n = len(mv)
    if n < MIN_MESSAGE:
        raise FormatError(f"message of {n} bytes is shorter than the minimum {MIN_MESSAGE}")
    if bytes(mv[:4]) != MAGIC:
        raise FormatError(f"not a flocora-codec message (magic {bytes(mv[:4])!r}, expected {MAGIC!r})")
    magic, version, flags, n_codecs, n_tensors = PREAMBLE.unpack_from(mv, 0)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"format version {version} is not supported (this decoder reads {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    if n > limits.max_message_bytes:
        raise LimitError(f"message of {n} bytes exceeds max_message_bytes={limits.max_message_bytes}")
    stored = CHECKSUM.unpack_from(mv, n - CHECKSUM_SIZE)[0]
    actual = crc32c(mv[: n - CHECKSUM_SIZE])
    if stored != actual:
        raise ChecksumError(f"CRC32C mismatch: stored {stored:#010x}, computed {actual:#010x}")
    if flags:
        raise FormatError(f"reserved flag bits set: {flags:#06x}")
    return version, flags, n_codecs, n_tensors


def expectation(expect) -> dict:
    """Normalize what a receiver expects to ``{name: (shape, torch dtype)}``.

    ``expect`` maps names to tensors or numpy arrays (a state dict: only
    their shapes and dtypes are used) or to ``(shape, dtype)`` pairs, with
    ``dtype`` a torch or numpy dtype, or None for any dtype; or it is a
    module, which stands for its ``state_dict()``.
    """
    if isinstance(expect, torch.nn.Module):
        expect = expect.state_dict()
    if not isinstance(expect, Mapping):
        raise TypeError(
            f"expect must be a module or map tensor names to tensors or (shape, dtype); got {type(expect).__name__}"
        )
    out = {}
    for name, v in expect.items():
        if isinstance(v, torch.Tensor):
            shape, dtype = tuple(v.shape), v.dtype
        elif isinstance(v, np.ndarray):
            shape, dtype = v.shape, v.dtype
        elif isinstance(v, tuple) and len(v) == 2:
            shape, dtype = v
        else:
            raise TypeError(f"expect[{name!r}] must be a tensor, an array or a (shape, dtype) pair; got {v!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            dtype = _numpy_dtype_to_torch(dtype)
        if dtype is not None and dtype not in DTYPE_CODES:
            raise TypeError(f"expect[{name!r}]: dtype {dtype} is not one the format carries")
        out[str(name)] = (tuple(int(d) for d in shape), dtype)
    return out


def _numpy_dtype_to_torch(dtype) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    except TypeError as exc:
        raise TypeError(f"expect: numpy dtype {dtype} has no torch equivalent") from exc


class _Heads:
    """Reads the part of a tensor record shared by messages and schemas (name,
    dtype, shape, codec index), checking each field as it is read, in the
    order of FORMAT.md 4 step 7.4, and the running totals against the limits."""

    def __init__(
        self, limits: DecodeLimits, expect: dict | None, records: list, max_decoded: int | None, message_bytes: int
    ):
        self.limits, self.expect, self.records = limits, expect, records
        self.max_decoded, self.message_bytes = max_decoded, message_bytes
        self.names: set = set()
        self.used = [False] * len(records)
        self.total_elements = self.decoded_bytes = 0

    def read(self, rd: "_Reader", t: int) -> tuple:
        limits, expect = self.limits, self.expect
        (name_len,) = rd.unpack(_U16, "name length")
        if name_len > limits.max_name_bytes:
            raise LimitError(f"tensor {t}: name of {name_len} bytes exceeds max_name_bytes={limits.max_name_bytes}")
        raw_name = rd.take(name_len, "tensor name")
        try:
            name = str(raw_name, "utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"tensor {t}: name is not valid UTF-8 ({exc.reason})") from None
        if name in self.names:
            raise FormatError(f"duplicate tensor name {name!r}")
        self.names.add(name)
        if expect is not None and name not in expect:
            raise ExpectationError(f"tensor {name!r} is not one the receiver expects "
                                   f"(expected names such as {sorted(expect)[:3]})")  # fmt: skip
        dtype_code, ndim = rd.unpack(_U8U8, "dtype and ndim")
        if dtype_code not in CODE_DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype code {dtype_code}")
        if ndim > limits.max_ndim:
            raise LimitError(f"tensor {name!r}: {ndim} dimensions exceed max_ndim={limits.max_ndim}")
        shape = struct.unpack_from(f"<{ndim}Q", rd.take(8 * ndim, "shape")) if ndim else ()
        _check_expected(expect, name, shape, dtype_code)
        numel = self.count_elements(name, shape, dtype_code)
        (codec_index,) = rd.unpack(_U16, "codec index")
        if codec_index >= len(self.records):
            raise FormatError(f"tensor {name!r}: codec index {codec_index} out of range ({len(self.records)} records)")
        self.used[codec_index] = True
        rec = self.records[codec_index]
        if rec.codec != CODEC_RAW and dtype_code not in FLOAT_CODES:
            raise FormatError(
                f"tensor {name!r}: codec {CODEC_NAMES[rec.codec]} on non-float dtype {CODE_DTYPES[dtype_code]}"
            )
        return name, dtype_code, tuple(shape), numel, codec_index

    def count_elements(self, name: str, shape: tuple, dtype_code: int) -> int:
        limits = self.limits
        numel = 1
        for d in shape:
            if d > limits.max_total_elements:
                raise LimitError(
                    f"tensor {name!r}: dimension {d} exceeds max_total_elements={limits.max_total_elements}"
                )
            numel *= d
        self.total_elements += numel
        if self.total_elements > limits.max_total_elements:
            raise LimitError(
                f"tensor {name!r} of shape {tuple(shape)} brings the message to {self.total_elements} elements, "
                f"over max_total_elements={limits.max_total_elements}"
            )
        self.decoded_bytes += numel * CODE_DTYPES[dtype_code].itemsize
        if self.max_decoded is not None and self.decoded_bytes > self.max_decoded:
            raise LimitError(
                f"tensor {name!r} of shape {tuple(shape)} brings a {self.message_bytes}-byte message to "
                f"{self.decoded_bytes} decoded bytes, over max_expansion={limits.max_expansion} times its size "
                "(a decompression bomb?): decode with expect= (the names, shapes and dtypes you expect) or raise "
                "DecodeLimits.max_expansion"
            )
        return numel

    def check_all_used(self) -> None:
        if not all(self.used):
            raise FormatError(f"codec record {self.used.index(False)} is not used by any tensor")


def _check_expected(expect: dict | None, name: str, shape: tuple, dtype_code: int) -> None:
    if expect is None:
        return
    want_shape, want_dtype = expect[name]
    if tuple(shape) != want_shape or want_dtype not in (None, CODE_DTYPES[dtype_code]):
        raise ExpectationError(f"tensor {name!r} is {CODE_DTYPES[dtype_code]} of shape {tuple(shape)}; "
                               f"the receiver expects {want_dtype or 'any dtype'} of shape {want_shape}")  # fmt: skip


def _check_expected_count(expect: dict | None, n_tensors: int, partial: bool) -> None:
    if expect is not None and (n_tensors > len(expect) if partial else n_tensors != len(expect)):
        raise ExpectationError(f"message holds {n_tensors} tensors; the receiver expects "
                               f"{'at most ' if partial else ''}{len(expect)}")  # fmt: skip


def _read_codec_table(rd: "_Reader", n_codecs: int, version: int) -> list:
    records = []
    for _ in range(n_codecs):
        rec = CodecRecord(*rd.unpack(CODEC_RECORD, "codec record"))
        rec.validate(version)
        records.append(rec)
    if len(set(records)) != len(records):
        raise FormatError("duplicate codec records")
    return records


def parse(
    data,
    limits: DecodeLimits | None = None,
    expect: dict | None = None,
    bound_expansion: bool = True,
    partial: bool = False,
    schemas=None,
) -> ParsedMessage:
    """Validate a whole message's envelope and header; return where everything lies.

    Parameters
    ----------
    data : bytes-like
        The message.
    limits : DecodeLimits, optional
        Bounds to enforce (defaults: :class:`DecodeLimits`).
    expect : dict, optional
        The output of :func:`expectation`: the message must hold exactly these
        names with these shapes and dtypes (:class:`ExpectationError`
        otherwise, raised as each record is read). ``max_expansion`` is then
        not applied: the receiver has bounded the output itself.
    bound_expansion : bool
        Apply ``limits.max_expansion`` when ``expect`` is None (a decoder
        does; ``message_info``, which allocates nothing, does not).
    partial : bool
        The message may hold a subset of ``expect``'s tensors.
    schemas : callable, optional
        ``schema_id -> ParsedSchema or None``: the schemas this receiver
        knows, for compact (version 3) messages.

    Returns
    -------
    ParsedMessage

    Raises
    ------
    FormatError, ChecksumError, UnsupportedVersionError, LimitError
        As FORMAT.md section 4 prescribes.
    """
    limits = limits or DecodeLimits()
    try:
        mv = memoryview(data).cast("B")
    except TypeError as exc:
        raise FormatError(f"message must be a bytes-like object, not {type(data).__name__}") from exc
    version, flags, n_codecs, n_tensors = check_envelope(mv, limits)
    body_end = len(mv) - CHECKSUM_SIZE
    rd = _Reader(mv, PREAMBLE_SIZE, body_end)

    if version == COMPACT_VERSION:
        return _parse_compact(mv, limits, schemas, expect, partial)
    # The header is a pure function of its bytes, the message length and the
    # checks asked for: a message whose header repeats one parsed before (the
    # same model and spec, round after round) reuses that result.
    key = (len(mv), limits, None if expect is None else tuple(expect.items()), bound_expansion, partial)
    hit = _PARSE_CACHE.get(key)
    if hit is not None and bytes(mv[: len(hit[0])]) == hit[0]:
        return hit[1]
    pm = _parse_tables(mv, rd, limits, expect, bound_expansion, partial, version, flags, n_codecs, n_tensors)
    if pm.header_bytes <= _PARSE_CACHE_MAX_HEADER:
        if len(_PARSE_CACHE) >= _PARSE_CACHE_SIZE:
            _PARSE_CACHE.clear()
        _PARSE_CACHE[key] = (bytes(mv[: pm.header_bytes]), pm)
    return pm


# Parsed headers, by (length, limits, expect, bound_expansion, partial): the
# header bytes and the ParsedMessage (shared: callers only read it).
_PARSE_CACHE: dict = {}
_PARSE_CACHE_SIZE = 16
_PARSE_CACHE_MAX_HEADER = 1 << 16


def _parse_tables(mv, rd, limits, expect, bound_expansion, partial, version, flags, n_codecs, n_tensors):
    """FORMAT.md 4 step 7 for a full (version 1 or 2) message."""
    if n_tensors > limits.max_tensors:
        raise LimitError(f"{n_tensors} tensors exceed max_tensors={limits.max_tensors}")
    _check_expected_count(expect, n_tensors, partial)
    max_decoded = limits.max_expansion * len(mv) if expect is None and bound_expansion else None
    # Both tables must fit in what is left before anything is looped over.
    rd.need(n_codecs * CODEC_RECORD.size + n_tensors * MIN_TENSOR_RECORD, f"{n_codecs} codecs and {n_tensors} tensors")
    records = _read_codec_table(rd, n_codecs, version)

    entries = []
    heads = _Heads(limits, expect, records, max_decoded, len(mv))
    for t in range(n_tensors):
        name, dtype_code, shape, numel, codec_index = heads.read(rd, t)
        rec = records[codec_index]
        count = index_code = 0
        if rec.codec == CODEC_TOPK:
            count, index_code = rd.unpack(_COUNT, "top-k count")
            if count > numel:
                raise FormatError(f"tensor {name!r}: top-k count {count} exceeds its {numel} elements")
            expected = ops.choose_index_code(numel, count)
            if index_code != expected:
                raise FormatError(
                    f"tensor {name!r}: index code {index_code}, but (n={numel}, k={count}) selects {expected}"
                )
        lens = rd.unpack(_SECTIONS, "section lengths")
        dtype = CODE_DTYPES[dtype_code]
        implied = section_sizes(rec, dtype, shape, numel, count)
        if lens != implied:
            raise FormatError(f"tensor {name!r}: section lengths {lens} differ from the {implied} its parameters imply")
        entries.append(TensorEntry(name, dtype, tuple(shape), codec_index, count, index_code, *lens, 0, numel))
    heads.check_all_used()
    _place_sections(entries, rd.pos, len(mv))
    return ParsedMessage(version, flags, records, entries, rd.pos, len(mv))


def _place_sections(entries: list, header_bytes: int, n: int, what_header: str = "header") -> None:
    """Set each entry's offset; the sections must end exactly at the checksum."""
    pos = header_bytes
    for e in entries:
        e.offset = pos
        pos = e.end
    body_end = n - CHECKSUM_SIZE
    if pos != body_end:
        what = "trailing bytes" if pos < body_end else "missing bytes"
        raise FormatError(f"{what}: {what_header} and sections account for {pos + CHECKSUM_SIZE} bytes, "
                          f"message has {n}")  # fmt: skip


# ---- schemas and compact messages (FORMAT.md 6) ------------------------------------
@dataclass
class ParsedSchema:
    """A validated schema: the tables a compact message refers to by ``schema_id``."""

    schema_id: bytes
    records: list
    entries: list  # TensorEntry with name, dtype, shape, codec_index, numel (no sections)
    total_bytes: int


def schema_id_of(data) -> bytes:
    """The id of serialized schema bytes: the first 16 bytes of their SHA-256."""
    return hashlib.sha256(data).digest()[:SCHEMA_ID_SIZE]


def write_schema(records, entries, names_utf8) -> bytes:
    """Serialize a schema (FORMAT.md 6.1): the v1 tables without counts and sections."""
    if len(records) > MAX_U16 or len(entries) > MAX_U32:
        raise ValueError(f"schema: {len(records)} codecs / {len(entries)} tensors exceed the format's fields")
    out = bytearray(PREAMBLE.pack(SCHEMA_MAGIC, SCHEMA_VERSION, 0, len(records), len(entries)))
    for r in records:
        out += r.pack()
    for e, nb in zip(entries, names_utf8):
        if len(nb) > _DEFAULT_LIMITS.max_name_bytes or len(e.shape) > _DEFAULT_LIMITS.max_ndim:
            raise ValueError(f"schema: tensor {e.name!r} exceeds the default name or ndim limit")
        out += _U16.pack(len(nb)) + nb + _U8U8.pack(DTYPE_CODES[e.dtype], len(e.shape))
        out += struct.pack(f"<{len(e.shape)}Q", *e.shape) + _U16.pack(e.codec_index)
    out += CHECKSUM.pack(crc32c(out))
    return bytes(out)


def parse_schema(
    data, limits: DecodeLimits | None = None, expect: dict | None = None, partial: bool = False
) -> ParsedSchema:
    """Validate serialized schema bytes (untrusted input, like a message).

    The checks are those of FORMAT.md 4 steps 1-7 with the schema's magic and
    version; a receiver bounds what every compact message against this schema
    can allocate here, by its limits and ``expect``.
    """
    limits = limits or DecodeLimits()
    try:
        mv = memoryview(data).cast("B")
    except TypeError as exc:
        raise FormatError(f"schema must be a bytes-like object, not {type(data).__name__}") from exc
    n = len(mv)
    if n < MIN_MESSAGE:
        raise FormatError(f"schema of {n} bytes is shorter than the minimum {MIN_MESSAGE}")
    if bytes(mv[:4]) != SCHEMA_MAGIC:
        hint = " (this is a message, not a schema)" if bytes(mv[:4]) == MAGIC else ""
        raise FormatError(f"not a flocora-codec schema (magic {bytes(mv[:4])!r}, expected {SCHEMA_MAGIC!r}){hint}")
    _, version, flags, n_codecs, n_tensors = PREAMBLE.unpack_from(mv, 0)
    if version != SCHEMA_VERSION:
        raise UnsupportedVersionError(
            f"schema version {version} is not supported (this decoder reads {SCHEMA_VERSION})"
        )
    if n > limits.max_message_bytes:
        raise LimitError(f"schema of {n} bytes exceeds max_message_bytes={limits.max_message_bytes}")
    stored, actual = CHECKSUM.unpack_from(mv, n - CHECKSUM_SIZE)[0], crc32c(mv[: n - CHECKSUM_SIZE])
    if stored != actual:
        raise ChecksumError(f"schema CRC32C mismatch: stored {stored:#010x}, computed {actual:#010x}")
    if flags:
        raise FormatError(f"reserved schema flag bits set: {flags:#06x}")
    if n_tensors > limits.max_tensors:
        raise LimitError(f"{n_tensors} tensors exceed max_tensors={limits.max_tensors}")
    _check_expected_count(expect, n_tensors, partial)
    rd = _Reader(mv, PREAMBLE_SIZE, n - CHECKSUM_SIZE)
    rd.need(n_codecs * CODEC_RECORD.size + n_tensors * MIN_SCHEMA_RECORD, f"{n_codecs} codecs and {n_tensors} tensors")
    records = _read_codec_table(rd, n_codecs, VERSION)
    heads = _Heads(limits, expect, records, None, n)
    entries = []
    for t in range(n_tensors):
        name, dtype_code, shape, numel, codec_index = heads.read(rd, t)
        entries.append(TensorEntry(name, CODE_DTYPES[dtype_code], shape, codec_index, numel=numel))
    heads.check_all_used()
    if rd.pos != n - CHECKSUM_SIZE:
        raise FormatError(f"trailing bytes: the schema's tables end at {rd.pos}, before its checksum at "
                          f"{n - CHECKSUM_SIZE}")  # fmt: skip
    return ParsedSchema(schema_id_of(mv), records, entries, n)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(rd: "_Reader", what: str) -> int:
    """LEB128, at most 10 bytes, minimal (one encoding per value)."""
    value = shift = 0
    for i in range(10):
        (b,) = rd.unpack(_U8, what)
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > 0:
                raise FormatError(f"{what}: non-minimal varint")
            if value > MAX_U64:
                raise FormatError(f"{what}: varint exceeds 64 bits")
            return value
        shift += 7
    raise FormatError(f"{what}: varint longer than 10 bytes")


def compact_header(schema_id: bytes, records, entries) -> bytes:
    """Fixed part and varint top-k counts of a compact message (FORMAT.md 6.2)."""
    return compact_header_of_counts(schema_id, [e.count for e in entries if records[e.codec_index].codec == CODEC_TOPK])


def compact_header_of_counts(schema_id: bytes, topk_counts) -> bytes:
    """:func:`compact_header` from the top-k tensors' counts, in message order."""
    head = MAGIC + struct.pack("<HH", COMPACT_VERSION, 0) + schema_id
    return head + b"".join(_varint(c) for c in topk_counts)


def compact_schema_id(data) -> bytes | None:
    """The schema id a compact message names (bytes 8..24), or None if ``data``
    does not start like one. Nothing is validated: use it to pick the schema."""
    mv = memoryview(data).cast("B")
    if len(mv) >= COMPACT_FIXED and bytes(mv[:4]) == MAGIC and _U16.unpack_from(mv, 4)[0] == COMPACT_VERSION:
        return bytes(mv[8:COMPACT_FIXED])
    return None


def _parse_compact(mv: memoryview, limits: DecodeLimits, schemas, expect, partial) -> ParsedMessage:
    """Steps 7-8 of a compact message: its schema, its counts, its sections."""
    rd = _Reader(mv, 8, len(mv) - CHECKSUM_SIZE)
    sid = bytes(rd.take(SCHEMA_ID_SIZE, "schema id"))
    schema = schemas(sid) if schemas is not None else None
    if schema is None:
        raise UnknownSchemaError(
            f"compact message refers to schema {sid.hex()}, which this receiver does not know: receive that schema "
            "first (fc.Schema.from_bytes) and pass it to decode(..., schemas=...)",
            sid,
        )
    if len(schema.entries) > limits.max_tensors:
        raise LimitError(f"{len(schema.entries)} tensors exceed max_tensors={limits.max_tensors}")
    _check_expected_count(expect, len(schema.entries), partial)
    heads = _Heads(limits, None, schema.records, None, len(mv))
    entries = []
    for se in schema.entries:
        if expect is not None:
            if se.name not in expect:
                raise ExpectationError(f"tensor {se.name!r} is not one the receiver expects "
                                       f"(expected names such as {sorted(expect)[:3]})")  # fmt: skip
            _check_expected(expect, se.name, se.shape, DTYPE_CODES[se.dtype])
        heads.count_elements(se.name, se.shape, DTYPE_CODES[se.dtype])
        rec = schema.records[se.codec_index]
        count = index_code = 0
        if rec.codec == CODEC_TOPK:
            count = _read_varint(rd, f"tensor {se.name!r}: top-k count")
            if count > se.numel:
                raise FormatError(f"tensor {se.name!r}: top-k count {count} exceeds its {se.numel} elements")
            index_code = ops.choose_index_code(se.numel, count)
        lens = section_sizes(rec, se.dtype, se.shape, se.numel, count)
        entries.append(TensorEntry(se.name, se.dtype, se.shape, se.codec_index, count, index_code, *lens, 0, se.numel))
    _place_sections(entries, rd.pos, len(mv), f"schema {sid.hex()}'s header")
    return ParsedMessage(COMPACT_VERSION, 0, schema.records, entries, rd.pos, len(mv), sid)
