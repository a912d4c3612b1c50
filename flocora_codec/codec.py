"""Encode named tensors into one wire message and back (docs/FORMAT.md, v1).

The kernels are reached only through :mod:`flocora_codec.ops`, one call per
group of tensors that share codec parameters, never one per tensor. The
encoder writes every section straight into the final ``bytes`` object (one
copy of the compressed data); the decoder validates the whole header before it
allocates anything the message claims.
"""

from __future__ import annotations

import ctypes
import logging
import math
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter

import numpy as np
import torch

from flocora_codec import format as fmt
from flocora_codec import ops
from flocora_codec.errors import ExpectationError, FormatError
from flocora_codec.format import DecodeLimits
from flocora_codec.spec import CodecSpec

__all__ = [
    "encode",
    "decode",
    "decode_into",
    "encode_numpy",
    "decode_numpy",
    "message_info",
    "MessageInfo",
    "TensorInfo",
    "ErrorFeedback",
]

_GRAN_CODES = {"tensor": fmt.GRAN_TENSOR, "row": fmt.GRAN_ROW, "group": fmt.GRAN_GROUP}
_META_CODES = {"float32": 1, "float16": 2}
_VALUE_CODES = {"float32": fmt.VALUES_F32, "float16": fmt.VALUES_F16, "bfloat16": fmt.VALUES_BF16,
                "quantized": fmt.VALUES_QUANTIZED, "sign": fmt.VALUES_SIGN}  # fmt: skip
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK64 = (1 << 64) - 1
_NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int16,
                           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128})  # fmt: skip


# ---- codec resolution -----------------------------------------------------------
def _record_for(spec: CodecSpec, dtype: torch.dtype) -> fmt.CodecRecord:
    """The codec record a resolved spec gives a tensor of ``dtype``."""
    if spec.is_raw or dtype not in _QUANTIZABLE:
        return fmt.RAW_RECORD
    scope = fmt.SCOPE_GLOBAL if spec.topk_scope == "global" else fmt.SCOPE_TENSOR
    if spec.sparse and spec.values == "sign":
        return fmt.CodecRecord(fmt.CODEC_TOPK, bits=1, meta_dtype=_META_CODES[spec.meta_dtype],
                               values=fmt.VALUES_SIGN, topk_scope=scope)  # fmt: skip
    if spec.sparse and spec.values != "quantized":
        return fmt.CodecRecord(fmt.CODEC_TOPK, values=_VALUE_CODES[spec.values], topk_scope=scope)
    gran = _GRAN_CODES[spec.granularity]
    if spec.sparse and gran == fmt.GRAN_ROW:
        gran = fmt.GRAN_TENSOR  # a values vector has one row: the canonical form is "tensor"
    return fmt.CodecRecord(
        fmt.CODEC_TOPK if spec.sparse else fmt.CODEC_AFFINE,
        bits=spec.bits,
        granularity=gran,
        group_log2=spec.group_size.bit_length() - 1 if gran == fmt.GRAN_GROUP else 0,
        rounding=1 if spec.rounding == "stochastic" else 0,
        meta_dtype=_META_CODES[spec.meta_dtype],
        values=fmt.VALUES_QUANTIZED if spec.sparse else fmt.VALUES_NONE,
        topk_scope=scope if spec.sparse else 0,
    )


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor stochastic-rounding seed.

    Parameters
    ----------
    seed : int
        The spec's seed (any integer; taken modulo 2**64).
    name : str
        The tensor's name.

    Returns
    -------
    int
        ``seed XOR (crc32c(utf8(name)) << 32)`` modulo 2**64, as the signed
        int64 the kernels take: tensors of one message draw independent noise.
    """
    s = (seed ^ (fmt.crc32c(name.encode("utf-8")) << 32)) & _MASK64
    return s - (1 << 64) if s >= 1 << 63 else s


def _topk_count(spec: CodecSpec, n: int) -> int:
    """Elements kept out of ``n`` (per tensor, or over a global group)."""
    if n == 0:
        return 0
    if spec.k is not None:
        return min(spec.k, n)
    return min(n, max(1, math.floor(spec.density * n + 0.5)))


# ---- output buffer ----------------------------------------------------------------
if platform.python_implementation() == "CPython":
    _bytes_from = ctypes.pythonapi.PyBytes_FromStringAndSize
    _bytes_from.restype = ctypes.py_object
    _bytes_from.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)

    def _alloc_message(n: int):
        """A fresh, not yet shared ``bytes`` of length n and a writable view of it.

        This is what C code does with ``PyBytes_FromStringAndSize(NULL, n)``:
        the object is filled before anyone else sees it (or hashes it), which
        saves the final ``bytes(bytearray)`` copy of the whole message.
        """
        out = _bytes_from(None, n)
        addr = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value
        return out, memoryview((ctypes.c_char * n).from_address(addr)).cast("B")

    _finish = lambda out, view: out
else:  # pragma: no cover - other interpreters: one extra copy

    def _alloc_message(n: int):
        buf = bytearray(n)
        return buf, memoryview(buf)

    _finish = lambda out, view: bytes(out)


def _host_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a (flat) tensor's data on the host; copies only device data."""
    if t.is_cpu and t.dtype in _NUMPY_DTYPES and not t.requires_grad and t.dim() and t.is_contiguous():
        return memoryview(t.numpy()).cast("B")  # the common case, in one step
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return memoryview(t.numpy())


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's elements, flat (a copy only if it is strided)."""
    t = t.detach().contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


_STAGE_MAX_BYTES = 1 << 20  # raw device tensors above this are copied one by one


def _off_host(x) -> bool:
    """Whether a tensor (or a device) is not the CPU's: its data crosses to or
    from the host in the staged copies below. One predicate, so that tests can
    send CPU tensors down the same paths."""
    return (x.device if isinstance(x, torch.Tensor) else x).type != "cpu"


def _host_bytes_many(ts) -> list[memoryview]:
    """Host byte views of tensors. Device tensors are joined on their device
    and cross in one copy per device: a device-to-host copy waits for the
    device (tens of microseconds each), and a message from a GPU has dozens of
    small tensors."""
    out: list = [None] * len(ts)
    by_device: dict = {}
    for i, t in enumerate(ts):
        if _off_host(t):
            by_device.setdefault(t.device, []).append(i)
        else:
            out[i] = _host_bytes(t)
    for members in by_device.values():
        parts = [_byte_view(ts[i]) for i in members]
        joined = memoryview(torch.cat(parts).cpu().numpy()) if parts else memoryview(b"")
        pos = 0
        for i, part in zip(members, parts):
            out[i] = joined[pos : pos + part.numel()]
            pos += part.numel()
    return out


def _staged_to(device: torch.device, ts: list) -> list:
    """Host tensors moved to ``device`` in one host-to-device copy: joined as
    bytes (each starting at a multiple of 16, so every dtype view of it is
    aligned), moved, then viewed back as their dtypes and shapes."""
    if not _off_host(device):
        return list(ts)
    parts, starts, pos = [], [], 0
    for t in ts:
        b = _byte_view(t)
        pad = -pos % 16
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
            pos += pad
        starts.append(pos)
        parts.append(b)
        pos += b.numel()
    joined = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    return [joined[a : a + t.numel() * t.element_size()].view(t.dtype).reshape(t.shape) for a, t in zip(starts, ts)]


class _Slicer:
    """Cuts a flat op output (as host bytes) into consecutive per-tensor pieces."""

    __slots__ = ("mv", "pos")

    def __init__(self, t):
        self.mv, self.pos = (t if isinstance(t, memoryview) else _host_bytes(t)), 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.mv):  # a kernel returned less than its documented size
            raise RuntimeError(f"encode: kernel output of {len(self.mv)} bytes, needed {self.pos + n}")
        piece = self.mv[self.pos : self.pos + n]
        self.pos += n
        return piece


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, from the smallest and largest value on the
    CPU (min and max propagate NaN): one pass and no temporary (58k float16
    values: 6 us, where isfinite takes 14 and an integer-bits test 10)."""
    if t.device.type != "cpu" or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return -math.inf < float(lo) and float(hi) < math.inf


def _holds_finite(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Every finite ``narrow`` value is finite as ``wide`` (same dtype, wider
    float, or float16 as bfloat16)."""
    return wide == narrow or wide in (torch.float32, torch.float64) or (narrow, wide) == (torch.float16, torch.bfloat16)


def _kernel_failed(op: str, names, xs, exc: Exception) -> ValueError:
    """Name the offending tensor of a multi-tensor call, on the error path only."""
    for name, x in zip(names, xs):
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            return ValueError(f"encode: tensor {name!r} has NaN or Inf values; {op} cannot encode it ({exc})")
    return ValueError(f"encode: {op} failed on tensors {list(names)}: {exc}")


# ---- encode -----------------------------------------------------------------------
def _resolve_record(spec: CodecSpec, name: str, dtype: torch.dtype, ndim: int, cache: dict):
    """(effective spec, codec record) of one tensor; one record per (spec, dtype)."""
    eff = spec.resolve(name, ndim)
    rec = cache.get((id(eff), dtype))
    if rec is None:
        rec = cache[(id(eff), dtype)] = _record_for(eff, dtype)
    return eff, rec


