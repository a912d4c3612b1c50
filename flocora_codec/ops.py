"""Typed wrappers over the ``torch.ops.flocora`` kernels, with fake kernels.

Every op takes a list of tensors and returns flat, concatenated buffers, so a
whole state dict costs one dispatch. Sizes are exact and static where the math
allows it (``packed_nbytes``, ``num_groups``, ``index_nbytes``), which is what
the ``register_fake`` kernels below use under ``torch.compile``.

The kernels live in ``csrc/cpu`` and ``csrc/cuda``; ``flocora_codec.reference``
holds the pure-PyTorch definitions they are tested against.

When the compiled extension ``flocora_codec._C`` cannot be loaded (no
compiler at install time, a torch it was not built for) or
``FLOCORA_FORCE_REFERENCE=1`` is set, every op runs the reference instead:
the same bytes, much slower, CPU only, with one warning at import.
:data:`BACKEND` says which one is in use.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Sequence

import crc32c as _crc32c_package
import numpy as np
import torch

FORCE_REFERENCE_ENV = "FLOCORA_FORCE_REFERENCE"


class ReferenceFallbackWarning(RuntimeWarning):
    """Issued once when the ops run the pure-PyTorch reference instead of ``_C``."""


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(v) for v in version.split("+")[0].split(".")[:2])


def _load_extension() -> tuple[str, str | None]:
    if os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0"):
        return "reference", f"{FORCE_REFERENCE_ENV} is set"
    try:
        from flocora_codec import _build_info
    except ImportError:  # an in-place build older than _build_info: trust it
        _build_info = None
    if _build_info is not None and not getattr(_build_info, "EXTENSION", True):
        return "reference", "flocora-codec was installed without its compiled extension (FLOCORA_NO_EXT=1)"
    built = getattr(_build_info, "TORCH_VERSION", None)
    # libtorch's C++ ABI changes between minor releases; a mismatched _C may
    # load and then crash, so it is not loaded at all.
    if built is not None and _minor(built) != _minor(torch.__version__):
        return "reference", (f"flocora_codec._C was built for torch {built}, this is torch {torch.__version__}")
    try:
        from flocora_codec import _C  # noqa: F401  (registers the schemas)
    except (ImportError, OSError) as exc:  # missing .so, or one built for another torch
        return "reference", f"the compiled extension flocora_codec._C cannot be loaded ({type(exc).__name__}: {exc})"
    return "compiled", None


BACKEND, FALLBACK_REASON = _load_extension()
"""``"compiled"`` (the ``torch.ops.flocora`` kernels) or ``"reference"``."""
if BACKEND == "reference":
    warnings.warn(
        f"flocora_codec: {FALLBACK_REASON}; using the pure-PyTorch reference ops (same messages, "
        "much slower, CPU only). Reinstall with a C++ compiler and a matching torch for the kernels.",
        ReferenceFallbackWarning,
        stacklevel=2,
    )


def _register_fake(name):
    """``torch.library.register_fake`` when the schema exists (compiled backend only)."""
    if BACKEND == "compiled":
        return torch.library.register_fake(name)
    return lambda fn: fn


def _reference_call(op: str, fn, *args):
    """Run a reference op with the kernels' error classes: malformed data or
    unencodable input raises ValueError (the codec turns it into FormatError
    when decoding), anything else RuntimeError."""
    from flocora_codec import reference as ref

    try:
        return fn(ref, *args)
    except RuntimeError:
        raise
    except ValueError as exc:
        raise ValueError(f"flocora::{op} (reference): {exc}") from exc
    except (IndexError, TypeError) as exc:
        raise RuntimeError(f"flocora::{op} (reference): {exc}") from exc


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
META_DTYPES = (torch.float32, torch.float16)
MAX_BITS = 8


# ---- exact sizes (mirrors csrc/include/flocora/affine.h) -------------------
def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits in one LSB-first bitstream."""
    return (numel * bits + 7) // 8


