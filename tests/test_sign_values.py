"""Sign-and-mean top-k values (STC's ternary code, format version 2):
against the pure-PyTorch reference, the version rules, hostile metadata."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flocora_codec as fc
from flocora_codec import format as fmt
from flocora_codec import reference as ref
from tests.conftest import REFERENCE_BACKEND


def reseal(data: bytearray) -> bytes:
    fmt.CHECKSUM.pack_into(data, len(data) - 4, fmt.crc32c(memoryview(data)[:-4]))
    return bytes(data)


def expected(xs: dict, spec: fc.CodecSpec) -> dict:
    """What decode must return, from the reference top-k and sign-mean code alone."""
    names = list(xs)
    flats = [xs[n].reshape(-1).float() for n in names]
    if spec.topk_scope == "global":
        total = sum(f.numel() for f in flats)
        k = min(total, max(1, int(spec.density * total + 0.5))) if total else 0
        idx, vals = ref.topk_select(flats, [k], global_scope=True)
    else:
        ks = [min(f.numel(), max(1, int(spec.density * f.numel() + 0.5))) if f.numel() else 0 for f in flats]
        idx, vals = ref.topk_select(flats, ks)
    meta = torch.float16 if spec.meta_dtype == "float16" else torch.float32
    out = {}
    for n, f, i, v in zip(names, flats, idx, vals):
        dense = torch.zeros(f.numel())
        if len(i):
            mu, packed = ref.sign_mean_encode(v, meta)
            dense[i] = ref.sign_mean_decode(mu, packed, len(i))
        out[n] = dense.reshape(xs[n].shape).to(xs[n].dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    density=st.floats(0.01, 1.0),
    scope=st.sampled_from(["tensor", "global"]),
    meta=st.sampled_from(["float32", "float16"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_decode_equals_reference(sizes, density, scope, meta, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = {f"t{i}": (torch.randn(n, generator=g) * 3).to(dtype) for i, n in enumerate(sizes)}
    spec = fc.CodecSpec(density=density, values="sign", topk_scope=scope, meta_dtype=meta, rules=())
    data = fc.encode(xs, spec)
    out = fc.decode(data)
    want = expected(xs, spec)
    for n in xs:
        assert out[n].dtype == xs[n].dtype and out[n].shape == xs[n].shape
        # positions, signs and mu exactly (the reference sums magnitudes in the kernel's order)
        assert torch.equal(out[n], want[n]), n
        kept = want[n] != 0
        # ternary: one magnitude per tensor
        assert out[n][kept].abs().unique().numel() <= 1
    assert struct.unpack_from("<H", data, 4)[0] == 2


def _sign_section_cases():
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-40, 40, (3000,), generator=g).float())
    wide[::97] = -0.0
    wide[5::101] = 0.0
    wide[7::89] = 3e38
    wide[9::83] = 1e-45  # subnormal
    tails = list(range(0, 40)) + [255, 256, 257]
    return [
        (wide[: sum(tails)], tails),
        (wide[:2000], [2000]),
        (wide[:1000], [0, 0, 333, 0, 667]),
        (wide[:0], []),
        (wide[:0], [0, 0]),
    ]


@pytest.mark.skipif(REFERENCE_BACKEND, reason="kernel against the reference")
@pytest.mark.parametrize("case", range(5))
def test_sign_sections_match_the_reference(case, cpu_isa):
    """Means bit for bit (values over 80 octaves: another order of additions
    rounds differently) and sign streams byte for byte, every tail length."""
    values, counts = _sign_section_cases()[case]
    means, signs = fc.ops.sign_sections(values, counts)
    want_means, want_signs = ref.sign_sections(values, counts)
    assert means.dtype == torch.float64 and signs.dtype == torch.uint8
    assert torch.equal(means, want_means) and torch.equal(signs, want_signs)
    assert means.numel() == sum(c > 0 for c in counts)
    assert signs.numel() == sum((c + 7) // 8 for c in counts)
    if case == 0:  # the order matters for these values: a plain running sum differs somewhere
        running = [sum(p.abs().double().tolist()) / len(p) for p in torch.split(values, counts) if len(p)]
        assert running != means.tolist()


@pytest.mark.skipif(REFERENCE_BACKEND, reason="the kernel's argument checks")
def test_sign_sections_refuse_counts_that_do_not_add_up():
    with pytest.raises(RuntimeError, match="add up"):
        fc.ops.sign_sections(torch.ones(10), [4, 5])
    with pytest.raises(RuntimeError, match="add up"):
        fc.ops.sign_sections(torch.ones(10), [4, 7])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.flocora._sign_sections(torch.ones(10, dtype=torch.float64), [10])


def test_each_kept_value_is_plus_or_minus_the_mean_magnitude():
    x = torch.tensor([0.5, -4.0, 0.1, 3.0, -0.0, 2.0, -1.0, 0.0])
    out = fc.decode(fc.encode({"x": x}, fc.CodecSpec(k=4, values="sign", rules=())))["x"]
    mu = (4.0 + 3.0 + 2.0 + 1.0) / 4
    assert out.tolist() == [0.0, -mu, 0.0, mu, 0.0, mu, -mu, 0.0]


def test_bytes_are_one_mean_and_one_bit_per_kept_value():
    x = {"w": torch.randn(64, 50)}
    data = fc.encode(x, fc.CodecSpec(k=100, values="sign", meta_dtype="float16"))
    (t,) = fc.message_info(data).tensors
    assert (t.metadata_bytes, t.payload_bytes, t.values, t.count) == (2, 13, "sign", 100)
    assert t.index_bytes == fc.ops.index_nbytes(3200, 100)


def test_messages_without_sign_values_stay_version_1():
    x = {"w": torch.randn(8, 8)}
    for spec in (fc.CodecSpec(bits=4), fc.CodecSpec(density=0.2), fc.CodecSpec(density=0.2, values="quantized")):
        assert struct.unpack_from("<H", fc.encode(x, spec), 4)[0] == 1


def _sign_message():
    data = fc.encode({"w": torch.arange(1.0, 41.0).reshape(5, 8)}, fc.CodecSpec(k=5, values="sign", rules=()))
    pm = fmt.parse(data)
    return bytearray(data), pm.entries[0]


def test_version_1_message_with_sign_values_is_rejected():
    data, _ = _sign_message()
    struct.pack_into("<H", data, 4, 1)
    with pytest.raises(fc.FormatError, match="sign values need version 2"):
        fc.decode(reseal(data))


@pytest.mark.parametrize(
    "mu, why",
    [
        (-1.0, "negative"),
        (-0.0, "negative zero"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        (3e38, "2 mu overflows"),
    ],
)
def test_impossible_mean_magnitudes_are_rejected(mu, why):
    data, e = _sign_message()
    struct.pack_into("<f", data, e.offset, mu)
    with pytest.raises(fc.FormatError, match="mean magnitude"):
        fc.decode(reseal(data))


def test_nonzero_padding_bits_are_rejected():
    data, e = _sign_message()
    data[e.end - 1] |= 0x80  # 5 kept values: bits 5..7 of the byte are padding
    with pytest.raises(fc.FormatError, match="padding"):
        fc.decode(reseal(data))


@pytest.mark.parametrize("field, value", [(1, 2), (2, 2), (4, 1), (5, 0), (0, 1)])
def test_invalid_sign_records_are_rejected(field, value):
    # bits must be 1, granularity tensor, rounding nearest, meta_dtype defined, codec top-k
    data, _ = _sign_message()
    data[fmt.PREAMBLE_SIZE + field] = value
    with pytest.raises(fc.FormatError):
        fc.decode(reseal(data))


def test_k_zero_and_empty_tensors():
    xs = {"a": torch.randn(10), "e": torch.empty(0, 3)}
    out = fc.decode(fc.encode(xs, fc.CodecSpec(k=0, values="sign", rules=())))
    assert torch.equal(out["a"], torch.zeros(10)) and out["e"].shape == (0, 3)


def test_non_finite_input_is_refused():
    with pytest.raises(ValueError):
        fc.encode({"a": torch.tensor([1.0, float("inf"), 2.0])}, fc.CodecSpec(k=2, values="sign", rules=()))


def test_error_feedback_with_sign_values_sends_everything_eventually():
    # EF + ternary: the running sum of what was sent tracks the running sum of the inputs
    g = torch.Generator().manual_seed(3)
    ef = fc.ErrorFeedback(fc.CodecSpec(density=0.05, values="sign", rules=()))
    sent = torch.zeros(400)
    total = torch.zeros(400)
    for _ in range(200):
        x = torch.randn(400, generator=g) * 0.01
        total += x
        sent += fc.decode(ef.encode({"x": x}))["x"]
    residual = ef.get_state()["x"]
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-4)


def test_mean_magnitude_beyond_the_tensor_dtype_is_rejected():
    data = bytearray(fc.encode({"h": torch.randn(40).half()}, fc.CodecSpec(k=5, values="sign", rules=())))
    e = fmt.parse(bytes(data)).entries[0]
    struct.pack_into("<f", data, e.offset, 1e6)  # finite in float32, not in float16
    with pytest.raises(fc.FormatError, match="finite as torch.float16"):
        fc.decode(reseal(data))
