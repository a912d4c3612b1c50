"""quantize_pack / unpack_dequantize against the pure-PyTorch reference."""

import ctypes
import math
import mmap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flocora_codec import ops
from flocora_codec import reference as R
from tests.conftest import DEVICES, FLOAT_DTYPES, REFERENCE_BACKEND
from tests.stochastic_kat import KNOWN_U24, probe_inputs, u24

# (numel, group size): per tensor, per row of odd length, power-of-two groups,
# a short last group, groups larger than one kernel task (16384).
SIZES = [(1, 1), (7, 7), (27 * 16, 27), (1000, 64), (1000, 8), (4099, 4096), (40000, 40000), (70001, 33000)]


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _check_against_reference(x, bits, group, stochastic=False, seed=0, meta=torch.float32, device="cpu"):
    packed, scales, offsets = ops.quantize_pack(
        [x.to(device)], bits, [group], stochastic=stochastic, seeds=[seed], meta_dtype=meta
    )
    rp, rs, ro = R.quantize_pack(x, bits, group, stochastic, seed, meta)
    assert torch.equal(packed.cpu(), rp)
    # bit for bit: torch.equal takes -0.0 for +0.0
    assert torch.equal(_bits(scales.cpu()), _bits(rs))
    assert torch.equal(_bits(offsets.cpu()), _bits(ro))
    y = ops.unpack_dequantize(packed, scales, offsets, bits, [x.numel()], [group], x.dtype)
    assert torch.equal(y.cpu(), R.unpack_dequantize(rp, rs, ro, bits, x.numel(), group, x.dtype))
    return y.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel,group", SIZES)
