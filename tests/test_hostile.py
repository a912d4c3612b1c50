"""Hostile messages with a valid checksum (docs/FORMAT.md 3.2, 3.3 and 4).

A CRC32C proves nothing about who wrote a message: anyone can re-seal one.
These tests build such messages by hand (the ``build`` helper of
test_format.py) and check that the decoder refuses every one that no encoder
could have written, and that a small message cannot make a receiver allocate
what its header merely claims.
"""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flocora_codec as fc
from flocora_codec import codec as codec_mod
from tests.test_format import RAW, build, refix_crc

F32_META, F16_META = 1, 2


def affine_message(scale, offset, *, bits=3, meta="<f", dtype_code=1, codes=None):
    """One affine tensor of 5 elements, tensor granularity (one group); the
    3-bit codes 5, 1, 7, 2, 0 of FORMAT.md 3.4, else all codes 0."""
    if codes is None:
        codes = b"\xcd\x05" if bits == 3 else bytes(-(-5 * bits // 8))
    codec = (1, bits, 0, 0, 0, F32_META if meta == "<f" else F16_META, 0, 0)
    m = struct.pack(meta, scale) + struct.pack(meta, offset)
    t = dict(name="q", dtype=dtype_code, shape=(5,), codec=0, lens=(len(m), 0, len(codes)))
    return build([codec], [t], m + codes)


# ---- 1. quantization metadata that no encoder writes -----------------------------
@pytest.mark.parametrize(
    "scale,offset,kw,why",
    [
        (3e38, 0.0, {}, "overflows float32"),  # 0 + 7 * 3e38 = inf: the example
        (1e38, 3e38, {"bits": 1}, "overflows float32"),  # 3e38 + 1e38
        (-0.0, 1.0, {}, "negative scale"),
        (-1.0, 1.0, {}, "negative scale"),
        (1.0, -0.0, {}, "offset -0.0"),
        (1e-40, 0.0, {}, "subnormal float32 scale"),
        (float("nan"), 0.0, {}, "non-finite"),
        (1.0, float("-inf"), {}, "non-finite"),
        # finite in float32, but a float16 tensor cannot hold the top value 60000 + 7 * 1000
        (1000.0, 60000.0, {"dtype_code": 2}, "finite range of torch.float16"),
        (1.0, -70000.0, {"dtype_code": 2}, "finite range of torch.float16"),
        (0.0, 3.398e38, {"dtype_code": 3}, "finite range of torch.bfloat16"),  # bfloat16 rounds it to inf
    ],
)
def test_affine_metadata_no_encoder_writes_is_refused(scale, offset, kw, why):
    with pytest.raises(fc.FormatError, match=why):
        fc.decode(affine_message(scale, offset, **kw))


@pytest.mark.parametrize(
    "scale,offset,kw",
    [
        (0.0, 5.0, {}),  # constant group
        (1.0, -3.0, {}),
        (1e37, -3e37, {}),  # top = -3e37 + 7e37: large but finite
        (2.0**-126, 0.0, {}),  # smallest normal scale
        (2.0**-20, 0.0, {"meta": "<e"}),  # float16 subnormal scales are what float16 rounding writes
        (4.0, 65000.0, {"dtype_code": 2, "bits": 1}),  # float16 top 65004 rounds to 65008: finite
    ],
)
def test_affine_metadata_an_encoder_may_write_decodes(scale, offset, kw):
    out = fc.decode(affine_message(scale, offset, **kw))["q"]
    assert bool(torch.isfinite(out).all())


# Values at the edges of every check: non-finite, signed zeros, negative,
# float32 subnormal and smallest normal, float16 and bfloat16 limits, tops
# that overflow float32 only at higher widths.
META_EDGES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-40, 2.0**-126, 2.0**-20, 1.0, 5.0,
              -3.0, 1000.0, 60000.0, 65000.0, 65504.0, -70000.0, 1e37, -3e37, 1e38, 3e38, 3.398e38, 3.4e38]  # fmt: skip


@pytest.mark.skipif(fc.ops.BACKEND != "compiled", reason="the compiled check against its Python formulations")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(st.sampled_from(META_EDGES), st.sampled_from(META_EDGES)), min_size=1, max_size=40),
    noise=st.lists(st.floats(-1e4, 1e4, width=32), max_size=40),
    bits=st.integers(1, 8),
    meta=st.sampled_from([torch.float32, torch.float16]),
    out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_compiled_metadata_check_agrees_with_its_python_formulations(pairs, noise, bits, meta, out_dtype):
    # Edge groups among ordinary ones (a positive scale with a noise offset), so that each check meets
    # groups that pass it and groups that break a later one.
    scales = [s for s, _ in pairs] + [abs(v) / 1e3 for v in noise]
    offsets = [o for _, o in pairs] + list(noise)
    s, o = torch.tensor(scales).to(meta), torch.tensor(offsets).to(meta)
    want = codec_mod._affine_meta_check_np(s, o, bits, out_dtype)
    assert codec_mod._affine_meta_check_torch(s, o, bits, out_dtype) == want
    assert fc.ops.affine_meta_check(s, o, bits, out_dtype) == want
    big_s, big_o = s.repeat(5000), o.repeat(5000)  # past one task of the op's threads
    assert fc.ops.affine_meta_check(big_s, big_o, bits, out_dtype) == want


