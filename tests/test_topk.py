"""topk_encode / sparse_decode / sparse_decode_add_ against the pure-PyTorch reference.

The CPU kernel runs a tensor of at most 65536 elements as one task and larger
ones (and every global selection) in chunked phases, so sizes on both sides of
that line appear throughout.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flocora_codec import ops
from flocora_codec import reference as R
from tests.conftest import _ISA_LEVELS, DEVICES, FLOAT_DTYPES, REFERENCE_BACKEND

CHUNK = 65536  # kChunk in csrc/cpu/topk_encode_cpu.cpp
SINGLE_MAX = 1 << 17  # kSingleMax: per-tensor selections up to this many elements run in one task
SINGLE_SAMPLE_MIN = 2048  # kSingleSampleMin: from here, Elias-Fano coded singles are sampled and staged


def _bits(t):
    """Exact float32 bits (torch.equal would let -0.0 == 0.0 pass)."""
    return t.cpu().float().view(torch.int32)


def _check(xs, ks, global_scope=False, device="cpu"):
    got = ops.topk_encode([x.to(device) for x in xs], ks, global_scope=global_scope)
    want = R.topk_encode(xs, ks, global_scope)
    assert torch.equal(got[0].cpu(), want[0]), (got[0], want[0])
    assert torch.equal(_bits(got[1]), _bits(want[1]))
    assert torch.equal(got[2].cpu(), want[2])
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.uint8 and got[0].dtype == torch.int64
    return got


def _decode(counts, values, index_bytes, xs, dtype=torch.float32):
    return ops.sparse_decode(index_bytes, values, [x.numel() for x in xs], counts.tolist(), dtype)


# ---- encode == reference ------------------------------------------------------------
# 8191 / 8192 / 20003: a single tensor's histogram on either side of its
# sub-histograms' threshold, with a vector tail.
SIZES = [1, 7, 16, 17, 100, 1000, 4099, 8191, 8192, 20003, CHUNK, CHUNK + 1, 3 * CHUNK + 77]
DENSITIES = [0.0, 0.001, 0.01, 0.1, 0.2, 0.25, 0.3, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_sizes_densities(device, n, cpu_isa):
    torch.manual_seed(n)
    x = torch.randn(n)
    # Large sizes (the chunked path) take fewer densities: the oracle sorts.
    densities = DENSITIES if n < CHUNK else [0.001, 0.1, 0.25, 1.0]
    for i, d in enumerate(densities):
        _check([x], [int(n * d)], device=device)
        if n < CHUNK or i % 2:
            _check([x], [int(n * d)], global_scope=True, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("global_scope", [False, True])
def test_matches_reference_dtypes_lists(device, dtype, global_scope, cpu_isa):
    torch.manual_seed(7)
    sizes = [5, 0, 1000, CHUNK + 5, 300, 2 * CHUNK]
    xs = [(torch.randn(s) * 10).to(dtype) for s in sizes]
    for d in [0.0, 0.01, 0.5, 1.0]:
        if global_scope:
            ks = [int(sum(sizes) * d)]
        else:
            ks = [int(s * d) for s in sizes]
        _check(xs, ks, global_scope, device)


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors_one_call(device, cpu_isa):
    # LoRA-like: dozens of tensors, most far below one chunk.
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 5000, (40,), generator=g).tolist() + [CHUNK + 1, 70000]
    xs = [torch.randn(s, generator=g) for s in sizes]
    _check(xs, [max(1, s // 100) for s in sizes], False, device)
    _check(xs, [sum(sizes) // 50], True, device)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    dtype=st.sampled_from(FLOAT_DTYPES),
    global_scope=st.booleans(),
    levels=st.sampled_from([2, 5, 1000]),
)
def test_matches_reference_with_ties(data, sizes, dtype, global_scope, levels):
    # Few distinct magnitudes (and both signs, and +-0): many ties at the threshold.
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    xs = [((torch.randint(-levels, levels + 1, (s,), generator=g).float()) * 0.25).to(dtype) for s in sizes]
    if global_scope:
        ks = [data.draw(st.integers(0, sum(sizes)))]
    else:
        ks = [data.draw(st.integers(0, s)) for s in sizes]
    if REFERENCE_BACKEND:
        _check(xs, ks, global_scope)
        return
    try:  # every build of the loops this CPU runs
        for level in [lvl for lvl in _ISA_LEVELS.values() if torch.ops.flocora._set_cpu_isa(lvl) == lvl]:
            _check(xs, ks, global_scope)
    finally:
        torch.ops.flocora._set_cpu_isa(-1)


def test_large_candidate_buckets(cpu_isa):
    # Every key in one top-digit bucket (|x| in [1, 1.125)), and then in one
    # second-digit bucket: the select must descend through all three digits.
    torch.manual_seed(0)
    for n in [5000, 2 * CHUNK]:
        x = 1.0 + torch.rand(n) * 0.12
        x[::3] *= -1
        _check([x], [n // 3])
        _check([x], [n // 3], True)
        y = (1.0 + torch.randint(0, 1024, (n,)).float() * 2.0**-23) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        for k in [17, n // 2] if n > CHUNK else [1, 17, n // 2, n - 1]:
            _check([y], [k])
            _check([y, y[: n // 2]], [k], True)


# Selections over at least 2^16 elements that run in chunks (a tensor past
# SINGLE_MAX, a global selection), and single tensors of SINGLE_SAMPLE_MIN
# elements or more coded by Elias-Fano, histogram every 8th element only and
# take the candidates of a bracket around the sample's estimate (kSampleMin,
# kSampleStride in csrc/cpu/topk_encode_cpu.cpp); a bracket that misses T is
# redone from a full histogram. These inputs make the sample lie.
def _misleading_samples(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    sampled_big, sampled_small = x.clone(), x.clone()
    sampled_big[::8] = 1000.0 + torch.rand(len(x[::8]), generator=g)  # the sample sees only the largest keys
    sampled_small[::8] = 1e-3 * torch.rand(len(x[::8]), generator=g)  # ... only the smallest
    spread = x * torch.where(torch.arange(n) % 8 == 0, 1e-6, 1.0)  # ... keys far below the rest
    return [t.to(dtype) for t in (sampled_big, sampled_small, spread)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampled_bracket_that_misses_is_redone(cpu_isa, dtype):
    for n in (SINGLE_SAMPLE_MIN, 5003, CHUNK + 1000, SINGLE_MAX + 1000):
        for x in _misleading_samples(n, dtype):
            for density in (0.001, 0.01, 0.2, 0.5):
                k = int(n * density)
                _check([x], [k])
                _check([x[: n // 3], x[n // 3 :]], [k], True)


def test_sampled_selection_matches_reference(cpu_isa):
    # The bracket holds T (no redo) on ordinary data, with ties at T.
    torch.manual_seed(5)
    x = torch.randn(2**18 + 77)
    x[::5] = x[7]
    for density in (0.001, 0.1, 0.3):
        _check([x], [int(x.numel() * density)])
        _check([x[: CHUNK + 5]], [int((CHUNK + 5) * density)])
    _check([x[:1000], x[1000:]], [5000], True)


def test_sampled_selection_sees_non_finite_values_the_sample_skips(cpu_isa):
    for bad in [float("nan"), float("inf")]:
        for where in (8 * 1000 + 5, 8 * 1001 + 5):  # not sampled; in either half of a 16-key block
            for n in (5 * CHUNK, 20003):  # a chunked group, a sampled single
                xs = [torch.randn(5000), torch.randn(n)]
                xs[1][where] = bad
                for ks, gs in [([100], True), ([10, 100], False)]:
                    with pytest.raises(ValueError, match="^flocora::topk_encode: input has NaN or Inf values"):
                        ops.topk_encode(xs, ks, global_scope=gs)


def test_sampled_keys_on_the_edges_of_fine_bins(cpu_isa):
    # A bracket's ends are fine-bin edges (keys with their low 18 bits all
    # ones or all zeros): a key on an edge belongs to exactly one side.
    g = torch.Generator().manual_seed(11)
    for n in (SINGLE_SAMPLE_MIN + 5, 20003, CHUNK + 3, SINGLE_MAX + 5):
        bits = torch.randn(n, generator=g).view(torch.int32)
        for edge in (bits | 0x3FFFF, bits & ~0x3FFFF):
            x = edge.view(torch.float32)
            for density in (0.001, 0.05, 0.1):
                _check([x], [int(n * density)])


@pytest.mark.parametrize("levels", [2, 5, 1000])
def test_sampled_singles_with_ties(levels, cpu_isa):
    # Few distinct magnitudes, both signs, +-0: T has many equal keys, the
    # first of which are kept in index order; staged and emitted in blocks of
    # 16 (AVX-512) or 8 (AVX2) with a tail.
    g = torch.Generator().manual_seed(levels)
    for n in (SINGLE_SAMPLE_MIN, SINGLE_SAMPLE_MIN + 9, 20003, CHUNK + 3):
        for dtype in FLOAT_DTYPES:
            x = (torch.randint(-levels, levels + 1, (n,), generator=g).float() * 0.25).to(dtype)
            for density in (0.0005, 0.01, 0.1, 0.15):
                _check([x], [max(1, int(n * density))])


def test_inputs_past_the_caches_select_alike_on_every_isa():
    # From 32 MiB of input on, AVX-512 CPUs run the AVX2 passes
    # (kPastCachesBytes): the output must not depend on the choice.
    x = torch.randn((32 << 20) // 4 + 77)
    levels = [lvl for lvl in _ISA_LEVELS.values() if torch.ops.flocora._set_cpu_isa(lvl) == lvl]
    try:
        for ks, gs in [([x.numel() // 100], False), ([x.numel() // 10], True)]:
            outs = []
            for lvl in levels:
                torch.ops.flocora._set_cpu_isa(lvl)
                outs.append(ops.topk_encode([x, x[:100]], ks + ([] if gs else [5]), global_scope=gs))
            for got in outs[1:]:
                for a, b in zip(got, outs[0]):
                    assert torch.equal(a, b)
    finally:
        torch.ops.flocora._set_cpu_isa(-1)


# ---- selection semantics ------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [10, 1000, 3 * CHUNK + 3])
def test_exact_top_k_and_tie_rule(device, n, cpu_isa):
    # Half the elements tie at |x| = 1 (either sign): the kept ties are the
    # lowest-indexed ones, every kept |x| >= every dropped |x|.
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g) * 0.5
    tie_pos = torch.randperm(n, generator=g)[: n // 2]
    x[tie_pos] = torch.where(torch.rand(n // 2, generator=g) < 0.5, -1.0, 1.0)
    x[torch.randperm(n, generator=g)[: n // 10]] = 3.0
    big = int((x.abs() > 1).sum())
    k = big + n // 8
    counts, values, index = ops.topk_encode([x.to(device)], [k])
    idx = R.decode_indices(index.cpu(), n, k)
    assert int(counts[0]) == k and idx.numel() == k
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx] = True
    assert x.abs()[kept].min() >= x.abs()[~kept].max()
    ties = torch.nonzero(x.abs() == 1.0).reshape(-1)
    assert torch.equal(idx[x[idx].abs() == 1.0], ties[: n // 8])
    assert torch.equal(_bits(values), _bits(x[idx]))


@pytest.mark.parametrize("device", DEVICES)
def test_global_ties_go_to_earlier_tensors(device, cpu_isa):
    xs = [torch.full((100,), -2.0), torch.ones(CHUNK + 10), torch.ones(50), torch.full((7,), 5.0)]
    counts, values, _ = ops.topk_encode([x.to(device) for x in xs], [120], global_scope=True)
    assert counts.tolist() == [100, 13, 0, 7]
    _check(xs, [120], True, device)
    _check(xs, [7 + 100 + CHUNK + 10 + 3], True, device)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_and_signed_zero(device, cpu_isa):
    for n in [33, 2 * CHUNK + 1]:
        for x in [torch.zeros(n), -torch.zeros(n), torch.full((n,), -0.5)]:
            for k in [0, 1, n // 2, n] if n < CHUNK else [n // 2]:
                _check([x], [k], device=device)
    x = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-45, -1e-45])
    _, values, _ = _check([x], [4], device=device)
    assert _bits(values).tolist() == _bits(torch.tensor([0.0, -0.0, 1e-45, -1e-45])).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_k_zero_full_and_empty(device):
    x = torch.randn(1000)
    counts, values, index = ops.topk_encode([x.to(device)], [0])
    assert counts.tolist() == [0] and values.numel() == 0 and index.numel() == 0
    counts, values, index = ops.topk_encode([x.to(device)], [1000])
    assert torch.equal(values.cpu(), x) and index.numel() == 125 and bool((index.cpu() == 255).all())
    counts, values, index = ops.topk_encode([torch.empty(0, device=device)], [0])
    assert counts.tolist() == [0] and values.numel() == 0 and index.numel() == 0
    counts, values, index = ops.topk_encode([torch.empty(0, 3, device=device)], [0], global_scope=True)
    assert counts.tolist() == [0] and values.numel() == 0
    _check([torch.empty(0), x, torch.empty(2, 0)], [0, 10, 0], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_any_shape(device, dtype):
    torch.manual_seed(1)
    base = torch.randn(120, 250).to(dtype)
    views = [base.t(), base[::2, 1::3], base[:, 7], base.reshape(5, 24, 250).permute(2, 0, 1)[::2]]
    for v in views:
        assert not v.is_contiguous()
        got = ops.topk_encode([v.to(device)], [v.numel() // 7])
        want = R.topk_encode([v.contiguous()], [v.numel() // 7])
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    _check([base.t(), base[:, 7]], [3000], True, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [50, 8192 + 50, CHUNK + 50])
@pytest.mark.parametrize("where", ["vector", "tail"])
def test_nonfinite_raises(device, dtype, n, where, cpu_isa):
    for bad in [float("nan"), float("inf"), -float("inf")]:
        x = torch.randn(n).to(dtype)
        x[{"vector": n // 2 + 1, "tail": n - 3}[where]] = bad
        for ks, gs in [([0], False), ([5], False), ([n], False), ([5], True)]:
            with pytest.raises(ValueError, match="^flocora::topk_encode: input has NaN or Inf values"):
                ops.topk_encode([x.to(device)], ks, global_scope=gs)
        with pytest.raises(ValueError, match="NaN or Inf"):
            R.topk_encode([x], [5])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_k_raises(device):
    x = torch.randn(10, device=device)
    with pytest.raises(RuntimeError, match=r"topk_encode.*k of tensor 0.*\[0, numel = 10\].*got 11"):
        ops.topk_encode([x], [11])
    with pytest.raises(RuntimeError, match=r"topk_encode.*got -1"):
        ops.topk_encode([x], [-1])
    with pytest.raises(RuntimeError, match=r"topk_encode.*total numel = 20.*got 21"):
        ops.topk_encode([x, x], [21], global_scope=True)
    with pytest.raises(RuntimeError, match="topk_encode.*2 values of k for 1 tensors"):
        ops.topk_encode([x], [1, 2])
    with pytest.raises(RuntimeError, match="topk_encode.*one k over all tensors"):
        ops.topk_encode([x, x], [1, 2], global_scope=True)
    with pytest.raises(RuntimeError, match="topk_encode.*dtype"):
        ops.topk_encode([x.double()], [1])


def test_independent_of_thread_count():
    # Tie shares are decided per chunk: the bytes must not depend on threads.
    xs = [torch.ones(3 * CHUNK + 3), torch.randn(2 * CHUNK).round()]
    ks_list = [([2 * CHUNK + 11, CHUNK], False), ([3 * CHUNK], True)]
    old = torch.get_num_threads()
    try:
        results = []
        for threads in [1, 2, 3]:
            torch.set_num_threads(threads)
            results.append([ops.topk_encode(xs, ks, global_scope=gs) for ks, gs in ks_list])
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
    for (ks, gs), got in zip(ks_list, results[0]):
        want = R.topk_encode(xs, ks, gs)
        assert all(torch.equal(u, v) for u, v in zip(got, want))


# ---- index codes ------------------------------------------------------------------------
def test_format_example():
    # docs/FORMAT.md 3.5: n = 20, indices 2, 9, 17 -> Elias-Fano 16 49.
    assert R.encode_indices(torch.tensor([2, 9, 17]), 20).tolist() == [0x16, 0x49]
    x = torch.zeros(20)
    x[[2, 9, 17]] = torch.tensor([3.0, -4.0, 5.0])
    counts, values, index = ops.topk_encode([x], [3])
    assert index.tolist() == [0x16, 0x49] and values.tolist() == [3.0, -4.0, 5.0]


@pytest.mark.parametrize("n", [8, 20, 64, 1000, 4096, 20003])
def test_code_choice_boundary(n):
    # At every k the op emits exactly index_nbytes bytes in the code that
    # choose_index_code names (bitmap on a tie), and the kernel bytes match.
    torch.manual_seed(n)
    x = torch.randn(n)
    ks = sorted(
        {0, 1, n} | {k for k in range(max(1, n // 5), min(n, n // 3 + 2))}
        if n <= 4096
        else {0, 1, n, n // 4 - 1, n // 4, n // 4 + 1, n // 5, n // 3}
    )
    flips = 0
    prev = None
    for k in ks:
        code = ops.choose_index_code(n, k)
        counts, values, index = ops.topk_encode([x], [k])
        assert index.numel() == ops.index_nbytes(n, k) == min(ops.bitmap_nbytes(n), ops.elias_fano_nbytes(n, k))
        if ops.bitmap_nbytes(n) == ops.elias_fano_nbytes(n, k):
            assert code == ops.INDEX_BITMAP
        idx = R.topk_select([x], [k])[0][0]
        if code == ops.INDEX_BITMAP:
            bitmap = torch.zeros(ops.bitmap_nbytes(n) * 8, dtype=torch.int64)
            bitmap[idx] = 1
            assert torch.equal(index, (bitmap.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8))
        assert torch.equal(index, R.encode_indices(idx, n))
        flips += prev is not None and code != prev
        prev = code
    assert n < 64 or flips >= 1


def test_code_tie_case():
    # n = 64, k = 16: l = 2, EF = 4 + 4 bytes = bitmap 8 bytes -> bitmap.
    assert ops.elias_fano_low_bits(64, 16) == 2 and ops.elias_fano_nbytes(64, 16) == 8
    assert ops.choose_index_code(64, 16) == ops.INDEX_BITMAP
    x = torch.arange(64.0)
    counts, values, index = ops.topk_encode([x], [16])
    assert index.tolist() == [0] * 6 + [0xFF, 0xFF]


def test_sizes_past_int32():
    # Size arithmetic on 64-bit counts (no allocation): against formulas
    # written independently here.
    for n in [2**31 - 1, 2**31, 2**31 + 1, 2**32 + 7, 3 * 2**33 + 5, 2**40, 2**50 + 3]:
        for k in [0, 1, 2, 1000, n // 1000, n // 32, n // 4, n // 2, n - 1, n]:
            low = (n // k).bit_length() - 1 if k else 0
            assert ops.elias_fano_low_bits(n, k) == low
            ef = 0 if k == 0 else -(-k * low // 8) + -(-(((n - 1) >> low) + k) // 8)
            assert ops.elias_fano_nbytes(n, k) == ef
            assert ops.index_nbytes(n, k) == min(-(-n // 8), ef)
            code = ops.INDEX_BITMAP if -(-n // 8) <= ef else ops.INDEX_ELIAS_FANO
            assert ops.index_codes_and_nbytes([n, n], [k, k]) == [(code, min(-(-n // 8), ef))] * 2
    # The kernel checks sizes in int64 before it allocates anything:
    # 2^40 elements, 1 kept -> Elias-Fano with l = 40: 5 + 1 bytes.
    with pytest.raises(RuntimeError, match="index_bytes has 7 bytes, numels and counts need 6"):
        ops.sparse_decode(torch.zeros(7, dtype=torch.uint8), torch.ones(1), [2**40], [1])
    with pytest.raises(RuntimeError, match=r"need 536870912\b"):  # 2^32 elements, 2^31 kept: bitmap
        ops.sparse_decode(torch.zeros(1, dtype=torch.uint8), torch.ones(1), [2**32], [2**31])


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3000), data=st.data())
def test_index_code_round_trip(n, data):
    k = data.draw(st.integers(0, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
    code = R.encode_indices(idx, n)
    assert code.numel() == ops.index_nbytes(n, k)
    assert torch.equal(R.decode_indices(code, n, k), idx)
    vals = torch.randn(k, generator=g)
    out = ops.sparse_decode(code, vals, [n], [k])
    want = torch.zeros(n)
    want[idx] = vals
    assert torch.equal(out, want)


# ---- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("global_scope", [False, True])
def test_round_trip_exact(device, dtype, global_scope):
    torch.manual_seed(5)
    xs = [torch.randn(s).to(dtype) for s in [0, 3, 999, CHUNK + 9, 64]]
    for d in [0.0, 0.003, 0.3, 1.0]:
        ks = [int(sum(x.numel() for x in xs) * d)] if global_scope else [int(x.numel() * d) for x in xs]
        counts, values, index = ops.topk_encode([x.to(device) for x in xs], ks, global_scope=global_scope)
        numels = [x.numel() for x in xs]
        for out_dtype in sorted({torch.float32, dtype}, key=str):
            dense = ops.sparse_decode(index, values, numels, counts.tolist(), out_dtype)
            assert dense.dtype == out_dtype and dense.device.type == device
            want = R.sparse_decode(index.cpu(), values.cpu(), numels, counts.tolist(), out_dtype)
            assert torch.equal(dense.cpu(), want)
            # kept elements come back bit-exact, the rest are zero
            flat = torch.cat([x.reshape(-1) for x in xs]).to(out_dtype)
            kept = dense.cpu() != 0
            assert torch.equal(dense.cpu()[kept], flat[kept])
        assert int((dense != 0).sum()) <= int(counts.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("values_dtype", FLOAT_DTYPES)
def test_decode_add_matches_reference(device, out_dtype, values_dtype):
    torch.manual_seed(11)
    xs = [torch.randn(s) for s in [17, 4000, CHUNK + 100]]
    counts, values, index = ops.topk_encode(xs, [5, 400, 6000])
    values = values.to(values_dtype)
    outs = [
        torch.randn(17).to(out_dtype),
        torch.randn(40, 100).to(out_dtype)[:, ::1],
        torch.randn(CHUNK + 100).to(out_dtype),
    ]
    want = [o.clone() for o in outs]
    got = [o.to(device) for o in outs]
    ops.sparse_decode_add_(got, index.to(device), values.to(device), counts.tolist())
    R.sparse_decode_add_(want, index, values, counts.tolist())
    for g, w in zip(got, want):
        assert g.dtype == out_dtype and torch.equal(g.cpu(), w)


OUT_CHUNK = 1 << 14  # kOutChunk in csrc/cpu/sparse_decode_cpu.cpp: output elements per write task


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + [torch.float64])
def test_assign_writes_every_element(device, out_dtype):
    # Assigning zeroes each output chunk by chunk as it scatters: targets full
    # of NaN must come back as the reference, whatever the sizes (on, off and
    # across the chunk line), counts (none, few, all) and the value dtype.
    torch.manual_seed(5)
    sizes = [OUT_CHUNK, OUT_CHUNK + 1, 3 * OUT_CHUNK - 1, 5, 40000, 2 * OUT_CHUNK, 1]
    ks = [0, 3, 3 * OUT_CHUNK - 1, 5, 4000, 1, 0]
    xs = [torch.randn(n) for n in sizes]
    counts, values, index = ops.topk_encode(xs, ks)
    c = counts.tolist()
    for vdtype in FLOAT_DTYPES:
        v = values.to(vdtype)
        want = R.sparse_decode(index, v, sizes, c, out_dtype)
        outs = [torch.full((n,), float("nan"), dtype=out_dtype, device=device) for n in sizes]
        ops.sparse_decode_into_(outs, index.to(device), v.to(device), c, accumulate=False)
        assert torch.equal(torch.cat(outs).cpu().view(-1), want), vdtype
        # The allocating decode writes every element too (its output is not zeroed first):
        # fill the memory it is likely to get back with NaN.
        junk = torch.full((sum(sizes),), float("nan"), dtype=out_dtype)
        del junk
        assert torch.equal(ops.sparse_decode(index.to(device), v.to(device), sizes, c, out_dtype).cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_add_non_contiguous(device):
    xs = [torch.randn(30, 40), torch.randn(9)]
    counts, values, index = ops.topk_encode(xs, [100, 3])
    base = torch.randn(40, 30, device=device)
    out0 = base.t()  # (30, 40) view, not contiguous
    out1 = torch.zeros(18, device=device)[::2]
    before = base.clone()
    ops.sparse_decode_add_([out0, out1], index.to(device), values.to(device), counts.tolist())
    want = before.t().clone()
    R.sparse_decode_add_([want, torch.zeros(9)], index, values, counts.tolist())
    assert torch.equal(base.t().cpu(), want.cpu())
    dense = R.sparse_decode(index, values, [1200, 9], counts.tolist())
    assert torch.equal(out1.cpu(), dense[1200:])


def test_decode_add_rejects_overlapping_outputs():
    counts, values, index = ops.topk_encode([torch.randn(10)] * 2, [2, 2])
    out = torch.zeros(10)
    with pytest.raises(RuntimeError, match="overlap"):
        ops.sparse_decode_add_([out, out], index, values, counts.tolist())


# ---- untrusted input -----------------------------------------------------------------
def _valid_message(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    counts, values, index = ops.topk_encode([x], [k])
    return index, values


def _same_verdict(index, values, numels, counts):
    """The op raises iff the reference raises; otherwise both decode alike."""
    try:
        want = R.sparse_decode(index, values, numels, counts)
    except ValueError:  # a malformed code (a size error would be RuntimeError, and fail the test)
        want = None
    outs = [torch.full((n,), 0.5) for n in numels]
    if want is None:
        with pytest.raises(ValueError, match=r"^flocora::sparse_decode: index code of tensor \d+ .* is malformed"):
            ops.sparse_decode(index, values, numels, counts)
        with pytest.raises(ValueError, match=r"^flocora::sparse_decode_add_: index code of tensor \d+ .* is malformed"):
            ops.sparse_decode_add_(outs, index, values, counts)
        assert all(bool((o == 0.5).all()) for o in outs), "outputs modified before validation"
    else:
        assert torch.equal(ops.sparse_decode(index, values, numels, counts), want)
        ops.sparse_decode_add_(outs, index, values, counts)
        assert torch.equal(torch.cat(outs) if outs else torch.empty(0), want + 0.5)
    return want is not None


@settings(max_examples=200, deadline=None)
@given(
    n=st.sampled_from([1, 9, 20, 64, 100, 1000, 5000, 140000]),
    density=st.sampled_from([0.001, 0.05, 0.2, 0.3, 0.9, 1.0]),
    flips=st.lists(st.integers(0, 2**40), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_corrupt_index_bytes_raise_or_match(n, density, flips, seed):
    # k >= 1, so there is always a code to corrupt (k = 0 has zero bytes).
    k = max(1, int(n * density))
    index, values = _valid_message(n, k, seed)
    assert index.numel() > 0
    bad = index.clone()
    for f in flips:
        bit = f % (8 * bad.numel())
        bad[bit // 8] ^= 1 << (bit % 8)
    _same_verdict(bad, values, [n], [k])


def test_crafted_invalid_codes():
    # Elias-Fano n = 20, k = 3, l = 2: low stream 6 bits (1 byte), high stream
    # (19 >> 2) + 3 = 7 bits (1 byte). Valid: indices 2, 9, 17.
    def ef(lows, highs):
        low = sum(v << (2 * i) for i, v in enumerate(lows))
        return torch.tensor([low, sum(1 << b for b in highs)], dtype=torch.uint8)

    vals = torch.ones(3)
    assert _same_verdict(ef([2, 1, 1], [0, 3, 6]), vals, [20], [3])
    cases = {
        "equal indices": ef([1, 1, 1], [0, 1, 5]),  # 1, 1, 13
        "decreasing": ef([3, 2, 1], [0, 1, 5]),  # 3, 2, 13
        "too many high bits": ef([2, 1, 1], [0, 3, 5, 6]),
        "too few high bits": ef([2, 1, 1], [0, 3]),
        "high padding bit": ef([2, 1, 1], [0, 3, 6, 7]),
        "low padding bit": torch.tensor([0x16 | 0x40, 0x49], dtype=torch.uint8),
    }
    for name, data in cases.items():
        assert not _same_verdict(data, vals, [20], [3]), name
    # n = 21, k = 2 -> l = 3, high stream (20 >> 3) + 2 = 4 bits. Second index:
    # high part 2 (bit 3), low 7 -> 23 >= 21.
    assert ops.choose_index_code(21, 2) == ops.INDEX_ELIAS_FANO and ops.index_nbytes(21, 2) == 2
    assert not _same_verdict(torch.tensor([7 << 3, 0b1001], dtype=torch.uint8), torch.ones(2), [21], [2])
    assert _same_verdict(torch.tensor([4 << 3, 0b1001], dtype=torch.uint8), torch.ones(2), [21], [2])  # 20
    # Bitmap n = 12, k = 3: valid, padding bit, extra bit, too few bits.
    assert ops.choose_index_code(12, 3) == ops.INDEX_BITMAP
    assert _same_verdict(torch.tensor([0b1011, 0], dtype=torch.uint8), vals, [12], [3])
    assert not _same_verdict(torch.tensor([0b1011, 0b10000], dtype=torch.uint8), vals, [12], [3])
    assert not _same_verdict(torch.tensor([0b1011, 0b1000], dtype=torch.uint8), vals, [12], [3])
    assert not _same_verdict(torch.tensor([0b0011, 0], dtype=torch.uint8), vals, [12], [3])


def _ef_1000_10():
    """n = 1000, k = 10 kept at 0, 1, 100, ..., 800: Elias-Fano with l = 6, 8
    bytes of low bits (index j's at bits 6j..6j+5), then 25 high bits (4 bytes,
    index j's at bit (idx >> 6) + j)."""
    x = torch.zeros(1000)
    x[[0, 1, 100, 200, 300, 400, 500, 600, 700, 800]] = torch.arange(1.0, 11.0)
    counts, values, index = ops.topk_encode([x], [10])
    assert index.numel() == 12 and ops.choose_index_code(1000, 10) == ops.INDEX_ELIAS_FANO
    assert index[0] == 1 << 6 and index[8] & 0b11 == 0b11  # low of index 1; high bits of 0 and 1
    return index, values


def error_order_cases():
    """Calls with several bad Elias-Fano codes (numel 1000, count 10 each):
    ``(values, [(codes, failing tensor, error text), ...])``. Padding is checked
    on every tensor first, then the counts, then the decoded indices; the error
    names the lowest failing tensor of that phase with its own kind (the CPU
    here, CUDA the same in test_cuda_parity.py)."""
    index, values = _ef_1000_10()
    count_bad = index.clone()
    count_bad[8] &= 0xFE  # index 0's high bit cleared: 9 indices
    pad_bad = index.clone()
    pad_bad[-1] |= 0x80  # high padding (bits 25..31)
    order_bad = index.clone()
    order_bad[0] &= ~0x40 & 0xFF  # index 1's low part 1 -> 0: indices 0, 0
    ok = index
    pad_text = "padding bits past the end of the bit stream are not zero"
    return values, [
        ([count_bad, ok, pad_bad], 2, pad_text),  # count error in tensor 0, padding in 2: padding first
        ([order_bad, pad_bad, ok], 1, pad_text),  # tensor 1, not tensor 0 paired with padding
        ([order_bad, ok, ok, count_bad], 3, "the number of set bits differs from count"),
        ([ok, ok, order_bad], 2, "the indices are not strictly increasing"),
    ]


def test_error_order_and_tensor():
    values, cases = error_order_cases()
    for codes, tensor, text in cases:
        ib, vals = torch.cat(codes), values.repeat(len(codes))
        numels, counts = [1000] * len(codes), [10] * len(codes)
        want = (
            f"flocora::sparse_decode: index code of tensor {tensor} (Elias-Fano, numel 1000, count 10) "
            f"is malformed: {text}"
        )
        with pytest.raises(ValueError) as info:
            ops.sparse_decode(ib, vals, numels, counts)
        assert str(info.value).splitlines()[0] == want


def test_decode_many_pieces():
    # Streams longer than one decode task (8 KiB): rank offsets and the
    # order check across task boundaries.
    n = 1 << 20
    torch.manual_seed(2)
    for k in [3, 5000, n // 6, n // 2]:
        x = torch.randn(n)
        counts, values, index = ops.topk_encode([x], [k])
        assert _same_verdict(index, values, [n], [k])
    # An Elias-Fano code whose only disorder straddles two tasks.
    n, k = 1 << 22, 1 << 17  # l = 5, high stream 2^17 + 2^17 bits = 32 KiB
    idx = torch.arange(k) * 32
    code = R.encode_indices(idx, n)
    assert ops.choose_index_code(n, k) == ops.INDEX_ELIAS_FANO
    r = 8192 * 8 // 2  # rank of the first set bit in the second 8 KiB of the high stream
    bad_idx = idx.clone()
    bad_idx[r] = bad_idx[r - 1]  # same high part, same low bits: not increasing
    bad = code.clone()
    low_nbytes = k * 5 // 8
    lows = R._unpack_lsb(code[:low_nbytes]).reshape(k, 5)
    lows[r] = R._unpack_lsb(torch.tensor([int(bad_idx[r]) & 31], dtype=torch.uint8))[:5]
    bad[:low_nbytes] = (lows.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)
    high = R._unpack_lsb(code[low_nbytes:])
    high[r + (int(idx[r]) >> 5)] = 0
    high[r + (int(bad_idx[r]) >> 5)] = 1
    bad[low_nbytes:] = (high.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)
    assert not _same_verdict(bad, torch.ones(k), [n], [k])


def test_wrong_sizes_raise():
    x = [torch.randn(100), torch.randn(3000)]
    counts, values, index = ops.topk_encode(x, [10, 30])
    c = counts.tolist()
    with pytest.raises(RuntimeError, match="index_bytes has"):
        ops.sparse_decode(index[:-1], values, [100, 3000], c)
    with pytest.raises(RuntimeError, match="index_bytes has"):
        ops.sparse_decode(torch.cat([index, index[:1]]), values, [100, 3000], c)
    with pytest.raises(RuntimeError, match="values has 39 elements, counts need 40"):
        ops.sparse_decode(index, values[:-1], [100, 3000], c)
    with pytest.raises(RuntimeError, match=r"count of tensor 0 must be in \[0, numel = 100\], got 101"):
        ops.sparse_decode(index, values, [100, 3000], [101, 30])
    with pytest.raises(RuntimeError, match="numel of tensor 1 is negative"):
        ops.sparse_decode(index, values, [100, -1], [10, 0])
    with pytest.raises(RuntimeError, match="2 numels and 1 counts"):
        ops.sparse_decode(index, values, [100, 3000], [10])
    with pytest.raises(RuntimeError, match="uint8"):
        ops.sparse_decode(index.to(torch.int32), values, [100, 3000], c)
    with pytest.raises(RuntimeError, match="values must be float32"):
        ops.sparse_decode(index, values.double(), [100, 3000], c)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.sparse_decode(index, values, [100, 3000], c, torch.int32)
    with pytest.raises(RuntimeError, match="2 output tensors and 1 counts"):
        ops.sparse_decode_add_([torch.zeros(100), torch.zeros(3000)], index, values, [10])
    with pytest.raises(RuntimeError, match="index_bytes has"):  # outs with the wrong numel
        ops.sparse_decode_add_([torch.zeros(100), torch.zeros(50)], index, values, c)


def test_decode_empty():
    out = ops.sparse_decode(torch.empty(0, dtype=torch.uint8), torch.empty(0), [], [])
    assert out.numel() == 0
    out = ops.sparse_decode(torch.empty(0, dtype=torch.uint8), torch.empty(0), [0, 5], [0, 0])
    assert torch.equal(out, torch.zeros(5))
    ops.sparse_decode_add_([], torch.empty(0, dtype=torch.uint8), torch.empty(0), [])


# ---- torch.library ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.manual_seed(0)
    xs = [torch.randn(40, device=device), torch.randn(3, 50, device=device).to(torch.float16)]
    torch.library.opcheck(torch.ops.flocora.topk_encode.default, (xs, [5, 20], False))
    counts, values, index = ops.topk_encode(xs, [5, 20])
    c = counts.tolist()
    torch.library.opcheck(torch.ops.flocora.sparse_decode.default, (index, values, [40, 150], c, torch.float32))
    outs = [torch.randn(40, device=device), torch.randn(3, 50, device=device)]
    torch.library.opcheck(torch.ops.flocora.sparse_decode_add_.default, (outs, index, values, c))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_global_scope(device):
    # The fake kernel gives the value and index sizes as unbacked symbols.
    xs = [torch.randn(40, device=device), torch.randn(150, device=device).to(torch.bfloat16)]
    torch.library.opcheck(torch.ops.flocora.topk_encode.default, (xs, [30], True))


def test_empty_list():
    for ks, gs in [([], False), ([0], True)]:
        counts, values, index = ops.topk_encode([], ks, global_scope=gs)
        assert counts.numel() == values.numel() == index.numel() == 0
    with pytest.raises(RuntimeError, match="no tensors"):
        ops.topk_encode([], [1], global_scope=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_random_bit_patterns(device, dtype, cpu_isa):
    # Every finite value of the dtype can occur: subnormals, huge magnitudes,
    # +-0; the keys must order them exactly like |x|.
    g = torch.Generator().manual_seed(17)
    for n in [3000, CHUNK + 3000]:
        if dtype == torch.float32:
            raw = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32)
        else:
            raw = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int64, generator=g).to(torch.int16)
        x = raw.view(dtype)
        x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))
        x[:50] = x[50:100]  # exact ties
        for k in [1, n // 100, n // 2]:
            _check([x], [k], device=device)
        _check([x, x[:777]], [n // 3], True, device)