def test_matches_reference_nearest(cpu_isa, device, bits, numel, group):
    torch.manual_seed(bits * 1000 + numel)
    _check_against_reference(torch.randn(numel), bits, group, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("meta", [torch.float32, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_matches_reference_dtypes(cpu_isa, device, dtype, meta, stochastic, bits):
    torch.manual_seed(bits)
    for numel, group in [(1000, 64), (27 * 5, 27), (40000, 40000)]:
        x = (torch.randn(numel) * 3).to(dtype)
        _check_against_reference(x, bits, group, stochastic, seed=99, meta=meta, device=device)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    bits=st.integers(1, 8),
    granularity=st.sampled_from(["tensor", "row", "group8", "group64"]),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_matches_reference_any_shape(shape, bits, granularity, stochastic, seed, scale):
    x = torch.randn(shape) * scale
    n = x.numel()
    group = {
        "tensor": max(n, 1),
        "row": max(n // shape[0], 1) if shape and shape[0] else max(n, 1),
        "group8": 8,
        "group64": 64,
    }[granularity]
    _check_against_reference(x, bits, group, stochastic, seed)


def test_bit_layout_worked_example():
    # docs/FORMAT.md: 3-bit codes 5, 1, 7, 2 (and 0) -> bytes 0xCD 0x05.
    x = torch.tensor([5.0, 1.0, 7.0, 2.0, 0.0])
    packed, scales, offsets = ops.quantize_pack([x], 3, [5])
    assert packed.tolist() == [0xCD, 0x05]
    assert scales.tolist() == [1.0] and offsets.tolist() == [0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = torch.randn(64, 48, device=device)
    for x in (base.t(), base[:, ::3], base[::2]):
        assert not x.is_contiguous()
        got = ops.quantize_pack([x], 4, [x.shape[1]])
        want = ops.quantize_pack([x.contiguous()], 4, [x.shape[1]])
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tensor_equals_single_calls(device):
    torch.manual_seed(0)
    xs = [torch.randn(s, device=device) for s in (0, 5, 1000, 27 * 16, 40000)]
    groups = [1, 5, 64, 27, 40000]
    seeds = [3, 4, 5, 6, 7]
    packed, scales, offsets = ops.quantize_pack(xs, 3, groups, stochastic=True, seeds=seeds)
    singles = [ops.quantize_pack([x], 3, [g], stochastic=True, seeds=[s]) for x, g, s in zip(xs, groups, seeds)]
    assert torch.equal(packed, torch.cat([p for p, _, _ in singles]))
    assert torch.equal(scales, torch.cat([s for _, s, _ in singles]))
    out = ops.unpack_dequantize(packed, scales, offsets, 3, [x.numel() for x in xs], groups)
    for part, (p, s, o), x, g in zip(torch.split(out, [x.numel() for x in xs]), singles, xs, groups):
        assert torch.equal(part, ops.unpack_dequantize(p, s, o, 3, [x.numel()], [g]))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("meta", [torch.float32, torch.float16])
def test_error_bound_nearest(cpu_isa, bits, meta):
    torch.manual_seed(bits)
    x = torch.randn(20000) * 10
    packed, scales, offsets = ops.quantize_pack([x], bits, [64], meta_dtype=meta)
    y = ops.unpack_dequantize(packed, scales, offsets, bits, [x.numel()], [64])
    half_step = (scales.float() / 2).repeat_interleave(64)[: x.numel()]
    # Up to a few float32 ulps of |x| beyond scale/2 from the rounding of the
    # affine arithmetic itself.
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + half_step * 2**bits)
    assert ((x - y).abs() <= half_step + slack).all()


def test_constant_groups_decode_exactly():
    x = torch.cat([torch.full((64,), 0.1234567), torch.full((64,), -3.0), torch.zeros(64), torch.full((7,), 1e-39)])
    for bits in (1, 2, 8):
        packed, scales, offsets = ops.quantize_pack([x], bits, [64])
        y = ops.unpack_dequantize(packed, scales, offsets, bits, [x.numel()], [64])
        assert torch.equal(y, x)


def test_stochastic_rounding_is_unbiased():
    # Per element, the mean of decode(encode(x)) over S seeds is within 5
    # standard errors (sigma <= scale / 2 / sqrt(S)) of x; deterministic seeds.
    torch.manual_seed(0)
    x = torch.randn(512)
    seeds = 400
    total = torch.zeros_like(x)
    for s in range(seeds):
        p, sc, of = ops.quantize_pack([x], 2, [64], stochastic=True, seeds=[s])
        total += ops.unpack_dequantize(p, sc, of, 2, [x.numel()], [64])
    mean = total / seeds
    sigma = (sc.repeat_interleave(64) / 2) / math.sqrt(seeds)
    assert ((mean - x).abs() <= 5 * sigma + 1e-6).all()
    # and the bias of the mean over all elements is far below one step
    assert abs((mean - x).mean().item()) < 0.01 * sc.mean().item()


def test_stochastic_independent_of_threads():
    x = torch.randn(300000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.quantize_pack([x], 3, [64], stochastic=True, seeds=[11])
        torch.set_num_threads(max(2, old))
        many = ops.quantize_pack([x], 3, [64], stochastic=True, seeds=[11])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_seed_changes_stochastic_codes():
    x = torch.randn(4096)
    a = ops.quantize_pack([x], 2, [64], stochastic=True, seeds=[1])[0]
    b = ops.quantize_pack([x], 2, [64], stochastic=True, seeds=[2])[0]
    assert not torch.equal(a, b)


# ---- the stochastic-rounding generator past 2^32 ------------------------------------
def test_stochastic_generator_known_answers():
    for (seed, i), u in KNOWN_U24.items():
        assert u24(seed, i) == u, (seed, i)
        assert R.stochastic_uniform24(seed, torch.tensor([i])).item() == u, (seed, i)


def _cpu_codes_at(x, seed, first):
    return torch.ops.flocora._quantize_stochastic_at(x, 1, seed, first)


@pytest.mark.parametrize("boundary", [2**32, 2**33])
@pytest.mark.parametrize("seed", [7, 2**40 + 3])
def test_stochastic_kernel_draws_known_values_across_2_32(cpu_isa, boundary, seed):
    # The kernel's own quantize path (key-block split, scalar and AVX2 loops)
    # from element boundary - 37 to boundary + 36, without a 2^33-element tensor.
    first = boundary - 37
    want = [u24(seed, first + j) for j in range(74)]
    for (s, i), u in KNOWN_U24.items():
        if s == seed and first <= i < first + 74:
            assert want[i - first] == u
    for x, code in probe_inputs(want):
        assert _cpu_codes_at(x, seed, first)[1:-1].tolist() == [code] * 72


def test_stochastic_kernel_matches_quantize_pack_at_zero():
    # The test hook and quantize_pack share one path: equal codes at index 0.
    x = torch.rand(1000)
    x[0], x[1] = 0.0, 1.0
    packed, _, _ = ops.quantize_pack([x], 1, [1000], stochastic=True, seeds=[7])
    bits = ((packed.long().unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[:1000]
    assert torch.equal(_cpu_codes_at(x, 7, 0).long(), bits)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    packed, scales, offsets = ops.quantize_pack([torch.empty(0, device=device)], 4, [64])
    assert packed.numel() == 0 and scales.numel() == 0
    assert ops.unpack_dequantize(packed, scales, offsets, 4, [0], [64]).numel() == 0
    packed, scales, offsets = ops.quantize_pack([], 4, [])
    assert packed.numel() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(cpu_isa, bad):
    for n, group in [(100, 64), (40000, 40000)]:
        x = torch.randn(n)
        x[n // 2] = bad
        with pytest.raises(ValueError, match="flocora::quantize_pack: input has NaN or Inf values"):
            ops.quantize_pack([x], 4, [group])


def test_invalid_arguments_raise():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="bits must be in 1..8"):
        ops.quantize_pack([x], 9, [8])
    with pytest.raises(RuntimeError, match="bits must be in 1..8"):
        ops.quantize_pack([x], 0, [8])
    with pytest.raises(RuntimeError, match="group size"):
        ops.quantize_pack([x], 4, [0])
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.quantize_pack([torch.arange(10)], 4, [8])
    with pytest.raises(RuntimeError, match="meta_dtype"):
        ops.quantize_pack([x], 4, [8], meta_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="range does not fit the metadata dtype Half"):
        ops.quantize_pack([torch.tensor([0.0, 1e6])], 4, [2], meta_dtype=torch.float16)


def test_unpack_checks_sizes_before_allocating():
    # A claim of 2^40 elements with an empty payload is refused from the
    # size arithmetic alone (int64 throughout), without allocating.
    e8 = torch.empty(0, dtype=torch.uint8)
    ef = torch.empty(0)
    with pytest.raises(RuntimeError, match="packed has 0 bytes"):
        ops.unpack_dequantize(e8, ef, ef, 4, [2**40], [64])
    p, s, o = ops.quantize_pack([torch.randn(100)], 4, [64])
    with pytest.raises(RuntimeError, match="scales and offsets"):
        ops.unpack_dequantize(p, s[:1], o, 4, [100], [64])
    with pytest.raises(RuntimeError, match="packed has"):
        ops.unpack_dequantize(p[:-1], s, o, 4, [100], [64])
    with pytest.raises(RuntimeError, match="negative"):
        ops.unpack_dequantize(p, s, o, 4, [-1], [64])


def test_size_helpers_past_2_31():
    n = 3 * 2**31 + 5
    assert ops.packed_nbytes(n, 3) == (n * 3 + 7) // 8
    assert ops.packed_nbytes(2**40, 1) == 2**37
    assert ops.num_groups(n, 64) == math.ceil(n / 64)
    assert ops.num_groups(2**40 + 1, 2**20) == 2**20 + 1


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    xs = [torch.randn(37, 5, device=device), torch.randn(64, device=device, dtype=torch.float16)]
    args = (xs, 3, [5, 64], True, [1, 2], torch.float32)
    torch.library.opcheck(torch.ops.flocora.quantize_pack.default, args)
    packed, scales, offsets = ops.quantize_pack(xs, 3, [5, 64], stochastic=True, seeds=[1, 2])
    torch.library.opcheck(
        torch.ops.flocora.unpack_dequantize.default,
        (packed, scales, offsets, 3, [185, 64], [5, 64], torch.bfloat16),
    )


def test_torch_compile_fullgraph():
    def roundtrip(x):
        packed, scales, offsets = torch.ops.flocora.quantize_pack([x], 4, [64], False, [0], torch.float32)
        return torch.ops.flocora.unpack_dequantize(packed, scales, offsets, 4, [x.numel()], [64], torch.float32)

    x = torch.randn(4096)
    compiled = torch.compile(roundtrip, fullgraph=True)
    assert torch.equal(compiled(x), roundtrip(x))


@pytest.mark.skipif(REFERENCE_BACKEND, reason="compares the kernels' CPU loop builds")
@pytest.mark.parametrize("stochastic", [False, True])
def test_every_cpu_isa_writes_the_scalar_bytes_at_every_length(stochastic):
    # Vector main loops (8/16/32/64 elements a step) and their tails, group
    # boundaries inside a step, and float16/bfloat16 in and out.
    torch.manual_seed(5)
    lengths = [*range(0, 140), 191, 192, 193, 255, 256, 257, 1000, 4097]
    xs = [torch.randn(n) * 2 for n in lengths]
    xs += [torch.randn(300).half(), torch.randn(77).bfloat16()]
    levels = [lvl for lvl in (0, 1, 2) if torch.ops.flocora._set_cpu_isa(lvl) == lvl]
    try:
        for bits in range(1, 9):
            for group in (1, 7, 16, 64, 10**6):
                results = []
                for lvl in levels:
                    torch.ops.flocora._set_cpu_isa(lvl)
                    p, s, o = ops.quantize_pack(xs, bits, [group] * len(xs), stochastic=stochastic,
                                                seeds=list(range(len(xs))))  # fmt: skip
                    numels = [x.numel() for x in xs]
                    ys = [ops.unpack_dequantize(p, s, o, bits, numels, [group] * len(xs), dt)
                          for dt in (torch.float32, torch.float16, torch.bfloat16)]  # fmt: skip
                    results.append((p, s, o, *ys))
                for lvl, r in zip(levels[1:], results[1:]):
                    for a, b in zip(results[0], r):
                        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (lvl, bits, group)
    finally:
        torch.ops.flocora._set_cpu_isa(-1)


def _awkward_groups(numel, group, seed):
    """Random values with the groups the one-pass loop must get exactly right:
    constant, all zero with -0.0, a range too small to invert, the minimum or
    maximum in the first or last lane, float32's largest finite range, every
    value negative, -0.0 the maximum and +0.0 the minimum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 3
    ngroups = numel // group
    for j, kind in zip(range(0, ngroups, 3), range(9)):
        s = slice(j * group, (j + 1) * group)
        if kind == 0:
            x[s] = 1.25
        elif kind == 1:
            x[s] = -0.0
            x[j * group + group // 2] = 0.0
        elif kind == 2:
            x[s] = torch.arange(group) * 1e-45  # subnormal: scale 0
        elif kind == 3:
            x[j * group] = -40.0
            x[(j + 1) * group - 1] = 40.0
        elif kind == 4:
            x[s] = x[s] * 1e36
        elif kind == 5:
            x[s] = torch.linspace(-1.7e38, 1.7e38, group)
        elif kind == 6:  # every value negative
            x[s] = -x[s].abs() - 1
        elif kind == 7:  # no value above -0.0, which is the maximum
            x[s] = -x[s].abs()
            x[j * group + group // 3] = -0.0
        elif kind == 8:  # no value below +0.0, which is the minimum
            x[s] = x[s].abs()
            x[j * group + 1] = 0.0
    return x


# Group sizes the one-pass loop takes (multiples of 16: one, two and four
# vectors a group, an odd count, long rows) and lengths giving whole blocks of
# 16 groups, part blocks and a short last group.
ONE_PASS = [(16, 16 * 16 * 3 + 5 * 16 + 7), (32, 32 * 21 + 31), (48, 48 * 19), (64, 64 * 16 * 4 + 64 * 3 + 1),
            (80, 80 * 17 + 40), (576, 576 * 9 + 100), (16384, 16384 * 2 + 999)]  # fmt: skip


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group,numel", ONE_PASS)
def test_one_pass_groups_match_reference(cpu_isa, bits, group, numel):
    x = _awkward_groups(numel, group, seed=group + bits)
    _check_against_reference(x, bits, group)


# float32 bit patterns of NaNs of either sign (quiet, and the smallest and
# largest payloads) and of the infinities: a loop that finds the range from
# the values' bits as integers must order each above every finite value.
NON_FINITE_BITS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000]


@pytest.mark.parametrize("group", [16, 32, 64, 80])
@pytest.mark.parametrize("where", ["first", "lane", "last group"])
@pytest.mark.parametrize("bad_bits", NON_FINITE_BITS, ids=hex)
@pytest.mark.parametrize("sign", ["mixed", "negative", "positive"])
def test_one_pass_groups_name_non_finite_input(cpu_isa, group, where, bad_bits, sign):
    # Every position of a group, among values of either sign or of one sign
    # only: a loop may find NaN through the range or through the codes.
    n = group * 40 + group // 2
    bad = torch.tensor([bad_bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    for pos in {"first": [0, group * 17], "lane": [5, group * 3 + 17], "last group": [n - 1]}[where]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(pos))
        x = {"mixed": x, "negative": -x.abs() - 0.5, "positive": x.abs() + 0.5}[sign]
        x[pos] = bad
        for bits in (1, 4, 8):
            with pytest.raises(ValueError, match="input has NaN or Inf values"):
                ops.quantize_pack([x], bits, [group])


def test_one_pass_groups_name_unfit_ranges(cpu_isa):
    x = torch.randn(64 * 20)
    x[64 * 7] = -3e38
    x[64 * 7 + 1] = 3e38  # the range overflows float32
    with pytest.raises(ValueError, match="range does not fit the metadata dtype Float"):
        ops.quantize_pack([x], 4, [64])


def _outputs_for(xs, bits, groups, meta=torch.float32):
    nbytes = sum(ops.packed_nbytes(x.numel(), bits) for x in xs)
    ngroups = sum(ops.num_groups(x.numel(), g) for x, g in zip(xs, groups))
    return torch.empty(nbytes, dtype=torch.uint8), torch.empty(ngroups, dtype=meta), torch.empty(ngroups, dtype=meta)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("meta", [torch.float32, torch.float16])
def test_quantize_pack_into_writes_what_quantize_pack_returns(cpu_isa, stochastic, meta):
    torch.manual_seed(3)
    groups = [64, 16, 5, 40000, 1]
    outs = None
    for round_ in range(2):  # the second round reuses the buffers with other values
        xs = [torch.randn(1000 + round_), torch.randn(33, 16).half(), torch.randn(7, 5).bfloat16(),
              torch.randn(50000), torch.randn(0)]  # fmt: skip
        if outs is None:
            outs = _outputs_for(xs, 3, groups, meta)
        elif outs[0].numel() != sum(ops.packed_nbytes(x.numel(), 3) for x in xs):
            outs = _outputs_for(xs, 3, groups, meta)
        ops.quantize_pack_into_(xs, 3, groups, *outs, stochastic=stochastic, seeds=[1, 2, 3, 4, 5])
        want = ops.quantize_pack(xs, 3, groups, stochastic=stochastic, seeds=[1, 2, 3, 4, 5], meta_dtype=meta)
        for got, w in zip(outs, want):
            assert torch.equal(_bits(got) if got.is_floating_point() else got, _bits(w) if w.is_floating_point() else w)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_writes_only_its_own_bytes(cpu_isa, bits):
    # The vector packers store whole registers and rely on later stores to
    # overwrite what a store wrote past its own bytes: the bytes around the
    # output must stay as they were, on every width and every shape the
    # one-pass loop takes (whole 64-code units, 16-code units, runs of
    # groups of 16 and 32 with an odd count, a short last group) and the
    # separate pack pass (groups of 7 and 40000).
    torch.manual_seed(bits)
    for group, numel in ONE_PASS[:5] + [(16, 16 * 5), (32, 32 * 3), (64, 64), (7, 999), (40000, 40000)]:
        xs = [torch.randn(numel), torch.randn(numel // 2 + 16)]
        groups = [group, 16]
        nbytes = sum(ops.packed_nbytes(x.numel(), bits) for x in xs)
        guard = torch.full((nbytes + 256,), 0xA5, dtype=torch.uint8)
        packed = guard[128 : 128 + nbytes]
        _, scales, offsets = _outputs_for(xs, bits, groups)
        ops.quantize_pack_into_(xs, bits, groups, packed, scales, offsets)
        assert torch.equal(packed, ops.quantize_pack(xs, bits, groups)[0]), (group, numel)
        assert (guard[:128] == 0xA5).all() and (guard[128 + nbytes :] == 0xA5).all(), (group, numel)


def test_quantize_pack_into_refuses_bad_outputs_before_writing():
    xs = [torch.randn(100), torch.randn(64)]
    packed, scales, offsets = _outputs_for(xs, 4, [64, 64])
    sentinel = [t.clone() for t in (packed, scales, offsets)]

    def refused(match, *outs):
        with pytest.raises(RuntimeError, match=match):
            ops.quantize_pack_into_(xs, 4, [64, 64], *outs)
        for t, s in zip((packed, scales, offsets), sentinel):
            # Byte for byte: the outputs start uninitialized, and a NaN among
            # other values compared as floats failed this now and then.
            assert torch.equal(t.view(torch.uint8), s.view(torch.uint8))

    refused("packed has 81 elements, the encoding needs 82", packed[:81], scales, offsets)
    refused("packed must be Byte", packed.view(torch.int8), scales, offsets)
    refused("scales has 4 elements, the encoding needs 3", packed, torch.empty(4), offsets)
    refused("offsets must be Half", packed, scales.half(), offsets)
    refused("meta_dtype must be float32 or float16", packed, scales.double(), offsets.double())
    refused("scales must be contiguous", packed, torch.empty(6)[::2], offsets)
    refused("overlap in memory", packed, scales, scales)
    big = torch.empty(ops.packed_nbytes(100, 4) + 400, dtype=torch.uint8)
    refused("tensor 0 overlaps an output", big[: packed.numel()], xs[0][:3], xs[0][3:6])


def test_quantize_pack_into_names_non_finite_input():
    x = torch.randn(256)
    x[100] = float("nan")
    with pytest.raises(ValueError, match="input has NaN or Inf values"):
        ops.quantize_pack_into_([x], 4, [64], *_outputs_for([x], 4, [64]))


@pytest.mark.skipif(REFERENCE_BACKEND, reason="checks the registered op")
def test_quantize_pack_into_opcheck():
    xs = [torch.randn(37, 5), torch.randn(64, dtype=torch.float16)]
    outs = _outputs_for(xs, 3, [5, 64])
    torch.library.opcheck(torch.ops.flocora.quantize_pack_into_.default, (xs, 3, [5, 64], True, [1, 2], *outs))


def test_inputs_past_the_caches_encode_alike_on_every_isa():
    # From 32 MiB of input on, AVX-512 CPUs run the AVX2 one-pass loop
    # (kPastCachesBytes): the bytes must not depend on the choice.
    n = (32 << 20) // 4 + 16 * 7
    x = torch.randn(n)
    levels = [lvl for lvl in (0, 1, 2) if torch.ops.flocora._set_cpu_isa(lvl) == lvl]
    try:
        for bits in (3, 4):
            outs = []
            for lvl in levels:
                torch.ops.flocora._set_cpu_isa(lvl)
                outs.append(ops.quantize_pack([x, x[:1000]], bits, [64, 16]))
            for got in outs[1:]:
                for a, b in zip(got, outs[0]):
                    assert torch.equal(a, b), bits
    finally:
        torch.ops.flocora._set_cpu_isa(-1)


# Tensors of several 16384-element pieces whose groups do not divide a piece:
# each piece decodes its whole groups from the packed bytes and the part
# groups at its ends from unpacked codes.
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [16, 48, 80, 576, 4608])
def test_decode_across_pieces_matches_reference(cpu_isa, bits, group):
    n = 16384 * 3 + group * 2 + 16
    x = torch.randn(n, generator=torch.Generator().manual_seed(group + bits))
    p, s, o = ops.quantize_pack([x], bits, [group])
    want = R.unpack_dequantize(p, s, o, bits, n, group, torch.float32)
    assert torch.equal(ops.unpack_dequantize(p, s, o, bits, [n], [group]), want)
    base = torch.randn(n)
    out = base.clone()
    ops.unpack_dequantize_into_([out], p, s, o, bits, [group], accumulate=True)
    assert torch.equal(out, base + want)


@pytest.mark.parametrize("bits", range(1, 8))
def test_decode_reads_no_byte_past_the_packed_codes(cpu_isa, bits):
    # The packed codes end right where an inaccessible page begins: a load
    # past them (the vector loops read 8 bytes where they may) would fault.
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(addr + page, page, 0) == 0  # PROT_NONE
    try:
        group, n = 64, 64 * 12
        x = torch.randn(n)
        p, s, o = ops.quantize_pack([x], bits, [group])
        guarded = torch.frombuffer(region, dtype=torch.uint8, count=p.numel(), offset=page - p.numel())
        guarded.copy_(p)
        got = ops.unpack_dequantize(guarded, s, o, bits, [n], [group])
        assert torch.equal(got, ops.unpack_dequantize(p, s, o, bits, [n], [group]))
        del guarded
    finally:
        libc.mprotect(addr + page, page, 3)  # PROT_READ | PROT_WRITE: the mapping can be closed


@pytest.mark.parametrize("group", [64, 48])
def test_large_outputs_stream_the_same_values(cpu_isa, group):
    # Outputs of 32 MiB and more are written with streaming stores where
    # 64-byte aligned; a misaligned view takes ordinary stores: same values.
    n = (64 << 20) // 4 + 16 * 5
    x = torch.randn(n)
    p, s, o = ops.quantize_pack([x], 3, [group])
    aligned = torch.empty(n)
    misaligned = torch.empty(n + 1)[1:]
    ops.unpack_dequantize_into_([aligned], p, s, o, 3, [group])
    ops.unpack_dequantize_into_([misaligned], p, s, o, 3, [group])
    assert aligned.data_ptr() % 64 == 0 and misaligned.data_ptr() % 64 != 0
    assert torch.equal(aligned, misaligned)
    assert torch.equal(aligned, ops.unpack_dequantize(p, s, o, 3, [n], [group]))
    head = 1 << 16  # the reference on a prefix of whole groups
    rp, rs, ro = R.quantize_pack(x[: head * 3], 3, group, False, 0, torch.float32)
    assert torch.equal(aligned[: head * 3], R.unpack_dequantize(rp, rs, ro, 3, head * 3, group, torch.float32))
    assert (aligned - x).abs().max() <= s.max() / 2 * 1.001
