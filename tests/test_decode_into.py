"""fc.decode_into: decoding into caller-owned tensors, against fc.decode."""

from __future__ import annotations

import warnings

import pytest
import torch

import flocora_codec as fc
from flocora_codec import ops
from tests.conftest import REFERENCE_BACKEND
from tests.test_format import refix_crc
from tests.test_hostile import affine_message


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1.lora_A": torch.randn(8, 70, generator=g),
        "layer1.lora_B": torch.randn(70, 8, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "norm.weight": torch.randn(24, generator=g),
        "half": torch.randn(6, 10, generator=g).half(),
        "bf": torch.randn(5, 33, generator=g).bfloat16(),
        "double": torch.randn(3, 50, generator=g).double(),
        "empty": torch.zeros(0, 4),
        "steps": torch.tensor(3),
        "mask": torch.tensor([True, False, True]),
    }


SPECS = [
    fc.CodecSpec(bits=4),
    fc.CodecSpec(bits=3, granularity="group", group_size=64),
    fc.CodecSpec(bits=2, granularity="group", group_size=8, meta_dtype="float16", rounding="stochastic", seed=3),
    fc.CodecSpec(bits=8, granularity="tensor", rules=()),
    fc.CodecSpec(density=0.2, values="sign", rules=()),
    fc.CodecSpec(density=0.3, topk_scope="global", values="bfloat16"),
    fc.CodecSpec(k=5, values="quantized", bits=3),
    fc.CodecSpec(density=0.1, values="float16"),
    fc.CodecSpec.raw(),
]


def clone_all(d):
    return {k: v.clone() for k, v in d.items()}


def assert_same(a, b):
    """Equal bits (so -0.0 differs from +0.0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        a, b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    assert torch.equal(a, b)


def targets_like(m, seed=7):
    """Targets with other (nonzero) contents, so that every write shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in m.items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
@pytest.mark.parametrize("mode", ["assign", "add"])
def test_decode_into_equals_decode(spec, mode, cpu_isa):
    m = model()
    data = fc.encode(m, spec)
    ref = fc.decode(data)
    tg = targets_like(m)
    before = clone_all(tg)
    ptrs = {k: v.data_ptr() for k, v in tg.items()}
    names = fc.decode_into(data, tg, mode=mode)
    assert names == list(ref)
    for k, v in tg.items():
        assert v.data_ptr() == ptrs[k]  # written in place
        want = ref[k] if mode == "assign" else before[k] + ref[k]
        assert_same(v, want)


@pytest.mark.parametrize("mode", ["assign", "add"])
def test_non_contiguous_targets_are_handled(mode):
    m = model()
    data = fc.encode(m, fc.CodecSpec(bits=4, granularity="group", group_size=8))
    sparse = fc.encode(m, fc.CodecSpec(density=0.2, rules=()))
    for msg in (data, sparse):
        ref = fc.decode(msg)
        tg = targets_like(m)
        # transposed storage, and a strided slice of a larger buffer
        tg["layer1.lora_A"] = torch.randn(70, 8).t()
        big = torch.randn(6, 20).half()
        big_before = big.clone()
        tg["half"] = big[:, ::2]
        assert not tg["layer1.lora_A"].is_contiguous() and not tg["half"].is_contiguous()
        before = clone_all(tg)
        fc.decode_into(msg, tg, mode=mode)
        for k in tg:
            want = ref[k] if mode == "assign" else before[k] + ref[k]
            assert_same(tg[k], want)
        assert torch.equal(big[:, 1::2], big_before[:, 1::2])  # the elements between are not the target's


def test_module_parameters_are_written_in_place():
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8))
    src = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    data = fc.encode(src, fc.CodecSpec(bits=8))
    w = net[0].weight
    fc.decode_into(data, net)
    assert net[0].weight is w and w.requires_grad
    ref = fc.decode(data)
    for k, v in net.state_dict().items():
        assert_same(v, ref[k])


