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
    weights = 1 << torch.arange(8, dtype=torch.int64)
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
    t = lambda v: torch.as_tensor(v, dtype=torch.int64)
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
        raise ValueError("quantize_pack: group range does not fit the metadata dtype")
    if meta_dtype == torch.float16:
        scale = half_round_up(scale).float()
        if not torch.isfinite(scale).all():
            raise ValueError("quantize_pack: group range does not fit the metadata dtype")
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
        raise ValueError("quantize_pack: input has NaN or Inf values")
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


# ---- top-k sparse ---------------------------------------------------------------
# Selection, index codes (bitmap / Elias-Fano, csrc/include/flocora/affine.h)
# and sparse decode. The oracle may sort; it applies the kernels' tie rule:
# equal |x| go to the lower index (the lower tensor first, for a global scope).
from flocora_codec.ops import (  # noqa: E402  beside the section that uses them
    INDEX_BITMAP,
    bitmap_nbytes,
    choose_index_code,
    elias_fano_low_bits,
    index_nbytes,
)


def _magnitude_keys(flat: torch.Tensor) -> torch.Tensor:
    """IEEE bits of |x| as int64: ordered like |x|, equal iff |x| is equal."""
    return flat.to(torch.float32).view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _top_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |x|; ties to the lower index (stable sort)."""
    order = torch.sort(-_magnitude_keys(flat), stable=True).indices[:k]
    return torch.sort(order).values


def topk_select(xs, ks, global_scope: bool = False):
    """Per tensor: the sorted int64 indices of the kept elements, and their
    float32 values (in index order). Tensors are read in row-major order."""
    flats = [x.detach().cpu().reshape(-1).to(torch.float32) for x in xs]
    for f in flats:
        if not torch.isfinite(f).all():
            raise ValueError("topk_encode: input has NaN or Inf values")
    if global_scope:
        if len(ks) != 1:
            raise RuntimeError("topk_encode: global_scope=True takes ks = [k]")
        (k,) = ks
        total = sum(f.numel() for f in flats)
        if not 0 <= k <= total:
            raise RuntimeError(f"topk_encode: k must be in [0, total numel = {total}], got {k}")
        chosen = _top_indices(torch.cat(flats) if flats else torch.empty(0), k)
        idx, off = [], 0
        for f in flats:
            mine = chosen[(chosen >= off) & (chosen < off + f.numel())]
            idx.append(mine - off)
            off += f.numel()
    else:
        if len(ks) != len(flats):
            raise RuntimeError("topk_encode: one k per tensor")
        idx = []
        for f, k in zip(flats, ks):
            if not 0 <= k <= f.numel():
                raise RuntimeError(f"topk_encode: k must be in [0, numel = {f.numel()}], got {k}")
            idx.append(_top_indices(f, k))
    return idx, [f[i] for f, i in zip(flats, idx)]


def _pack_lsb(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """LSB-first stream of `bits`-bit codes, zero-padded to nbytes."""
    codes = codes.reshape(-1).to(torch.int64)
    stream = ((codes[:, None] >> torch.arange(bits, dtype=torch.int64)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    return (stream.reshape(nbytes, 8) << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def _unpack_lsb(data: torch.Tensor) -> torch.Tensor:
    """Bits of a byte stream, LSB-first, as int64 0/1."""
    return ((data.reshape(-1).to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)


def encode_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Index code of k sorted distinct indices in [0, n): the bitmap or
    Elias-Fano, whichever is smaller (the bitmap on a tie)."""
    idx = idx.reshape(-1).to(torch.int64)
    k = idx.numel()
    if choose_index_code(n, k) == INDEX_BITMAP:
        bits = torch.zeros(n, dtype=torch.int64)
        bits[idx] = 1
        return _pack_lsb(bits, 1, bitmap_nbytes(n))
    low_bits = elias_fano_low_bits(n, k)
    low = _pack_lsb(idx & ((1 << low_bits) - 1), low_bits, (k * low_bits + 7) // 8)
    nhigh = ((n - 1) >> low_bits) + k if k else 0
    unary = torch.zeros(nhigh, dtype=torch.int64)
    unary[(idx >> low_bits) + torch.arange(k)] = 1
    return torch.cat([low, _pack_lsb(unary, 1, (nhigh + 7) // 8)])


def decode_indices(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`, validating: RuntimeError on wrong
    sizes, ValueError (as the kernels) unless data is exactly the canonical
    code of k strictly increasing indices < n (padding bits zero)."""
    if not 0 <= k <= n:
        raise RuntimeError(f"sparse_decode: count {k} not in [0, numel = {n}]")
    data = data.reshape(-1)
    if data.numel() != index_nbytes(n, k):
        raise RuntimeError(f"sparse_decode: index code has {data.numel()} bytes, expected {index_nbytes(n, k)}")
    bits = _unpack_lsb(data)
    if choose_index_code(n, k) == INDEX_BITMAP:
        if bits[n:].any():
            raise ValueError("sparse_decode: bitmap padding bits are not zero")
        idx = torch.nonzero(bits[:n]).reshape(-1)
        if idx.numel() != k:
            raise ValueError("sparse_decode: bitmap set bits differ from count")
        return idx
    low_bits = elias_fano_low_bits(n, k)
    low_nbytes = (k * low_bits + 7) // 8
    low_stream = bits[: low_nbytes * 8]
    if low_stream[k * low_bits :].any():
        raise ValueError("sparse_decode: Elias-Fano low padding bits are not zero")
    low = (low_stream[: k * low_bits].reshape(k, low_bits) << torch.arange(low_bits)).sum(1)
    unary = bits[low_nbytes * 8 :]
    nhigh = ((n - 1) >> low_bits) + k if k else 0
    if unary[nhigh:].any():
        raise ValueError("sparse_decode: Elias-Fano high padding bits are not zero")
    pos = torch.nonzero(unary).reshape(-1)
    if pos.numel() != k:
        raise ValueError("sparse_decode: Elias-Fano high part set bits differ from count")
    idx = ((pos - torch.arange(k)) << low_bits) | low
    if (idx >= n).any():
        raise ValueError("sparse_decode: Elias-Fano index >= numel")
    if (idx[1:] <= idx[:-1]).any():
        raise ValueError("sparse_decode: Elias-Fano indices not strictly increasing")
    return idx


def topk_encode(xs, ks, global_scope: bool = False):
    """Reference of ``ops.topk_encode``: (counts, values, index_bytes)."""
    idx, vals = topk_select(xs, ks, global_scope)
    counts = torch.tensor([i.numel() for i in idx], dtype=torch.int64)
    values = torch.cat(vals) if vals else torch.empty(0)
    codes = [encode_indices(i, x.numel()) for i, x in zip(idx, xs)]
    index_bytes = torch.cat(codes) if codes else torch.empty(0, dtype=torch.uint8)
    return counts, values, index_bytes


def _decode_all(index_bytes, values, numels, counts):
    """Validated sorted indices of every tensor, and its values as float32."""
    numels, counts = [int(n) for n in numels], [int(c) for c in counts]
    if len(numels) != len(counts):
        raise RuntimeError("sparse_decode: one count per tensor")
    for n, k in zip(numels, counts):
        if n < 0 or not 0 <= k <= n:
            raise RuntimeError(f"sparse_decode: count {k} not in [0, numel = {n}]")
    sizes = [index_nbytes(n, k) for n, k in zip(numels, counts)]
    index_bytes, values = index_bytes.reshape(-1).cpu(), values.reshape(-1).cpu().float()
    if index_bytes.numel() != sum(sizes):
        raise RuntimeError(f"sparse_decode: index_bytes has {index_bytes.numel()} bytes, need {sum(sizes)}")
    if values.numel() != sum(counts):
        raise RuntimeError(f"sparse_decode: values has {values.numel()} elements, need {sum(counts)}")
    idx = [decode_indices(b, n, k) for b, n, k in zip(torch.split(index_bytes, sizes), numels, counts)]
    return idx, list(torch.split(values, counts))


def sparse_decode(index_bytes, values, numels, counts, dtype=torch.float32):
    """Reference of ``ops.sparse_decode``: one flat tensor of sum(numels)."""
    idx, vals = _decode_all(index_bytes, values, numels, counts)
    outs = []
    for i, v, n in zip(idx, vals, numels):
        out = torch.zeros(int(n), dtype=dtype)
        out[i] = v.to(dtype)
        outs.append(out)
    return torch.cat(outs) if outs else torch.empty(0, dtype=dtype)


def sparse_decode_add_(outs, index_bytes, values, counts):
    """Reference of ``ops.sparse_decode_add_``: the sum is formed in float32
    (float64 for float64 outputs) and rounded once to the output dtype.
    Nothing is modified unless every index code is valid."""
    idx, vals = _decode_all(index_bytes, values, [o.numel() for o in outs], counts)
    for out, i, v in zip(outs, idx, vals):
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        flat = out.detach().cpu().reshape(-1).to(acc)
        flat[i] += v.to(acc)
        out.copy_(flat.to(out.dtype).reshape(out.shape))


def magnitude_sum(v: torch.Tensor) -> float:
    """The float64 sum of ``|v|`` (float32) in the encoders' fixed order: 16
    lanes, lane ``j`` summing the values at positions ``i = j mod 16`` in
    order, then the lanes pairwise (``s0 + s1``, ``s2 + s3``, ...), those
    sums pairwise, down to one."""
    m = v.reshape(-1).to(torch.float32).abs().to(torch.float64)
    m = torch.cat([m, m.new_zeros(-m.numel() % 16)]).reshape(-1, 16)  # + 0.0: changes no sum
    s = [0.0] * 16
    for row in m.tolist():  # Python floats are float64: one rounding per addition, in order
        s = [a + b for a, b in zip(s, row)]
    while len(s) > 1:
        s = [a + b for a, b in zip(s[::2], s[1::2])]
    return s[0]


def sign_sections(values: torch.Tensor, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of ``ops.sign_sections``: per member (``counts[i]``
    values each, back to back) that keeps any, the float64 mean of its
    magnitudes (:func:`magnitude_sum` over the count); per member, its sign
    bits padded to a whole byte, the streams back to back."""
    v = values.reshape(-1).to(torch.float32)
    pieces = [p for p in (torch.split(v, list(counts)) if len(counts) else ()) if p.numel()]
    means = torch.tensor([magnitude_sum(p) / p.numel() for p in pieces], dtype=torch.float64)
    signs = [pack_bits((p >= 0).to(torch.int64), 1) for p in pieces]
    return means, torch.cat(signs) if signs else torch.empty(0, dtype=torch.uint8)


def sign_mean_encode(values: torch.Tensor, meta_dtype: torch.dtype = torch.float32):
    """STC's sign-and-mean code of one tensor's kept values (FORMAT.md 3.3,
    ``values = 5``): ``mu = mean(|v|)`` (:func:`magnitude_sum` over the count,
    rounded to float32, then to ``meta_dtype``) and one bit per value, 1 for
    ``v >= 0`` (including -0.0), 0 for ``v < 0``."""
    v = values.detach().cpu().reshape(-1).to(torch.float32)
    mu = torch.tensor(magnitude_sum(v) / max(1, v.numel()), dtype=torch.float64).to(torch.float32).to(meta_dtype)
    return mu, pack_bits((v >= 0).to(torch.int64), 1)


def sign_mean_decode(mu: torch.Tensor, packed: torch.Tensor, count: int) -> torch.Tensor:
    """``+mu`` where the bit is 1, ``-mu`` where it is 0 (float32)."""
    bits = unpack_bits(packed, 1, count)
    m = mu.to(torch.float32)
    return torch.where(bits == 1, m, -m)


def topk_layout(pieces, members, counts, kinds, field_positions, num_tensors, header_len, fields_src):
    """The reference of ``ops.topk_layout``, in plain Python."""
    from flocora_codec.format import TOPK_FIELDS
    from flocora_codec.ops import TOPK_KIND_PLAIN, TOPK_KIND_SIGN, index_code_and_nbytes

    pieces, members, kinds = pieces.tolist(), members.tolist(), kinds.tolist()
    counts, positions = counts.tolist(), field_positions.tolist()
    sizes = [0] * num_tensors
    member_lens, records = [], []
    for (t, n, g), c in zip(members, counts):
        kind, size, bits, group, _ = kinds[g]
        code, index = index_code_and_nbytes(n, c)
        if kind == TOPK_KIND_PLAIN:
            lens, meta, payload = [index, c * size], 0, c * size
        elif kind == TOPK_KIND_SIGN:
            meta = size if c else 0
            lens, payload = [meta, index, (c + 7) // 8], (c + 7) // 8
        else:
            ngroups = (1 if c else 0) if group == 0 else num_groups(c, group)
            payload = packed_nbytes(c, bits)
            lens, meta = [ngroups * size, ngroups * size, index, payload], 2 * ngroups * size
        member_lens.append(lens)
        records.append(TOPK_FIELDS.pack(c, code, meta, index, payload))
        sizes[t] += sum(lens)
    for t, _, _, n in pieces:
        sizes[t] += n
    at, end = [], header_len
    for size in sizes:
        at.append(end)
        end += size
    ranges = []
    for t, src, off, n in pieces:
        if n:
            ranges += [src, off, at[t], n]
        at[t] += n
    taken = {}
    for (t, _, g), lens in zip(members, member_lens):
        for s, n in enumerate(lens):
            src = kinds[g][4] + s
            if n:
                ranges += [src, taken.get(src, 0), at[t], n]
            taken[src] = taken.get(src, 0) + n
            at[t] += n
    if positions:
        for j, pos in enumerate(positions):
            ranges += [fields_src, TOPK_FIELDS.size * j, pos, TOPK_FIELDS.size]
        fields = torch.frombuffer(bytearray(b"".join(records)), dtype=torch.uint8)
    else:
        fields = torch.empty(0, dtype=torch.uint8)
    return torch.tensor(ranges, dtype=torch.int64), fields, end
