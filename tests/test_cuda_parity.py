"""CUDA kernels against the CPU kernels: the same bytes, for every op.

Every test needs a CUDA device and skips without one. The CPU kernels are
tested against the pure-PyTorch reference elsewhere (test_quant.py,
test_topk.py); here the CUDA output must equal the CPU output exactly:
packed bytes, metadata bits (signed zeros included), counts, values and
index-code bytes; and the same error, type and text, for the same bad input.
"""

import itertools
import re

import pytest
import torch

from flocora_codec import ops
from tests.stochastic_kat import KNOWN_U24, probe_inputs, u24
from tests.test_topk import _ef_1000_10, error_order_cases

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}

# Shapes: empty, tiny, odd, around the fused tile (8192 elements) and the
# range chunk (16384), more than one block, several rows.
SHAPES = [(0,), (1,), (7,), (8,), (9,), (33,), (1000,), (4097,), (8191,), (8193,), (3, 333), (64, 4099),
          (257, 129), (70001,), (2, 40000)]  # fmt: skip


def _groups(shape, granularity):
    numel = 1
    for s in shape:
        numel *= s
    if granularity == "tensor":
        return max(numel, 1)
    if granularity == "row":
        return max(shape[-1], 1)
    return int(granularity)


def _data(shape, dtype, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(shape, generator=g) * 3
    elif kind == "ties":  # few distinct magnitudes: ties at the top-k threshold
        x = torch.randint(-4, 5, shape, generator=g).float()
    elif kind == "sparse":  # many (signed) zeros
        x = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.2)
    elif kind == "constant":
        x = torch.full(shape, 1.25)
    elif kind == "wide":  # magnitudes over many binades (within float16's range)
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape, generator=g).float())
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _bits_of(t):
    t = t.detach().cpu().contiguous()
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _same_bits(a, b):
    """Equal dtype, shape and bit patterns."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(_bits_of(a), _bits_of(b))


def _raises_same(fn_cpu, fn_cuda, exc, match):
    """Both backends raise ``exc`` with a first line matching ``match`` (a
    regex per backend where the texts differ: {"cpu": ..., "cuda": ...})."""
    for device, fn in (("cpu", fn_cpu), ("cuda", fn_cuda)):
        pattern = match[device] if isinstance(match, dict) else match
        with pytest.raises(exc) as info:
            fn()
        assert info.type is exc, (device, info.type)  # not a subclass, e.g. OutOfMemoryError
        assert re.fullmatch(pattern, str(info.value).splitlines()[0]), (device, str(info.value))


def _quant_both(xs_cpu, bits, groups, stochastic=False, seeds=None, meta=torch.float32):
    seeds = seeds if seeds is not None else [0] * len(xs_cpu)
    cpu = ops.quantize_pack(xs_cpu, bits, groups, stochastic=stochastic, seeds=seeds, meta_dtype=meta)
    cuda = ops.quantize_pack(
        [x.cuda() for x in xs_cpu], bits, groups, stochastic=stochastic, seeds=seeds, meta_dtype=meta
    )
    assert all(t.is_cuda for t in cuda)
    _same_bits(cuda[0], cpu[0])
    _same_bits(cuda[1], cpu[1])  # both backends store +0.0 for a zero minimum
    _same_bits(cuda[2], cpu[2])
    return cpu, cuda


def _dequant_both(q, numels, groups, bits, dtype):
    cpu = ops.unpack_dequantize(*q, bits, numels, groups, dtype)
    cuda = ops.unpack_dequantize(*[t.cuda() for t in q], bits, numels, groups, dtype)
    _same_bits(cuda, cpu)
    return cpu


# ---- quantize_pack / unpack_dequantize ---------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "row", "8", "64", "4096"])
def test_quantize_nearest_matches_cpu(bits, shape, granularity):
    x = _data(shape, torch.float32, seed=bits * 7919 + len(shape))
    g = _groups(shape, granularity)
    cpu, _ = _quant_both([x], bits, [g])
    _dequant_both(cpu, [x.numel()], [g], bits, torch.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize(
    "group", [1, 3, 5, 8, 13, 16, 24, 32, 64, 100, 128, 256, 512, 1000, 4095, 5000, 8192, 9000, 16385, 100003]
)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_group_sizes_match_cpu(bits, group, stochastic):
    # Odd group sizes put group boundaries inside bytes and across tiles;
    # 8 * 2^k up to 256 take the lanes kernel (one warp segment per group),
    # > 8192 the range / finalize / pack path.
    x = _data((123457,), torch.float32, seed=group + bits)
    cpu, _ = _quant_both([x], bits, [group], stochastic, [group * 31 + 7])
    _dequant_both(cpu, [x.numel()], [group], bits, torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("meta", [torch.float32, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("kind", ["randn", "sparse", "constant", "wide"])
def test_quantize_dtypes_meta_kinds_match_cpu(dtype, meta, stochastic, bits, kind):
    shapes = [(1000,), (27, 5), (64, 300), (100000,)]
    xs = [_data(s, dtype, seed=i + bits, kind=kind) for i, s in enumerate(shapes)]
    groups = [64, 5, 300, 100000]
    seeds = [1, 2**40 + 3, 2**63 - 1, 12345]
    cpu, _ = _quant_both(xs, bits, groups, stochastic, seeds, meta)
    for out_dtype in FLOAT_DTYPES:
        _dequant_both(cpu, [x.numel() for x in xs], groups, bits, out_dtype)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**62 + 11])
def test_quantize_stochastic_seeds_match_cpu(seed):
    x = _data((3, 7777), torch.float32, seed=5)
    for bits in (1, 3, 8):
        _quant_both([x], bits, [7777], True, [seed])
        _quant_both([x], bits, [64], True, [seed])


def test_quantize_multi_tensor_matches_cpu_and_single_calls():
    # More tensors than one descriptor pack (128: two launches), mixed paths and dtypes.
    shapes = [(s % 17 + 1, (s * 37) % 301 + 1) for s in range(197)] + [(0,), (50000,), (3, 20000)]
    xs = [_data(s, FLOAT_DTYPES[i % 3], seed=i) for i, s in enumerate(shapes)]
    groups = [[64, 8, 1000, 5][i % 4] for i in range(len(xs))]
    groups[-1] = xs[-1].numel()
    groups[-2] = 50000
    seeds = list(range(len(xs)))
    for bits in (2, 5):
        cpu, cuda = _quant_both(xs, bits, groups, True, seeds)
        # One call == the concatenation of single-tensor calls.
        singles = [
            ops.quantize_pack([x.cuda()], bits, [g], stochastic=True, seeds=[s]) for x, g, s in zip(xs, groups, seeds)
        ]
        for j in range(3):
            _same_bits(cuda[j], torch.cat([s[j] for s in singles]))
        _dequant_both(cpu, [x.numel() for x in xs], groups, bits, torch.float32)


VIEWS = [lambda b: b.t(), lambda b: b[::2, 1::3], lambda b: b[:, 5], lambda b: b.t()[10:200]]


@pytest.mark.parametrize("bits", [1, 4, 7])
@pytest.mark.parametrize("view", range(len(VIEWS)))
def test_quantize_non_contiguous_matches_cpu(bits, view):
    base = _data((300, 301), torch.float32, seed=3)
    v_cpu, v_cuda = VIEWS[view](base), VIEWS[view](base.cuda())  # the kernel sees the strided view
    assert not v_cpu.is_contiguous() and not v_cuda.is_contiguous()
    for g in (64, v_cpu.numel()):
        cpu = ops.quantize_pack([v_cpu], bits, [g])
        cuda = ops.quantize_pack([v_cuda], bits, [g])
        for a, b in zip(cuda, cpu):
            _same_bits(a, b)


def test_quantize_misaligned_storage_offset_matches_cpu():
    # Views starting at odd elements: no 16-byte loads, same bytes.
    base = _data((100003,), torch.float32, seed=9)
    for off in (1, 2, 3, 5):
        x = base[off:]
        for g in (8, 64, 50000):
            _quant_both([x], 3, [g])
    base16 = base.half()
    _quant_both([base16[3:]], 5, [64])


def test_unpack_misaligned_inputs_match_cpu():
    x = _data((5000,), torch.float32, seed=1)
    q = ops.quantize_pack([x], 3, [64])
    # Slices of a larger buffer: packed bytes start at an odd address.
    big = torch.cat([torch.zeros(3, dtype=torch.uint8), q[0]])
    cpu = ops.unpack_dequantize(big[3:], q[1], q[2], 3, [5000], [64])
    cuda = ops.unpack_dequantize(big.cuda()[3:], q[1].cuda(), q[2].cuda(), 3, [5000], [64])
    _same_bits(cuda, cpu)


def test_quantize_cuda_graph_capture():
    xs = [torch.randn(1000, device="cuda"), torch.randn(64, 4099, device="cuda"), torch.randn(33, device="cuda")]
    groups = [64, xs[1].numel(), 8]  # fused tiles and the big-group passes
    args = dict(stochastic=True, seeds=[1, 2, 3], meta_dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        ops.quantize_pack(xs, 4, groups, **args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.quantize_pack(xs, 4, groups, **args)
    for trial in range(3):
        for x in xs:
            x.copy_(torch.randn_like(x) * (trial + 1))
        graph.replay()
        torch.cuda.synchronize()
        eager = ops.quantize_pack(xs, 4, groups, **args)
        cpu = ops.quantize_pack([x.cpu() for x in xs], 4, groups, **args)
        for c, e, p in zip(captured, eager, cpu):
            _same_bits(c, e)
            _same_bits(c, p)


def test_quantize_round_trip_on_cuda():
    x = torch.randn(10000, device="cuda")
    for bits in range(1, 9):
        p, s, o = ops.quantize_pack([x], bits, [128])
        y = ops.unpack_dequantize(p, s, o, bits, [x.numel()], [128])
        assert y.is_cuda
        step = s.float().repeat_interleave(128)[: x.numel()]
        assert torch.all((y - x).abs() <= step / 2 + 1e-6 * x.abs().max())


_Q = "flocora::quantize_pack: "
QUANTIZE_ERRORS = [
    (
        lambda d: ([torch.tensor([1.0, float("nan")], device=d)], 4, [2], torch.float32),
        ValueError,
        _Q + "input has NaN or Inf values",
    ),
    (
        lambda d: ([torch.tensor([1.0, float("inf")], device=d)], 4, [2], torch.float32),
        ValueError,
        _Q + "input has NaN or Inf values",
    ),
    (
        lambda d: (
            [torch.randn(20000, device=d).index_fill_(0, torch.tensor([19999], device=d), float("-inf"))],
            4,
            [20000],
            torch.float32,
        ),
        ValueError,
        _Q + "input has NaN or Inf values",
    ),
    # The lanes kernel (groups of 8 * 2^k): a NaN mid-tensor, a range too wide for float16.
    (
        lambda d: (
            [torch.randn(1000, device=d).index_fill_(0, torch.tensor([777], device=d), float("nan"))],
            4,
            [64],
            torch.float32,
        ),
        ValueError,
        _Q + "input has NaN or Inf values",
    ),
    (
        lambda d: ([torch.tensor([0.0] * 15 + [1e6] + [0.5] * 16, device=d)], 4, [16], torch.float16),
        ValueError,
        _Q + r"a group's range does not fit the metadata dtype Half \(float16 holds \|values\| up to 65504\)",
    ),
    # scale 1e6 / 15 is beyond float16's 65504 ([0, 1e5] would fit: scale ~6667)
    (
        lambda d: ([torch.tensor([0.0, 1e6], device=d)], 4, [2], torch.float16),
        ValueError,
        _Q + r"a group's range does not fit the metadata dtype Half \(float16 holds \|values\| up to 65504\)",
    ),
    (lambda d: ([torch.ones(4, device=d)], 0, [2], torch.float32), RuntimeError, _Q + r"bits must be in 1\.\.8, got 0"),
    (lambda d: ([torch.ones(4, device=d)], 9, [2], torch.float32), RuntimeError, _Q + r"bits must be in 1\.\.8, got 9"),
    (
        lambda d: ([torch.ones(4, device=d)], 4, [0], torch.float32),
        RuntimeError,
        _Q + "group size of tensor 0 must be >= 1, got 0",
    ),
    (
        lambda d: ([torch.ones(4, device=d)], 4, [2, 2], torch.float32),
        RuntimeError,
        _Q + "got 2 group sizes for 1 tensors",
    ),
    (
        lambda d: ([torch.ones(4, device=d)], 4, [2], torch.bfloat16),
        RuntimeError,
        _Q + "meta_dtype must be float32 or float16, got BFloat16",
    ),
    # One message on both backends (csrc/include/flocora/host_checks.h).
    (
        lambda d: ([torch.ones(4, device=d, dtype=torch.int32)], 4, [2], torch.float32),
        RuntimeError,
        _Q + r"unsupported dtype Int \(expected float32, float16 or bfloat16\)",
    ),
]


@pytest.mark.parametrize("case", range(len(QUANTIZE_ERRORS)))
def test_quantize_errors_match_cpu(case):
    make, exc, match = QUANTIZE_ERRORS[case]

    def call(device):
        xs, bits, groups, meta = make(device)
        return lambda: ops.quantize_pack(xs, bits, groups, meta_dtype=meta)

    _raises_same(call("cpu"), call("cuda"), exc, match)


def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="CPU|cpu"):
        ops.quantize_pack([torch.ones(4, device="cuda"), torch.ones(4)], 4, [2, 2])
    q = ops.quantize_pack([torch.ones(4, device="cuda")], 4, [2])
    with pytest.raises(RuntimeError, match="CPU|cpu"):
        ops.unpack_dequantize(q[0], q[1].cpu(), q[2], 4, [4], [2])
    with pytest.raises(RuntimeError, match="CPU|cpu"):
        ops.topk_encode([torch.ones(4, device="cuda"), torch.ones(4)], [1, 1])
    with pytest.raises(RuntimeError, match="CPU|cpu"):
        ops.sparse_decode(torch.zeros(1, dtype=torch.uint8), torch.ones(1, device="cuda"), [4], [1])


def test_unpack_size_errors_match_cpu():
    q = ops.quantize_pack([torch.randn(100)], 3, [10])
    u = "flocora::unpack_dequantize: "
    cases = [
        ((q[0][:-1], q[1], q[2], 3, [100], [10]), u + "packed has 37 bytes, the sizes need 38"),
        ((q[0], q[1][:-1], q[2], 3, [100], [10]), u + "expected 10 scales and offsets, got 9 and 10"),
        (
            (q[0], q[1], q[2].half(), 3, [100], [10]),
            u + "scales and offsets must both be float32 or both float16, got Float and Half",
        ),
        ((q[0], q[1], q[2], 4, [100], [10]), u + "packed has 38 bytes, the sizes need 50"),
        ((q[0], q[1], q[2], 3, [100, 0], [10]), u + "got 2 numels and 1 group sizes"),
    ]
    for args, match in cases:
        moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        _raises_same(lambda: ops.unpack_dequantize(*args), lambda: ops.unpack_dequantize(*moved), RuntimeError, match)


@pytest.mark.slow
def test_quantize_past_2_31_elements_matches_cpu():
    # int64 indexing: codes and bytes past element 2^31 (float16 input, 4 GiB).
    n = 2**31 + 1001
    x = torch.randn(n // 1000 + 1, dtype=torch.float16).repeat(1000)[:n]
    for bits, g in ((3, 64), (8, n)):
        cpu, cuda = _quant_both([x], bits, [g], True, [7])
        del cuda
        y = ops.unpack_dequantize(*[t.cuda() for t in cpu], bits, [n], [g], torch.float16)
        _same_bits(y[-5000:], ops.unpack_dequantize(*cpu, bits, [n], [g], torch.float16)[-5000:])


@pytest.mark.slow
@pytest.mark.parametrize("group", [64, "tensor"])  # the lanes kernel and the range / pack passes
def test_quantize_stochastic_draws_known_values_past_2_32(group):
    # The generator's key changes every 2^32 elements: the draws in windows
    # across 2^32 and 2^33 equal the generator's definition and its known
    # answers (tests/stochastic_kat.py; the CPU kernel is checked there through
    # a test hook). float32 zeros, 2^33 + 64 elements (32 GiB), bits = 1.
    n, seed = 2**33 + 64, 7
    g = 64 if group == 64 else n
    windows = [2**32 - 24, 2**33 - 24]  # 48 elements each, starting on a byte
    want = {first: [u24(seed, first + j) for j in range(48)] for first in windows}
    for (s, i), u in KNOWN_U24.items():
        for first in windows:
            if s == seed and first <= i < first + 48:
                assert want[first][i - first] == u
    x = torch.zeros(n, device="cuda")
    for k in range(2):  # probe_inputs: code 0 iff u24 >= U, then code 1 iff u24 <= U
        for first in windows:
            probe, code = probe_inputs(want[first])[k]
            x[first : first + 48] = probe.cuda()
            # Offset 0, scale 1 in every group of the window: the probe's 0 and
            # 1 sit at its ends, zeros follow it, and a 1 precedes it (the first
            # 64-group of the window would otherwise have max < 1).
            x[first - 1] = 1.0
        packed, scales, offsets = ops.quantize_pack([x], 1, [g], stochastic=True, seeds=[seed])
        for first in windows:
            byte = packed[first // 8 : first // 8 + 6].cpu().long()
            got = ((byte.unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
            assert got[1:-1].tolist() == [code] * 46, (first, k)
        del packed, scales, offsets


# ---- top-k --------------------------------------------------------------------------
def _topk_oracle(xs, ks, global_scope):
    """Indices kept per tensor: the k largest |x|, ties to the lower position,
    by a stable sort of the magnitude keys (an independent definition)."""
    flat = [x.reshape(-1).float().cpu() for x in xs]
    keys = [(f.view(torch.int32) & 0x7FFFFFFF).long() for f in flat]
    if global_scope:
        allk = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
        order = torch.sort(-allk, stable=True).indices[: ks[0]]
        owner = torch.repeat_interleave(torch.arange(len(xs)), torch.tensor([k.numel() for k in keys]))
        starts = torch.tensor([0] + [k.numel() for k in keys]).cumsum(0)
        return [torch.sort(order[owner[order] == i] - starts[i]).values for i in range(len(xs))]
    return [torch.sort(torch.sort(-k, stable=True).indices[:kk]).values for k, kk in zip(keys, ks)]


def _topk_both(xs_cpu, ks, global_scope):
    cpu = ops.topk_encode(xs_cpu, ks, global_scope=global_scope)
    cuda = ops.topk_encode([x.cuda() for x in xs_cpu], ks, global_scope=global_scope)
    for a, b in zip(cuda, cpu):
        assert a.is_cuda
        _same_bits(a, b)
    # Independent check of the selection itself.
    want = _topk_oracle(xs_cpu, ks, global_scope)
    counts = cpu[0].tolist()
    assert counts == [w.numel() for w in want]
    dense = ops.sparse_decode(cuda[2], cuda[1], [x.numel() for x in xs_cpu], counts)
    parts = torch.split(dense.cpu(), [x.numel() for x in xs_cpu])
    for x, part, w in zip(xs_cpu, parts, want):
        expect = torch.zeros(x.numel())
        expect[w] = x.reshape(-1).float()[w]
        _same_bits(part, expect)
    return cpu, cuda


DENSITIES = [0.0, 0.001, 0.01, 0.1, 0.37, 1.0]


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["randn", "ties", "sparse", "wide"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_local_matches_cpu(density, kind, dtype):
    shapes = [(1,), (7,), (4096,), (4097,), (3, 1000), (70001,), (0,)]
    xs = [_data(s, dtype, seed=i, kind=kind) for i, s in enumerate(shapes)]
    ks = [int(density * x.numel()) for x in xs]
    _topk_both(xs, ks, global_scope=False)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["randn", "ties", "sparse"])
def test_topk_global_matches_cpu(density, kind):
    shapes = [(100,), (0,), (3, 4099), (20000,), (5,)]
    xs = [_data(s, torch.float32, seed=10 + i, kind=kind) for i, s in enumerate(shapes)]
    k = int(density * sum(x.numel() for x in xs))
    _topk_both(xs, [k], global_scope=True)


@pytest.mark.parametrize("n,k", [(1, 1), (8, 1), (9, 8), (64, 4), (1000, 1), (1000, 999), (2**20 + 3, 3),
                                 (2**20, 2**10), (12345, 6000), (100000, 100000)])  # fmt: skip
def test_topk_index_code_edges_match_cpu(n, k):
    # Both codes, l from 0 to 20, bitmap/Elias-Fano size ties.
    x = _data((n,), torch.float32, seed=n ^ k)
    _topk_both([x], [k], global_scope=False)


def test_topk_many_tensors_and_non_contiguous_match_cpu():
    # More tensors than one descriptor pack (128).
    base = _data((200, 300), torch.float32, seed=4, kind="ties")
    xs = [base.t(), base[::3, 1::2]] + [_data((i * 13 % 97 + 1,), torch.float16, seed=i) for i in range(150)]
    ks = [max(0, x.numel() // 7) for x in xs]
    _topk_both(xs, ks, global_scope=False)
    _topk_both(xs, [sum(ks)], global_scope=True)


def test_topk_all_ties_take_lowest_indices():
    xs = [torch.full((5000,), -2.0), torch.full((3000,), 2.0)]
    cpu, cuda = _topk_both(xs, [6000], global_scope=True)
    assert cuda[0].tolist() == [5000, 1000]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_topk_non_finite_raises_on_both(bad):
    x = torch.randn(10000)
    x[7777] = bad
    _raises_same(
        lambda: ops.topk_encode([x], [10]),
        lambda: ops.topk_encode([x.cuda()], [10]),
        ValueError,
        "flocora::topk_encode: input has NaN or Inf values",
    )


_T = "flocora::topk_encode: "


@pytest.mark.parametrize(
    "args",
    [
        ([5, 5], True, 2, _T + r"global_scope=True takes ks = \[k\] \(one k over all tensors\), got 2 values"),
        ([5, 5], False, 1, _T + "got 2 values of k for 1 tensors"),
        ([11], False, 1, _T + r"k of tensor 0 must be in \[0, numel = 10\], got 11"),
        ([-1], False, 1, _T + r"k of tensor 0 must be in \[0, numel = 10\], got -1"),
        ([21], True, 2, _T + r"k must be in \[0, total numel = 20\], got 21"),
    ],
)
def test_topk_argument_errors_match_cpu(args):
    ks, global_scope, ntensors, match = args
    xs = [torch.randn(10) for _ in range(ntensors)]
    _raises_same(
        lambda: ops.topk_encode(xs, ks, global_scope=global_scope),
        lambda: ops.topk_encode([x.cuda() for x in xs], ks, global_scope=global_scope),
        RuntimeError,
        match,
    )


def test_topk_dtype_error_matches_cpu():
    xs = [torch.randn(10), torch.arange(10, dtype=torch.int32)]
    _raises_same(
        lambda: ops.topk_encode(xs, [1, 1]),
        lambda: ops.topk_encode([x.cuda() for x in xs], [1, 1]),
        RuntimeError,
        _T + r"tensor 1 has dtype Int \(expected float32, float16 or bfloat16\)",
    )


# ---- sparse decode --------------------------------------------------------------------
def _encoded(density=0.05, seed=0):
    xs = [_data(s, torch.float32, seed=seed + i) for i, s in enumerate([(1000,), (70001,), (13,), (4096,)])]
    ks = [max(1, int(density * x.numel())) for x in xs]
    counts, values, index = ops.topk_encode(xs, ks)
    return xs, counts.tolist(), values, index


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 1.0])
def test_sparse_decode_matches_cpu(dtype, density):
    xs, counts, values, index = _encoded(density)
    numels = [x.numel() for x in xs]
    cpu = ops.sparse_decode(index, values, numels, counts, dtype)
    cuda = ops.sparse_decode(index.cuda(), values.cuda(), numels, counts, dtype)
    _same_bits(cuda, cpu)
    for vdt in (torch.float16, torch.bfloat16):
        _same_bits(
            ops.sparse_decode(index.cuda(), values.to(vdt).cuda(), numels, counts, dtype),
            ops.sparse_decode(index, values.to(vdt), numels, counts, dtype),
        )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_sparse_decode_add_matches_cpu(dtype):
    xs, counts, values, index = _encoded(0.1, seed=3)
    outs_cpu = [torch.randn(x.shape).to(dtype) for x in xs]
    outs_cpu[1] = torch.randn(2, 70001).to(dtype)[1]  # a view with an offset
    wide = torch.randn(13, 3).to(dtype)
    outs_cpu[2] = wide[:, 1]  # non-contiguous
    outs_cuda = [o.clone().cuda() for o in outs_cpu]
    wide_cuda = wide.clone().cuda()
    outs_cuda[2] = wide_cuda[:, 1]
    ops.sparse_decode_add_(outs_cpu, index, values, counts)
    ops.sparse_decode_add_(outs_cuda, index.cuda(), values.cuda(), counts)
    for a, b in zip(outs_cuda, outs_cpu):
        _same_bits(a, b)
    _same_bits(wide_cuda, wide)  # only column 1 changed, on both


def _corruptions(index, counts, numels):
    """Index codes with single bit flips everywhere (every byte for short codes)."""
    g = torch.Generator().manual_seed(0)
    n = index.numel()
    positions = range(n) if n <= 300 else torch.randint(0, n, (300,), generator=g).tolist()
    for pos in positions:
        for bit in (0, 3, 7):
            bad = index.clone()
            bad[pos] ^= 1 << bit
            yield bad


def _first_line(exc):
    return str(exc).splitlines()[0]


@pytest.mark.parametrize("density", [0.002, 0.3])
def test_sparse_decode_corrupt_codes_agree_with_cpu(density):
    # Untrusted input: for every corruption both backends raise the same error
    # (type and text: tensor, code and kind), or both decode to the same
    # bytes, with sparse_decode and sparse_decode_add_; a failed decode_add_
    # leaves the outputs untouched.
    xs, counts, values, index = _encoded(density, seed=11)
    numels = [x.numel() for x in xs]
    decoded = 0
    for bad in _corruptions(index, counts, numels):
        try:
            cpu, cpu_err = ops.sparse_decode(bad, values, numels, counts), None
        except ValueError as exc:
            cpu, cpu_err = None, exc
        outs = [torch.full((n,), 0.5, device="cuda") for n in numels]
        if cpu is None:
            with pytest.raises(ValueError) as info:
                ops.sparse_decode(bad.cuda(), values.cuda(), numels, counts)
            assert _first_line(info.value) == _first_line(cpu_err)
            with pytest.raises(ValueError) as info:
                ops.sparse_decode_add_(outs, bad.cuda(), values.cuda(), counts)
            assert _first_line(info.value) == _first_line(cpu_err).replace("sparse_decode:", "sparse_decode_add_:")
            assert all(bool((o == 0.5).all()) for o in outs)
        else:
            decoded += 1
            _same_bits(ops.sparse_decode(bad.cuda(), values.cuda(), numels, counts), cpu)
            outs_cpu = [torch.full((n,), 0.5) for n in numels]
            ops.sparse_decode_add_(outs_cpu, bad, values, counts)
            ops.sparse_decode_add_(outs, bad.cuda(), values.cuda(), counts)
            for a, b in zip(outs, outs_cpu):
                _same_bits(a, b)
    if any(ops.choose_index_code(n, c) == ops.INDEX_ELIAS_FANO for n, c in zip(numels, counts)):
        assert decoded > 0  # Elias-Fano low-bit flips that keep the order decode (to other indices)


_SD = "flocora::sparse_decode: "


def test_sparse_decode_specific_violations_raise():
    index, values = _ef_1000_10()
    # Wrong count with the right sizes: the lowest high bit cleared, 9 indices left.
    bad = index.clone()
    high = int(bad[8]) | int(bad[9]) << 8 | int(bad[10]) << 16 | int(bad[11]) << 24
    high &= high - 1
    bad[8:12] = torch.tensor([(high >> (8 * j)) & 0xFF for j in range(4)], dtype=torch.uint8)
    _raises_same(
        lambda: ops.sparse_decode(bad, values, [1000], [10]),
        lambda: ops.sparse_decode(bad.cuda(), values.cuda(), [1000], [10]),
        ValueError,
        _SD + r"index code of tensor 0 \(Elias-Fano, numel 1000, count 10\) is malformed: "
        "the number of set bits differs from count",
    )
    # Padding bits of the last (high-part) byte: bits 25..31.
    bad = index.clone()
    bad[-1] |= 0x80
    _raises_same(
        lambda: ops.sparse_decode(bad, values, [1000], [10]),
        lambda: ops.sparse_decode(bad.cuda(), values.cuda(), [1000], [10]),
        ValueError,
        _SD + r"index code of tensor 0 \(Elias-Fano, numel 1000, count 10\) is malformed: "
        "padding bits past the end of the bit stream are not zero",
    )
    # Bitmap padding: n = 9 with 8 kept is a 2-byte bitmap, bits 9..15 must be 0.
    counts, values, index = ops.topk_encode([torch.randn(9)], [8])
    assert index.numel() == 2
    bad = index.clone()
    bad[1] |= 0x02
    _raises_same(
        lambda: ops.sparse_decode(bad, values, [9], [8]),
        lambda: ops.sparse_decode(bad.cuda(), values.cuda(), [9], [8]),
        ValueError,
        _SD + r"index code of tensor 0 \(bitmap, numel 9, count 8\) is malformed: "
        "padding bits past the end of the bit stream are not zero",
    )


def test_sparse_decode_error_order_and_tensor_match_cpu():
    # Several bad tensors in one call: the CPU checks padding (every tensor),
    # then counts, then the decoded indices, and names the lowest failing
    # tensor of that phase with its own kind. CUDA must name the same pair.
    values, cases = error_order_cases()
    for codes, tensor, text in cases:
        ib = torch.cat(codes)
        vals = values.repeat(len(codes))
        numels, counts = [1000] * len(codes), [10] * len(codes)
        match = (
            _SD
            + f"index code of tensor {tensor} "
            + r"\(Elias-Fano, numel 1000, count 10\) is malformed: "
            + re.escape(text)
        )
        _raises_same(
            lambda: ops.sparse_decode(ib, vals, numels, counts),
            lambda: ops.sparse_decode(ib.cuda(), vals.cuda(), numels, counts),
            ValueError,
            match,
        )


def test_sparse_size_errors_match_cpu():
    xs, counts, values, index = _encoded(0.05)
    numels = [x.numel() for x in xs]
    nb, nv = index.numel(), values.numel()
    cases = [
        ((index[:-1], values, numels, counts), f"index_bytes has {nb - 1} bytes, numels and counts need {nb}"),
        ((index, values[:-1], numels, counts), f"values has {nv - 1} elements, counts need {nv}"),
        ((index, values, numels[:-1], counts), "got 3 numels and 4 counts"),
        # one more count for tensor 2 (13 elements): the same index size, one value short
        (
            (index, values, numels, [c + 1 if i == 2 else c for i, c in enumerate(counts)]),
            f"values has {nv} elements, counts need {nv + 1}",
        ),
        (
            (index, values, numels, [numels[0] + 1] + counts[1:]),
            re.escape(f"count of tensor 0 must be in [0, numel = {numels[0]}], got {numels[0] + 1}"),
        ),
        ((index.int(), values, numels, counts), "index_bytes must be uint8, got Int"),
        ((index, values.long(), numels, counts), "values must be float32, float16 or bfloat16, got Long"),
    ]
    assert ops.index_nbytes(13, counts[2]) == ops.index_nbytes(13, counts[2] + 1)
    for (ib, v, n, c), match in cases:
        _raises_same(
            lambda: ops.sparse_decode(ib, v, n, c),
            lambda: ops.sparse_decode(ib.cuda(), v.cuda(), n, c),
            RuntimeError,
            _SD + match,
        )


def test_sparse_decode_many_tensors_match_cpu():
    # More tensors than one descriptor pack (128): three packs; then a bad
    # code in tensor 200 (the second pack) is named as tensor 200.
    xs = [_data((i * 37 % 501 + 1,), torch.float32, seed=i) for i in range(300)]
    ks = [max(1, x.numel() // (3 + i % 20)) for i, x in enumerate(xs)]
    counts, values, index = ops.topk_encode(xs, ks)
    numels, counts = [x.numel() for x in xs], counts.tolist()
    for dtype in (torch.float32, torch.float64):
        _same_bits(
            ops.sparse_decode(index.cuda(), values.cuda(), numels, counts, dtype),
            ops.sparse_decode(index, values, numels, counts, dtype),
        )
    outs_cpu = [torch.randn(n) for n in numels]
    outs_cuda = [o.cuda() for o in outs_cpu]
    ops.sparse_decode_add_(outs_cpu, index, values, counts)
    ops.sparse_decode_add_(outs_cuda, index.cuda(), values.cuda(), counts)
    for a, b in zip(outs_cuda, outs_cpu):
        _same_bits(a, b)
    start = sum(ops.index_nbytes(n, k) for n, k in zip(numels[:200], counts[:200]))
    end = start + ops.index_nbytes(numels[200], counts[200])
    bad = index.clone()
    bad[end - 1] |= 0x80  # the top bit of the last byte: padding unless it ends on a byte
    code = "bitmap" if ops.choose_index_code(numels[200], counts[200]) == ops.INDEX_BITMAP else "Elias-Fano"
    nbits = (
        numels[200]
        if code == "bitmap"
        else ((numels[200] - 1) >> ops.elias_fano_low_bits(numels[200], counts[200])) + counts[200]
    )
    assert nbits % 8, "pick sizes whose last byte has padding"
    _raises_same(
        lambda: ops.sparse_decode(bad, values, numels, counts),
        lambda: ops.sparse_decode(bad.cuda(), values.cuda(), numels, counts),
        ValueError,
        _SD + f"index code of tensor 200 \\({code}, numel {numels[200]}, count {counts[200]}\\) is malformed: "
        "padding bits past the end of the bit stream are not zero",
    )


def test_ops_follow_a_non_default_current_stream():
    # The kernels run on the caller's current stream: on a side stream whose
    # input copy is delayed by a sleep, a kernel on another stream would read
    # the stale input. Every op's result must equal the CPU's.
    x_cpu = _data((70001,), torch.float32, seed=21)
    counts, values, index = ops.topk_encode([x_cpu], [700])
    side = torch.cuda.Stream()
    x = torch.zeros_like(x_cpu, device="cuda")
    ib, vals = torch.zeros_like(index, device="cuda"), torch.zeros_like(values, device="cuda")
    src = [t.cuda() for t in (x_cpu, index, values)]
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs are written
        x.copy_(src[0])
        ib.copy_(src[1])
        vals.copy_(src[2])
        q = ops.quantize_pack([x], 3, [64], stochastic=True, seeds=[5])
        t = ops.topk_encode([x], [700])
        d = ops.sparse_decode(ib, vals, [70001], counts.tolist())
        out = torch.zeros(70001, device="cuda")
        ops.sparse_decode_add_([out], ib, vals, counts.tolist())
    side.synchronize()
    for a, b in zip(q, ops.quantize_pack([x_cpu], 3, [64], stochastic=True, seeds=[5])):
        _same_bits(a, b)
    for a, b in zip(t, (counts, values, index)):
        _same_bits(a, b)
    want = ops.sparse_decode(index, values, [70001], counts.tolist())
    _same_bits(d, want)
    _same_bits(out, want)


def test_sparse_decode_add_overlapping_outputs_raise():
    xs, counts, values, index = _encoded(0.05)
    for device in ("cpu", "cuda"):
        buf = torch.zeros(sum(x.numel() for x in xs) + 10, device=device)
        outs = [buf[: xs[0].numel()], buf[5 : 5 + xs[1].numel()], buf[:13], buf[:4096]]
        with pytest.raises(RuntimeError, match="overlap"):
            ops.sparse_decode_add_(outs, index.to(device), values.to(device), counts)


@pytest.mark.parametrize("global_scope", [False, True])
def test_topk_round_trip_on_cuda(global_scope):
    xs = [torch.randn(s, device="cuda") for s in [(100, 37), (5000,), (1,)]]
    ks = [300] if global_scope else [100, 50, 1]
    counts, values, index = ops.topk_encode(xs, ks, global_scope=global_scope)
    numels = [x.numel() for x in xs]
    dense = ops.sparse_decode(index, values, numels, counts.tolist())
    flat = torch.cat([x.reshape(-1) for x in xs])
    kept = dense != 0
    assert int(kept.sum()) == int(counts.sum())
    assert torch.equal(dense[kept], flat[kept])
    # Every kept |x| >= every dropped |x| (within the selection scope).
    if global_scope:
        assert flat[kept].abs().min() >= flat[~kept].abs().max()
    outs = [torch.zeros_like(x) for x in xs]
    ops.sparse_decode_add_(outs, index, values, counts.tolist())
    assert torch.equal(torch.cat([o.reshape(-1) for o in outs]), dense)


def test_all_combinations_smoke():
    # A compact cross product of the remaining axes (bits x meta x rounding x
    # granularity), one odd shape, so every template instance runs once more.
    x = _data((129, 65), torch.bfloat16, seed=1)
    for bits, meta, stochastic, g in itertools.product(
        range(1, 9), [torch.float32, torch.float16], [False, True], [1, 65, 129 * 65]
    ):
        _quant_both([x], bits, [g], stochastic, [bits], meta)


def test_split_views_on_cuda_outputs():
    # Decode sends only CPU outputs to _split_views (codec._split_members)
    # until this passes on a GPU: the op is registered for every device.
    flat = torch.arange(30.0, device="cuda")
    layout = torch.tensor([0, 2, 3, 4, 4, 1, 12, 0, 13, 1, 3, 1, 16, 3, 2, 2, 2, 4, 2, 1], dtype=torch.int64)
    got = ops.split_views(flat, layout)
    want = ops.split_views(flat.cpu(), layout)
    assert [g.device.type for g in got] == ["cuda"] * 4
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    got[0].fill_(-1.0)  # the same memory, as a view's
    assert bool(flat[:12].eq(-1.0).all()) and float(flat[12]) == 12.0
