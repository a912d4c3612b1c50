"""Pure-PyTorch reference implementations of every codec op.

These are the oracle for the tests (the kernels must match them byte for
byte) and the eager baseline of the benchmarks. They favour clarity over
speed; every formula mirrors ``csrc/include/flocora/affine.h``.
"""
from __future__ import annotations

import torch

from flocora_codec.ops import num_groups, packed_nbytes

FLT_MIN = torch.finfo(torch.float32).tiny
_U32 = 0xFFFFFFFF


# ---- bit streams --------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bitstream: code i occupies bits i*bits .. i*bits+bits-1."""
    codes = codes.reshape(-1).to(torch.int64)
    n = codes.numel()
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)
    nbytes = packed_nbytes(n, bits)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.reshape(nbytes, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` int64 codes."""
    stream = ((packed.reshape(-1).to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


# ---- float16 metadata rounding --------------------------------------------------
def half_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 <= x (x float32)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, h.new_full((), -float("inf"))), h)


def half_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= x (x float32)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, h.new_full((), float("inf"))), h)


# ---- counter-based generator (lowbias32) ---------------------------------------
def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32  # wraps in int64; the low 32 bits are exact
    return x ^ (x >> 16)


def stochastic_uniform24(seed: int, index: torch.Tensor) -> torch.Tensor:
    """uniform24(stochastic_key(seed, i), i mod 2^32) for int64 indices i."""
    seed &= (1 << 64) - 1
    t = lambda v: torch.as_tensor(v, dtype=torch.int64)  # noqa: E731
    k = mix32(t((seed >> 32) ^ 0x9E3779B9))
    k = mix32(t(seed & _U32) ^ k)
    key = mix32(k ^ (index >> 32) ^ 0x85EBCA6B)
    lo = index & _U32
    return mix32((mix32(lo ^ key) + key) & _U32) >> 8


# ---- affine quantization ---------------------------------------------------------
def affine_params(flat: torch.Tensor, bits: int, group_size: int, meta_dtype: torch.dtype):
    """Per-group (offset, scale, inv_scale) as float32, plus the stored metadata."""
    n = flat.numel()
    ngroups = num_groups(n, group_size)
    pad = ngroups * group_size - n
    lo = torch.cat([flat, flat.new_full((pad,), float("inf"))]).reshape(ngroups, group_size).amin(1)
    hi = torch.cat([flat, flat.new_full((pad,), -float("inf"))]).reshape(ngroups, group_size).amax(1)
    lo, hi = lo + 0.0, hi + 0.0  # -0.0 -> +0.0, as the kernels do
    levels = float(2**bits - 1)
    if meta_dtype == torch.float16:
        offset_meta = half_round_down(lo)
        offset = offset_meta.float()
    else:
        offset = lo
    scale = (hi - offset) / levels
    if not (torch.isfinite(offset).all() and torch.isfinite(scale).all()):
        raise RuntimeError("quantize_pack: group range does not fit the metadata dtype")
    if meta_dtype == torch.float16:
        scale = half_round_up(scale).float()
        if not torch.isfinite(scale).all():
            raise RuntimeError("quantize_pack: group range does not fit the metadata dtype")
    scale = torch.where(scale >= FLT_MIN, scale, torch.zeros_like(scale))
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), scale)
    return offset, scale, inv


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    stochastic: bool = False,
    seed: int = 0,
    meta_dtype: torch.dtype = torch.float32,
):
    """Reference of one tensor's ``ops.quantize_pack``: (packed, scales, offsets)."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        e = torch.empty(0, dtype=meta_dtype)
        return torch.empty(0, dtype=torch.uint8), e, e.clone()
    if not torch.isfinite(flat).all():
        raise RuntimeError("quantize_pack: input has NaN or Inf")
    offset, scale, inv = affine_params(flat, bits, group_size, meta_dtype)
    group = torch.arange(n) // group_size
    levels = float(2**bits - 1)
    v = ((flat - offset[group]) * inv[group]).clamp(0.0, levels)
    if stochastic:
        floor = v.floor()
        u = stochastic_uniform24(seed, torch.arange(n, dtype=torch.int64)).to(torch.float32) * 2.0**-24
        q = (floor + (u < (v - floor)).to(torch.float32)).clamp(max=levels)
    else:
        q = torch.round(v)  # ties to even
    return pack_bits(q.to(torch.int64), bits), scale.to(meta_dtype), offset.to(meta_dtype)


def unpack_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    numel: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of one tensor's ``ops.unpack_dequantize``: flat ``dtype``."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    q = unpack_bits(packed, bits, numel).to(torch.float32)
    group = torch.arange(numel) // group_size
    return (offsets.float()[group] + q * scales.float()[group]).to(dtype)