def encode(tensors: Mapping[str, torch.Tensor], spec: CodecSpec | None = None, *, schema=None) -> bytes:
    """Compress named tensors into one self-describing, checksummed message.

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Names to tensors (any device, any strides). Order is kept.
    spec : CodecSpec, optional
        How to compress; default ``CodecSpec()`` (4-bit per-row affine,
        0-d/1-d tensors raw). Non-float tensors always travel raw.
    schema : Schema, optional
        Write a compact message (FORMAT.md 6) against this schema, which the
        receiver must hold: a header of 24 bytes plus a few per top-k tensor
        instead of the tables. ``tensors`` and ``spec`` must give exactly the
        schema's tables (``Schema.build(tensors, spec)``).

    Returns
    -------
    bytes
        The message (docs/FORMAT.md, version 1; 2 with sign values; 3 when
        compact). Deterministic: the same tensors and spec give the same bytes.

    Raises
    ------
    TypeError
        If a key is not a ``str`` or a value not a tensor.
    ValueError
        For unsupported dtypes or layouts, NaN/Inf in a tensor that is
        quantized, or sizes the format cannot represent.

    Examples
    --------
    >>> data = encode({"w": torch.randn(8, 16)}, CodecSpec(bits=4))
    >>> decode(data)["w"].shape
    torch.Size([8, 16])
    """
    if spec is None:
        spec = CodecSpec()
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"encode: spec must be a CodecSpec, not {type(spec).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"encode: tensors must be a mapping of names to tensors, not {type(tensors).__name__}")
    key = _plan_key(tensors, spec, schema)
    plan = _ENCODE_PLANS.get(key) if key is not None else None
    if plan is not None and _matches_plan(tensors, plan):
        # The kernels take the tensors as they are, without their autograd
        # history (a detach of each cost ~0.2 us a tensor).
        with torch.no_grad():
            return _encode_with_plan(plan, list(tensors.values()))

    records: dict[fmt.CodecRecord, int] = {}
    entries: list[fmt.TensorEntry] = []
    names_utf8: list[bytes] = []
    parts: list[list] = []  # per tensor: the byte pieces of its sections, in order
    affine_groups: dict[tuple, list[int]] = {}
    topk_groups: dict[tuple, list[int]] = {}
    flat: list[torch.Tensor] = []
    specs: list[CodecSpec] = []
    rec_cache: dict[tuple, fmt.CodecRecord] = {}

    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"encode: tensor names must be str; got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"encode: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"encode: {name!r} has layout {t.layout}; only dense (strided) tensors are supported")
        if t.dtype not in fmt.DTYPE_CODES:
            raise ValueError(f"encode: {name!r} has dtype {t.dtype}, which the format does not carry")
        eff, rec = _resolve_record(spec, name, t.dtype, t.dim(), rec_cache)
        idx = records.setdefault(rec, len(records))
        i = len(entries)
        entries.append(fmt.TensorEntry(name, t.dtype, tuple(t.shape), idx))
        names_utf8.append(name.encode("utf-8"))
        x = t.detach().reshape(-1)
        flat.append(x)
        specs.append(eff)
        parts.append([])
        if rec.codec == fmt.CODEC_RAW or x.numel() == 0:
            if rec.codec == fmt.CODEC_TOPK:
                entries[i].index_code = ops.choose_index_code(0, 0)
            continue
        # The kernels take mixed float dtypes in one call, so the dtype is not
        # part of the key: a global top-k really spans every tensor of its record.
        if rec.codec == fmt.CODEC_AFFINE:
            affine_groups.setdefault((rec, x.device), []).append(i)
        else:
            sel = (eff.k, eff.density) if rec.topk_scope == fmt.SCOPE_GLOBAL else None
            topk_groups.setdefault((rec, x.device, sel), []).append(i)

    if schema is not None:
        schema.check_matches(list(records), entries)  # before any kernel runs
    for (rec, _), members in affine_groups.items():
        _encode_affine(rec, members, entries, flat, specs, parts)
    for (rec, _, sel), members in topk_groups.items():
        _encode_topk(rec, sel is not None, members, entries, flat, specs, parts)

    record_list = list(records)
    for i, e in enumerate(entries):
        rec = record_list[e.codec_index]
        if rec.codec == fmt.CODEC_RAW:
            e.payload_len = flat[i].numel() * flat[i].element_size()
        else:
            e.metadata_len, e.index_len, e.payload_len = fmt.section_sizes(rec, e.dtype, e.shape, e.numel, e.count)
    compact = fmt.compact_header(schema.id, record_list, entries) if schema is not None else None
    header = len(compact) if compact is not None else fmt.header_nbytes(record_list, entries, names_utf8)
    total = header + sum(e.metadata_len + e.index_len + e.payload_len for e in entries) + fmt.CHECKSUM_SIZE
    out, view = _alloc_message(total)
    count_positions: dict[int, int] = {}
    if compact is not None:
        view[:header] = compact
        pos = header
    else:
        pos = fmt.write_header(view, record_list, entries, names_utf8, count_positions)
    raw = [i for i, e in enumerate(entries) if record_list[e.codec_index].codec == fmt.CODEC_RAW and e.payload_len]
    # Small device tensors cross together; a large one is copied straight into
    # the message (joining it would cost a device and a host copy of its size).
    raw_direct = {i for i in raw if _off_host(flat[i]) and entries[i].payload_len > _STAGE_MAX_BYTES}
    staged = [i for i in raw if i not in raw_direct]
    raw_bytes = dict(zip(staged, _host_bytes_many([flat[i] for i in staged])))
    out_t = None
    starts = []
    for i, e in enumerate(entries):
        starts.append(pos)
        if i in raw_bytes:
            view[pos : pos + e.payload_len] = raw_bytes[i]
            pos += e.payload_len
            continue
        if i in raw_direct:  # device -> host straight into the message
            if out_t is None:
                out_t = _writable_tensor(view)
            out_t[pos : pos + e.payload_len].copy_(_byte_view(flat[i]))
            pos += e.payload_len
            continue
        for piece in parts[i]:
            view[pos : pos + len(piece)] = piece
            pos += len(piece)
    if pos != total - fmt.CHECKSUM_SIZE:  # sizes come from one formula; never send a short message
        raise RuntimeError(f"encode: wrote {pos} of {total - fmt.CHECKSUM_SIZE} bytes (internal size mismatch)")
    layout = ops.plan_layout(tensors.values()) if key is not None else None  # None: not all on the CPU
    if layout is not None:
        _remember_plan(
            key, layout, bytes(view[:header]), total, record_list, entries, specs, starts, affine_groups,
            topk_groups, schema.id if compact is not None else None, count_positions,
        )  # fmt: skip
    fmt.CHECKSUM.pack_into(view, pos, fmt.crc32c(view[:pos]))
    return _finish(out, view)


# ---- encode plans -----------------------------------------------------------------
# Round after round an FL client encodes tensors of the same names, dtypes and
# shapes with the same spec: everything but the kernels' output is then the
# same (codec records, groups, seeds, header bytes, section sizes). That
# layout is kept, and the next encode of the same key only runs the kernels
# and copies their output into place. Top-k tensors are the exception: their
# counts, index codes and section sizes depend on the data (a global top-k
# splits its k differently each round), so a plan with top-k groups patches
# those header fields and lays the sections out again on every encode.
_ENCODE_PLANS: dict = {}
_ENCODE_PLANS_SIZE = 16


@dataclass
class _AffinePlan:
    rec: fmt.CodecRecord
    members: list  # tensor positions in the message
    group_sizes: list
    seeds: list
    names: list
    dtypes: set
    # per member: (tensor position, metadata bytes of scales (= of offsets), its first, packed bytes, its first)
    pieces: list
    inputs: Callable  # flat tensors -> the kernel's inputs (_kernel_inputs)


@dataclass
class _TopkPlan:
    rec: fmt.CodecRecord
    global_scope: bool
    members: list  # tensor positions in the message
    numels: list  # of the members
    ks: list  # the counts asked of the kernel (fixed by the specs and numels)
    inputs: Callable  # flat tensors -> the kernel's inputs (_kernel_inputs)
    dtypes: set  # of the members
    seeds: list  # each member's stochastic-rounding seed (quantized values)


@dataclass
class _EncodePlan:
    layout: object  # ops.plan_layout of the tensors: dtypes and shapes a message must have to use the plan
    header: bytes  # the whole header; with top-k groups, their fields are rewritten on each encode
    total: int  # message bytes (without top-k groups: fixed)
    affine: list
    raw: list  # (tensor position, bytes)
    starts: list  # section start of each tensor (without top-k groups: fixed)
    topk: list
    entries: list  # the message's tensor entries (an encode updates copies of the top-k ones)
    specs: list  # effective spec per tensor
    record_list: list
    compact_id: bytes | None  # schema id of a compact message
    count_positions: dict  # full headers: tensor position -> offset of its top-k count field
    ranges: torch.Tensor | None = None  # copy_to_bytes_ ranges of a fixed layout (no top-k groups), once known
    topk_positions: list = field(default_factory=list)  # top-k tensors in message order (compact counts)
    # Per-tensor top-k groups keep the counts asked of them, so their layout
    # is fixed too: (header with its top-k fields, total, ranges, the fields'
    # records, a copy source of those ranges), once known.
    fixed_topk_layout: tuple | None = None
    raw_inputs: Callable | None = None  # flat tensors -> the raw ones (_getter)
    layout_tables: _LayoutTables | None = None  # ops.topk_layout's inputs but the counts, once needed


@dataclass
class _LayoutTables:
    """What ops.topk_layout needs of a plan besides the counts (int64 tensors
    and the sources' positions in _encode_with_plan's outputs)."""

    pieces: torch.Tensor  # affine and raw sections: tensor, source, source offset, bytes
    members: torch.Tensor  # top-k tensors, group by group: tensor, numel, group
    kinds: torch.Tensor  # per group: kind, itemsize, bits, value group size, first source
    field_positions: torch.Tensor  # full headers: each member's count field; compact: none
    fields_src: int
    compact_counts: list  # compact headers: each top-k position's member (-1: an empty tensor)


def _layout_tables(plan: _EncodePlan) -> _LayoutTables:
    """The plan's _LayoutTables, made once. Sources: each affine group's
    packed codes, scales and offsets; each top-k group's (_topk_sources);
    the raw tensors; the fields' records."""
    pieces = []
    for gi, g in enumerate(plan.affine):
        for i, m, ma, n, na in g.pieces:
            pieces += [(i, 3 * gi + 1, ma, m), (i, 3 * gi + 2, ma, m), (i, 3 * gi, na, n)]
    src = 3 * len(plan.affine)
    members, kinds = [], []
    for gi, tp in enumerate(plan.topk):
        rec = tp.rec
        members += [(i, n, gi) for i, n in zip(tp.members, tp.numels)]
        if rec.values == fmt.VALUES_SIGN:
            kinds.append((ops.TOPK_KIND_SIGN, fmt.META_CODES[rec.meta_dtype].itemsize, 0, 0, src))
            src += 3
        elif rec.values == fmt.VALUES_QUANTIZED:
            group = 1 << rec.group_log2 if rec.granularity == fmt.GRAN_GROUP else 0
            kinds.append((ops.TOPK_KIND_QUANTIZED, fmt.META_CODES[rec.meta_dtype].itemsize, rec.bits, group, src))
            src += 4
        else:
            kinds.append((ops.TOPK_KIND_PLAIN, fmt.VALUE_DTYPES[rec.values].itemsize, 0, 0, src))
            src += 2
    pieces += [(i, src + r, 0, n) for r, (i, n) in enumerate(plan.raw)]
    member_of = {i: j for j, (i, _, _) in enumerate(members)}
    positions = [plan.count_positions[i] for i, _, _ in members] if plan.compact_id is None else []

    def table(rows, width):
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, width)

    plan.layout_tables = _LayoutTables(
        table(pieces, 4), table(members, 3), table(kinds, 5), torch.tensor(positions, dtype=torch.int64),
        src + len(plan.raw), [member_of.get(i, -1) for i in plan.topk_positions],
    )  # fmt: skip
    return plan.layout_tables