def topk_raw_message(values: bytes, *, values_code=1, dtype_code=1):
    """Top-k of a 16-element tensor keeping indices 0 and 5 (bitmap)."""
    vsize = 4 if values_code == 1 else 2
    t = dict(name="s", dtype=dtype_code, shape=(16,), codec=0, count=2, code=0, lens=(0, 2, 2 * vsize))
    return build([(2, 0, 0, 0, 0, 0, values_code, 0)], [t], b"\x21\x00" + values, version=1)


def test_topk_raw_values_must_be_finite():
    ok = fc.decode(topk_raw_message(struct.pack("<2f", 1.5, -2.0)))["s"]
    assert ok[0] == 1.5 and ok[5] == -2.0 and int((ok != 0).sum()) == 2
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(fc.FormatError, match="not finite"):
            fc.decode(topk_raw_message(struct.pack("<2f", 1.0, bad)))
    # float32 values for a float16 tensor: 1e6 is finite as float32, inf as float16
    with pytest.raises(fc.FormatError, match="float16"):
        fc.decode(topk_raw_message(struct.pack("<2f", 1.0, 1e6), dtype_code=2))
    with pytest.raises(fc.FormatError, match="not finite"):
        fc.decode(topk_raw_message(struct.pack("<2e", 1.0, float("inf")), values_code=2))


def test_encoder_never_writes_what_the_decoder_refuses_at_the_dtype_edge():
    # Rounding the float16 scale up used to make the top code of this float16
    # tensor decode to inf. The encoder now refuses, naming the fix...
    x = torch.tensor([[-65504.0, 100.0, 65504.0]], dtype=torch.float16)
    with pytest.raises(ValueError, match="meta_dtype='float32'"):
        fc.encode({"x": x}, fc.CodecSpec(bits=4, granularity="tensor", meta_dtype="float16"))
    # ... and the suggested spec round-trips finite values.
    y = fc.decode(fc.encode({"x": x}, fc.CodecSpec(bits=4, granularity="tensor", meta_dtype="float32")))["x"]
    assert bool(torch.isfinite(y).all()) and y[0, 2] == 65504.0
    # bfloat16 sparse values would round 65504 up to 65536, inf as float16
    with pytest.raises(ValueError, match="beyond the range"):
        fc.encode({"x": x}, fc.CodecSpec(k=1, values="bfloat16", rules=()))