def num_groups(numel: int, group_size: int) -> int:
    """Groups of ``group_size`` consecutive elements; the last may be short."""
    return -(-numel // group_size) if numel else 0


INDEX_BITMAP = 0
INDEX_ELIAS_FANO = 1


def elias_fano_low_bits(n: int, k: int) -> int:
    """l = max{l : k * 2**l <= n} (0 when k == 0)."""
    if k <= 0:
        return 0
    return min(62, max(0, (n // k).bit_length() - 1))  # 2**l <= n / k  <=>  2**l <= n // k


def bitmap_nbytes(n: int) -> int:
    return (n + 7) // 8


def elias_fano_nbytes(n: int, k: int) -> int:
    if k <= 0:
        return 0
    low = elias_fano_low_bits(n, k)
    return (k * low + 7) // 8 + ((((n - 1) >> low) + k) + 7) // 8


def choose_index_code(n: int, k: int) -> int:
    """The smaller of bitmap and Elias-Fano for k of n; the bitmap on a tie."""
    return INDEX_BITMAP if bitmap_nbytes(n) <= elias_fano_nbytes(n, k) else INDEX_ELIAS_FANO


def index_nbytes(n: int, k: int) -> int:
    return index_code_and_nbytes(n, k)[1]


def index_code_and_nbytes(n: int, k: int) -> tuple[int, int]:
    """(choose_index_code(n, k), index_nbytes(n, k)) in one step."""
    if type(n) is int and type(k) is int:  # not the symbolic sizes of fake tensors
        return _index_code_and_nbytes_cached(n, k)
    return _index_code_and_nbytes(n, k)


def index_codes_and_nbytes(numels: Sequence[int], counts: Sequence[int]) -> list[tuple[int, int]]:
    """:func:`index_code_and_nbytes` of each (numel, count) pair of plain ints."""
    return list(map(_index_code_and_nbytes_cached, numels, counts))


@functools.lru_cache(maxsize=8192)  # an encode asks twice per top-k tensor; FL rounds repeat (n, k)
def _index_code_and_nbytes_cached(n: int, k: int) -> tuple[int, int]:
    return _index_code_and_nbytes(n, k)


def _index_code_and_nbytes(n, k):
    bitmap, ef = (n + 7) // 8, elias_fano_nbytes(n, k)
    return (INDEX_BITMAP, bitmap) if bitmap <= ef else (INDEX_ELIAS_FANO, ef)


# ---- quantize + pack --------------------------------------------------------
def quantize_pack(
    xs: Sequence[torch.Tensor],
    bits: int,
    group_sizes: Sequence[int],
    *,
    stochastic: bool = False,
    seeds: Sequence[int] | None = None,
    meta_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine-quantize and bit-pack each tensor of ``xs`` in one call.

    Tensor ``i`` is read in row-major order and cut into groups of
    ``group_sizes[i]`` consecutive elements (the last group may be shorter).
    Per group, with ``m``/``M`` its min/max and ``L = 2**bits - 1``:
    ``offset = m``, ``scale = (M - m) / L``, ``q = round((x - offset) / scale)``
    clamped to ``[0, L]`` (nearest with ties to even, or stochastic:
    ``floor(v) + [u < frac(v)]`` with ``u`` drawn from a counter-based hash of
    ``(seeds[i], element index)``, so ``E[decode] = x``). With float16
    metadata the offset is rounded down and the scale up, so the range still
    covers the group. A group with ``scale`` below the smallest normal float
    stores scale 0 and decodes to its offset (exact for constant groups).

    Returns ``(packed, scales, offsets)``: ``packed`` is uint8, each tensor's
    ``packed_nbytes(numel, bits)`` bytes back to back; ``scales`` and
    ``offsets`` hold ``num_groups(numel, group_size)`` values per tensor, back
    to back, in ``meta_dtype``. Input that cannot be encoded (NaN or Inf, a
    range beyond float16 metadata) raises ``ValueError``; a bad argument or a
    kernel failure, ``RuntimeError``.
    """
    xs = list(xs)
    if seeds is None:
        seeds = [0] * len(xs)
    if not xs:
        empty = torch.empty(0, dtype=torch.uint8)
        return empty, torch.empty(0, dtype=meta_dtype), torch.empty(0, dtype=meta_dtype)
    if BACKEND == "reference":
        return _reference_call("quantize_pack", _ref_quantize_pack, xs, int(bits), [int(g) for g in group_sizes],
                               bool(stochastic), [int(s) for s in seeds], meta_dtype)  # fmt: skip
    return torch.ops.flocora.quantize_pack(
        xs, int(bits), [int(g) for g in group_sizes], bool(stochastic), [int(s) for s in seeds], meta_dtype
    )


@_register_fake("flocora::quantize_pack")
def _quantize_pack_fake(xs, bits, group_sizes, stochastic, seeds, meta_dtype):
    nbytes = sum(packed_nbytes(x.numel(), bits) for x in xs)
    ngroups = sum(num_groups(x.numel(), g) for x, g in zip(xs, group_sizes))
    device = xs[0].device
    return (
        torch.empty(nbytes, dtype=torch.uint8, device=device),
        torch.empty(ngroups, dtype=meta_dtype, device=device),
        torch.empty(ngroups, dtype=meta_dtype, device=device),
    )


def quantize_pack_into_(
    xs: Sequence[torch.Tensor],
    bits: int,
    group_sizes: Sequence[int],
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    *,
    stochastic: bool = False,
    seeds: Sequence[int] | None = None,
) -> None:
    """:func:`quantize_pack` into caller-owned outputs, in place (CPU only).

    ``packed`` (uint8), ``scales`` and ``offsets`` (the metadata dtype,
    float32 or float16) must be contiguous and of exactly the sizes
    :func:`quantize_pack` returns for these inputs, and must not overlap each
    other or an input. An encoder that sends the same shapes every round
    reuses them instead of faulting in fresh pages on every call (a large
    output costs as much to fault in as to encode). Arguments are checked
    before any write; after a ``ValueError`` (input that cannot be encoded)
    the outputs' contents are unspecified.
    """
    xs = list(xs)
    if seeds is None:
        seeds = [0] * len(xs)
    args = (xs, int(bits), [int(g) for g in group_sizes], bool(stochastic), [int(s) for s in seeds])
    if BACKEND == "reference":
        _reference_call("quantize_pack_into_", _ref_quantize_pack_into_, *args, packed, scales, offsets)
        return
    torch.ops.flocora.quantize_pack_into_(*args, packed, scales, offsets)


@_register_fake("flocora::quantize_pack_into_")
def _quantize_pack_into_fake(xs, bits, group_sizes, stochastic, seeds, packed, scales, offsets):
    return None


def unpack_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    numels: Sequence[int],
    group_sizes: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack`: ``x_hat = offset + q * scale``.

    Returns one flat tensor of ``sum(numels)`` elements of ``dtype``; split it
    with ``torch.split(out, numels)``. Sizes of ``packed``, ``scales`` and
    ``offsets`` are checked against ``numels`` before anything is read.
    """
    if BACKEND == "reference":
        return _reference_call("unpack_dequantize", _ref_unpack_dequantize, packed, scales, offsets, int(bits),
                               [int(n) for n in numels], [int(g) for g in group_sizes], dtype)  # fmt: skip
    return torch.ops.flocora.unpack_dequantize(
        packed, scales, offsets, int(bits), [int(n) for n in numels], [int(g) for g in group_sizes], dtype
    )


@_register_fake("flocora::unpack_dequantize")
def _unpack_dequantize_fake(packed, scales, offsets, bits, numels, group_sizes, dtype):
    return torch.empty(sum(numels), dtype=dtype, device=packed.device)


def unpack_dequantize_into_(
    outs: Sequence[torch.Tensor],
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_sizes: Sequence[int],
    *,
    accumulate: bool = False,
) -> None:
    """:func:`unpack_dequantize` into caller-owned tensors, in place.

    Tensor ``i`` of the stream (``outs[i].numel()`` elements, read in
    row-major order) is written to ``outs[i]`` in its dtype (float32, float16
    or bfloat16; CPU only), or added to it with ``accumulate=True`` (the
    decoded value rounded to the output dtype, then summed in float32: the
    same as ``out += unpack_dequantize(...)`` in PyTorch). No result is
    allocated; a non-contiguous output goes through a contiguous copy.
    Sizes, dtypes and overlap are checked before any output is touched.
    """
    outs = list(outs)
    if BACKEND == "reference":
        _reference_call("unpack_dequantize_into_", _ref_unpack_dequantize_into_, outs, packed, scales, offsets,
                        int(bits), [int(g) for g in group_sizes], bool(accumulate))  # fmt: skip
        return
    torch.ops.flocora.unpack_dequantize_into_(
        outs, packed, scales, offsets, int(bits), [int(g) for g in group_sizes], bool(accumulate)
    )


@_register_fake("flocora::unpack_dequantize_into_")
def _unpack_dequantize_into_fake(outs, packed, scales, offsets, bits, group_sizes, accumulate):
    return None


def disjoint(tensors: Sequence[torch.Tensor]) -> bool:
    """True if the memory spans of no two ``tensors`` overlap (a strided
    tensor spans from its first element to its last; empty ones span
    nothing): one call, where a Python loop costs a few calls per tensor."""
    tensors = list(tensors)
    if BACKEND == "reference":
        return _spans_disjoint(tensors)
    return bool(torch.ops.flocora._disjoint(tensors))


def plan_layout(tensors: Sequence[torch.Tensor]):
    """The count, dtypes and shapes of ``tensors`` as one comparable object
    (an int64 tensor from one compiled call; a tuple on the reference
    backend), or None if one is not a strided CPU tensor. Encode plans keep
    it and check each message against it with :func:`plan_layout_matches`."""
    tensors = list(tensors)
    if BACKEND == "reference":
        if not all(t.is_cpu and t.layout == torch.strided for t in tensors):
            return None
        return tuple((t.dtype, tuple(t.shape)) for t in tensors)
    layout = torch.ops.flocora._plan_layout(tensors)
    return layout if layout.numel() else None


def plan_layout_matches(tensors: Sequence[torch.Tensor], layout) -> bool:
    """Whether ``tensors`` have the :func:`plan_layout` ``layout``."""
    if BACKEND == "reference":
        return plan_layout(tensors) == layout
    return bool(torch.ops.flocora._plan_layout_matches(list(tensors), layout))


def copy_from_bytes_(outs: Sequence[torch.Tensor], src: torch.Tensor, offsets: Sequence[int]) -> None:
    """``outs[i]``'s bytes become ``src[offsets[i]:][:outs[i].nbytes]``, in
    place (CPU, contiguous ``outs``, uint8 ``src``); every range is checked
    before any write."""
    outs, offsets = list(outs), [int(o) for o in offsets]
    if BACKEND == "reference":
        op = "flocora::_copy_from_bytes_"
        if len(offsets) != len(outs):
            raise RuntimeError(f"{op}: got {len(offsets)} offsets for {len(outs)} outputs")
        for i, (o, a) in enumerate(zip(outs, offsets)):
            if o.device.type != "cpu" or not o.is_contiguous():
                raise RuntimeError(f"{op}: output {i} must be a contiguous CPU tensor")
            if not 0 <= a <= src.numel() or o.nbytes > src.numel() - a:
                raise RuntimeError(f"{op}: output {i} ({o.nbytes} bytes at {a}) reaches past src ({src.numel()} bytes)")
        _check_outs_disjoint("_copy_from_bytes_", outs)
        for o, a in zip(outs, offsets):
            o.view(-1).view(torch.uint8).copy_(src[a : a + o.nbytes]) if o.numel() else None
        return
    torch.ops.flocora._copy_from_bytes_(outs, src, offsets)


@_register_fake("flocora::_copy_from_bytes_")
def _copy_from_bytes_fake(outs, src, offsets):
    return None


def split_views(flat: torch.Tensor, layout: torch.Tensor) -> list[torch.Tensor]:
    """Tensors over ``flat``'s memory (1-D, contiguous), one per entry
    ``(element offset, ndim, *sizes, *strides)`` of the int64 CPU tensor
    ``layout``; each is checked to lie within ``flat``. They share its
    storage, as views do (compiled extension only)."""
    return torch.ops.flocora._split_views(flat, layout)


def crc32c(data, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of a C-contiguous bytes-like object, continuing
    from ``value`` (the CRC of the bytes before it), as ``crc32c.crc32c``
    computes it. The compiled op splits large inputs between the threads."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    if BACKEND != "compiled" or n == 0:
        return _crc32c_package.crc32c(mv, value)
    # A tensor over the same memory, only read. torch.frombuffer warns on
    # read-only buffers such as bytes: it gets a ctypes view of them instead.
    addr = np.frombuffer(mv, dtype=np.uint8).ctypes.data
    return torch.ops.flocora._crc32c(
        torch.frombuffer((ctypes.c_ubyte * n).from_address(addr), dtype=torch.uint8), value
    )


def affine_meta_check(scales: torch.Tensor, offsets: torch.Tensor, bits: int, out_dtype: torch.dtype) -> int:
    """Whether affine metadata (CPU, 1-D, float32 or float16 alike) could come
    from an encoder when decoded to ``out_dtype``: 0, or the number (1-6) of
    the first check of ``codec.affine_meta_violation`` that some group
    breaks. One pass of the compiled op over the groups."""
    if BACKEND != "compiled":
        raise RuntimeError("affine_meta_check needs the compiled extension")
    return int(torch.ops.flocora._affine_meta_check(scales.contiguous(), offsets.contiguous(), int(bits), out_dtype))


def sign_sections(values: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign values of a top-k group (FORMAT.md 3.3): ``values`` holds each
    member's ``counts[i]`` kept values back to back (float32, CPU). Returns
    ``(means, signs)``: float64 ``mean(|v|)`` of each member that keeps any
    (:func:`flocora_codec.reference.magnitude_sum` over the count; STC's
    ``mu`` once rounded to float32), and each member's sign bits (1 for ``v >= 0``) padded
    to a whole byte, back to back."""
    values, counts = values.reshape(-1).contiguous(), [int(c) for c in counts]
    if BACKEND == "reference":
        from flocora_codec import reference as ref

        return ref.sign_sections(values, counts)
    return torch.ops.flocora._sign_sections(values, counts)


TOPK_KIND_PLAIN, TOPK_KIND_SIGN, TOPK_KIND_QUANTIZED = 0, 1, 2


def topk_layout(
    pieces: torch.Tensor,
    members: torch.Tensor,
    counts: torch.Tensor,
    kinds: torch.Tensor,
    field_positions: torch.Tensor,
    num_tensors: int,
    header_len: int,
    fields_src: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The byte layout of a message whose top-k counts are known only now.

    ``pieces`` (int64, rows ``tensor, source, source offset, bytes``, each
    tensor's in section order): the sections of the tensors that are not
    top-k. ``members`` (rows ``tensor, numel, group``) and ``counts``: the
    top-k tensors, each group's in message order. ``kinds`` (rows ``kind,
    itemsize, bits, value group size, first source``): per group, kind
    ``TOPK_KIND_PLAIN`` (itemsize of a value; sources: index codes, values),
    ``TOPK_KIND_SIGN`` (metadata itemsize; mu, index codes, sign bits) or
    ``TOPK_KIND_QUANTIZED`` (metadata itemsize, bits, group size or 0 for
    the whole vector; scales, offsets, index codes, packed codes), each
    source holding the members' pieces back to back. Tensors follow each
    other from ``header_len`` on.

    Returns ``(ranges, fields, end)``: :func:`copy_to_bytes_` ranges for the
    body (empty pieces left out) and, if ``field_positions`` names a header
    offset per member, for the records in ``fields`` (uint8, per member: count
    u64, index code u8, metadata, index and payload bytes u64, little-endian)
    taken from source ``fields_src``; ``end``, where the body ends.
    """
    if BACKEND == "reference":
        from flocora_codec import reference as ref

        return ref.topk_layout(pieces, members, counts, kinds, field_positions, num_tensors, header_len, fields_src)
    ranges, fields, end = torch.ops.flocora._topk_layout(
        pieces, members, counts, kinds, field_positions, int(num_tensors), int(header_len), int(fields_src)
    )
    return ranges, fields, int(end)


def copy_to_bytes_(dst: torch.Tensor, srcs: Sequence[torch.Tensor], ranges: Sequence[int] | torch.Tensor) -> None:
    """Byte ranges of ``srcs`` into ``dst`` (a contiguous uint8 CPU tensor), in
    place: ``ranges`` holds quadruples ``(source, source byte offset, dst byte
    offset, bytes)``, as ints or a 1-D int64 CPU tensor (what an encode plan
    keeps: no conversion per call). Every range is checked before any write;
    dst ranges must not overlap each other, nor any source ``dst``."""
    srcs = list(srcs)
    if not isinstance(ranges, torch.Tensor):
        ranges = torch.tensor([int(r) for r in ranges], dtype=torch.int64)
    if BACKEND == "reference":
        _copy_to_bytes_reference(dst, srcs, ranges)
        return
    torch.ops.flocora._copy_to_bytes_(dst, srcs, ranges)


def _copy_to_bytes_reference(dst, srcs, ranges):
    op = "flocora::_copy_to_bytes_"
    if dst.device.type != "cpu" or dst.dtype != torch.uint8 or not dst.is_contiguous():
        raise RuntimeError(f"{op}: dst must be a contiguous uint8 CPU tensor")
    if isinstance(ranges, torch.Tensor):
        if ranges.device.type != "cpu" or ranges.dtype != torch.int64 or ranges.dim() != 1:
            raise RuntimeError(f"{op}: ranges must be a contiguous 1-D int64 CPU tensor")
        ranges = ranges.tolist()
    if len(ranges) % 4:
        raise RuntimeError(
            f"{op}: ranges must be quadruples (source, offset, dst offset, bytes); got {len(ranges)} numbers"
        )
    for i, t in enumerate(srcs):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise RuntimeError(f"{op}: source {i} must be a contiguous CPU tensor")
        if t.nbytes and not _spans_disjoint([t.view(-1).view(torch.uint8), dst]):
            raise RuntimeError(f"{op}: source {i} overlaps dst")
    quads = [ranges[j : j + 4] for j in range(0, len(ranges), 4)]
    spans = []
    for r, (s, so, d, n) in enumerate(quads):
        if not 0 <= s < len(srcs):
            raise RuntimeError(f"{op}: range {r} names source {s} of {len(srcs)}")
        sn = srcs[s].nbytes
        if n < 0 or so < 0 or so > sn or n > sn - so:
            raise RuntimeError(f"{op}: range {r} ({n} bytes at {so}) reaches past source {s} ({sn} bytes)")
        if d < 0 or d > dst.numel() or n > dst.numel() - d:
            raise RuntimeError(f"{op}: range {r} ({n} bytes at {d}) reaches past dst ({dst.numel()} bytes)")
        if n:
            spans.append((d, d + n))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise RuntimeError(f"{op}: dst ranges overlap at byte {b[0]}")
    for s, so, d, n in quads:
        if n:
            dst[d : d + n].copy_(srcs[s].reshape(-1).view(torch.uint8)[so : so + n])


@_register_fake("flocora::_copy_to_bytes_")
def _copy_to_bytes_fake(dst, srcs, ranges):
    return None


# ---- top-k sparse -----------------------------------------------------------
def topk_encode(
    xs: Sequence[torch.Tensor], ks: Sequence[int], *, global_scope: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select the largest ``|x|`` and code their indices compactly.

    ``global_scope=False``: ``ks[i]`` elements of ``xs[i]``.
    ``global_scope=True``: ``ks == [k]``, the ``k`` largest over all elements of
    all tensors, as one flattened vector. Ties go to the lower index (tensor
    order first, for the global scope).

    Returns ``(counts, values, index_bytes)``: ``counts`` int64, elements kept
    per tensor; ``values`` float32, each tensor's kept values in increasing
    index order, back to back; ``index_bytes`` uint8, each tensor's index code
    (``index_nbytes(numel, count)`` bytes: bitmap or Elias-Fano, whichever is
    smaller) back to back. NaN or Inf input raises ``ValueError``.
    """
    xs, ks = list(xs), [int(k) for k in ks]
    if not xs:  # no tensor to dispatch on, and nothing to select
        if ks != ([0] if global_scope else []):
            raise RuntimeError(f"flocora::topk_encode: no tensors, but ks = {ks}")
        return (
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dtype=torch.float32),
            torch.empty(0, dtype=torch.uint8),
        )
    if BACKEND == "reference":
        return _reference_call("topk_encode", _ref_topk_encode, xs, ks, bool(global_scope))
    return torch.ops.flocora.topk_encode(xs, ks, bool(global_scope))


@_register_fake("flocora::topk_encode")
def _topk_encode_fake(xs, ks, global_scope):
    ctx = torch.library.get_ctx()
    device = xs[0].device
    counts = torch.empty(len(xs), dtype=torch.int64, device=device)
    if global_scope:
        nvalues = ctx.new_dynamic_size()
        nindex = ctx.new_dynamic_size()
    else:
        nvalues = sum(ks)
        nindex = sum(index_nbytes(x.numel(), k) for x, k in zip(xs, ks))
    return (
        counts,
        torch.empty(nvalues, dtype=torch.float32, device=device),
        torch.empty(nindex, dtype=torch.uint8, device=device),
    )


def sparse_decode(
    index_bytes: torch.Tensor,
    values: torch.Tensor,
    numels: Sequence[int],
    counts: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Scatter ``values`` into zeros: one flat tensor of ``sum(numels)``.

    The index codes are validated (strictly increasing, in range, exactly
    ``counts[i]`` entries, zero padding) before anything is written. A
    malformed code raises ``ValueError`` naming the first failing tensor (by
    phase: padding of every tensor, then the counts, then the indices) and
    what is wrong; sizes that do not match ``numels``/``counts``, or a kernel
    failure, raise ``RuntimeError``.
    """
    if BACKEND == "reference":
        return _reference_call("sparse_decode", _ref_sparse_decode, index_bytes, values, [int(n) for n in numels],
                               [int(c) for c in counts], dtype)  # fmt: skip
    return torch.ops.flocora.sparse_decode(
        index_bytes, values, [int(n) for n in numels], [int(c) for c in counts], dtype
    )


@_register_fake("flocora::sparse_decode")
def _sparse_decode_fake(index_bytes, values, numels, counts, dtype):
    return torch.empty(sum(numels), dtype=dtype, device=values.device)


def sparse_decode_add_(
    outs: Sequence[torch.Tensor], index_bytes: torch.Tensor, values: torch.Tensor, counts: Sequence[int]
) -> None:
    """``outs[i].view(-1)[idx_i] += values_i`` in place, for every tensor."""
    if BACKEND == "reference":
        _reference_call("sparse_decode_add_", _ref_sparse_decode_add_, list(outs), index_bytes, values,
                        [int(c) for c in counts])  # fmt: skip
        return
    torch.ops.flocora.sparse_decode_add_(list(outs), index_bytes, values, [int(c) for c in counts])


@_register_fake("flocora::sparse_decode_add_")
def _sparse_decode_add_fake(outs, index_bytes, values, counts):
    return None


def sparse_decode_into_(
    outs: Sequence[torch.Tensor],
    index_bytes: torch.Tensor,
    values: torch.Tensor,
    counts: Sequence[int],
    *,
    accumulate: bool = False,
) -> None:
    """:func:`sparse_decode` into caller-owned CPU tensors, in place.

    ``accumulate=False``: ``outs[i]`` becomes zeros with ``values_i`` at its
    indices; ``accumulate=True``: :func:`sparse_decode_add_`. Every index
    code is validated (as :func:`sparse_decode`: a malformed one raises
    ``ValueError``) before any output is touched.
    """
    outs = list(outs)
    if BACKEND == "reference":
        _reference_call("sparse_decode_into_", _ref_sparse_decode_into_, outs, index_bytes, values,
                        [int(c) for c in counts], bool(accumulate))  # fmt: skip
        return
    torch.ops.flocora.sparse_decode_into_(outs, index_bytes, values, [int(c) for c in counts], bool(accumulate))


@_register_fake("flocora::sparse_decode_into_")
def _sparse_decode_into_fake(outs, index_bytes, values, counts, accumulate):
    return None


# ---- reference backend: the list-taking ops over flocora_codec.reference ----
# The reference works on CPU tensors; results go back to the inputs' device.
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def _ref_quantize_pack(ref, xs, bits, group_sizes, stochastic, seeds, meta_dtype):
    if not 1 <= bits <= MAX_BITS:
        raise RuntimeError(f"flocora::quantize_pack: bits must be in [1, {MAX_BITS}], got {bits}")
    if len(group_sizes) != len(xs) or len(seeds) != len(xs):
        raise RuntimeError("flocora::quantize_pack: one group size and one seed per tensor")
    if meta_dtype not in META_DTYPES:
        raise RuntimeError(f"flocora::quantize_pack: meta_dtype must be float32 or float16, got {meta_dtype}")
    parts = [ref.quantize_pack(_cpu(x), bits, g, stochastic, s, meta_dtype) for x, g, s in zip(xs, group_sizes, seeds)]
    device = xs[0].device
    return tuple(torch.cat([p[j] for p in parts]).to(device) for j in range(3))


def _ref_unpack_dequantize(ref, packed, scales, offsets, bits, numels, group_sizes, dtype):
    if len(group_sizes) != len(numels):
        raise RuntimeError("flocora::unpack_dequantize: one group size per tensor")
    device = packed.device
    nbytes = [packed_nbytes(n, bits) for n in numels]
    ngroups = [num_groups(n, g) for n, g in zip(numels, group_sizes)]
    packed, scales, offsets = _cpu(packed).reshape(-1), _cpu(scales).reshape(-1), _cpu(offsets).reshape(-1)
    if packed.numel() != sum(nbytes) or scales.numel() != sum(ngroups) or offsets.numel() != sum(ngroups):
        raise RuntimeError(
            f"flocora::unpack_dequantize: got {packed.numel()} packed bytes and {scales.numel()}/{offsets.numel()} "
            f"scales/offsets, need {sum(nbytes)} and {sum(ngroups)}"
        )
    outs = [
        ref.unpack_dequantize(p, s, o, bits, n, g, dtype)
        for p, s, o, n, g in zip(torch.split(packed, nbytes), torch.split(scales, ngroups),
                                 torch.split(offsets, ngroups), numels, group_sizes)
    ]  # fmt: skip
    return (torch.cat(outs) if outs else torch.empty(0, dtype=dtype)).to(device)


def _ref_topk_encode(ref, xs, ks, global_scope):
    device = xs[0].device
    out = ref.topk_encode([_cpu(x) for x in xs], ks, global_scope)
    return tuple(t.to(device) for t in out)


def _ref_sparse_decode(ref, index_bytes, values, numels, counts, dtype):
    return ref.sparse_decode(_cpu(index_bytes), _cpu(values), numels, counts, dtype).to(values.device)


def _ref_sparse_decode_add_(ref, outs, index_bytes, values, counts):
    ref.sparse_decode_add_(outs, _cpu(index_bytes), _cpu(values), counts)


def _spans_disjoint(tensors) -> bool:
    spans = []
    for o in tensors:
        if o.numel():
            extent = 1 + sum((n - 1) * st for n, st in zip(o.shape, o.stride()))
            spans.append((o.data_ptr(), o.data_ptr() + extent * o.element_size()))
    spans.sort()
    return not any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def _check_outs_disjoint(op, outs):
    if not _spans_disjoint(outs):
        raise RuntimeError(f"flocora::{op}: output tensors overlap in memory")


_C10_NAMES = {torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
              torch.int64: "Long", torch.float16: "Half", torch.float32: "Float", torch.float64: "Double",
              torch.bfloat16: "BFloat16", torch.bool: "Bool"}  # fmt: skip


def _ref_quantize_pack_into_(ref, xs, bits, group_sizes, stochastic, seeds, packed, scales, offsets):
    op = "flocora::quantize_pack_into_"
    meta = scales.dtype
    if not 1 <= bits <= MAX_BITS or len(group_sizes) != len(xs) or len(seeds) != len(xs) or meta not in META_DTYPES:
        _ref_quantize_pack(ref, xs, bits, group_sizes, stochastic, seeds, meta)  # raises the argument error
    nbytes = sum(packed_nbytes(x.numel(), bits) for x in xs)
    ngroups = sum(num_groups(x.numel(), g) for x, g in zip(xs, group_sizes))
    for name, t, dtype, n in [("packed", packed, torch.uint8, nbytes), ("scales", scales, meta, ngroups),
                              ("offsets", offsets, meta, ngroups)]:  # fmt: skip
        if t.device.type != "cpu":
            raise RuntimeError(f"{op}: {name} is on {t.device}; this op runs on the CPU")
        if t.dtype != dtype:
            raise RuntimeError(f"{op}: {name} must be {_C10_NAMES[dtype]}, got {_C10_NAMES.get(t.dtype, t.dtype)}")
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous")
        if t.numel() != n:
            raise RuntimeError(f"{op}: {name} has {t.numel()} elements, the encoding needs {n}")
    try:
        _check_outs_disjoint("quantize_pack_into_", [packed, scales, offsets])
    except RuntimeError:
        raise RuntimeError(f"{op}: packed, scales and offsets overlap in memory") from None
    for i, x in enumerate(xs):
        for o in (packed, scales, offsets):
            if x.numel() and o.numel():
                try:
                    _check_outs_disjoint("quantize_pack_into_", [x, o])
                except RuntimeError:
                    raise RuntimeError(f"{op}: tensor {i} overlaps an output in memory") from None
    if not xs:
        return
    for dst, src in zip(
        (packed, scales, offsets), _ref_quantize_pack(ref, xs, bits, group_sizes, stochastic, seeds, meta)
    ):
        dst.copy_(src)


def _ref_unpack_dequantize_into_(ref, outs, packed, scales, offsets, bits, group_sizes, accumulate):
    for i, o in enumerate(outs):
        if o.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"flocora::unpack_dequantize_into_: output {i} has dtype {o.dtype}")
    _check_outs_disjoint("unpack_dequantize_into_", outs)
    numels = [o.numel() for o in outs]
    flat = _ref_unpack_dequantize(ref, packed, scales, offsets, bits, numels, group_sizes, torch.float32)
    for o, v in zip(outs, torch.split(flat, numels)):
        v = v.to(device=o.device, dtype=o.dtype).reshape(o.shape)
        o.add_(v) if accumulate else o.copy_(v)


def _ref_sparse_decode_into_(ref, outs, index_bytes, values, counts, accumulate):
    if accumulate:
        _ref_sparse_decode_add_(ref, outs, index_bytes, values, counts)
        return
    _check_outs_disjoint("sparse_decode_into_", outs)
    numels = [o.numel() for o in outs]
    # float64 holds every value exactly: one rounding, to each output's dtype
    dense = _ref_sparse_decode(ref, index_bytes, values, numels, counts, torch.float64)
    for o, v in zip(outs, torch.split(dense, numels)):
        o.copy_(v.reshape(o.shape))