def test_partial_messages_leave_the_other_targets_alone():
    m = model()
    data = fc.encode({k: m[k] for k in ("half", "norm.weight")}, fc.CodecSpec(bits=4))
    tg = targets_like(m)
    before = clone_all(tg)
    with pytest.raises(fc.ExpectationError):
        fc.decode_into(data, tg)
    assert fc.decode_into(data, tg, partial=True) == ["half", "norm.weight"]
    ref = fc.decode(data)
    for k in tg:
        assert_same(tg[k], ref[k] if k in ref else before[k])


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.update({"norm.weight": torch.zeros(25)}),  # shape
        lambda t: t.update({"half": t["half"].float()}),  # dtype
        lambda t: t.pop("steps"),  # a tensor the message holds and the targets lack
        lambda t: t.update({"extra": torch.zeros(3)}),  # a target the message lacks (partial=False)
    ],
)
def test_mismatched_targets_are_refused_before_any_write(change):
    m = model()
    data = fc.encode(m, fc.CodecSpec(bits=4))
    tg = targets_like(m)
    change(tg)
    before = clone_all(tg)
    with pytest.raises(fc.ExpectationError):
        fc.decode_into(data, tg)
    for k in tg:
        assert_same(tg[k], before[k])


def test_bad_arguments():
    m = model()
    data = fc.encode(m, fc.CodecSpec(bits=4))
    with pytest.raises(ValueError, match="mode"):
        fc.decode_into(data, targets_like(m), mode="sum")
    with pytest.raises(TypeError):
        fc.decode_into(data, [1, 2])
    tg = targets_like(m)
    tg["steps"] = 3
    with pytest.raises(TypeError):
        fc.decode_into(data, tg)


def test_overlapping_targets_are_refused_untouched():
    w = torch.randn(8, 16)
    data = fc.encode({"a": w, "b": w.clone()}, fc.CodecSpec(bits=4))
    shared = torch.zeros(8, 16)
    before = shared.clone()
    with pytest.raises(ValueError, match="overlap"):
        fc.decode_into(data, {"a": shared, "b": shared.view(8, 16)})
    assert torch.equal(shared, before)


def _sparse_and_affine_message():
    m = model()
    # affine and raw tensors around a top-k group: nothing may be written when the index code is bad
    spec = fc.CodecSpec(bits=4, rules=(fc.Rule("layer1.*", fc.CodecSpec(density=0.5)),))  # bitmap index codes
    return m, fc.encode(m, spec)


def _corrupt_index_code(data):
    info = fc.message_info(data)
    t = next(t for t in info.tensors if t.codec == "topk" and t.index_code == "bitmap")
    pos = t.offset + t.metadata_bytes  # the bitmap: setting one more bit breaks its count
    body = bytearray(data)
    for bit in range(8):
        if not body[pos] >> bit & 1:
            body[pos] |= 1 << bit
            break
    return refix_crc(bytes(body))


@pytest.mark.parametrize("mode", ["assign", "add"])
def test_a_bad_index_code_leaves_every_target_untouched(mode):
    m, data = _sparse_and_affine_message()
    bad = _corrupt_index_code(data)
    with pytest.raises(fc.FormatError):
        fc.decode(bad)
    tg = targets_like(m)
    before = clone_all(tg)
    with pytest.raises(fc.FormatError):
        fc.decode_into(bad, tg, mode=mode)
    for k in tg:
        assert_same(tg[k], before[k])


@pytest.mark.parametrize(
    "bad",
    [
        lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:],  # checksum
        lambda d: d[:-1],  # truncated
        lambda d: refix_crc(d[:6] + b"\x7f" + d[7:]),  # flags
    ],
)
def test_corrupt_messages_leave_every_target_untouched(bad):
    m, data = _sparse_and_affine_message()
    tg = targets_like(m)
    before = clone_all(tg)
    with pytest.raises(fc.CodecError):
        fc.decode_into(bad(data), tg)
    for k in tg:
        assert_same(tg[k], before[k])


@pytest.mark.parametrize("scale,offset", [(3e38, 0.0), (-1.0, 1.0), (float("nan"), 0.0)])
def test_affine_metadata_no_encoder_writes_leaves_the_target_untouched(scale, offset):
    tg = {"q": torch.full((5,), 7.0)}
    with pytest.raises(fc.FormatError):
        fc.decode_into(affine_message(scale, offset), tg)
    assert torch.equal(tg["q"], torch.full((5,), 7.0))