_SEED_TENSORS = {
    "a": torch.linspace(-3, 5, 96).reshape(8, 12),
    "h": (torch.linspace(-2, 2, 40) * 100).reshape(4, 10).half(),
    "b": torch.linspace(-1, 1, 64).reshape(8, 8).bfloat16(),
}
_SEED_SPECS = (
    fc.CodecSpec(bits=4, granularity="row", rules=()),
    fc.CodecSpec(bits=2, granularity="group", group_size=8, meta_dtype="float16", rules=()),
    fc.CodecSpec(density=0.3, values="quantized", bits=3, rules=()),
    fc.CodecSpec(density=0.3, values="float16", rules=()),
    fc.CodecSpec(density=0.3, values="sign", rules=()),
)
_SEEDS = [fc.encode(_SEED_TENSORS, s) for s in _SEED_SPECS]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_resealed_metadata_mutants_never_decode_to_non_finite(data):
    """Overwrite 1-4 bytes of the metadata/payload region with anything and
    re-seal the CRC: whatever still decodes holds only finite values (every
    tensor here is quantized or sparse, so none may carry NaN or Inf)."""
    msg = data.draw(st.sampled_from(_SEEDS))
    info = fc.message_info(msg)
    body = bytearray(msg[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(info.header_bytes, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    try:
        out = fc.decode(refix_crc(bytes(body) + b"\0\0\0\0"))
    except fc.CodecError:
        return
    for name, t in out.items():
        assert bool(torch.isfinite(t).all()), name


# ---- 2. bombs -------------------------------------------------------------------
def bomb(numel: int) -> bytes:
    """Top-k, k = 0, float32 values: Elias-Fano needs 0 index bytes for k = 0,
    so every section is legitimately empty, whatever the shape claims."""
    t = dict(name="w", dtype=1, shape=(numel,), codec=0, count=0, code=1, lens=(0, 0, 0))
    return build([(2, 0, 0, 0, 0, 0, 1, 0)], [t])


def test_the_74_byte_bomb_is_refused_by_the_default_limits():
    data = bomb(1 << 28)  # 1 GiB of float32 zeros
    assert len(data) == 74
    with pytest.raises(fc.LimitError, match="max_expansion"):
        fc.decode(data)
    with pytest.raises(fc.LimitError, match="max_expansion"):
        fc.decode(bomb((1 << 31) - 1))  # 8 GiB, within max_total_elements
    # the limit names itself and can be raised by a receiver that wants this
    small = bomb(1 << 12)
    assert fc.decode(small)["w"].count_nonzero() == 0
    with pytest.raises(fc.LimitError, match="max_expansion=10 "):
        fc.decode(small, limits=fc.DecodeLimits(max_expansion=10))
    # inspecting allocates nothing, so it describes the bomb instead of refusing it
    assert fc.message_info(data).tensors[0].shape == (1 << 28,)


def test_the_bomb_is_refused_by_a_receiver_that_expects_the_model(monkeypatch):
    model = {"w": torch.zeros(1000)}
    monkeypatch.setattr(codec_mod, "_decode_parsed", lambda *a: pytest.fail("allocated before refusing"))
    for data in (bomb(1 << 28), bomb(1000 + 1)):
        with pytest.raises(fc.ExpectationError, match=r"shape \(1000,\)"):
            fc.decode(data, expect=model)


def test_expect_accepts_the_model_and_refuses_everything_else():
    model = {"a": torch.randn(4, 8), "b": torch.randn(8).half()}
    data = fc.encode(model, fc.CodecSpec(bits=4))
    out = fc.decode(data, expect=model)
    assert list(out) == ["a", "b"] and out["b"].dtype == torch.float16
    assert list(fc.decode(data, expect={"b": ((8,), torch.float16), "a": ((4, 8), torch.float32)})) == ["a", "b"]
    assert list(fc.decode_numpy(data, expect={k: v.numpy() for k, v in model.items()})) == ["a", "b"]
    cases = [
        ({"a": model["a"]}, "holds 2 tensors; the receiver expects 1"),
        ({"a": model["a"], "c": model["b"]}, "'b' is not one the receiver expects"),
        ({"a": torch.randn(8, 4), "b": model["b"]},
         r"shape \(4, 8\); the receiver expects torch.float32 of shape \(8, 4\)"),
        ({"a": model["a"], "b": model["b"].float()}, "'b' is torch.float16"),
    ]  # fmt: skip
    for expect, match in cases:
        with pytest.raises(fc.ExpectationError, match=match):
            fc.decode(data, expect=expect)
    with pytest.raises(TypeError, match="expect"):
        fc.decode(data, expect=[("a", model["a"])])
    # a module stands for its state dict (as decode_into takes it)
    module = torch.nn.Module()
    module.register_buffer("a", torch.zeros(4, 8))
    module.register_buffer("b", torch.zeros(8, dtype=torch.float16))
    assert list(fc.decode(data, expect=module)) == ["a", "b"]
    assert list(fc.decode_numpy(data, expect=module)) == ["a", "b"]
    module.register_buffer("b", torch.zeros(9, dtype=torch.float16))
    with pytest.raises(fc.ExpectationError, match=r"shape \(9,\)"):
        fc.decode(data, expect=module)
    # a receiver that accepts a subset, in any dtype, still bounds every shape
    loose = {"a": ((4, 8), None), "b": ((8,), None), "c": ((3,), None)}
    assert list(fc.decode(data, expect=loose, partial=True)) == ["a", "b"]
    with pytest.raises(fc.ExpectationError, match="expects at most 1"):
        fc.decode(data, expect={"a": ((4, 8), None)}, partial=True)
    with pytest.raises(fc.ExpectationError, match=r"any dtype of shape \(9,\)"):
        fc.decode(data, expect={"a": ((4, 8), None), "b": ((9,), None)}, partial=True)


def test_expectation_error_is_a_codec_error():
    # callers that drop bad uploads with `except CodecError` keep working
    assert issubclass(fc.ExpectationError, fc.CodecError)


# ---- spec gaps closed (FORMAT.md 4) --------------------------------------------
@pytest.mark.parametrize("shape", [(6, 0), (2**63, 0), (0, 2**64 - 1)])
def test_each_dimension_is_checked_against_the_element_limit(shape):
    t = dict(name="z", dtype=1, shape=shape, codec=0, lens=(0, 0, 0))
    data = build([RAW], [t])
    with pytest.raises(fc.LimitError, match="dimension"):
        fc.decode(data, limits=fc.DecodeLimits(max_total_elements=5))
    if max(shape) <= 6:
        assert fc.decode(data)["z"].shape == shape  # empty, and fine under the default limit


def test_records_are_checked_one_by_one_in_table_order():
    # FORMAT.md 4 step 7: a format error in the first record comes before a
    # limit error in the second, since each record is checked as it is read.
    bad_dtype = dict(name="a", dtype=0, shape=(1,), codec=0, lens=(0, 0, 4))
    too_big = dict(name="b", dtype=1, shape=(10,), codec=0, lens=(0, 0, 40))
    limits = fc.DecodeLimits(max_total_elements=5)
    with pytest.raises(fc.FormatError, match="unknown dtype code 0"):
        fc.decode(build([RAW], [bad_dtype, too_big], bytes(44)), limits=limits)
    with pytest.raises(fc.LimitError, match="max_total_elements"):
        fc.decode(build([RAW], [too_big, bad_dtype], bytes(44)), limits=limits)


def test_sparse_scatter_never_writes_outside_its_output():
    """Index codes that decode past n are refused on every path, including the
    in-place ``sparse_decode_add_`` an accumulating server uses."""
    from flocora_codec import ops

    n, k = 20, 8  # k = 8 of 20: the bitmap (3 bytes) beats Elias-Fano (4)
    assert ops.choose_index_code(n, k) == 0
    bad = torch.tensor([0b0111_1111, 0, 0b1000_0000], dtype=torch.uint8)  # indices 0..6 and 23 >= n
    vals = torch.arange(1.0, 9.0)
    guard = torch.full((n + 16,), 7.0)
    with pytest.raises(ValueError, match="padding bits past the end of the bit stream are not zero"):
        ops.sparse_decode_add_([guard[:n]], bad, vals, [k])
    assert bool((guard == 7.0).all())  # nothing written, in or out of bounds
    with pytest.raises(ValueError, match="padding bits past the end of the bit stream are not zero"):
        ops.sparse_decode(bad, vals, [n], [k], torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sparse_scatter_is_bounded_even_under_graph_capture():
    """Under CUDA graph capture the host cannot read the validation flag
    before the scatter is launched: the kernel reads it and writes nothing."""
    from flocora_codec import ops

    n, k, dev = 20, 8, "cuda"
    bad = torch.tensor([0b0111_1111, 0, 0b1000_0000], dtype=torch.uint8, device=dev)  # index 23 >= n
    good = torch.tensor([0b1111_1111, 0, 0], dtype=torch.uint8, device=dev)  # indices 0..7
    vals = torch.arange(1.0, 9.0, device=dev)
    with pytest.raises(ValueError, match="padding bits past the end of the bit stream are not zero"):
        ops.sparse_decode_add_([torch.zeros(n, device=dev)], bad, vals, [k])
    guard = torch.full((n + 16,), 7.0, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_decode_add_([guard[:n]], bad, vals, [k])
    graph.replay()
    torch.cuda.synchronize()
    assert bool((guard == 7.0).all())  # nothing written, in or out of bounds
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_decode_add_([guard[:n]], good, vals, [k])
    graph.replay()
    torch.cuda.synchronize()
    assert guard[:8].tolist() == [8.0 + i for i in range(8)] and bool((guard[8:] == 7.0).all())
