"""The Python codec API: round trips, error bounds, rules, grouping, golden bytes."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flocora_codec as fc
from flocora_codec import codec as codec_mod
from flocora_codec import format as fmt
from flocora_codec import ops
from flocora_codec import reference as R

GOLDEN = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ALL_RAW_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.complex64,
    torch.complex128,
]  # fmt: skip


def sample(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ---- expectations computed from the input alone ----------------------------------------
# Not from the message (its stored scales) nor from the encoder's helpers: an
# encoder that stores too large a step or groups wrongly must fail these.
def spec_group_size(granularity: str, group_size: int, shape: tuple, numel: int) -> int:
    """Elements per group by FORMAT.md 3.2's table."""
    if granularity == "group":
        return group_size
    if granularity == "row" and len(shape) >= 2 and shape[0] > 0:
        return numel // shape[0]  # one group per index of dimension 0
    return max(numel, 1)


def input_steps(flat: torch.Tensor, group: int, bits: int, meta_dtype: str) -> torch.Tensor:
    """Per element, the largest step its group may have: (max - min) / (2^b - 1)
    over its group of the input, widened only by the metadata rounding
    (float16: offset down by at most one float16 ulp, scale up by one)."""
    v = flat.detach().reshape(-1).double()
    gid = torch.arange(v.numel()) // group
    ng = int(gid[-1]) + 1
    lo = torch.full((ng,), float("inf"), dtype=torch.float64).scatter_reduce(0, gid, v, "amin")
    hi = torch.full((ng,), -float("inf"), dtype=torch.float64).scatter_reduce(0, gid, v, "amax")
    levels = 2**bits - 1
    if meta_dtype == "float16":
        ulp = torch.clamp(lo.abs() * 2**-10, min=2**-24)
        step = (hi - lo + ulp) / levels * (1 + 2**-10) + 2**-24
    else:
        step = (hi - lo) / levels * (1 + 2**-22)
    return step[gid]


def assert_within_steps(y, x, steps, rounding):
    """|y - x| <= step / 2 (nearest) or one step (stochastic), plus float32
    arithmetic in offset + q * scale and the rounding to the output dtype."""
    x64, y64 = x.detach().reshape(-1).double(), y.reshape(-1).double()
    bound = steps * (1.0 if rounding == "stochastic" else 0.5)
    slack = 4 * 2**-24 * (x64.abs() + steps * 256) + torch.finfo(y.dtype).eps * y64.abs() + 1e-30
    err = (y64 - x64).abs()
    assert bool((err <= bound + slack).all()), float((err - bound).max())