def _plan_key(tensors, spec, schema):
    """Where a message's plan is kept: its spec, schema and names (None if
    unhashable). The plan also keeps its tensors' dtypes and shapes, which a
    message must match (_matches_plan) to be written from it."""
    key = (spec, None if schema is None else schema.id, tuple(tensors))
    try:
        hash(key)
    except TypeError:  # a spec holding something unhashable
        return None
    return key


def _matches_plan(tensors, plan) -> bool:
    """Whether the tensors (all CPU and strided) have the dtypes and shapes
    the plan was made for; anything else (not tensors at all) is for the
    slow path, which raises its own errors."""
    try:
        return ops.plan_layout_matches(tensors.values(), plan.layout)
    except (TypeError, RuntimeError, AttributeError):
        return False


def _remember_plan(key, layout, header, total, record_list, entries, specs, starts, affine_groups, topk_groups,
                   compact_id, count_positions):  # fmt: skip
    affine = []
    for (rec, _), members in affine_groups.items():
        pieces, meta_pos, packed_pos = [], 0, 0
        for i in members:
            e = entries[i]
            half = e.metadata_len // 2
            pieces.append((i, half, meta_pos, e.payload_len, packed_pos))
            meta_pos += half
            packed_pos += e.payload_len
        affine.append(_AffinePlan(
            rec, list(members), [_group_size(rec, entries[i]) for i in members],
            [tensor_seed(specs[i].seed, entries[i].name) for i in members], [entries[i].name for i in members],
            {entries[i].dtype for i in members}, pieces, _kernel_inputs(members, entries),
        ))  # fmt: skip
    raw = [(i, e.payload_len) for i, e in enumerate(entries)
           if record_list[e.codec_index].codec == fmt.CODEC_RAW and e.payload_len]  # fmt: skip
    topk = [_TopkPlan(rec, sel is not None, list(members), [entries[i].numel for i in members],
                      _topk_counts_asked(sel is not None, members, entries, specs), _kernel_inputs(members, entries),
                      {entries[i].dtype for i in members},
                      [tensor_seed(specs[i].seed, entries[i].name) for i in members])
            for (rec, _, sel), members in topk_groups.items()]  # fmt: skip
    if len(_ENCODE_PLANS) >= _ENCODE_PLANS_SIZE:
        _ENCODE_PLANS.clear()
    _ENCODE_PLANS[key] = _EncodePlan(
        layout, header, total, affine, raw, list(starts), topk, entries, specs, record_list, compact_id,
        count_positions,
        topk_positions=[i for i, e in enumerate(entries) if record_list[e.codec_index].codec == fmt.CODEC_TOPK],
        raw_inputs=_getter([i for i, _ in raw]) if raw else None,
    )  # fmt: skip


def _encode_with_plan(plan: _EncodePlan, flat: list) -> bytes:
    outputs: list = []  # packed, scales, offsets of each affine group; then the top-k groups' sources
    for g in plan.affine:  # every kernel runs (and may refuse its input) before the message is allocated
        xs = g.inputs(flat)
        meta = fmt.META_CODES[g.rec.meta_dtype]
        try:
            packed, scales, offsets = ops.quantize_pack(
                xs, g.rec.bits, g.group_sizes, stochastic=g.rec.rounding == fmt.ROUND_STOCHASTIC, seeds=g.seeds,
                meta_dtype=meta,
            )  # fmt: skip
        except ValueError as exc:
            raise _kernel_failed("quantize_pack", g.names, xs, exc) from exc
        _refuse_unfit_groups(scales, offsets, g.rec, g.dtypes, g.names)
        outputs += (packed, scales, offsets)
    header, total, ranges = plan.header, plan.total, plan.ranges
    # Top-k groups: the kernels' outputs as copy sources (_topk_sources);
    # ops.topk_layout places them and the header's top-k fields (`fields`,
    # one more source) once the counts are known. The plan is shared
    # (threads may encode with it at once): nothing of this encode's layout
    # is written to it but the fixed layout of per-tensor selections.
    fields = None
    fixed = plan.fixed_topk_layout
    if fixed is not None:
        for tp in plan.topk:
            counts, values, index_bytes, _ = _topk_kernel(False, tp.members, plan.entries, flat, plan.specs, tp.ks,
                                                          tp.inputs(flat))  # fmt: skip
            if counts != tp.ks:  # the kernel's contract for a per-tensor selection
                raise RuntimeError(f"encode: top-k kept {counts} elements, not the {tp.ks} asked (internal error)")
            outputs += _topk_sources(tp, plan.entries, counts, values, index_bytes)
        header, total, ranges, fields = fixed
    elif plan.topk:
        tables = plan.layout_tables or _layout_tables(plan)
        all_counts, count_tensors = [], []
        for tp in plan.topk:
            counts, values, index_bytes, count_tensor = _topk_kernel(
                tp.global_scope, tp.members, plan.entries, flat, plan.specs, tp.ks, tp.inputs(flat)
            )
            outputs += _topk_sources(tp, plan.entries, counts, values, index_bytes)
            all_counts += counts
            count_tensors.append(count_tensor)
        if plan.compact_id is not None:  # (empty tensors are in no top-k group: count 0)
            counts = [all_counts[j] if j >= 0 else 0 for j in tables.compact_counts]
            header = fmt.compact_header_of_counts(plan.compact_id, counts)
        ranges, fields, end = ops.topk_layout(
            tables.pieces, tables.members, torch.cat(count_tensors) if len(count_tensors) > 1 else count_tensors[0],
            tables.kinds, tables.field_positions, len(plan.entries), len(header), tables.fields_src,
        )  # fmt: skip
        total = end + fmt.CHECKSUM_SIZE
    out, view = _alloc_message(total)
    view[: len(header)] = header
    # Kernel outputs and raw tensors into place: one call, byte ranges fixed by the layout.
    if ranges is None:
        ranges = []
        starts = plan.starts
        for gi, g in enumerate(plan.affine):
            for i, m, ma, n, na in g.pieces:  # scales, offsets, packed codes
                pos = starts[i]
                ranges += (3 * gi + 1, ma, pos, m, 3 * gi + 2, ma, pos + m, m, 3 * gi, na, pos + 2 * m, n)
        first_raw = len(outputs)
        raw_at = [starts[i] for i, _ in plan.raw]
        ranges += chain.from_iterable(zip(range(first_raw, first_raw + len(raw_at)), repeat(0), raw_at,
                                          [n for _, n in plan.raw]))  # fmt: skip
        ranges = plan.ranges = _int64_tensor(ranges)
    if plan.raw:
        raw = plan.raw_inputs(flat)
        # (C-level iteration: a Python loop over a message's tensors cost ~0.3 us each)
        outputs += raw if all(map(torch.Tensor.is_contiguous, raw)) else [t.contiguous() for t in raw]
    if fields is not None:
        outputs.append(fields)
    ops.copy_to_bytes_(_writable_tensor(view), outputs, ranges)
    if fixed is None and plan.topk and not any(tp.global_scope for tp in plan.topk):
        # per-tensor selections keep the counts asked of them: the layout of this encode is every encode's
        plan.fixed_topk_layout = (bytes(view[: len(header)]), total, ranges, fields)
    end = total - fmt.CHECKSUM_SIZE
    fmt.CHECKSUM.pack_into(view, end, fmt.crc32c(view[:end]))
    return _finish(out, view)


def _topk_sources(tp: _TopkPlan, entries, counts, values, index_bytes) -> tuple:
    """A top-k group's outputs whose bytes make its members' sections, in
    section order (each output holds the members' pieces back to back):
    sign values: mu, index codes, sign bits; quantized values: scales,
    offsets, index codes, packed codes; plain values: index codes, values."""
    rec = tp.rec
    if rec.values == fmt.VALUES_SIGN:
        mus, signs = _sign_sections(rec, tp.members, entries, counts, values)
        return mus, index_bytes, signs
    if rec.values == fmt.VALUES_QUANTIZED:
        packed, scales, offsets = _quantize_topk_values(rec, tp.members, entries, counts, values, tp.seeds, tp.dtypes)
        return scales, offsets, index_bytes, packed
    return index_bytes, _plain_topk_values(rec, tp.members, entries, counts, values, tp.dtypes)


