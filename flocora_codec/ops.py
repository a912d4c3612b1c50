"""Typed wrappers over the ``torch.ops.flocora`` kernels, with fake kernels.

Every op takes a list of tensors and returns flat, concatenated buffers, so a
whole state dict costs one dispatch. Sizes are exact and static where the math
allows it (``packed_nbytes``, ``num_groups``, ``index_nbytes``), which is what
the ``register_fake`` kernels below use under ``torch.compile``.

The kernels live in ``csrc/cpu`` and ``csrc/cuda``; ``flocora_codec.reference``
holds the pure-PyTorch definitions they are tested against.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from flocora_codec import _C  # noqa: F401  (registers the schemas)

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
    low = 0
    while low < 62 and (k << (low + 1)) <= n:
        low += 1
    return low


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
    if choose_index_code(n, k) == INDEX_BITMAP:
        return bitmap_nbytes(n)
    return elias_fano_nbytes(n, k)


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
    return torch.ops.flocora.quantize_pack(
        xs, int(bits), [int(g) for g in group_sizes], bool(stochastic), [int(s) for s in seeds], meta_dtype
    )


@torch.library.register_fake("flocora::quantize_pack")
def _quantize_pack_fake(xs, bits, group_sizes, stochastic, seeds, meta_dtype):
    nbytes = sum(packed_nbytes(x.numel(), bits) for x in xs)
    ngroups = sum(num_groups(x.numel(), g) for x, g in zip(xs, group_sizes))
    device = xs[0].device
    return (
        torch.empty(nbytes, dtype=torch.uint8, device=device),
        torch.empty(ngroups, dtype=meta_dtype, device=device),
        torch.empty(ngroups, dtype=meta_dtype, device=device),
    )


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
    return torch.ops.flocora.unpack_dequantize(
        packed, scales, offsets, int(bits), [int(n) for n in numels], [int(g) for g in group_sizes], dtype
    )


@torch.library.register_fake("flocora::unpack_dequantize")
def _unpack_dequantize_fake(packed, scales, offsets, bits, numels, group_sizes, dtype):
    return torch.empty(sum(numels), dtype=dtype, device=packed.device)


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
    return torch.ops.flocora.topk_encode(xs, ks, bool(global_scope))


@torch.library.register_fake("flocora::topk_encode")
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
    return torch.ops.flocora.sparse_decode(
        index_bytes, values, [int(n) for n in numels], [int(c) for c in counts], dtype
    )


@torch.library.register_fake("flocora::sparse_decode")
def _sparse_decode_fake(index_bytes, values, numels, counts, dtype):
    return torch.empty(sum(numels), dtype=dtype, device=values.device)


def sparse_decode_add_(
    outs: Sequence[torch.Tensor], index_bytes: torch.Tensor, values: torch.Tensor, counts: Sequence[int]
) -> None:
    """``outs[i].view(-1)[idx_i] += values_i`` in place, for every tensor."""
    torch.ops.flocora.sparse_decode_add_(list(outs), index_bytes, values, [int(c) for c in counts])


@torch.library.register_fake("flocora::sparse_decode_add_")
def _sparse_decode_add_fake(outs, index_bytes, values, counts):
    return None