def expected_topk(flats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted kept indices of each tensor: the k largest |x| over the
    concatenation (one tensor for the per-tensor scope), ties to the lower
    position (tensor order first), by a stable sort of float32 magnitudes."""
    mags = torch.cat([f.detach().reshape(-1).float().abs() for f in flats]) if flats else torch.zeros(0)
    keep = torch.sort(-mags, stable=True).indices[:k]
    out, start = [], 0
    for f in flats:
        n = f.numel()
        out.append(torch.sort(keep[(keep >= start) & (keep < start + n)] - start).values)
        start += n
    return out


def message_indices(data: bytes, name: str) -> torch.Tensor:
    """The kept indices the message carries, by the pure-PyTorch reference decoder."""
    pm = fmt.parse(data)
    e = next(e for e in pm.entries if e.name == name)
    raw = torch.tensor(list(data[e.index_offset : e.index_offset + e.index_len]), dtype=torch.uint8)
    return R.decode_indices(raw, e.numel, e.count)


# ---- raw -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_RAW_DTYPES, ids=str)
def test_raw_round_trip_is_bit_exact(dtype):
    base = torch.arange(-7, 17, dtype=torch.float64).reshape(4, 6)
    x = (base > 0) if dtype == torch.bool else base.abs().to(dtype) if not dtype.is_signed else base.to(dtype)
    tensors = {"x": x, "scalar": x.flatten()[3].clone(), "empty": x[:0], "strided": x.t()}
    out = fc.decode(fc.encode(tensors, fc.CodecSpec.raw()))
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k


def test_raw_keeps_nan_and_inf_bits():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out = fc.decode(fc.encode({"x": x}, fc.CodecSpec.raw()))["x"]
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))


def test_non_float_and_1d_default_raw():
    tensors = {"w": sample((8, 16)), "b": sample(8), "s": torch.tensor(3.0), "i": torch.arange(12).reshape(3, 4)}
    info = fc.message_info(fc.encode(tensors, fc.CodecSpec(bits=2)))
    assert [t.codec for t in info.tensors] == ["affine", "raw", "raw", "raw"]
    info = fc.message_info(fc.encode(tensors, fc.CodecSpec(bits=2, rules=())))
    assert [t.codec for t in info.tensors] == ["affine", "affine", "affine", "raw"]


# ---- affine ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    bits=st.integers(1, 8),
    granularity=st.sampled_from(["tensor", "row", "group"]),
    group_size=st.sampled_from([8, 16, 64]),
    meta_dtype=st.sampled_from(["float32", "float16"]),
    dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_nearest_error_is_at_most_half_a_step(shape, bits, granularity, group_size, meta_dtype, dtype, magnitude, seed):
    x = sample(shape, dtype, seed, magnitude)
    spec = fc.CodecSpec(bits=bits, granularity=granularity, group_size=group_size, meta_dtype=meta_dtype, rules=())
    data = fc.encode({"x": x}, spec)
    y = fc.decode(data)["x"]
    assert y.dtype == dtype and y.shape == x.shape
    if x.numel() == 0:
        return
    g = spec_group_size(granularity, group_size, tuple(x.shape), x.numel())
    assert_within_steps(y, x, input_steps(x, g, bits, meta_dtype), "nearest")


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), granularity=st.sampled_from(["tensor", "row", "group"]), seed=st.integers(0, 1000))
def test_stochastic_error_is_below_one_step(bits, granularity, seed):
    x = sample((6, 40), seed=seed)
    spec = fc.CodecSpec(bits=bits, granularity=granularity, group_size=16, rounding="stochastic", seed=seed)
    data = fc.encode({"x": x}, spec)
    g = spec_group_size(granularity, 16, tuple(x.shape), x.numel())
    assert_within_steps(fc.decode(data)["x"], x, input_steps(x, g, bits, "float32"), "stochastic")


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.linspace(-1, 1, 64).reshape(4, 16)
    spec = fc.CodecSpec(bits=1, granularity="tensor", rounding="stochastic")
    a = fc.encode({"x": x}, spec.replace(seed=1))
    assert a == fc.encode({"x": x}, spec.replace(seed=1))  # deterministic
    assert a != fc.encode({"x": x}, spec.replace(seed=2))
    # the per-tensor seed mixes in the name: same data, other name, other codes
    renamed = fc.decode(fc.encode({"y": x}, spec.replace(seed=1)))["y"]
    assert not torch.equal(renamed, fc.decode(a)["x"])
    mean = torch.stack([fc.decode(fc.encode({"x": x}, spec.replace(seed=s)))["x"] for s in range(300)]).mean(0)
    assert float((mean - x).abs().max()) < 0.25  # 1-bit steps are 2.0 wide; 300 draws: sd <= 0.058


def test_constant_and_special_tensors():
    spec = fc.CodecSpec(bits=3, granularity="group", group_size=8, rules=())
    tensors = {
        "const": torch.full((5, 7), -2.25),
        "zeros": torch.zeros(3, 3),
        "one": torch.tensor([4.5]),
        "scalar": torch.tensor(0.125),
        "empty": torch.empty(0, 5),
        "noncontig": sample((6, 10))[:, ::3],
    }
    out = fc.decode(fc.encode(tensors, spec))
    for k in ("const", "zeros", "one", "scalar", "empty"):
        assert torch.equal(out[k], tensors[k]), k
    assert out["noncontig"].shape == (6, 4)
    direct = fc.decode(fc.encode({"noncontig": tensors["noncontig"].contiguous()}, spec))["noncontig"]
    assert torch.equal(out["noncontig"], direct)


def test_float64_is_quantized_through_float32():
    x = sample((4, 8)).double()
    out = fc.decode(fc.encode({"x": x}, fc.CodecSpec(bits=8)))["x"]
    assert out.dtype == torch.float64
    assert float((out - x).abs().max()) < float(x.max() - x.min()) / 255


def test_nan_input_names_the_tensor():
    x = sample((4, 8))
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="'bad'"):
        fc.encode({"good": sample((4, 8)), "bad": x}, fc.CodecSpec(bits=4))


def test_out_of_range_for_float16_is_refused():
    big = torch.linspace(0, 2e6, 32).reshape(4, 8)
    with pytest.raises(ValueError, match="metadata dtype"):  # scale 2e6/15 > 65504
        fc.encode({"big": big}, fc.CodecSpec(bits=4, granularity="tensor", meta_dtype="float16"))
    with pytest.raises(ValueError, match="'big'.*float16"):
        fc.encode({"ok": sample((4, 8)), "big": big}, fc.CodecSpec(k=3, values="float16"))
    # float32 metadata and values carry it
    assert float(fc.decode(fc.encode({"big": big}, fc.CodecSpec(k=3)))["big"].max()) == 2e6


def test_granularity_row_gives_one_group_per_output_channel():
    x = sample((5, 3, 2, 2))
    info = fc.message_info(fc.encode({"x": x}, fc.CodecSpec(bits=4, granularity="row")))
    t = info.tensors[0]
    assert t.group_size == 12 and t.metadata_bytes == 2 * 5 * 4 and t.payload_bytes == 30


# ---- sparse ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    density=st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.9, 1.0]),
    values=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 10_000),
)
def test_sparse_raw_values_are_exact(shape, density, values, seed):
    x = sample(shape, seed=seed)
    data = fc.encode({"x": x}, fc.CodecSpec(density=density, values=values, rules=()))
    y = fc.decode(data)["x"]
    t = fc.message_info(data).tensors[0]
    n = x.numel()
    assert t.count == min(n, max(1, int(density * n + 0.5)))
    kept = y != 0
    assert int(kept.sum()) == t.count  # randn has no zeros
    vdtype = getattr(torch, values)
    assert torch.equal(y[kept], x[kept].to(vdtype).float())
    if t.count < n:  # the kept ones are the largest |x|
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())
    assert t.index_code == ("bitmap" if ops.choose_index_code(n, t.count) == 0 else "elias-fano")


def test_sparse_k_count_and_zero():
    x = sample((10, 10))
    for k, expected in ((0, 0), (7, 7), (1000, 100)):
        data = fc.encode({"x": x}, fc.CodecSpec(k=k))
        assert fc.message_info(data).tensors[0].count == expected
        y = fc.decode(data)["x"]
        assert int((y != 0).sum()) == expected


def test_sparse_quantized_values():
    x = sample((16, 32), seed=3)
    spec = fc.CodecSpec(density=0.25, values="quantized", bits=8, granularity="group", group_size=16)
    data = fc.encode({"x": x}, spec)
    t = fc.message_info(data).tensors[0]
    assert (t.count, t.group_size, t.bits) == (128, 16, 8)
    y = fc.decode(data)["x"]
    kept = y != 0
    assert int(kept.sum()) <= 128
    vals = x.flatten()[torch.topk(x.abs().flatten(), 128).indices]
    step = (vals.max() - vals.min()) / 255
    assert float((y - x)[kept].abs().max()) <= float(step)  # per-group steps are smaller still
    # row on a values vector is stored as the canonical "tensor"
    data = fc.encode({"x": x}, spec.replace(granularity="row"))
    assert fc.message_info(data).tensors[0].granularity == "tensor"


def test_global_topk_selects_over_all_tensors():
    a, b = sample((8, 8), seed=1), sample((4, 16), seed=2) * 3
    spec = fc.CodecSpec(k=20, topk_scope="global", rules=())
    data = fc.encode({"a": a, "b": b}, spec)
    info = fc.message_info(data)
    assert sum(t.count for t in info.tensors) == 20
    out = fc.decode(data)
    both = torch.cat([a.flatten(), b.flatten()])
    dec = torch.cat([out["a"].flatten(), out["b"].flatten()])
    kept = dec != 0
    assert torch.equal(dec[kept], both[kept])
    assert float(both[kept].abs().min()) >= float(both[~kept].abs().max())


def test_global_topk_spans_mixed_dtypes_in_one_call(monkeypatch):
    calls = []
    real = ops.topk_encode

    def counting(xs, ks, **kw):
        calls.append((len(xs), list(ks)))
        return real(xs, ks, **kw)

    monkeypatch.setattr(ops, "topk_encode", counting)
    tensors = {"f": sample((10, 10)), "h": sample((5, 20), torch.float16, 1), "b": sample((4, 25), torch.bfloat16, 2)}
    data = fc.encode(tensors, fc.CodecSpec(density=0.1, topk_scope="global", rules=()))
    assert calls == [(3, [30])]
    assert sum(t.count for t in fc.message_info(data).tensors) == 30


def test_sparse_empty_tensor():
    out = fc.decode(fc.encode({"e": torch.empty(0, 3), "x": sample((2, 3))}, fc.CodecSpec(k=2, rules=())))
    assert out["e"].shape == (0, 3)
    assert int((out["x"] != 0).sum()) == 2


specs = st.builds(
    fc.CodecSpec,
    bits=st.one_of(st.none(), st.integers(1, 8)),
    granularity=st.sampled_from(["tensor", "row", "group"]),
    group_size=st.sampled_from([8, 32]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    seed=st.integers(0, 2**64 - 1),
    meta_dtype=st.sampled_from(["float32", "float16"]),
    k=st.one_of(st.none(), st.integers(0, 40)),
    topk_scope=st.sampled_from(["tensor", "global"]),
    values=st.sampled_from(["float32", "float16", "bfloat16", "sign"]),
    rules=st.sampled_from([(), (fc.Rule("*", "raw", max_ndim=1),), (fc.Rule("b*", "raw"),)]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs,
    quantize_values=st.booleans(),
    layout=st.lists(
        st.tuples(st.lists(st.integers(0, 7), max_size=3).map(tuple), st.sampled_from(FLOATS + (torch.int32,))),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 1000),
)
def test_any_spec_round_trips_consistently(spec, quantize_values, layout, seed):
    if quantize_values and spec.sparse and spec.bits is not None:
        spec = spec.replace(values="quantized")
    tensors = {}
    for j, (shape, dtype) in enumerate(layout):
        x = sample(shape, seed=seed + j) * 3
        tensors[f"{'ab'[j % 2]}{j}"] = x.to(torch.int32) if dtype == torch.int32 else x.to(dtype)
    data = fc.encode(tensors, spec)
    assert fc.encode(tensors, spec) == data  # deterministic, stochastic rounding included
    out = fc.decode(data)
    info = fc.message_info(data)
    assert list(out) == list(tensors) == [t.name for t in info.tensors]
    assert info.total_bytes == len(data) == (info.header_bytes + info.metadata_bytes + info.index_bytes
                                             + info.payload_bytes + 4)  # fmt: skip
    assert_topk_as_specified(data, tensors, out, spec)
    for t in info.tensors:
        x, y = tensors[t.name], out[t.name]
        assert y.dtype == x.dtype and y.shape == x.shape
        if t.codec == "raw":
            assert torch.equal(y, x)
        elif t.codec == "affine" and x.numel():
            g = spec_group_size(spec.granularity, spec.group_size, tuple(x.shape), x.numel())
            assert_within_steps(y, x, input_steps(x, g, spec.bits, spec.meta_dtype), spec.rounding)


def assert_topk_as_specified(data, tensors, out, spec):
    """Every top-k tensor keeps the positions expected_topk picks from the
    input (k per tensor, or one k over all top-k tensors for the global
    scope), zeros elsewhere, and its values as the value encoding says."""
    sparse = [t for t in fc.message_info(data).tensors if t.codec == "topk"]
    if not sparse:
        return
    if spec.topk_scope == "global":
        flats = [tensors[t.name] for t in sparse]
        k = min(spec.k, sum(f.numel() for f in flats))
        want_idx = dict(zip([t.name for t in sparse], expected_topk(flats, k)))
    else:
        want_idx = {t.name: expected_topk([tensors[t.name]], min(spec.k, tensors[t.name].numel()))[0] for t in sparse}
    for t in sparse:
        x, y = tensors[t.name], out[t.name]
        idx = message_indices(data, t.name)
        assert torch.equal(idx, want_idx[t.name]), t.name
        xf, yf = x.reshape(-1), y.reshape(-1)
        dropped = torch.ones(x.numel(), dtype=torch.bool)
        dropped[idx] = False
        assert bool((yf[dropped] == 0).all())
        v = xf[idx].float()  # the kept values, in index order
        if t.values in ("float32", "float16", "bfloat16"):  # exact in their dtype
            assert torch.equal(yf[idx], v.to(getattr(torch, t.values)).to(x.dtype))
        elif t.values == "quantized" and v.numel():  # the values vector, grouped as FORMAT.md 3.3 says
            g = spec.group_size if spec.granularity == "group" else v.numel()
            assert_within_steps(yf[idx], v, input_steps(v, g, spec.bits, spec.meta_dtype), spec.rounding)
        elif t.values == "sign" and v.numel():  # +-mean|v|: float64 sum, float32, then the meta dtype
            mu = (v.double().abs().sum() / v.numel()).float().to(getattr(torch, spec.meta_dtype)).float()
            assert torch.equal(yf[idx], torch.where(v >= 0, mu, -mu).to(x.dtype))


@pytest.mark.parametrize("values", ["float32", "float16", "bfloat16", "quantized", "sign"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("k", [1, 23, 500])
def test_topk_keeps_the_largest_and_codes_every_value_encoding(values, scope, k):
    # Few distinct magnitudes, so ties straddle every threshold.
    g = torch.Generator().manual_seed(k)
    tensors = {
        "a": torch.randint(-4, 5, (12, 10), generator=g).float() * 0.75,
        "b": torch.randn(7, 9, generator=g).half(),
        "c": torch.randint(-3, 4, (5, 8), generator=g).bfloat16(),
    }
    spec = fc.CodecSpec(
        k=k,
        topk_scope=scope,
        values=values,
        bits=3,
        granularity="group",
        group_size=8,
        rounding="stochastic" if k == 23 else "nearest",
        meta_dtype="float16",
        rules=(),
    )
    data = fc.encode(tensors, spec)
    assert [t.codec for t in fc.message_info(data).tensors] == ["topk"] * 3
    assert_topk_as_specified(data, tensors, fc.decode(data), spec)


# ---- kernel failures that are not about the message -------------------------------------
_DECODE_CASES = [  # (kernel op the decoder calls, spec)
    ("unpack_dequantize", fc.CodecSpec(bits=4, rules=())),
    ("sparse_decode", fc.CodecSpec(density=0.2, rules=())),
    ("unpack_dequantize", fc.CodecSpec(density=0.2, values="quantized", bits=4, rules=())),
    ("unpack_dequantize", fc.CodecSpec(density=0.2, values="sign", rules=())),
]
_ENCODE_CASES = [
    ("quantize_pack", fc.CodecSpec(bits=4, rules=())),
    ("topk_encode", fc.CodecSpec(density=0.2, rules=())),
    ("quantize_pack", fc.CodecSpec(density=0.2, values="quantized", bits=4, rules=())),
]


@pytest.mark.parametrize(
    "make_exc",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
        lambda: RuntimeError("flocora::sparse_decode: internal error (simulated)"),
        lambda: MemoryError(),
    ],
)
def test_kernel_failures_surface_as_they_are(monkeypatch, make_exc):
    # Only the kernels' ValueError (a malformed index code; input that cannot
    # be encoded) is about the message. Anything else must reach the caller
    # unchanged: not reported as a corrupt message (FormatError) or bad input.
    tensors = {"w": sample((16, 8), seed=1), "v": sample((40,), seed=2)}
    for op, spec in _DECODE_CASES + _ENCODE_CASES:
        exc = make_exc()
        data = fc.encode(tensors, spec)

        def fail(*args, **kwargs):
            raise exc

        with monkeypatch.context() as m:
            m.setattr(ops, op, fail)
            with pytest.raises(type(exc)) as info:
                if (op, spec) in _DECODE_CASES:
                    fc.decode(data)
                else:
                    fc.encode(tensors, spec)
        assert info.value is exc, (op, spec)


def test_malformed_index_code_is_a_format_error():
    # The kernel's ValueError for a bad index code becomes FormatError, with it as the cause.
    x = torch.zeros(16, 64)
    x[3, 5], x[9, 60] = 2.0, -3.0
    data = bytearray(fc.encode({"x": x}, fc.CodecSpec(k=2, rules=())))
    pm = fmt.parse(bytes(data))
    e = pm.entries[0]
    data[e.index_offset + e.index_len - 1] |= 0x80  # a padding bit of the Elias-Fano high part
    body = bytes(data[:-4])
    data = body + struct.pack("<I", fmt.crc32c(body))  # the checksum recomputed: the kernel must catch it
    with pytest.raises(fc.FormatError, match="sparse_decode rejected the index codes of \\['x'\\]") as info:
        fc.decode(data)
    assert type(info.value.__cause__) is ValueError
    assert "padding bits" in str(info.value.__cause__)


# ---- spec, rules, grouping -----------------------------------------------------------------
def test_spec_validation_messages():
    for kw, msg in [
        (dict(bits=0), "bits"),
        (dict(bits=True), "bits"),
        (dict(group_size=24), "power of two"),
        (dict(group_size=4), "power of two"),
        (dict(density=1.5), "density"),
        (dict(density=0.0), "density"),
        (dict(k=-1), "k must"),
        (dict(k=2, density=0.5), "not both"),
        (dict(rounding="up"), "rounding"),
        (dict(meta_dtype="bfloat16"), "meta_dtype"),
        (dict(values="int8"), "values"),
        (dict(topk_scope="layer"), "topk_scope"),
        (dict(bits=None, values="quantized", k=3), "quantized"),
        (dict(rules=("*",)), "Rule"),
        (dict(seed=1.5), "seed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fc.CodecSpec(**kw)
    with pytest.raises(ValueError, match="max_ndim"):
        fc.Rule("*", "raw", max_ndim=-1)
    with pytest.raises(ValueError, match="spec"):
        fc.Rule("*", "int8")
    assert fc.CodecSpec(meta_dtype=torch.float16).meta_dtype == "float16"


def test_rules_first_match_wins():
    spec = fc.CodecSpec(
        bits=4,
        rules=(
            fc.Rule("*.lora_B", fc.CodecSpec(bits=8, granularity="tensor")),
            fc.Rule("*.lora_*", "raw"),
            fc.Rule("*", "raw", max_ndim=1),
        ),
    )
    tensors = {"l.lora_A": sample((4, 8)), "l.lora_B": sample((8, 4)), "fc.w": sample((4, 4)), "fc.b": sample(4)}
    info = {t.name: t for t in fc.message_info(fc.encode(tensors, spec)).tensors}
    assert info["l.lora_A"].codec == "raw"
    assert (info["l.lora_B"].bits, info["l.lora_B"].granularity) == (8, "tensor")
    assert (info["fc.w"].bits, info["fc.w"].granularity) == (4, "row")
    assert info["fc.b"].codec == "raw"


def test_one_kernel_call_per_codec_group(monkeypatch):
    calls = []
    real = ops.quantize_pack

    def counting(xs, *a, **kw):
        calls.append(len(xs))
        return real(xs, *a, **kw)

    monkeypatch.setattr(ops, "quantize_pack", counting)
    tensors = {f"l{i}.lora_A": sample((4, 16), seed=i) for i in range(6)}
    tensors.update({f"l{i}.lora_B": sample((16, 4), seed=10 + i) for i in range(6)})
    fc.encode(tensors, fc.CodecSpec(bits=4))
    assert calls == [12]
    calls.clear()
    spec = fc.CodecSpec(bits=4, rules=(fc.Rule("*.lora_B", fc.CodecSpec(bits=2)),))
    fc.encode(tensors, spec)
    assert sorted(calls) == [6, 6]


def test_decode_groups_kernel_calls(monkeypatch):
    calls = []
    real = ops.unpack_dequantize

    def counting(packed, scales, offsets, bits, numels, *a, **kw):
        calls.append(len(numels))
        return real(packed, scales, offsets, bits, numels, *a, **kw)

    tensors = {f"t{i}": sample((3, 8), seed=i) for i in range(5)}
    data = fc.encode(tensors, fc.CodecSpec(bits=3))
    monkeypatch.setattr(ops, "unpack_dequantize", counting)
    fc.decode(data)
    assert calls == [5]


def test_mixed_dtypes_share_a_record_and_decode_back():
    tensors = {"a": sample((4, 8)), "h": sample((4, 8), torch.float16), "b": sample((4, 8), torch.bfloat16)}
    data = fc.encode(tensors, fc.CodecSpec(bits=8))
    assert fc.message_info(data).n_codecs == 1
    out = fc.decode(data)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype
        assert float((out[k].float() - v.float()).abs().max()) < 0.05


def test_encoding_is_deterministic_and_accepts_bytes_likes():
    tensors = {"w": sample((8, 8)), "b": sample(8)}
    spec = fc.CodecSpec(bits=3, granularity="group", group_size=8)
    a, b = fc.encode(tensors, spec), fc.encode(dict(tensors), spec)
    assert isinstance(a, bytes) and a == b
    ref = fc.decode(a)
    for form in (bytearray(a), memoryview(a), np.frombuffer(a, dtype=np.uint8)):
        out = fc.decode(form)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_encode_input_errors():
    with pytest.raises(TypeError, match="names must be str"):
        fc.encode({1: torch.zeros(2)})
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        fc.encode({"a": [1.0, 2.0]})
    with pytest.raises(TypeError, match="CodecSpec"):
        fc.encode({"a": torch.zeros(2)}, {"bits": 4})
    with pytest.raises(ValueError, match="layout"):
        fc.encode({"a": torch.zeros(3, 3).to_sparse()})


def test_decoded_tensors_are_independent_of_the_message():
    data = bytearray(fc.encode({"r": torch.arange(4.0)}, fc.CodecSpec.raw()))
    out = fc.decode(data)["r"]
    data[20:] = bytes(len(data) - 20)
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "spec", [fc.CodecSpec.raw(), fc.CodecSpec(), fc.CodecSpec(density=0.5)], ids=["raw", "4-bit", "top-50%"]
)
def test_decoded_tensors_of_every_shape_are_disjoint_contiguous_views(spec):
    # A group's tensors come out as views of one buffer (one as_strided each
    # where some tensor is not 1-D): shapes of every rank, empty dims
    # between full tensors, none overlapping another.
    g = torch.Generator().manual_seed(5)
    state = {
        "a": torch.randn(3, 4, generator=g),
        "s": torch.randn((), generator=g),
        "e": torch.empty(0, 3),
        "v": torch.randn(7, generator=g),
        "c": torch.randn(2, 3, 4, generator=g),
        "z": torch.empty(4, 0, 2),
        "b": torch.randn(5, 2, generator=g),
    }
    out = fc.decode(fc.encode(state, spec))
    assert list(out) == list(state)
    for name, t in out.items():
        assert t.shape == state[name].shape and t.is_contiguous(), name
        if spec.bits is None:
            assert torch.equal(t, state[name]), name
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out.values() if t.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    before = {k: t.clone() for k, t in out.items()}
    out["c"].fill_(7.0)
    assert all(torch.equal(out[k], before[k]) for k in out if k != "c")


@pytest.mark.skipif(ops.BACKEND != "compiled", reason="the compiled op")
def test_split_views_lays_tensors_over_flat_and_refuses_what_reaches_past_it():
    flat = torch.arange(20.0)
    layout = torch.tensor(
        [0, 2, 3, 4, 4, 1, 12, 0, 13, 1, 0, 1, 14, 2, 0, 3, 3, 1, 20, 2, 0, 5, 5, 1], dtype=torch.int64
    )
    a, s, e, z, tail = ops.split_views(flat, layout)
    assert torch.equal(a, flat[:12].view(3, 4)) and s.shape == () and s.item() == 12.0
    assert e.shape == (0,) and z.shape == (0, 3) and tail.shape == (0, 5)
    assert a.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    a.fill_(-1.0)  # the same memory, as a view's
    assert flat[:12].eq(-1.0).all() and flat[12] == 12.0
    for bad in (
        [18, 1, 3, 1],
        [0, 2, 5, 5, 5, 1],
        [20, 0],
        [-1, 1, 1, 1],
        [0, 1, -2, 1],
        [0, 1, 2, -1],
        [0, 3, 1],
        [0],
    ):
        with pytest.raises(RuntimeError, match="_split_views"):
            ops.split_views(flat, torch.tensor(bad, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="1-D contiguous"):
        ops.split_views(flat.view(4, 5), torch.tensor([0, 0], dtype=torch.int64))
    with pytest.raises(RuntimeError, match="int64 CPU"):
        ops.split_views(flat, torch.tensor([0, 0], dtype=torch.int32))


def test_requires_grad_input():
    w = sample((4, 8)).requires_grad_()
    out = fc.decode(fc.encode({"w": w}, fc.CodecSpec(bits=8)))["w"]
    assert not out.requires_grad


# ---- numpy --------------------------------------------------------------------------------
def test_numpy_variants():
    arrays = {
        "w": np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32),
        "f": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        "s": np.array(7, dtype=np.int32),
        "ro": np.arange(5, dtype=np.int16),
    }
    arrays["ro"].flags.writeable = False
    out = fc.decode_numpy(fc.encode_numpy(arrays, fc.CodecSpec.raw()))
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    bf = fc.encode({"b": torch.ones(2, 2, dtype=torch.bfloat16)}, fc.CodecSpec.raw())
    assert fc.decode_numpy(bf)["b"].dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        fc.encode_numpy({"o": np.array(["a", "b"])})


# ---- specs from configuration ------------------------------------------------------------
def test_codec_spec_from_dict():
    assert fc.CodecSpec.from_dict({}) == fc.CodecSpec()
    assert fc.CodecSpec.from_dict({"raw": True, "bits": 99}) == fc.CodecSpec.raw()  # raw wins, unchecked
    assert fc.CodecSpec.from_dict({"bits": None, "k": 3, "keep_1d_raw": False}) == fc.CodecSpec(
        bits=None, k=3, rules=()
    )
    assert fc.CodecSpec.from_dict({"keep_1d_raw": True}).rules == fc.CodecSpec().rules
    with pytest.raises(ValueError, match="unknown key 'bitz'"):
        fc.CodecSpec.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match="bits"):
        fc.CodecSpec.from_dict({"bits": 9})


# ---- error feedback ------------------------------------------------------------------------
def test_error_feedback_telescopes():
    x = sample((8, 32), seed=5)
    ef = fc.ErrorFeedback(fc.CodecSpec(bits=1, granularity="tensor"))
    total = torch.zeros_like(x)
    rounds = 20
    for _ in range(rounds):
        total += fc.decode(ef.encode({"x": x, "i": torch.arange(3)}))["x"]
    residual = ef.get_state()["x"]
    # sum of what was sent + what is still owed == what was meant to be sent
    assert float((total + residual - rounds * x).abs().max()) < 1e-4
    # and the mean sent is far closer to x than one 1-bit round is
    one = fc.decode(fc.encode({"x": x}, fc.CodecSpec(bits=1, granularity="tensor")))["x"]
    assert float((total / rounds - x).abs().mean()) < 0.3 * float((one - x).abs().mean())
    assert "i" not in ef.get_state()


def test_error_feedback_state():
    ef = fc.ErrorFeedback(fc.CodecSpec(k=2, rules=()))
    x = sample((3, 4))
    ef.encode({"x": x})
    state = ef.get_state()
    ef2 = fc.ErrorFeedback(fc.CodecSpec(k=2, rules=()))
    ef2.set_state(state)
    assert ef.encode({"x": x}) == ef2.encode({"x": x})
    ef.reset()
    assert ef.get_state() == {}
    with pytest.raises(TypeError):
        fc.ErrorFeedback("raw")
    with pytest.raises(ValueError, match="float"):
        ef2.set_state({"x": torch.arange(3)})


def test_error_feedback_drops_a_residual_of_another_shape_with_a_warning(caplog):
    # the documented behaviour (ErrorFeedback, "Mismatched residuals"), the Flower mod's as well
    spec = fc.CodecSpec(k=2, rules=())
    ef = fc.ErrorFeedback(spec)
    ef.encode({"x": sample((3, 4))})
    y = sample((4, 3), seed=3)
    with caplog.at_level("WARNING", logger="flocora_codec"):
        data = ef.encode({"x": y})
    assert "dropped the residual of 'x'" in caplog.text
    assert data == fc.encode({"x": y}, spec)  # encoded as if there were no residual
    assert ef.get_state()["x"].shape == (4, 3)


def test_error_feedback_residual_dtypes_and_steps():
    spec = fc.CodecSpec(bits=2, rules=(fc.Rule("raw.*", "raw"),))
    x = {"h": sample((4, 8)).half(), "d": sample((4, 8), seed=2).double(), "raw.w": sample((2, 3))}
    ef = fc.ErrorFeedback(spec)
    for _ in range(2):
        data = ef.encode(x)
    state = ef.get_state()
    assert state["h"].dtype == torch.float32 and state["d"].dtype == torch.float64
    assert "raw.w" not in state  # travelled exactly: no residual kept
    # encode() is compensate -> encode -> decode -> settle
    ef2 = fc.ErrorFeedback(spec)
    ef2.set_state({k: v.numpy() for k, v in fc.ErrorFeedback(spec).get_state().items()})
    for _ in range(2):
        to_send, targets = ef2.compensate(x)
        assert {k: v.dtype for k, v in to_send.items()} == {k: v.dtype for k, v in x.items()}
        data2 = fc.encode(to_send, spec)
        ef2.settle(targets, fc.decode(data2))
    assert data2 == data
    assert all(torch.equal(ef2.get_state()[k], v) for k, v in state.items())
    # a residual kept in another float dtype is converted
    ef2.set_state({"h": state["h"].half()})
    assert ef2.get_state()["h"].dtype == torch.float32


# ---- golden files -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(make_golden.CASES))
def test_golden_messages(case, cpu_isa):
    # cpu_isa (tests/conftest.py): once with the portable loops, once with AVX2.
    path = GOLDEN / f"{case}.flc"
    if not path.exists():
        pytest.fail(f"{path.name} missing: run tests/golden/make_golden.py {case}")
    data = path.read_bytes()
    with np.load(GOLDEN / "inputs.npz") as f:
        inputs = make_golden.to_tensors({k: f[k] for k in f.files})
    # the encoder still writes exactly the pinned bytes ...
    assert fc.encode(inputs, make_golden.CASES[case]) == data
    # ... and the decoder still reads them to the pinned values
    out = fc.decode(data)
    with np.load(GOLDEN / f"{case}.npz") as f:
        expected = make_golden.to_tensors({k: f[k] for k in f.files})
    assert list(out) == list(inputs)
    for k, v in expected.items():
        assert out[k].dtype == inputs[k].dtype and out[k].shape == inputs[k].shape, k
        assert torch.equal(out[k], v), k


def test_golden_preamble_version():
    # a message is written in the lowest version that defines what it holds
    for path in GOLDEN.glob("*.flc"):
        version = 3 if path.name.startswith("v3_") else 2 if path.name.startswith("v2_") else 1
        assert struct.unpack_from("<4sHH", path.read_bytes()) == (b"FLoC", version, 0), path.name


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


# Device tensors cross to and from the host in one staged copy per group
# (codec._host_bytes_many, _staged_to): every spec of these tests, mixed dtypes,
# empty, 0-d and strided tensors.
_STAGED_TENSORS = {
    "w": sample((16, 64)),
    "wt": sample((24, 40), seed=1).t(),
    "h": sample((8, 33), torch.float16, seed=2),
    "bf": sample((5, 64), torch.bfloat16, seed=3),
    "b": sample(16, seed=4),
    "odd": sample(7, seed=5),
    "i": torch.arange(5),
    "mask": torch.tensor([True, False, True]),
    "u8": torch.arange(3, dtype=torch.uint8),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}
_STAGED_SPECS = [
    fc.CodecSpec.raw(),
    fc.CodecSpec(bits=4),
    fc.CodecSpec(bits=3, granularity="group", group_size=64, meta_dtype="float16"),
    fc.CodecSpec(density=0.1, values="float16"),
    fc.CodecSpec(density=0.2, topk_scope="global"),
    fc.CodecSpec(density=0.1, values="quantized", bits=8),
    fc.CodecSpec(density=0.1, values="sign"),
]


@pytest.mark.parametrize("spec", _STAGED_SPECS, ids=range(len(_STAGED_SPECS)))
def test_device_staging_paths_give_the_same_bytes_and_tensors(monkeypatch, spec):
    # Run on CPU tensors by calling every tensor off the host: the message and
    # the decoded tensors must equal the ones of the plain CPU paths.
    codec_mod._ENCODE_PLANS.clear()
    want = fc.encode(_STAGED_TENSORS, spec)
    want_out = fc.decode(want)
    monkeypatch.setattr(codec_mod, "_off_host", lambda x: True)
    codec_mod._ENCODE_PLANS.clear()  # the first encode of a key takes the path device tensors take
    assert fc.encode(_STAGED_TENSORS, spec) == want
    got = fc.decode(want, device="cpu")
    assert list(got) == list(want_out)
    for name, t in got.items():
        assert t.dtype == want_out[name].dtype and t.shape == want_out[name].shape, name
        assert torch.equal(_bits(t), _bits(want_out[name])), name


def test_large_raw_device_tensors_go_straight_into_the_message(monkeypatch):
    # Raw device tensors above codec._STAGE_MAX_BYTES are copied one by one, not joined.
    tensors = {"big": sample(300_000, seed=7), "small": sample(10, seed=8), "big16": sample(600_001, torch.float16)}
    codec_mod._ENCODE_PLANS.clear()
    want = fc.encode(tensors, fc.CodecSpec.raw())
    joined = []
    real = codec_mod._host_bytes_many
    monkeypatch.setattr(codec_mod, "_host_bytes_many", lambda ts: joined.append([t.numel() for t in ts]) or real(ts))
    monkeypatch.setattr(codec_mod, "_off_host", lambda x: True)
    codec_mod._ENCODE_PLANS.clear()
    assert fc.encode(tensors, fc.CodecSpec.raw()) == want
    assert joined == [[10]]


def test_staged_copies_keep_bytes_dtypes_and_alignment(monkeypatch):
    monkeypatch.setattr(codec_mod, "_off_host", lambda x: True)
    ts = [torch.arange(5, dtype=torch.uint8), torch.randn(3), torch.zeros(0), torch.arange(4, dtype=torch.int64),
          torch.randn(2, 3, dtype=torch.float16), torch.tensor([True, False])]  # fmt: skip
    views = codec_mod._host_bytes_many(ts)
    assert [bytes(v) for v in views] == [_bits(t).numpy().tobytes() for t in ts]
    moved = codec_mod._staged_to(torch.device("cpu"), ts)
    for t, m in zip(ts, moved):
        assert m.dtype == t.dtype and m.shape == t.shape
        assert torch.equal(_bits(m), _bits(t))
        assert m.untyped_storage().data_ptr() == moved[0].untyped_storage().data_ptr()  # one copy for all
        assert m.storage_offset() * m.element_size() % 16 == 0  # every dtype view starts aligned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("spec", _STAGED_SPECS, ids=range(len(_STAGED_SPECS)))
def test_cuda_encode_matches_cpu_bytes(spec):
    codec_mod._ENCODE_PLANS.clear()
    cpu = fc.encode(_STAGED_TENSORS, spec)
    gpu = fc.encode({k: v.cuda() for k, v in _STAGED_TENSORS.items()}, spec)
    assert cpu == gpu
    want = fc.decode(cpu)
    out = fc.decode(cpu, device="cuda")
    for name, t in out.items():
        assert t.device.type == "cuda", name
        assert torch.equal(_bits(t), _bits(want[name])), name


def test_codec_module_exports():
    for name in ("encode", "decode", "encode_numpy", "decode_numpy", "message_info", "ErrorFeedback"):
        assert getattr(fc, name) is getattr(codec_mod, name)
    assert issubclass(fc.CodecError, ValueError)
    for err in (fc.FormatError, fc.ChecksumError, fc.UnsupportedVersionError, fc.LimitError):
        assert issubclass(err, fc.CodecError)


def test_encoder_refuses_what_the_default_decoder_would_reject():
    limits = fc.DecodeLimits()
    with pytest.raises(ValueError, match="max_name_bytes"):
        fc.encode({"x" * (limits.max_name_bytes + 1): torch.zeros(3)}, fc.CodecSpec.raw())
    with pytest.raises(ValueError, match="max_ndim"):
        fc.encode({"t": torch.zeros([1] * (limits.max_ndim + 1))}, fc.CodecSpec.raw())
    # at the limits, the default decoder reads it back
    name = "y" * limits.max_name_bytes
    out = fc.decode(fc.encode({name: torch.zeros([1] * limits.max_ndim)}, fc.CodecSpec.raw()))
    assert out[name].shape == (1,) * limits.max_ndim


# ---- encode plans: the second encode of a layout reuses the first's ------------------
def _plan_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 40, generator=g)
    return {
        "w": w.t(),  # non-contiguous
        "lora_B": torch.randn(40, 16, generator=g).requires_grad_(),
        "h": torch.randn(7, 9, generator=g).half(),
        "bf": torch.randn(3, 70, generator=g).bfloat16(),
        "d": torch.randn(5, 6, generator=g).double(),
        "bias": torch.randn(40, generator=g),
        "scalar": torch.tensor(2.5),
        "steps": torch.tensor([3, 4]),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize(
    "spec",
    [
        fc.CodecSpec(),
        fc.CodecSpec(bits=3, granularity="group", group_size=16, meta_dtype="float16"),
        fc.CodecSpec(bits=2, rounding="stochastic", seed=11, rules=()),
        fc.CodecSpec.raw(),  # non-contiguous, float64 and integer tensors copied as they are
    ],
)
def test_a_planned_encode_writes_the_bytes_of_a_fresh_one(spec):
    codec_mod._ENCODE_PLANS.clear()
    first = fc.encode(_plan_inputs(0), spec)
    assert codec_mod._ENCODE_PLANS  # remembered
    planned = [fc.encode(_plan_inputs(s), spec) for s in (0, 1)]
    codec_mod._ENCODE_PLANS.clear()
    fresh = [fc.encode(_plan_inputs(s), spec) for s in (0, 1)]
    assert planned == fresh and planned[0] == first
    # other seed, other plan; NaN input refused on the planned path as on the fresh one
    assert fc.encode(_plan_inputs(1), spec.replace(seed=5)) != planned[1] or spec.rounding != "stochastic"
    bad = _plan_inputs(2)
    bad["h"][0, 3] = float("nan")
    if spec == fc.CodecSpec.raw():  # raw tensors carry NaN as they are
        assert torch.isnan(fc.decode(fc.encode(bad, spec))["h"][0, 3])
        return
    with pytest.raises(ValueError, match="'h' has NaN"):
        fc.encode(bad, spec)


TOPK_PLAN_SPECS = [
    fc.CodecSpec(density=0.1),
    fc.CodecSpec(density=0.2, topk_scope="global", values="float16"),
    fc.CodecSpec(k=7, values="bfloat16"),
    fc.CodecSpec(density=0.3, values="quantized", bits=4, granularity="group", group_size=16),
    fc.CodecSpec(density=0.1, values="quantized", bits=8, rounding="stochastic", meta_dtype="float16"),
    fc.CodecSpec(density=0.02, values="quantized", bits=3, topk_scope="global"),  # some members keep nothing
    fc.CodecSpec(density=0.05, values="sign", topk_scope="global"),
    fc.CodecSpec(density=0.3, values="sign", meta_dtype="float16"),  # per tensor: the fixed layout
    fc.CodecSpec(
        bits=4, rules=(fc.Rule("lora_B", fc.CodecSpec(density=0.25, values="float16")), fc.Rule("*", "raw", max_ndim=1))
    ),
]


@pytest.mark.parametrize("spec", TOPK_PLAN_SPECS)
@pytest.mark.parametrize("compact", [False, True])
def test_a_planned_topk_encode_writes_the_bytes_of_a_fresh_one(spec, compact):
    """Top-k counts, index codes and section sizes change with the data (a
    global k splits differently each time): the plan rewrites them."""
    schema = fc.Schema.build(_plan_inputs(0), spec) if compact else None
    codec_mod._ENCODE_PLANS.clear()
    first = fc.encode(_plan_inputs(0), spec, schema=schema)
    assert codec_mod._ENCODE_PLANS  # remembered
    inputs = [_plan_inputs(s) for s in (0, 1, 2)]
    with torch.no_grad():
        inputs[2]["lora_B"][:20] = 0.0  # ties and a different split of a global k
    planned = [fc.encode(x, spec, schema=schema) for x in inputs]
    fresh = []
    for x in inputs:
        codec_mod._ENCODE_PLANS.clear()
        fresh.append(fc.encode(x, spec, schema=schema))
    assert planned == fresh and planned[0] == first
    assert len({len(m) for m in planned}) > 1 or spec.topk_scope == "tensor" or spec.values == "sign"
    schemas = {schema.id: schema} if compact else None
    for x, m in zip(inputs, planned):
        out = fc.decode(m, schemas=schemas)
        assert list(out) == list(x)
    bad = _plan_inputs(3)
    with torch.no_grad():
        bad["lora_B"][1, 2] = float("inf")
    fc.encode(_plan_inputs(3), spec, schema=schema)  # the plan is there
    with pytest.raises(ValueError, match="'lora_B' has NaN or Inf"):
        fc.encode(bad, spec, schema=schema)


def _layout_case(seed):
    """A random message layout for ops.topk_layout: fixed (affine or raw)
    tensors and top-k groups of every kind between them."""
    g = np.random.default_rng(seed)
    n_tensors = int(g.integers(1, 12))
    kinds = [(0, 2, 0, 0), (0, 4, 0, 0), (1, 4, 0, 0), (1, 2, 0, 0), (2, 4, 8, 0), (2, 2, 3, 16), (2, 4, 1, 64)]
    chosen = [kinds[i] for i in g.choice(len(kinds), size=int(g.integers(1, 4)), replace=False)]
    group_rows, src = [], 5  # sources 0-4: the fixed pieces'
    for kind in chosen:
        group_rows.append((*kind, src))
        src += (2, 3, 4)[kind[0]]
    pieces, members = [], []
    for t in range(n_tensors):
        if g.random() < 0.4:
            for _ in range(int(g.integers(1, 4))):
                pieces.append((t, int(g.integers(0, 5)), int(g.integers(0, 100)), int(g.integers(0, 50))))
        else:
            numel = int(g.integers(1, 5000))
            members.append((t, numel, int(g.integers(0, len(chosen)))))
    members.sort(key=lambda m: (m[2], m[0]))  # each group's members in message order
    counts = [int(g.integers(0, n + 1)) if g.random() < 0.8 else 0 for _, n, _ in members]
    positions = sorted(g.choice(10_000, size=len(members), replace=False).tolist()) if g.random() < 0.7 else []
    as_table = lambda rows, w: torch.tensor(rows, dtype=torch.int64).reshape(-1, w)
    return (as_table(pieces, 4), as_table(members, 3), torch.tensor(counts, dtype=torch.int64),
            as_table(group_rows, 5), torch.tensor(positions, dtype=torch.int64), n_tensors, 10_033, src)  # fmt: skip


@pytest.mark.skipif(ops.BACKEND == "reference", reason="kernel against the reference")
@pytest.mark.parametrize("seed", range(40))
def test_topk_layout_matches_the_reference(seed):
    args = _layout_case(seed)
    ranges, fields, end = ops.topk_layout(*args)
    want_ranges, want_fields, want_end = R.topk_layout(*args)
    assert end == want_end and torch.equal(fields, want_fields)
    assert torch.equal(ranges, want_ranges)
    quads = ranges.reshape(-1, 4)
    assert bool((quads[:, 3] > 0).all())  # empty pieces left out
    body = quads[quads[:, 0] != args[-1]]
    assert int(body[:, 3].sum()) == end - args[6]  # the body's pieces tile it
    spans = sorted(body[:, 2:].tolist())
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))


@pytest.mark.skipif(ops.BACKEND == "reference", reason="the kernel's argument checks")
def test_topk_layout_refuses_inconsistent_tables():
    pieces, members, counts, kinds, positions, n, header, src = _layout_case(3)
    one = torch.tensor([[0, 10, 0]], dtype=torch.int64)
    plain = torch.tensor([[0, 2, 0, 0, 0]], dtype=torch.int64)
    empty, none = torch.empty(0, 4, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    cases = [
        ((empty, one, torch.tensor([11]), plain, none, 1, 0, 1), "member 0 is out of range"),
        ((empty, one, torch.tensor([1]), plain, none, 0, 0, 1), "member 0 is out of range"),
        ((empty, one, torch.tensor([1, 2]), plain, none, 1, 0, 1), "one per member"),
        ((empty, one, torch.tensor([1]), torch.tensor([[3, 2, 0, 0, 0]]), none, 1, 0, 1),
         "bad kind row"),
        ((empty, one, torch.tensor([1]), torch.tensor([[2, 2, 9, 0, 0]]), none, 1, 0, 1),
         "bad quantized parameters"),
        ((empty, one, torch.tensor([1]), plain, torch.tensor([5]), 1, 20, 1), "outside the header"),
        ((torch.tensor([[2, 0, 0, 4]]), one, torch.tensor([1]), plain, none, 1, 0, 1),
         "piece 0 is out of range"),
        ((pieces.t(), members, counts, kinds, positions, n, header, src), "pieces must be"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.topk_layout(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    """The integer-bits finiteness check the top-k paths use, against torch.isfinite."""
    g = torch.Generator().manual_seed(0)
    for special in (float("inf"), float("-inf"), float("nan"), 1.0, -0.0, 65504.0, 3e38):
        for n in (1, 17, 1000):
            t = (torch.randn(n, generator=g) * 100).to(dtype)
            t[n // 2] = special
            assert codec_mod._all_finite(t) == bool(torch.isfinite(t).all())
            assert codec_mod._all_finite(t[::3]) == bool(torch.isfinite(t[::3]).all())  # non-contiguous
    assert codec_mod._all_finite(torch.empty(0, dtype=dtype))
    if dtype.itemsize == 2:  # every bit pattern
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        for piece in every.split(61):
            assert codec_mod._all_finite(piece) == bool(torch.isfinite(piece).all())


def test_a_plan_serves_only_the_dtypes_and_shapes_it_was_made_for():
    # Plans are found by spec and names, and checked against the message's
    # dtypes and shapes (one compiled call): any other layout under the same
    # names is encoded afresh, and what is not a tensor still gets its error.
    spec = fc.CodecSpec(density=0.25, values="float16", rules=(fc.Rule("*", "raw", max_ndim=1),))
    base = _plan_inputs(0)
    variants = {
        "shape": {**base, "lora_B": torch.randn(16, 40)},
        "rank": {**base, "lora_B": torch.randn(640)},
        "dtype": {**base, "lora_B": torch.randn(40, 16).half()},
        "raw dtype": {**base, "steps": torch.tensor([3.0, 4.0])},
        "noncontiguous": {**base, "lora_B": torch.randn(16, 40).t()},  # same shape: the plan serves it
    }
    for name, tensors in variants.items():
        codec_mod._ENCODE_PLANS.clear()
        fc.encode(base, spec)
        fc.encode(base, spec)  # the plan, remembered and used
        planned = fc.encode(tensors, spec)
        codec_mod._ENCODE_PLANS.clear()
        assert planned == fc.encode(tensors, spec), name
        assert [tuple(t.shape) for t in fc.decode(planned).values()] == [tuple(t.shape) for t in tensors.values()]
    codec_mod._ENCODE_PLANS.clear()
    fc.encode(base, spec)
    with pytest.raises(TypeError, match="'lora_B' is a list, not a torch.Tensor"):
        fc.encode({**base, "lora_B": [1.0, 2.0]}, spec)
    with pytest.raises(ValueError, match="layout"):
        fc.encode({**base, "lora_B": torch.randn(40, 16).to_sparse()}, spec)


def test_planned_topk_encodes_in_threads_write_their_own_bytes():
    """The plan is shared; each encode's top-k counts and sections are its own."""
    import threading

    spec = fc.CodecSpec(density=0.1, topk_scope="global", values="float16")
    inputs = [_plan_inputs(s) for s in range(6)]
    for x in inputs[::2]:
        with torch.no_grad():
            x["lora_B"].mul_(50.0)  # a different split of the global k
    codec_mod._ENCODE_PLANS.clear()
    want = []
    for x in inputs:
        codec_mod._ENCODE_PLANS.clear()
        want.append(fc.encode(x, spec))
    fc.encode(inputs[0], spec)  # the plan every thread shares
    wrong = []

    def work(t):
        for r in range(40):
            j = (t + r) % len(inputs)
            if fc.encode(inputs[j], spec) != want[j]:
                wrong.append(j)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sign_values_refuse_a_mean_magnitude_their_metadata_cannot_hold(scope):
    # mu = mean(|v|) of "b" is about 1e5: inf as float16 metadata. The
    # message must name "b", on the first encode and on the planned one.
    tensors = {"a": torch.randn(8, 16), "b": torch.full((8, 16), 1e5) * torch.sign(torch.randn(8, 16))}
    spec = fc.CodecSpec(density=0.5, values="sign", meta_dtype="float16", topk_scope=scope, rules=())
    codec_mod._ENCODE_PLANS.clear()
    for _ in range(2):
        with pytest.raises(ValueError, match="'b' has NaN/Inf or out-of-range values; sign values"):
            fc.encode(tensors, spec)
    ok = fc.decode(fc.encode(tensors, spec.replace(meta_dtype="float32")))
    kept = ok["b"].abs()[ok["b"] != 0]
    assert kept.numel() >= 64 and bool((kept == 1e5).all())