def _int64_tensor(values: list) -> torch.Tensor:
    """A list of ints as an int64 CPU tensor (through numpy: torch.tensor
    takes 43 us for a message's thousand ranges, this 11)."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


def _writable_tensor(view: memoryview) -> torch.Tensor:
    return torch.frombuffer(view, dtype=torch.uint8)


def _group_size(rec: fmt.CodecRecord, e: fmt.TensorEntry) -> int:
    return fmt.affine_group_size(rec.granularity, rec.group_log2, e.shape, e.numel)


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    # float64 goes through the float32 kernels (it is quantized or sparsified anyway).
    return x.float() if x.dtype == torch.float64 else x


def _encode_affine(rec, members, entries, flat, specs, parts):
    names = [entries[i].name for i in members]
    xs = [_as_kernel_input(flat[i]) for i in members]
    gs = [_group_size(rec, entries[i]) for i in members]
    seeds = [tensor_seed(specs[i].seed, entries[i].name) for i in members]
    meta = fmt.META_CODES[rec.meta_dtype]
    try:
        packed, scales, offsets = ops.quantize_pack(
            xs, rec.bits, gs, stochastic=rec.rounding == fmt.ROUND_STOCHASTIC, seeds=seeds, meta_dtype=meta
        )
    except ValueError as exc:  # the kernels' verdict on the input; other failures surface as they are
        raise _kernel_failed("quantize_pack", names, xs, exc) from exc
    # metadata first: the host copies of scales and offsets start on their alignment
    s, o, p = (_Slicer(mv) for mv in _host_bytes_many([scales, offsets, packed]))
    if _off_host(scales):  # checked on the host copy: one transfer instead of a wait per test
        scales, offsets = (torch.frombuffer(mv, dtype=meta) if len(mv) else scales.cpu() for mv in (s.mv, o.mv))
    _refuse_unfit_groups(scales, offsets, rec, {entries[i].dtype for i in members}, names)
    for i, x, g in zip(members, xs, gs):
        meta_len = ops.num_groups(x.numel(), g) * meta.itemsize
        parts[i] += [s.take(meta_len), o.take(meta_len), p.take(ops.packed_nbytes(x.numel(), rec.bits))]


def _refuse_unfit_groups(scales, offsets, rec, dtypes, names) -> None:
    """Refuse to write groups a decoder must reject (FORMAT.md 3.2): near the
    edge of a dtype's range, rounding the float16 scale up can make the top
    code decode to inf (a float16 tensor holding +-65504 with float16 metadata)."""
    for dtype in dtypes:
        if affine_meta_violation(scales, offsets, rec.bits, dtype) is not None:
            raise ValueError(
                f"encode: tensors {names[:5]}: a group's range reaches the edge of {dtype}'s range and would "
                f"decode beyond it with {fmt.META_CODES[rec.meta_dtype]} metadata; use meta_dtype='float32' "
                "or keep these tensors raw"
            )


def _values_name(rec: fmt.CodecRecord) -> str:
    return fmt.VALUE_NAMES[rec.values]


def _topk_counts_asked(global_scope, members, entries, specs) -> list:
    """The kernel's ``ks``: one count for a global group, else one per member."""
    if global_scope:
        return [_topk_count(specs[members[0]], sum(entries[i].numel for i in members))]
    return [_topk_count(specs[i], entries[i].numel) for i in members]


def _kernel_inputs(members, entries) -> Callable:
    """A plan's function from the flat tensors to a kernel's inputs for
    these members: itemgetter, no Python loop, unless one is float64."""
    if any(entries[i].dtype == torch.float64 for i in members):
        return lambda flat: [_as_kernel_input(flat[i]) for i in members]
    return _getter(members)


def _getter(positions) -> Callable:
    """flat tensors -> the list of those at ``positions`` (itemgetter: no Python loop)."""
    if len(positions) == 1:
        only = positions[0]
        return lambda flat: [flat[only]]
    get = itemgetter(*positions)
    return lambda flat: list(get(flat))


def _topk_kernel(global_scope, members, entries, flat, specs, ks=None, xs=None):
    """The top-k kernel over ``members``: (counts as a list, float32 values,
    index bytes, counts as the kernel's int64 tensor). ``ks``:
    :func:`_topk_counts_asked`, and ``xs``, the kernel's inputs, if known."""
    if xs is None:
        xs = [_as_kernel_input(flat[i]) for i in members]
    if ks is None:
        ks = _topk_counts_asked(global_scope, members, entries, specs)
    try:
        counts, values, index_bytes = ops.topk_encode(xs, ks, global_scope=global_scope)
    except ValueError as exc:  # the kernels' verdict on the input; other failures surface as they are
        raise _kernel_failed("topk_encode", [entries[i].name for i in members], xs, exc) from exc
    return counts.tolist(), values, index_bytes, counts


def _topk_select(global_scope, members, entries, flat, specs):
    """The top-k kernel over ``members``; sets each entry's count and index
    code. Returns (counts as a list, float32 values, index bytes, index
    bytes per member)."""
    counts, values, index_bytes, _ = _topk_kernel(global_scope, members, entries, flat, specs)
    index_lens = []
    for i, c in zip(members, counts):
        e = entries[i]
        e.count = c
        e.index_code, nbytes = ops.index_code_and_nbytes(e.numel, c)
        index_lens.append(nbytes)
    return counts, values, index_bytes, index_lens


def _plain_topk_values(rec, members, entries, counts, values, dtypes=None) -> torch.Tensor:
    """Kept values in the record's value dtype (float32/float16/bfloat16),
    refused where that dtype, or a narrower tensor dtype, cannot hold them.
    ``dtypes``: the members' dtypes, if known."""
    vdtype = fmt.VALUE_DTYPES[rec.values]
    converted = values.to(vdtype)
    if dtypes is None:
        dtypes = {entries[i].dtype for i in members}
    narrower = dtypes - {torch.float32, torch.float64, vdtype}
    # bfloat16 rounds 65504 up to 65536: inf as float16
    if not (_all_finite(converted) and all(_all_finite(converted.to(dtype)) for dtype in narrower)):
        bad = ~torch.isfinite(converted)
        for dtype in narrower:
            bad |= ~torch.isfinite(converted.to(dtype))
        # float16 tops out at 65504: refuse rather than send inf
        bad = torch.split(bad, counts)
        name = next(entries[i].name for i, b in zip(members, bad) if bool(b.any()))
        raise ValueError(f"encode: tensor {name!r} has values beyond the range of {_values_name(rec)} sparse values")
    return converted


def _encode_topk(rec, global_scope, members, entries, flat, specs, parts):
    counts, values, index_bytes, index_lens = _topk_select(global_scope, members, entries, flat, specs)
    if _off_host(values) and rec.values not in (fmt.VALUES_SIGN, fmt.VALUES_QUANTIZED):
        # Plain values are converted and checked on the host (the same rounding): one transfer for both.
        values_mv, index_mv = _host_bytes_many([values, index_bytes])  # values first: aligned
        index_bytes = torch.frombuffer(index_mv, dtype=torch.uint8) if len(index_mv) else index_bytes.cpu()
        values = torch.frombuffer(values_mv, dtype=torch.float32) if len(values_mv) else values.cpu()
    idx = _Slicer(index_bytes)
    for i, nbytes in zip(members, index_lens):
        parts[i].append(idx.take(nbytes))
    if rec.values == fmt.VALUES_SIGN:
        _encode_sign_values(rec, members, entries, counts, values, parts)
        return
    if rec.values != fmt.VALUES_QUANTIZED:
        vals = _Slicer(_plain_topk_values(rec, members, entries, counts, values))
        itemsize = fmt.VALUE_DTYPES[rec.values].itemsize
        for i, c in zip(members, counts):
            parts[i].append(vals.take(c * itemsize))
        return
    seeds = [tensor_seed(specs[i].seed, entries[i].name) for i in members]
    packed, scales, offsets = _quantize_topk_values(rec, members, entries, counts, values, seeds)
    p, s, o = _Slicer(packed), _Slicer(scales), _Slicer(offsets)
    for i, c, g in zip(members, counts, _topk_value_groups(rec, counts)):
        if c:
            meta_len = ops.num_groups(c, g) * scales.element_size()
            parts[i] = [s.take(meta_len), o.take(meta_len), parts[i][0], p.take(ops.packed_nbytes(c, rec.bits))]


def _topk_value_groups(rec, counts) -> list:
    """The group size of each member's values vector (values = quantized)."""
    if rec.granularity == fmt.GRAN_GROUP:
        return [1 << rec.group_log2] * len(counts)
    return counts  # the whole vector is one group


def _quantize_topk_values(rec, members, entries, counts, values, seeds, dtypes=None) -> tuple:
    """values = quantized: the kept values of each member that keeps any,
    each its own 1-D vector, quantized in one kernel call; (packed, scales,
    offsets), each the members' pieces back to back."""
    meta = fmt.META_CODES[rec.meta_dtype]
    kept = [j for j, c in enumerate(counts) if c]
    vecs = torch.split(values, counts) if members else ()
    if len(kept) < len(counts):
        vecs = [vecs[j] for j in kept]
    if not kept:
        empty = torch.empty(0, dtype=meta)
        return torch.empty(0, dtype=torch.uint8), empty, empty
    gs = _topk_value_groups(rec, [counts[j] for j in kept])
    names = [entries[members[j]].name for j in kept]
    try:
        packed, scales, offsets = ops.quantize_pack(
            list(vecs), rec.bits, gs, stochastic=rec.rounding == fmt.ROUND_STOCHASTIC,
            seeds=[seeds[j] for j in kept] if len(kept) < len(counts) else seeds, meta_dtype=meta,
        )  # fmt: skip
    except ValueError as exc:  # the kernels' verdict on the input; other failures surface as they are
        raise _kernel_failed("quantize_pack", names, vecs, exc) from exc
    if dtypes is None:
        dtypes = {entries[members[j]].dtype for j in kept}
    _refuse_unfit_groups(scales, offsets, rec, dtypes, names)
    return packed, scales, offsets


def _sign_sections(rec, members, entries, counts, values) -> tuple[torch.Tensor, torch.Tensor]:
    """values = 5 of a top-k group, all tensors at once (a loop of torch calls
    cost ~90 us a tensor): the mean magnitude ``mu`` of each member that keeps
    values, in the record's metadata dtype, and their sign bits (1 = positive
    or zero, decoded ``+mu``; 0 = negative, decoded ``-mu``), each member's
    stream padded to a whole byte (FORMAT.md 3.4), back to back."""
    meta = fmt.META_CODES[rec.meta_dtype]
    kept = [(i, c) for i, c in zip(members, counts) if c]
    if not kept:
        return torch.empty(0, dtype=meta), torch.empty(0, dtype=torch.uint8)
    host = values.detach().to("cpu")
    means, signs = ops.sign_sections(host, counts)
    mus = means.to(torch.float32).to(meta)  # STC's mu: rounded to float32, then to meta
    if not (_all_finite(host) and _all_finite(mus.float() * 2)):
        for (i, c), v, mu in zip(kept, torch.split(host, [c for _, c in kept]), mus):  # name the first offender
            if not (_all_finite(v) and bool(torch.isfinite(mu.float() * 2))):
                raise ValueError(f"encode: tensor {entries[i].name!r} has NaN/Inf or out-of-range values; "
                                 f"sign values cannot encode it")  # fmt: skip
    return mus, signs