def test_compact_messages_need_their_schema():
    m = model()
    spec = fc.CodecSpec(bits=4, rules=(fc.Rule("layer1.*", fc.CodecSpec(density=0.2)),))
    schema = fc.Schema.build(m, spec)
    data = fc.encode(m, spec, schema=schema)
    tg = targets_like(m)
    before = clone_all(tg)
    with pytest.raises(fc.CodecError):
        fc.decode_into(data, tg)
    for k in tg:
        assert_same(tg[k], before[k])
    fc.decode_into(data, tg, schemas=schema)
    ref = fc.decode(data, schemas=[schema])
    for k in tg:
        assert_same(tg[k], ref[k])


def test_limits_still_apply():
    m = model()
    data = fc.encode(m, fc.CodecSpec(bits=4))
    with pytest.raises(fc.LimitError):
        fc.decode_into(data, targets_like(m), limits=fc.DecodeLimits(max_tensors=3))


@pytest.mark.skipif(REFERENCE_BACKEND, reason="kernel argument checks")
def test_kernel_ops_check_before_writing():
    x = torch.randn(100)
    packed, scales, offsets = ops.quantize_pack([x], 4, [10])
    out = torch.full((100,), 5.0)
    with pytest.raises(RuntimeError):  # sizes do not match the stream
        ops.unpack_dequantize_into_([torch.zeros(90)], packed, scales, offsets, 4, [10])
    with pytest.raises(RuntimeError):
        ops.unpack_dequantize_into_([out[:50], out[40:90]], packed, scales, offsets, 4, [10, 10])
    with pytest.raises(RuntimeError):
        ops.unpack_dequantize_into_([out.double()], packed, scales, offsets, 4, [10])
    assert torch.equal(out, torch.full((100,), 5.0))
    ops.unpack_dequantize_into_([out], packed, scales, offsets, 4, [10])
    assert torch.equal(out, ops.unpack_dequantize(packed, scales, offsets, 4, [100], [10]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_targets_go_through_decode():
    m = model()
    data = fc.encode(m, fc.CodecSpec(bits=4))
    tg = {k: v.cuda() for k, v in targets_like(m).items()}
    fc.decode_into(data, tg)
    ref = fc.decode(data, device="cuda")
    for k in tg:
        assert_same(tg[k], ref[k])


def test_disjoint_compares_memory_spans():
    x = torch.zeros(10, 8)
    assert ops.disjoint([x[:5], x[5:], torch.zeros(3)])
    assert not ops.disjoint([x[:6], x[5:]])
    assert not ops.disjoint([x, x.view(80)])
    assert ops.disjoint([x, x[:0], x[3:3]])  # empty tensors share nothing
    assert not ops.disjoint([x[:, :4], x[1]])  # a strided view spans from its first to its last element
    assert ops.disjoint([])


def test_copy_from_bytes_checks_every_range_before_writing():
    src = torch.arange(64, dtype=torch.uint8)
    a, b = torch.zeros(4, dtype=torch.float32), torch.zeros(3, dtype=torch.int16)
    ops.copy_from_bytes_([a, b], src, [0, 20])
    assert torch.equal(a.view(torch.uint8), src[:16]) and torch.equal(b.view(torch.uint8), src[20:26])
    a.zero_()
    with pytest.raises(RuntimeError, match="output 1 .6 bytes at 59. reaches past src .64 bytes."):
        ops.copy_from_bytes_([a, b], src, [0, 59])
    assert not a.any()  # the first range was fine, and still nothing was written
    with pytest.raises(RuntimeError, match="reaches past src"):
        ops.copy_from_bytes_([a], src, [-1])
    with pytest.raises(RuntimeError, match="output 0 must be a contiguous CPU tensor"):
        ops.copy_from_bytes_([torch.zeros(4, 2)[:, 0]], src, [0])
    with pytest.raises(RuntimeError, match="overlap"):
        ops.copy_from_bytes_([a, a[1:]], src, [0, 0])
    with pytest.raises(RuntimeError, match="2 offsets for 1 outputs"):
        ops.copy_from_bytes_([a], src, [0, 0])


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_copy_to_bytes_checks_every_range_before_writing(impl):
    copy = ops.copy_to_bytes_ if impl == "op" else ops._copy_to_bytes_reference
    if impl == "op" and ops.BACKEND == "reference":
        pytest.skip("reference backend")
    dst = torch.zeros(32, dtype=torch.uint8)
    a, b = torch.arange(4, dtype=torch.float32), torch.arange(3, dtype=torch.int16)
    copy(dst, [a, b], [1, 2, 0, 4, 0, 4, 10, 12, 1, 0, 28, 0])  # an empty range anywhere in bounds
    assert torch.equal(dst[:4], b.view(torch.uint8)[2:6]) and torch.equal(dst[10:22], a.view(torch.uint8)[4:])
    assert not dst[4:10].any() and not dst[22:].any()
    before = dst.clone()
    bad = [
        ([0, 0, 0, 4, 1, 0, 30, 6], "range 1 .6 bytes at 30. reaches past dst .32 bytes."),
        ([0, 0, 0, 4, 1, 2, 8, 6], "range 1 .6 bytes at 2. reaches past source 1 .6 bytes."),
        ([0, 0, 0, 4, 2, 0, 8, 1], "range 1 names source 2 of 2"),
        ([0, 0, 0, 8, 1, 0, 7, 2], "dst ranges overlap at byte 7"),
        ([0, 0, -1, 4], "reaches past dst"),
        ([0, 0, 0], "quadruples"),
    ]
    for ranges, message in bad:
        with pytest.raises(RuntimeError, match=message):
            copy(dst, [a, b], ranges)
        assert torch.equal(dst, before)  # nothing written, not even the valid first range
    with pytest.raises(RuntimeError, match="source 0 must be a contiguous CPU tensor"):
        copy(dst, [torch.zeros(4, 2)[:, 0]], [])
    with pytest.raises(RuntimeError, match="source 0 overlaps dst"):
        copy(dst, [dst[4:8]], [0, 0, 0, 4])
    with pytest.raises(RuntimeError, match="dst must be a contiguous uint8 CPU tensor"):
        copy(dst.view(torch.int8), [a], [])
    for ranges in (torch.tensor([0, 0, 0, 4], dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="ranges must be a contiguous 1-D int64 CPU tensor"):
            copy(dst, [a], ranges)
    copy(dst, [a], torch.tensor([0, 0, 0, 4]))  # as a tensor, the ranges an encode plan keeps
    assert torch.equal(dst[:4], a.view(torch.uint8)[:4])


def test_raw_tensors_come_straight_from_a_read_only_message():
    # bytes are read-only: the raw copy must neither warn nor write to them
    m = {"w": torch.randn(5, 7), "steps": torch.tensor(3), "ids": torch.arange(10)}
    data = fc.encode(m, fc.CodecSpec.raw())
    before = bytes(data)
    tg = {k: torch.zeros_like(v) for k, v in m.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.decode_into(data, tg)
        fc.decode_into(memoryview(bytearray(data))[0:], tg)
    assert data == before
    for k in m:
        assert_same(tg[k], m[k])


@pytest.mark.skipif(ops.BACKEND == "reference", reason="the compiled op's registration")
def test_byte_movers_opcheck():
    dst = torch.zeros(40, dtype=torch.uint8)
    srcs = [torch.arange(6, dtype=torch.float32), torch.arange(5, dtype=torch.int16)]
    ranges = torch.tensor([0, 4, 0, 20, 1, 0, 24, 10])
    torch.library.opcheck(torch.ops.flocora._copy_to_bytes_.default, (dst, srcs, ranges))
    outs = [torch.zeros(3), torch.zeros(2, dtype=torch.int16)]
    torch.library.opcheck(torch.ops.flocora._copy_from_bytes_.default, (outs, dst, [0, 12]))


def test_plan_layout_describes_strided_cpu_tensors_only():
    # Encode plans and decode_into check tensors against such a layout in one call.
    a, b = torch.zeros(2, 3), torch.zeros(4, dtype=torch.float16)
    layout = ops.plan_layout([a, b])
    assert layout is not None and ops.plan_layout_matches([a, b], layout)
    assert ops.plan_layout_matches([a.t().contiguous().t(), b], layout)  # other strides, same shape
    for other in ([b, a], [a], [a, b, b], [a, b.float()], [a.t(), b], [a.reshape(6), b], [a, b[:3]]):
        assert not ops.plan_layout_matches(other, layout)
    assert ops.plan_layout([]) is not None and ops.plan_layout_matches([], ops.plan_layout([]))
    assert ops.plan_layout([a, torch.zeros(2, device="meta")]) is None
    assert ops.plan_layout([a.to_sparse()]) is None
    assert not ops.plan_layout_matches([a.to_sparse(), b], layout)