def _encode_sign_values(rec, members, entries, counts, values, parts):
    """values = 5: per tensor its ``mu`` and sign bits (_sign_sections)."""
    mus, signs = _sign_sections(rec, members, entries, counts, values)
    mu_bytes, sign_bytes = _Slicer(mus), _Slicer(signs)
    for i, c in zip(members, counts):
        if c:
            parts[i] = [mu_bytes.take(mus.element_size()), parts[i][0], sign_bytes.take((c + 7) // 8)]


# ---- decode -----------------------------------------------------------------------
def _gather(mv: memoryview, spans) -> torch.Tensor:
    """Concatenate byte ranges ``(start, length)`` of the message into a new uint8 tensor.

    One copy, via memoryview slices (far cheaper per piece than tensor slices);
    the result is writable and aligned, so it can be viewed as any dtype.
    """
    buf = bytearray().join([mv[a : a + n] for a, n in spans if n])
    if not buf:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def _check_padding(mv: memoryview, streams, what: str) -> None:
    """Bits past the last code of each packed stream MUST be zero (FORMAT.md 3.4)."""
    for end, nbits, name in streams:
        if nbits % 8 and mv[end - 1] >> (nbits % 8):
            raise FormatError(f"tensor {name!r}: nonzero padding bits after the last {what} code")


_FLOAT32_MIN_NORMAL = torch.finfo(torch.float32).tiny


def affine_meta_violation(scales: torch.Tensor, offsets: torch.Tensor, bits: int, out_dtype: torch.dtype) -> str | None:
    """Why these affine groups could come from no encoder (FORMAT.md 3.2), or None.

    Every group's decoded values lie between its offset and its top value
    ``offset + scale * (2^bits - 1)`` (float32, each operation rounded), so
    both being finite in float32 and in the output dtype bounds every value
    of the group: O(groups) work, never O(elements).
    """
    if scales.device.type == "cpu" and offsets.device.type == "cpu":
        if ops.BACKEND == "compiled":
            code = ops.affine_meta_check(scales, offsets, bits, out_dtype)
        else:
            code = _affine_meta_check_np(scales, offsets, bits, out_dtype)
    else:
        code = _affine_meta_check_torch(scales, offsets, bits, out_dtype)
    return None if code == 0 else _affine_meta_reason(code, bits, out_dtype)


def _affine_meta_reason(code: int, bits: int, out_dtype: torch.dtype) -> str:
    """The reason for check ``code`` (1-6) of affine_meta_violation."""
    return (
        "non-finite scale or offset",
        "negative scale (or -0.0; the encoder writes +0.0)",
        "offset -0.0 (the encoder writes +0.0)",
        "subnormal float32 scale (the encoder stores a scale below 2^-126 as 0)",
        f"a group's top value offset + scale * {(1 << bits) - 1} overflows float32",
        f"a group's range decodes beyond the finite range of {out_dtype}",
    )[code - 1]


def _affine_meta_check_torch(scales, offsets, bits, out_dtype) -> int:
    """The checks of affine_meta_violation as torch ops (metadata on a GPU):
    0, or the first one some group breaks. ``ops.affine_meta_check`` and
    _affine_meta_check_np compute the same."""
    s, o = scales.float(), offsets.float()
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(o).all())):
        return 1
    if bool(torch.signbit(s).any()):
        return 2
    if bool(((o == 0) & torch.signbit(o)).any()):
        return 3
    if scales.dtype == torch.float32 and bool(((s != 0) & (s < _FLOAT32_MIN_NORMAL)).any()):
        return 4
    top = o + s * float((1 << bits) - 1)  # two roundings, as the kernels decode
    if not bool(torch.isfinite(top).all()):
        return 5
    if out_dtype in (torch.float16, torch.bfloat16) and not (
        bool(torch.isfinite(top.to(out_dtype)).all()) and bool(torch.isfinite(o.to(out_dtype)).all())
    ):
        return 6
    return 0


def _affine_meta_check_np(scales, offsets, bits, out_dtype) -> int:
    """_affine_meta_check_torch for CPU tensors, in numpy (the reference
    backend's): the same float32 operations at a fraction of the per-call
    cost of torch ops on small arrays."""
    s = scales.numpy().astype(np.float32, copy=False)
    o = offsets.numpy().astype(np.float32, copy=False)
    if not (np.isfinite(s).all() and np.isfinite(o).all()):
        return 1
    if np.signbit(s).any():
        return 2
    if ((o == 0) & np.signbit(o)).any():
        return 3
    if scales.dtype == torch.float32 and ((s != 0) & (s < _FLOAT32_MIN_NORMAL)).any():
        return 4
    with np.errstate(over="ignore", invalid="ignore"):
        top = o + s * np.float32((1 << bits) - 1)  # two float32 roundings, as the kernels decode
        if not np.isfinite(top).all():
            return 5
        if out_dtype == torch.float16:
            bad = not (np.isfinite(top.astype(np.float16)).all() and np.isfinite(o.astype(np.float16)).all())
        elif out_dtype == torch.bfloat16:  # numpy has no bfloat16
            t, ot = torch.from_numpy(top), torch.from_numpy(o)
            bad = not (bool(torch.isfinite(t.to(out_dtype)).all()) and bool(torch.isfinite(ot.to(out_dtype)).all()))
        else:
            bad = False
    return 6 if bad else 0


def _affine_spans(rec, members, counts):
    """Where the affine sections of ``members`` lie: scales, offsets, the
    packed streams whose padding bits must be checked, payloads; and, with
    the extension, the three as one gather (``copy_to_bytes_`` ranges into
    one buffer, scales' and offsets' bytes, the buffer's size): one call
    instead of a join of slices per section (9 us each for 41 tensors)."""
    half = [e.metadata_len // 2 for e in members]
    s_spans = [(e.offset, h) for e, h in zip(members, half)]
    o_spans = [(e.offset + h, h) for e, h in zip(members, half)]
    p_spans = [(e.payload_offset, e.payload_len) for e in members]
    gather = None
    if ops.BACKEND == "compiled":
        ranges, at = [], 0
        for a, n in chain(s_spans, o_spans, p_spans):
            if n:
                ranges += (0, a, at, n)
                at += n
        meta_bytes = sum(half)
        gather = (_int64_tensor(ranges), meta_bytes, at)
    pad = [(e.end, c * rec.bits, e.name) for e, c in zip(members, counts) if (c * rec.bits) % 8]
    return s_spans, o_spans, pad, p_spans, gather


def _affine_inputs(mv, rec, members, counts, out_dtype, spans=None):
    """``(packed, scales, offsets)`` of the affine sections of ``members``,
    after every content check of FORMAT.md 4 step 8 (metadata, padding)."""
    meta = fmt.META_CODES[rec.meta_dtype]
    s_spans, o_spans, pad, p_spans, gather = spans or _affine_spans(rec, members, counts)
    if gather is not None:
        ranges, meta_bytes, total = gather
        buf = torch.empty(total, dtype=torch.uint8)
        ops.copy_to_bytes_(buf, [_message_tensor(mv)], ranges)
        scales = buf[:meta_bytes].view(meta)
        offsets = buf[meta_bytes : 2 * meta_bytes].view(meta)
        packed = buf[2 * meta_bytes :]
    else:
        scales = _gather(mv, s_spans).view(meta)
        offsets = _gather(mv, o_spans).view(meta)
        packed = None
    why = affine_meta_violation(scales, offsets, rec.bits, out_dtype)
    if why is not None:
        raise FormatError(f"{why} in tensors {[e.name for e in members]}")
    _check_padding(mv, pad, f"{rec.bits}-bit")
    if packed is None:
        packed = _gather(mv, p_spans)
    return packed, scales, offsets


def _view_plan(members):
    """How a flat tensor holding ``members`` back to back becomes their
    tensors, worked out once per header: ``(layout, plan)``. ``layout``, with
    the extension: one ``_split_views`` call for all of them on the CPU (a
    Python ``as_strided`` call cost 0.86 us a tensor, a split 0.33).
    ``plan``, for other devices (the op has not run on a GPU yet) and the
    reference backend: None to split the flat tensor (every member 1-D),
    else each member's shape, contiguous strides and element offset for an
    ``as_strided`` call each."""
    plan, layout, offset = [], [], 0
    for e in members:
        shape = tuple(e.shape)
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= max(d, 1)
        strides = tuple(reversed(strides))
        plan.append((shape, strides, offset))
        layout += (offset, len(shape), *shape, *strides)
        offset += e.numel
    layout = torch.tensor(layout, dtype=torch.int64) if ops.BACKEND == "compiled" else None
    return layout, None if all(len(e.shape) == 1 for e in members) else plan


def _split_members(flat: torch.Tensor, numels, view_plan) -> list:
    """A group's tensors from ``flat`` (their ``numels`` elements back to
    back), over its memory, by its ``_view_plan``."""
    layout, plan = view_plan
    if layout is not None and flat.device.type == "cpu":
        return ops.split_views(flat, layout)
    if plan is None:
        return list(torch.split(flat, numels))
    base = flat.storage_offset()
    return [flat.as_strided(shape, strides, base + offset) for shape, strides, offset in plan]


def _decode_layout(pm: fmt.ParsedMessage):
    """What decoding ``pm`` takes besides the message's bytes, worked out once
    per parsed header (a repeated header reuses its ParsedMessage, so this too):
    the raw tensors by dtype, the empty ones, and the codec groups with the
    section spans of their members (affine: _affine_spans; top-k: _topk_spans)."""
    lay = pm.__dict__.get("_decode_layout")
    if lay is not None:
        return lay
    raw: dict[torch.dtype, list] = {}
    empty, groups = [], {}
    for e in pm.entries:
        if pm.records[e.codec_index].codec == fmt.CODEC_RAW:
            raw.setdefault(e.dtype, []).append(e)
        elif e.numel == 0:
            empty.append(e)
        else:
            groups.setdefault((e.codec_index, e.dtype), []).append(e)
    glist = []
    for (ci, dtype), members in groups.items():
        rec = pm.records[ci]
        numels = [e.numel for e in members]
        if rec.codec == fmt.CODEC_AFFINE:
            gs = [fmt.affine_group_size(rec.granularity, rec.group_log2, e.shape, e.numel) for e in members]
            extra = (gs, _affine_spans(rec, members, numels))
        else:
            extra = _topk_spans(rec, members)
        glist.append((rec, dtype, members, numels, extra, _view_plan(members)))
    raws = [(dtype, members, [(e.payload_offset, e.payload_len) for e in members], _view_plan(members))
            for dtype, members in raw.items()]  # fmt: skip
    lay = pm._decode_layout = (raws, empty, glist)
    return lay


@dataclass
class _TopkSpans:
    """Where a top-k group's sections lie, worked out once per header."""

    counts: list  # of every member
    index: list  # (offset, bytes) of each member's index code
    kept: list  # the members that keep values, and their counts
    kept_counts: list
    values: list  # (offset, bytes) of each kept member's payload (plain: every member's)
    mus: list | None = None  # sign values: (offset, bytes) of each kept member's mu
    pad: list | None = None  # sign values: (end, bits, name) of each kept member's sign stream
    group_sizes: list | None = None  # quantized values: of each kept member's values vector
    affine: tuple | None = None  # quantized values: their _affine_spans


def _topk_spans(rec, members) -> _TopkSpans:
    counts = [e.count for e in members]
    kept = [e for e in members if e.count]
    kept_counts = [e.count for e in kept]
    plain = rec.values not in (fmt.VALUES_SIGN, fmt.VALUES_QUANTIZED)
    tk = _TopkSpans(counts, [(e.index_offset, e.index_len) for e in members], kept, kept_counts,
                    [(e.payload_offset, e.payload_len) for e in (members if plain else kept)])  # fmt: skip
    if rec.values == fmt.VALUES_SIGN:
        tk.mus = [(e.offset, e.metadata_len) for e in kept]
        tk.pad = [(e.end, e.count, e.name) for e in kept]
    elif rec.values == fmt.VALUES_QUANTIZED:
        tk.group_sizes = [1 << rec.group_log2 if rec.granularity == fmt.GRAN_GROUP else c for c in kept_counts]
        tk.affine = _affine_spans(rec, kept, kept_counts)
    return tk


def _sign_values(mv, rec, tk: _TopkSpans, dtype, device) -> torch.Tensor:
    """Sign-and-mean values as 1-bit affine codes with scale ``2 mu`` and offset
    ``-mu``: exactly ``-mu`` or ``+mu`` (doubling and ``-mu + 2 mu`` are exact)."""
    if not tk.kept:
        return torch.empty(0, dtype=torch.float32, device=device)
    meta = fmt.META_CODES[rec.meta_dtype]
    mus = _gather(mv, tk.mus).view(meta).float()
    if (not bool(torch.isfinite(mus * 2).all()) or bool(torch.signbit(mus).any())
            or not bool(torch.isfinite(mus.to(dtype)).all())):  # fmt: skip
        # a mean of |values| of this dtype is finite in it: no encoder wrote this
        raise FormatError(f"sign values: mean magnitude must be finite, >= +0, at most half the float32 range and "
                          f"finite as {dtype} in tensors {[e.name for e in tk.kept]}")  # fmt: skip
    _check_padding(mv, tk.pad, "sign")
    packed = _gather(mv, tk.values)
    return ops.unpack_dequantize(packed.to(device), (2 * mus).to(device), (-mus).to(device), 1, tk.kept_counts,
                                 tk.kept_counts, torch.float32)  # fmt: skip


def _topk_values(mv, rec, tk: _TopkSpans, dtype, device) -> torch.Tensor:
    """The float32 values of a top-k group (tensor ``dtype``), checked."""
    if rec.values == fmt.VALUES_SIGN:
        return _sign_values(mv, rec, tk, dtype, device)
    if rec.values == fmt.VALUES_QUANTIZED:
        if not tk.kept:
            return torch.empty(0, dtype=torch.float32, device=device)
        packed, scales, offsets = _affine_inputs(mv, rec, tk.kept, tk.kept_counts, dtype, tk.affine)
        # The parser checked every size, so a kernel error here is not about the message: it surfaces as is.
        return ops.unpack_dequantize(packed.to(device), scales.to(device), offsets.to(device), rec.bits,
                                     tk.kept_counts, tk.group_sizes, torch.float32)  # fmt: skip
    vdtype = fmt.VALUE_DTYPES[rec.values]
    values = _gather(mv, tk.values).view(vdtype)
    if not (_all_finite(values) and (_holds_finite(dtype, vdtype) or _all_finite(values.to(dtype)))):
        # the encoder refuses non-finite inputs to top-k, and values its dtype cannot hold
        raise FormatError(f"top-k values that are not finite (as {vdtype} or as the tensor's {dtype}) "
                          f"in tensors {[e.name for e in tk.kept]}")  # fmt: skip
    return values.to(device=device, dtype=torch.float32)


def _decode_parsed(pm: fmt.ParsedMessage, mv: memoryview, device) -> dict[str, torch.Tensor]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    raw_groups, empty, groups = _decode_layout(pm)
    out: dict[str, torch.Tensor] = dict.fromkeys([e.name for e in pm.entries])  # the table order
    for dtype, members, spans, view_plan in raw_groups:
        out.update(zip([e.name for e in members], _raw_tensors(mv, dtype, members, spans, view_plan, device)))
    for e in empty:
        out[e.name] = torch.zeros(e.shape, dtype=e.dtype, device=device)

    for rec, dtype, members, numels, extra, view_plan in groups:
        kdtype = torch.float32 if dtype == torch.float64 else dtype
        if rec.codec == fmt.CODEC_AFFINE:
            gs, spans = extra
            packed, scales, offsets = _staged_to(device, _affine_inputs(mv, rec, members, numels, dtype, spans))
            # The parser checked every size, so a kernel error here is not about the message: it surfaces as is.
            dense = ops.unpack_dequantize(packed, scales, offsets, rec.bits, numels, gs, kdtype)
        else:
            counts = extra.counts
            index_bytes = _gather(mv, extra.index)
            values = _topk_values(mv, rec, extra, dtype, device)
            if values.device != index_bytes.device:
                index_bytes = index_bytes.to(device)
            try:
                dense = ops.sparse_decode(index_bytes, values, numels, counts, kdtype)
            except ValueError as exc:  # only a malformed index code; other kernel failures surface as they are
                raise FormatError(
                    f"sparse_decode rejected the index codes of {[e.name for e in members]}: {exc}"
                ) from exc
        if dtype != kdtype:
            dense = dense.to(dtype)
        out.update(zip([e.name for e in members], _split_members(dense, numels, view_plan)))
    return out


def _raw_tensors(mv, dtype, members, spans, view_plan, device=None) -> list:
    """The raw tensors ``members`` (all of ``dtype``, at ``spans``), checked:
    one copy out of the message for all of them (and one to ``device``), then
    views of it."""
    flat = _gather(mv, spans)
    # The largest byte, compared as an int: no bool temporary of the payload's
    # size (and none for atheris 3.0's comparison hook to leak: fuzz/).
    if dtype == torch.bool and flat.numel() and int(flat.max()) > 1:
        name = next(e.name for e in members if any(b > 1 for b in mv[e.payload_offset : e.end]))
        raise FormatError(f"tensor {name!r}: bool elements must be 0 or 1")
    if device is not None and _off_host(device):
        flat = flat.to(device)
    return _split_members(flat.view(dtype), [e.numel for e in members], view_plan)


def _as_view(data) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except TypeError as exc:
        raise FormatError(f"message must be a bytes-like object, not {type(data).__name__}") from exc


def _schema_lookup(schemas):
    """``schema_id -> ParsedSchema or None`` from None, a Schema, an iterable
    of them, or a mapping of ids to them (e.g. a ``SchemaRegistry``)."""
    if schemas is None:
        return None
    if hasattr(schemas, "parsed"):  # one Schema
        return lambda sid: schemas.parsed if sid == schemas.id else None
    if isinstance(schemas, Mapping):
        return lambda sid: getattr(schemas.get(sid), "parsed", None)
    by_id = {s.id: s.parsed for s in schemas}
    return by_id.get


def decode(
    data, *, device=None, limits: DecodeLimits | None = None, expect=None, partial: bool = False, schemas=None
) -> dict[str, torch.Tensor]:
    """Rebuild the named tensors of a message.

    The whole message is validated first (length, CRC32C, every header field
    and section size, against ``limits`` and ``expect``), so a hostile or
    corrupted message raises before anything it claims is allocated.

    Parameters
    ----------
    data : bytes-like
        A message produced by :func:`encode` (``bytes``, ``bytearray``,
        ``memoryview``...).
    device : torch.device or str, optional
        Where the tensors are decoded and returned (default CPU). Only the
        compressed sections are moved there.
    limits : DecodeLimits, optional
        Bounds on message size, tensor count, total elements, ndim, name
        length and expansion (defaults: :class:`DecodeLimits`).
    expect : mapping or torch.nn.Module, optional
        What the receiver knows the message must hold: names mapped to
        tensors or arrays (a state dict: only shapes and dtypes are used) or
        to ``(shape, dtype)`` pairs; a module stands for its state dict.
        Anything else is refused before any
        allocation, which is how a server should decode client uploads: a
        message cannot make it allocate more than its own model. With
        ``expect`` the ``max_expansion`` limit does not apply. A dtype of
        None accepts any dtype.
    partial : bool
        The message may hold a subset of ``expect`` (default: exactly it).
    schemas : Schema, iterable of Schema, or mapping of id to Schema, optional
        The schemas this receiver holds, for compact messages (version 3).
        A compact message naming another raises ``UnknownSchemaError``.

    Returns
    -------
    dict[str, torch.Tensor]
        Original names (in encoding order), shapes and dtypes. Sparse tensors
        come back dense, zero where nothing was sent.

    Raises
    ------
    FormatError
        Malformed message.
    ChecksumError
        CRC32C mismatch (corruption).
    UnsupportedVersionError
        Format version not implemented here.
    LimitError
        The message exceeds ``limits``.
    ExpectationError
        The message is well formed but not what ``expect`` says.
    """
    mv = _as_view(data)
    pm = fmt.parse(
        mv,
        limits,
        None if expect is None else fmt.expectation(expect),
        partial=partial,
        schemas=_schema_lookup(schemas),
    )
    return _decode_parsed(pm, mv, device)


_KERNEL_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decode_into(
    data, tensors, *, mode: str = "assign", partial: bool = False, limits: DecodeLimits | None = None, schemas=None
) -> list[str]:
    """Decode a message into tensors the caller already has, in place.

    The targets are the expectation (as ``decode(..., expect=tensors)``): the
    message must hold exactly their names (a subset with ``partial=True``),
    with their shapes and dtypes. The whole message is validated, contents
    included (FORMAT.md 4), before the first target is written: a message
    that fails any check raises and leaves every target untouched.

    Parameters
    ----------
    data : bytes-like
        A message produced by :func:`encode`.
    tensors : Mapping[str, torch.Tensor] or torch.nn.Module
        The targets, by name; a module stands for its ``state_dict()``
        (parameters and buffers are written in place).
    mode : {"assign", "add"}
        ``"assign"``: each target becomes what :func:`decode` returns (top-k
        tensors: zero where nothing was sent). ``"add"``: each target gets
        ``target += decode(data)[name]``, with the same result as that
        PyTorch expression (the decoded value in the target's dtype, then
        added); top-k tensors touch only the sent elements.
    partial : bool
        The message may hold a subset of the targets; the others are left as
        they are.
    limits, schemas
        As for :func:`decode`.

    Returns
    -------
    list[str]
        The names written, in message order.

    Notes
    -----
    On the CPU nothing of the targets' size is allocated: affine and top-k
    tensors are decoded by the kernels straight into them, raw tensors are
    copied from the message. Exceptions, which go through a temporary: a
    non-contiguous target (decoded into a contiguous buffer, then copied),
    a float64 target of an affine codec (the kernels decode to float32).
    Targets on another device are decoded there with :func:`decode`, then
    copied. Targets the message writes must not overlap in memory (tied
    weights under two names are refused).

    Raises
    ------
    CodecError
        As for :func:`decode` (``ExpectationError`` when the message does
        not match the targets' names, shapes or dtypes).
    TypeError, ValueError
        A target that is not a tensor, overlapping targets, an unknown mode.
    """
    if mode not in ("assign", "add"):
        raise ValueError(f"decode_into: mode must be 'assign' or 'add', not {mode!r}")
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.state_dict()
    if not isinstance(tensors, Mapping):
        raise TypeError(f"decode_into: tensors must be a mapping of names to tensors or a module, "
                        f"not {type(tensors).__name__}")  # fmt: skip
    mv = _as_view(data)
    # Nothing the message claims is allocated before the targets are matched
    # below, so the header is parsed without the expansion bound and then
    # matched against the targets (cheaper than expect=; a mismatch is an
    # ExpectationError, raised after the header's own checks).
    pm = fmt.parse(mv, limits, None, bound_expansion=False, schemas=_schema_lookup(schemas))
    n = len(pm.entries)
    if n > len(tensors) if partial else n != len(tensors):
        raise ExpectationError(f"message holds {n} tensors; the targets are "
                               f"{'at most ' if partial else ''}{len(tensors)}")  # fmt: skip
    names = [e.name for e in pm.entries]
    targets = [tensors.get(name) for name in names]
    # One compiled call checks that every target is a CPU tensor of its
    # entry's dtype and shape (0.25 us a tensor in Python); anything else
    # goes through the loop below, which names the first mismatch.
    on_cpu = _targets_match(targets, pm)
    if not on_cpu:
        for e, t in zip(pm.entries, targets):
            if t is None:
                raise ExpectationError(f"tensor {e.name!r} is not one of the targets")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"decode_into: target {e.name!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.dtype != e.dtype or t.shape != e.shape:
                raise ExpectationError(f"tensor {e.name!r} is {e.dtype} of shape {e.shape}; the target is "
                                       f"{t.dtype} of shape {tuple(t.shape)}")  # fmt: skip
    targets = [t.detach() if t.requires_grad else t for t in targets]  # in-place writes, even to leaves with grad
    add = mode == "add"
    if not ops.disjoint(targets):
        raise ValueError("decode_into: two targets the message writes overlap in memory")
    if not on_cpu and any(t.device.type != "cpu" for t in targets):
        # One device: decode there, then copy (validated as a whole first).
        devices = {t.device for t in targets}
        dense = _decode_parsed(pm, mv, devices.pop() if len(devices) == 1 else None)
        for t, name in zip(targets, names):
            src = dense[name].to(t.device)
            t.add_(src) if add else t.copy_(src)
        return names

    # Phase 1: every check and every input, nothing written.
    writes = []  # (targets, tensors to copy or add), per raw dtype
    raw_direct = []  # (target, message offset): assigned straight from the message bytes
    affine_calls = []  # (outs, packed, scales, offsets, bits, group sizes)
    via_temp = []  # (targets, dense float32 thunk)
    s_outs, s_index, s_values, s_counts, s_names = [], [], [], [], []
    raw_groups, _, groups = _decode_layout(pm)  # empty tensors: nothing to write
    target_of = dict(zip(names, targets))
    for dtype, members, spans, view_plan in raw_groups:
        outs = [target_of[e.name] for e in members]
        if not add and dtype != torch.bool and all(t.is_contiguous() for t in outs):  # no check of the values
            raw_direct += [(t, e.payload_offset) for t, e in zip(outs, members)]
        else:
            writes.append((outs, _raw_tensors(mv, dtype, members, spans, view_plan)))
    for rec, dtype, members, numels, extra, _ in groups:
        outs = [target_of[e.name] for e in members]
        if rec.codec == fmt.CODEC_AFFINE:
            gs, spans = extra
            packed, scales, offsets = _affine_inputs(mv, rec, members, numels, dtype, spans)
            if dtype in _KERNEL_OUT_DTYPES:
                affine_calls.append((outs, packed, scales, offsets, rec.bits, gs))
            else:  # float64: the kernels decode to float32
                via_temp.append((outs, numels, (packed, scales, offsets, rec.bits, numels, gs)))
        else:
            values = _topk_values(mv, rec, extra, dtype, torch.device("cpu"))
            if dtype in (torch.float16, torch.bfloat16):
                values = values.to(dtype).float()  # as decode rounds them: exact sums in "add" mode
            s_outs += outs
            s_index.append(_gather(mv, extra.index))
            s_values.append(values)
            s_counts += extra.counts
            s_names += [e.name for e in members]

    # Phase 2: the writes. The index codes are validated by the one
    # sparse_decode_into_ call below before it writes anything, so it goes first.
    if s_outs:
        try:
            index_bytes, values = (
                (s_index[0], s_values[0]) if len(s_index) == 1 else (torch.cat(s_index), torch.cat(s_values))
            )
            ops.sparse_decode_into_(s_outs, index_bytes, values, s_counts, accumulate=add)
        except ValueError as exc:  # only a malformed index code; other kernel failures surface as they are
            raise FormatError(f"sparse_decode rejected the index codes of {s_names}: {exc}") from exc
    for outs, packed, scales, offsets, bits, gs in affine_calls:
        ops.unpack_dequantize_into_(outs, packed, scales, offsets, bits, gs, accumulate=add)
    for outs, numels, args in via_temp:
        dense = ops.unpack_dequantize(*args, torch.float32)
        for t, d in zip(outs, torch.split(dense, numels)):
            d = d.reshape(t.shape)
            t.add_(d) if add else t.copy_(d)
    for dsts, srcs in writes:  # one dispatch per dtype
        torch._foreach_add_(dsts, srcs) if add else torch._foreach_copy_(dsts, srcs)
    if raw_direct:
        ops.copy_from_bytes_([t for t, _ in raw_direct], _message_tensor(mv), [a for _, a in raw_direct])
    return names


_LAYOUT_DTYPE_CODES: dict = {}  # torch dtype -> its code in an ops.plan_layout


def _targets_match(targets, pm: fmt.ParsedMessage) -> bool:
    """Whether the targets are strided CPU tensors of the entries' dtypes and
    shapes (one compiled call; the entries' layout is worked out once per
    parsed header). False for anything else, mismatches included."""
    expected = pm.__dict__.get("_targets_layout")
    try:
        if expected is None:
            if ops.BACKEND == "reference":
                expected = tuple((e.dtype, tuple(e.shape)) for e in pm.entries)
            else:
                layout = [len(pm.entries)]
                for e in pm.entries:
                    code = _LAYOUT_DTYPE_CODES.get(e.dtype)
                    if code is None:
                        code = _LAYOUT_DTYPE_CODES[e.dtype] = int(ops.plan_layout([torch.empty(0, dtype=e.dtype)])[1])
                    layout += (code, len(e.shape), *e.shape)
                expected = torch.tensor(layout, dtype=torch.int64)
            pm.__dict__["_targets_layout"] = expected
        return ops.plan_layout_matches(targets, expected)
    except (TypeError, RuntimeError, AttributeError):  # a target that is not a tensor
        return False


def _message_tensor(mv: memoryview) -> torch.Tensor:
    """The message's bytes as a uint8 tensor, without a copy; only ever read.

    ``torch.frombuffer`` warns on a read-only buffer such as ``bytes`` (and
    silencing it with ``warnings.catch_warnings`` is not thread-safe), so the
    tensor wraps a ctypes view of the same memory, as ``_alloc_message`` does;
    the caller holds the message while the tensor is in use.
    """
    n = len(mv)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    addr = np.frombuffer(mv, dtype=np.uint8).ctypes.data
    return torch.frombuffer((ctypes.c_ubyte * n).from_address(addr), dtype=torch.uint8)


# ---- numpy ------------------------------------------------------------------------
def encode_numpy(arrays: Mapping[str, np.ndarray], spec: CodecSpec | None = None, *, schema=None) -> bytes:
    """:func:`encode` for numpy arrays (no copy of the arrays on the way in).

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Names to arrays of a dtype torch can wrap (float16/32/64, ints, bool,
        complex).
    spec : CodecSpec, optional
        As for :func:`encode`.
    schema : Schema, optional
        As for :func:`encode` (a compact message).

    Returns
    -------
    bytes
        The message.

    Raises
    ------
    TypeError, ValueError
        As for :func:`encode`, or for an array dtype torch cannot wrap.
    """
    tensors = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        # from_numpy warns on read-only arrays and needs C order (np.ascontiguousarray
        # would turn a 0-d array into 1-d); encode only reads.
        if not (a.flags.writeable and a.flags.c_contiguous):
            a = a.copy(order="C")
        try:
            tensors[name] = torch.from_numpy(a)
        except TypeError as exc:
            raise ValueError(f"encode_numpy: {name!r} has dtype {a.dtype}, which the codec does not carry") from exc
    return encode(tensors, spec, schema=schema)


def decode_numpy(
    data, *, limits: DecodeLimits | None = None, expect=None, partial: bool = False, schemas=None
) -> dict[str, np.ndarray]:
    """:func:`decode` to numpy arrays.

    Parameters
    ----------
    data : bytes-like
        The message.
    limits : DecodeLimits, optional
        As for :func:`decode`.
    expect : mapping or torch.nn.Module, optional
        As for :func:`decode` (numpy arrays or ``(shape, dtype)`` pairs).
    partial, schemas
        As for :func:`decode`.

    Returns
    -------
    dict[str, numpy.ndarray]
        bfloat16 tensors (which numpy lacks) come back as float32 (exact).

    Raises
    ------
    CodecError
        As for :func:`decode`.
    """
    out = {}
    for name, t in decode(data, limits=limits, expect=expect, partial=partial, schemas=schemas).items():
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[name] = t.numpy()
    return out


# ---- message_info -----------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One row of :func:`message_info`'s tensor table."""

    name: str
    dtype: torch.dtype
    shape: tuple
    codec: str  # "raw" | "affine" | "topk"
    params: str  # human-readable codec parameters
    bits: int  # 0 when nothing is quantized
    granularity: str | None
    group_size: int | None  # elements per group for quantized data (None if not quantized)
    rounding: str | None
    meta_dtype: str | None
    values: str | None  # top-k value encoding
    topk_scope: str | None
    count: int | None  # top-k: elements kept
    index_code: str | None  # top-k: "bitmap" | "elias-fano"
    offset: int  # where its sections start in the message
    metadata_bytes: int
    index_bytes: int
    payload_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        return self.metadata_bytes + self.index_bytes + self.payload_bytes


@dataclass(frozen=True)
class MessageInfo:
    """Exact byte breakdown of a message.

    ``total_bytes == header_bytes + metadata_bytes + index_bytes +
    payload_bytes + checksum_bytes``.
    """

    version: int
    total_bytes: int
    header_bytes: int  # preamble + codec table + tensor table
    metadata_bytes: int  # scales and offsets
    index_bytes: int  # sparse index codes
    payload_bytes: int  # packed codes, sparse values, raw tensors
    checksum_bytes: int
    n_codecs: int
    tensors: tuple
    schema_id: bytes | None = None  # compact messages: the schema holding their tables


def message_info(data, *, limits: DecodeLimits | None = None, schemas=None) -> MessageInfo:
    """Describe a message without decoding its tensors (checksum verified).

    Parameters
    ----------
    data : bytes-like
        The message.
    limits : DecodeLimits, optional
        As for :func:`decode`.
    schemas : optional
        As for :func:`decode`: a compact message is described from its schema.

    Returns
    -------
    MessageInfo
        Totals by part and a per-tensor :class:`TensorInfo` table.

    Raises
    ------
    CodecError
        If the header is invalid, as for :func:`decode` (section contents,
        such as index codes, are only checked by :func:`decode`).
    """
    # Nothing is decoded here, so a would-be bomb is described, not refused.
    pm = fmt.parse(_as_view(data), limits, bound_expansion=False, schemas=_schema_lookup(schemas))
    rows = []
    for e in pm.entries:
        r = pm.records[e.codec_index]
        q = r.bits > 0
        if q:
            n = e.count if r.codec == fmt.CODEC_TOPK else e.numel
            shape = (n,) if r.codec == fmt.CODEC_TOPK else e.shape
            gsize = fmt.affine_group_size(r.granularity, r.group_log2, shape, n)
        topk = r.codec == fmt.CODEC_TOPK
        rows.append(
            TensorInfo(
                name=e.name,
                dtype=e.dtype,
                shape=e.shape,
                codec=fmt.CODEC_NAMES[r.codec],
                params=r.describe(),
                bits=r.bits,
                granularity=fmt.GRAN_NAMES[r.granularity] if q else None,
                group_size=gsize if q else None,
                rounding=fmt.ROUND_NAMES[r.rounding] if q else None,
                meta_dtype=str(fmt.META_CODES[r.meta_dtype])[6:] if q else None,
                values=fmt.VALUE_NAMES[r.values] if topk else None,
                topk_scope=fmt.SCOPE_NAMES[r.topk_scope] if topk else None,
                count=e.count if topk else None,
                index_code=("bitmap", "elias-fano")[e.index_code] if topk else None,
                offset=e.offset,
                metadata_bytes=e.metadata_len,
                index_bytes=e.index_len,
                payload_bytes=e.payload_len,
            )
        )
    return MessageInfo(
        version=pm.version,
        total_bytes=pm.total_bytes,
        header_bytes=pm.header_bytes,
        metadata_bytes=sum(t.metadata_bytes for t in rows),
        index_bytes=sum(t.index_bytes for t in rows),
        payload_bytes=sum(t.payload_bytes for t in rows),
        checksum_bytes=fmt.CHECKSUM_SIZE,
        n_codecs=len(pm.records),
        tensors=tuple(rows),
        schema_id=pm.schema_id,
    )


# ---- error feedback ---------------------------------------------------------------
# a library logs; the application decides where its warnings go
log = logging.getLogger("flocora_codec")


def _residual_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 tensors keep float64 residuals; every other float dtype float32
    return torch.float64 if dtype == torch.float64 else torch.float32


class ErrorFeedback:
    """Error feedback (EF14 / "memory"): what compression lost is sent later.

    Per key, the residual ``r = (x + r_prev) - decode(encode(x + r_prev))`` is
    kept and added to the next tensor of that key before it is encoded, so
    the compression error does not accumulate over rounds. The FL loop
    (``fl/``) and the Flower mod (:func:`flocora_codec.flower.compression_mod`)
    both use this class.

    Residuals
        One per floating-point tensor key, on the tensor's device, in float32
        (float64 for float64 tensors): ``x + r_prev`` is formed in that dtype
        and cast to the tensor's dtype for encoding. An all-zero residual (the
        tensor travelled exactly, e.g. raw under a rule) is not kept. Keys
        absent from a message keep their residual for a later one.

    Mismatched residuals
        A residual whose shape differs from its tensor's (the model changed,
        or a stale state was restored) is dropped with a logged warning
        (logger ``"flocora_codec"``) and the tensor is encoded without it: a
        long-running client must not fail every round over error it can no
        longer owe. A residual of another float dtype is converted.

    Parameters
    ----------
    spec : CodecSpec
        The (lossy) spec used by :meth:`encode`. It is a public attribute:
        with stochastic rounding, give each round its own seed
        (``ef.spec = spec.replace(seed=round_seed)``) so that the rounding
        noise is independent across rounds.

    Examples
    --------
    >>> ef = ErrorFeedback(CodecSpec(bits=2))
    >>> data = ef.encode({"w": torch.randn(4, 8)})

    :meth:`encode` is :meth:`compensate`, :func:`encode`, :func:`decode` and
    :meth:`settle`; callers that must act between the steps (the Flower mod
    scales the update to a clipping norm) call them themselves:

    >>> to_send, targets = ef.compensate(tensors)
    >>> data = encode(to_send, ef.spec)
    >>> ef.settle(targets, decode(data))
    """

    def __init__(self, spec: CodecSpec):
        if not isinstance(spec, CodecSpec):
            raise TypeError(f"ErrorFeedback: spec must be a CodecSpec, not {type(spec).__name__}")
        self.spec = spec
        self._residual: dict[str, torch.Tensor] = {}

    def compensate(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        """Add the residuals to ``tensors``.

        Parameters
        ----------
        tensors : Mapping[str, torch.Tensor]
            As for :func:`encode`.

        Returns
        -------
        to_send : dict
            ``tensors`` with each float tensor replaced by ``x + residual`` in
            its own dtype; other values as they are.
        targets : dict[str, torch.Tensor]
            ``x + residual`` of the float tensors in the residual dtype: what
            the message is meant to carry, for :meth:`settle`.
        """
        to_send, targets = {}, {}
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                x = t.detach().to(_residual_dtype(t.dtype))
                r = self._residual.get(name)
                if r is not None and r.shape != x.shape:
                    log.warning("ErrorFeedback: dropped the residual of %r: shape %s, the tensor's %s",
                                name, tuple(r.shape), tuple(x.shape))  # fmt: skip
                    del self._residual[name]
                    r = None
                if r is not None:
                    x = x + r.to(device=x.device, dtype=x.dtype)
                targets[name] = x
                t = x.to(t.dtype)
            to_send[name] = t
        return to_send, targets

    def settle(self, targets: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> None:
        """Keep ``targets - decoded`` as the residual of each key of ``targets``.

        Parameters
        ----------
        targets : Mapping[str, torch.Tensor]
            What the message was meant to carry: :meth:`compensate`'s
            ``targets``, or what was actually encoded when the caller changed
            it (e.g. scaled it down).
        decoded : Mapping[str, torch.Tensor]
            The decoded message (at least the keys of ``targets``).
        """
        for name, x in targets.items():
            dtype = _residual_dtype(x.dtype)
            r = x.to(dtype) - decoded[name].to(device=x.device, dtype=dtype)
            if bool(r.any()):
                self._residual[name] = r
            else:
                self._residual.pop(name, None)

    def encode(self, tensors: Mapping[str, torch.Tensor], *, schema=None) -> bytes:
        """Encode ``tensors + residual`` and keep the new residual.

        Parameters
        ----------
        tensors : Mapping[str, torch.Tensor]
            As for :func:`encode`.
        schema : Schema, optional
            As for :func:`encode` (a compact message).

        Returns
        -------
        bytes
            The message.
        """
        to_send, targets = self.compensate(tensors)
        data = encode(to_send, self.spec, schema=schema)
        # decode where the tensors live: on a GPU only the compressed bytes go back up
        device = next((x.device for x in targets.values()), None)
        self.settle(targets, decode(data, device=device, schemas=schema))
        return data

    def reset(self) -> None:
        """Forget every residual."""
        self._residual.clear()

    def get_state(self) -> dict[str, torch.Tensor]:
        """The residuals, by key (copies).

        Returns
        -------
        dict[str, torch.Tensor]
        """
        return {k: v.clone() for k, v in self._residual.items()}

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the residuals (e.g. restored from a checkpoint).

        Parameters
        ----------
        state : Mapping[str, torch.Tensor or numpy.ndarray]
            As returned by :meth:`get_state`. float64 residuals stay float64,
            other float dtypes become float32.

        Raises
        ------
        ValueError
            A residual that is not floating-point.
        """
        residual = {}
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                v = np.array(v)  # writable: torch warns on read-only arrays (Flower's)
            t = torch.as_tensor(v).detach()
            if not t.is_floating_point():
                raise ValueError(f"ErrorFeedback.set_state: residual {k!r} has dtype {t.dtype}, not a float dtype")
            residual[k] = t.to(_residual_dtype(t.dtype), copy=True)
        self._residual = residual
