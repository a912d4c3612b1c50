"""Wire format v1 (docs/FORMAT.md): byte layout and every conformance rule.

Messages here are built by hand with ``struct`` (``build`` below), not by the
encoder, so the decoder is checked against the document, not against itself.
"""

from __future__ import annotations

import struct

import crc32c
import numpy as np
import pytest
import torch

import flocora_codec as fc
from flocora_codec import format as fmt

PREAMBLE = "<4sHHHI"


def build(codecs, tensors, payload=b"", *, magic=b"FLoC", version=1, flags=0, n_codecs=None, n_tensors=None,
          trailer=None):  # fmt: skip
    """A message from parts; ``tensors``: dicts of name, dtype, shape, codec, [count, code], lens."""
    out = struct.pack(PREAMBLE, magic, version, flags,
                      len(codecs) if n_codecs is None else n_codecs,
                      len(tensors) if n_tensors is None else n_tensors)  # fmt: skip
    for c in codecs:
        out += bytes(c)
    for t in tensors:
        name = t["name"].encode() if isinstance(t["name"], str) else t["name"]
        out += struct.pack("<H", len(name)) + name
        out += struct.pack("<BB", t["dtype"], len(t["shape"]))
        out += struct.pack(f"<{len(t['shape'])}Q", *t["shape"])
        out += struct.pack("<H", t["codec"])
        if "count" in t:
            out += struct.pack("<QB", t["count"], t["code"])
        out += struct.pack("<QQQ", *t["lens"])
    out += payload
    return out + struct.pack("<I", crc32c.crc32c(out) if trailer is None else trailer)


RAW = (0, 0, 0, 0, 0, 0, 0, 0)
W = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5


def raw_message(**kw):
    t = dict(name="w", dtype=1, shape=(2, 3), codec=0, lens=(0, 0, 24))
    t.update(kw.pop("tensor", {}))
    return build([kw.pop("codec", RAW)], [t], kw.pop("payload", W.tobytes()), **kw)


def affine3_message(scale=1.0, offset=0.0, payload=b"\xcd\x05", meta="<f"):
    """The 3-bit example of FORMAT.md 3.4 with codes 5, 1, 7, 2, 0 (tensor granularity)."""
    codec = (1, 3, 0, 0, 0, 1 if meta == "<f" else 2, 0, 0)
    m = struct.pack(meta, scale) + struct.pack(meta, offset)
    t = dict(name="q", dtype=1, shape=(5,), codec=0, lens=(len(m), 0, 2))
    return build([codec], [t], m + payload)


def refix_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", crc32c.crc32c(data[:-4]))


# ---- layout, decoded independently of the encoder ------------------------------------
def test_hand_built_raw_message_decodes():
    out = fc.decode(raw_message())
    assert list(out) == ["w"]
    assert out["w"].dtype == torch.float32
    np.testing.assert_array_equal(out["w"].numpy(), W)


def test_hand_built_affine_message_decodes_the_doc_example():
    out = fc.decode(affine3_message())["q"]
    assert out.tolist() == [5.0, 1.0, 7.0, 2.0, 0.0]
    out = fc.decode(affine3_message(scale=0.5, offset=-1.0, meta="<e"))["q"]
    assert out.tolist() == [1.5, -0.5, 2.5, 0.0, -1.0]


def test_crc32c_check_value():
    # The standard check value quoted in FORMAT.md 2.5.
    assert fmt.crc32c(b"123456789") == 0xE3069283


# Sizes around the op's boundaries: one chain below 4 KiB, 8 chains of whole
# words above (and the bytes after them), a second thread from 256 KiB.
_CRC_SIZES = [0, 1, 7, 8, 9, 63, 4095, 4096, 4097, 4159, 65537, (256 << 10) - 1, 256 << 10, (256 << 10) + 1,
              (1 << 20) + 3, 3_000_017]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
def test_crc32c_op_matches_the_package(cpu_isa, threads):
    # The compiled CRC (parallel chains, threads, joined by multiplication
    # mod the polynomial; a byte table on the scalar build) against crc32c's.
    rng = np.random.default_rng(3)
    blob = rng.integers(0, 256, size=max(_CRC_SIZES) + 64, dtype=np.uint8).tobytes()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in _CRC_SIZES:
            for start in (0, 3):  # an unaligned start as well
                piece = memoryview(blob)[start : start + n]
                for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
                    assert fc.ops.crc32c(piece, value) == crc32c.crc32c(piece, value), (n, start, value)
        assert fc.ops.crc32c(bytearray(b"123456789")) == fmt.crc32c(b"123456789") == 0xE3069283
    finally:
        torch.set_num_threads(before)


def test_crc32c_of_large_messages_through_the_op():
    # Messages from 256 KiB on are checksummed by the op; the trailer is the
    # package's CRC, and a flipped byte still fails the check.
    data = fc.encode({"w": torch.randn(128, 1024)}, fc.CodecSpec.raw())
    assert len(data) > fmt._CRC_OP_MIN_BYTES
    assert struct.unpack("<I", data[-4:])[0] == crc32c.crc32c(data[:-4]) == fmt.crc32c(memoryview(data)[:-4])
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(fc.ChecksumError):
        fc.decode(bytes(bad))


def test_encoder_preamble_and_trailer():
    data = fc.encode({"a": torch.randn(4, 8), "b": torch.zeros(3)}, fc.CodecSpec(bits=4))
    magic, version, flags, n_codecs, n_tensors = struct.unpack_from(PREAMBLE, data)
    assert (magic, version, flags, n_codecs, n_tensors) == (b"FLoC", 1, 0, 2, 2)
    assert struct.unpack("<I", data[-4:])[0] == crc32c.crc32c(data[:-4])
    # codec table: the affine record, then the raw one (first appearance order)
    assert data[14:22] == bytes([1, 4, 1, 0, 0, 1, 0, 0])
    assert data[22:30] == bytes(RAW)


def test_empty_message():
    data = fc.encode({}, fc.CodecSpec())
    assert len(data) == 18
    assert fc.decode(data) == {}
    assert fc.message_info(data).total_bytes == 18


@pytest.mark.parametrize(
    "bits,codes,expected",
    [
        (3, [5, 1, 7, 2, 0], b"\xcd\x05"),
        (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], b"\x8d\x01"),
        (4, [3, 10, 15, 0, 7], b"\xa3\x0f\x07"),
    ],
)
def test_packed_bits_examples_of_the_doc(bits, codes, expected):
    x = torch.tensor(codes, dtype=torch.float32).reshape(1, -1)
    spec = fc.CodecSpec(bits=bits, granularity="tensor", rules=())
    data = fc.encode({"x": x}, spec)
    t = fc.message_info(data).tensors[0]
    assert t.metadata_bytes == 8 and t.payload_bytes == len(expected)
    meta = data[t.offset : t.offset + 8]
    assert struct.unpack("<ff", meta) == (1.0, 0.0)  # scale, then offset
    assert data[t.offset + 8 : t.offset + 8 + len(expected)] == expected
    assert fc.decode(data)["x"].flatten().tolist() == codes


def test_elias_fano_example_of_the_doc():
    x = torch.zeros(20)
    x[[2, 9, 17]] = torch.tensor([3.0, -4.0, 5.0])
    data = fc.encode({"x": x.reshape(4, 5)}, fc.CodecSpec(k=3, rules=()))
    t = fc.message_info(data).tensors[0]
    assert (t.count, t.index_code, t.index_bytes) == (3, "elias-fano", 2)
    assert data[t.offset : t.offset + 2] == b"\x16\x49"
    assert struct.unpack("<3f", data[t.offset + 2 : t.offset + 14]) == (3.0, -4.0, 5.0)
    assert torch.equal(fc.decode(data)["x"].flatten(), x)


def test_bitmap_example_of_the_doc():
    # 3 of 20 by bitmap: the doc's bytes 04 02 02, decoded by hand (a dense pick uses bitmap).
    codec = (2, 0, 0, 0, 0, 0, 1, 0)
    t = dict(name="s", dtype=1, shape=(20,), codec=0, count=3, code=0, lens=(0, 3, 12))
    data = build([codec], [t], b"\x04\x02\x02" + struct.pack("<3f", 1, 2, 3))
    # (n=20, k=3) selects Elias-Fano, so the bitmap is non-canonical and rejected:
    with pytest.raises(fc.FormatError, match="index code"):
        fc.decode(data)
    x = torch.zeros(20)
    x[[2, 9, 17]] = 1.0
    x[[0, 1, 3, 4, 5, 6, 7, 8, 10, 11]] = 0.5  # 13 kept of 20: the bitmap wins
    data = fc.encode({"x": x}, fc.CodecSpec(k=13, rules=()))
    t = fc.message_info(data).tensors[0]
    assert t.index_code == "bitmap"
    assert data[t.offset : t.offset + 3] == b"\xff\x0f\x02"  # indices 0-11 and 17


# ---- conformance: every rejection of FORMAT.md section 4 ----------------------------------
def test_short_and_bad_magic():
    with pytest.raises(fc.FormatError, match="shorter"):
        fc.decode(b"FLoC\x01\x00")
    with pytest.raises(fc.FormatError, match="magic"):
        fc.decode(raw_message(magic=b"PK\x03\x04"))
    with pytest.raises(fc.FormatError, match="bytes-like"):
        fc.decode(12345)


def test_unsupported_version_before_checksum():
    data = raw_message(version=4, trailer=0)
    with pytest.raises(fc.UnsupportedVersionError, match="version 4"):
        fc.decode(data)


def test_checksum():
    data = bytearray(raw_message())
    data[-10] ^= 0x40
    with pytest.raises(fc.ChecksumError):
        fc.decode(bytes(data))


def test_reserved_flags():
    with pytest.raises(fc.FormatError, match="reserved flag"):
        fc.decode(raw_message(flags=0x8000))


def test_message_limit():
    data = raw_message()
    with pytest.raises(fc.LimitError, match="max_message_bytes"):
        fc.decode(data, limits=fc.DecodeLimits(max_message_bytes=len(data) - 1))
    assert fc.decode(data, limits=fc.DecodeLimits(max_message_bytes=len(data)))


def test_huge_element_claim_is_refused_before_allocation():
    # 10**12 float32 elements claimed in a 60-byte message.
    big = dict(shape=(10**6, 10**6), lens=(0, 0, 4 * 10**12))
    with pytest.raises(fc.LimitError, match="max_total_elements"):
        fc.decode(raw_message(tensor=big, payload=b""))
    # The same through top-k with k = 0: Elias-Fano needs 0 index bytes, so the
    # sections are legitimately empty and only the element limit stands between
    # this message and a 4 TB allocation.
    t = dict(name="s", dtype=1, shape=(10**12,), codec=0, count=0, code=1, lens=(0, 0, 0))
    data = build([(2, 0, 0, 0, 0, 0, 1, 0)], [t])
    with pytest.raises(fc.LimitError):
        fc.decode(data)
    with pytest.raises(fc.LimitError):
        fc.message_info(data)


def test_limits_on_counts_names_ndim():
    with pytest.raises(fc.LimitError, match="max_tensors"):
        fc.decode(raw_message(n_tensors=10**9))
    with pytest.raises(fc.FormatError, match="truncated"):
        fc.decode(raw_message(n_tensors=1000))
    with pytest.raises(fc.LimitError, match="max_name_bytes"):
        fc.decode(raw_message(), limits=fc.DecodeLimits(max_name_bytes=0))
    with pytest.raises(fc.LimitError, match="max_ndim"):
        fc.decode(raw_message(), limits=fc.DecodeLimits(max_ndim=1))
    with pytest.raises(fc.LimitError, match="max_total_elements"):
        fc.decode(raw_message(), limits=fc.DecodeLimits(max_total_elements=5))
    with pytest.raises(ValueError, match="max_ndim"):
        fc.DecodeLimits(max_ndim=-1)


@pytest.mark.parametrize(
    "codec",
    [
        (3, 0, 0, 0, 0, 0, 0, 0),  # unknown codec id
        (0, 1, 0, 0, 0, 0, 0, 0),  # raw with bits
        (0, 0, 0, 0, 0, 0, 0, 1),  # raw with a scope
        (1, 0, 0, 0, 0, 1, 0, 0),  # affine without bits
        (1, 9, 0, 0, 0, 1, 0, 0),  # 9 bits
        (1, 4, 3, 0, 0, 1, 0, 0),  # unknown granularity
        (1, 4, 2, 2, 0, 1, 0, 0),  # group of 4
        (1, 4, 0, 6, 0, 1, 0, 0),  # group_log2 without group granularity
        (1, 4, 0, 0, 2, 1, 0, 0),  # unknown rounding
        (1, 4, 0, 0, 0, 3, 0, 0),  # bfloat16 metadata
        (1, 4, 0, 0, 0, 1, 1, 0),  # affine with a value encoding
        (2, 0, 0, 0, 0, 0, 4, 0),  # quantized values without bits
        (2, 4, 0, 0, 0, 1, 1, 0),  # bits with raw values
        (2, 4, 1, 0, 0, 1, 4, 0),  # row granularity on a values vector
        (2, 0, 0, 0, 0, 0, 5, 0),  # unknown value encoding
        (2, 0, 0, 0, 0, 0, 1, 2),  # unknown scope
    ],
)
def test_invalid_codec_records(codec):
    with pytest.raises(fc.FormatError, match="codec"):
        fc.decode(raw_message(codec=codec))


def test_codec_table_rules():
    t0 = dict(name="a", dtype=1, shape=(2,), codec=0, lens=(0, 0, 8))
    t1 = dict(name="b", dtype=1, shape=(2,), codec=1, lens=(0, 0, 8))
    assert fc.decode(build([RAW], [t0, dict(t1, codec=0)], bytes(16))).keys() == {"a", "b"}
    with pytest.raises(fc.FormatError, match="duplicate codec"):
        fc.decode(build([RAW, RAW], [t0, t1], bytes(16)))
    with pytest.raises(fc.FormatError, match="not used"):
        fc.decode(build([RAW, (1, 4, 0, 0, 0, 1, 0, 0)], [t0, dict(t1, codec=0)], bytes(16)))
    with pytest.raises(fc.FormatError, match="out of range"):
        fc.decode(build([RAW], [t0, t1], bytes(16)))


def test_tensor_record_rules():
    for bad in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ab\xe2\x82"):  # invalid, overlong, surrogate, cut
        with pytest.raises(fc.FormatError, match="UTF-8"):
            fc.decode(raw_message(tensor=dict(name=bad)))
    assert list(fc.decode(raw_message(tensor=dict(name="λ.w"))))[0] == "λ.w"
    with pytest.raises(fc.FormatError, match="unknown dtype"):
        fc.decode(raw_message(tensor=dict(dtype=0)))
    with pytest.raises(fc.FormatError, match="unknown dtype"):
        fc.decode(raw_message(tensor=dict(dtype=16)))
    t = dict(name="a", dtype=1, shape=(2,), codec=0, lens=(0, 0, 8))
    with pytest.raises(fc.FormatError, match="duplicate tensor name"):
        fc.decode(build([RAW], [t, t], bytes(16)))
    # affine on an integer dtype
    with pytest.raises(fc.FormatError, match="non-float"):
        fc.decode(build([(1, 8, 0, 0, 0, 1, 0, 0)], [dict(t, dtype=8, lens=(8, 0, 2))], bytes(10)))


@pytest.mark.parametrize("lens", [(0, 0, 23), (0, 0, 25), (1, 0, 23), (0, 4, 20), (0, 0, 2**64 - 1)])
def test_section_lengths_must_match(lens):
    with pytest.raises(fc.FormatError, match="section lengths"):
        fc.decode(raw_message(tensor=dict(lens=lens)))


def test_trailing_and_missing_bytes():
    with pytest.raises(fc.FormatError, match="trailing"):
        fc.decode(raw_message(payload=W.tobytes() + b"\x00"))
    with pytest.raises(fc.FormatError, match="missing"):
        fc.decode(raw_message(payload=W.tobytes()[:-1]))


def test_topk_count_and_index_code_checked():
    codec = (2, 0, 0, 0, 0, 0, 1, 0)
    t = dict(name="s", dtype=1, shape=(4,), codec=0, count=5, code=0, lens=(0, 1, 20))
    with pytest.raises(fc.FormatError, match="exceeds"):
        fc.decode(build([codec], [t], bytes(21)))
    # (n=4, k=1): bitmap 1 byte <= Elias-Fano 2 bytes, so code 1 is rejected
    t = dict(t, count=1, code=1, lens=(0, 1, 4))
    with pytest.raises(fc.FormatError, match="index code"):
        fc.decode(build([codec], [t], b"\x04" + struct.pack("<f", 1.0)))
    t = dict(t, code=0)
    out = fc.decode(build([codec], [t], b"\x04" + struct.pack("<f", 1.5)))["s"]
    assert out.tolist() == [0.0, 0.0, 1.5, 0.0]
    # two bits set for a count of one: the kernel's validation becomes a FormatError
    with pytest.raises(fc.FormatError):
        fc.decode(build([codec], [t], b"\x05" + struct.pack("<f", 1.5)))
    # a set padding bit past n = 4
    with pytest.raises(fc.FormatError):
        fc.decode(build([codec], [t], b"\x10" + struct.pack("<f", 1.5)))


def test_packed_padding_bits_must_be_zero():
    with pytest.raises(fc.FormatError, match="padding"):
        fc.decode(affine3_message(payload=b"\xcd\x85"))


@pytest.mark.parametrize("scale,offset", [(float("nan"), 0.0), (1.0, float("inf")), (-1.0, 0.0)])
def test_metadata_must_be_finite_and_scales_non_negative(scale, offset):
    with pytest.raises(fc.FormatError, match="scale"):
        fc.decode(affine3_message(scale=scale, offset=offset))


def test_bool_bytes_must_be_0_or_1():
    t = dict(name="m", dtype=10, shape=(3,), codec=0, lens=(0, 0, 3))
    assert fc.decode(build([RAW], [t], b"\x01\x00\x01"))["m"].tolist() == [True, False, True]
    with pytest.raises(fc.FormatError, match="bool"):
        fc.decode(build([RAW], [t], b"\x01\x02\x01"))


def test_truncated_tables():
    data = raw_message()
    for cut in range(15, len(data) - 4):
        with pytest.raises(fc.CodecError):
            fc.decode(refix_crc(data[:cut] + data[-4:]))


def test_message_info_byte_identity():
    tensors = {"a": torch.randn(16, 32), "b": torch.randn(16), "c": torch.randn(64, 8).half()}
    for spec in (fc.CodecSpec(), fc.CodecSpec.raw(), fc.CodecSpec(density=0.1, values="quantized", bits=4)):
        data = fc.encode(tensors, spec)
        info = fc.message_info(data)
        assert info.total_bytes == len(data)
        assert info.total_bytes == (info.header_bytes + info.metadata_bytes + info.index_bytes
                                    + info.payload_bytes + info.checksum_bytes)  # fmt: skip
        assert [t.name for t in info.tensors] == list(tensors)
        # sections are contiguous, in table order, right after the header
        pos = info.header_bytes
        for t in info.tensors:
            assert t.offset == pos
            pos += t.total_bytes
        assert pos == len(data) - 4


def test_version_2_worked_example_of_format_md():
    # FORMAT.md 3.3, sign-and-mean values: the message typed in from the document
    doc = """46 4c 6f 43 02 00 00 00 01 00 01 00 00 00 02 01 00 00 00 01 05 00
             01 00 78 01 01 08 00 00 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00 00
             04 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00
             00 00 20 40 6a 06 b1 e6 9e 3d"""
    data = bytes.fromhex(doc)
    assert fc.decode(data)["x"].tolist() == [0.0, -2.5, 0.0, 2.5, 0.0, 2.5, -2.5, 0.0]
    x = torch.tensor([0.5, -4.0, 0.1, 3.0, -0.0, 2.0, -1.0, 0.0])
    assert fc.encode({"x": x}, fc.CodecSpec(k=4, values="sign", rules=())) == data


# ---- reused header parses ------------------------------------------------------------
def test_a_repeated_header_is_reused_only_for_the_same_bytes_and_checks():
    from flocora_codec import format as fmt

    a = fc.encode({"wa": torch.randn(4, 8), "b": torch.randn(3)}, fc.CodecSpec(bits=4))
    b = fc.encode({"wb": torch.randn(4, 8), "b": torch.randn(3)}, fc.CodecSpec(bits=4))  # same length, other name
    assert len(a) == len(b)
    assert fmt.parse(a) is fmt.parse(a)  # reused
    assert [e.name for e in fmt.parse(b).entries] == ["wb", "b"]
    assert list(fc.decode(b)) == ["wb", "b"]
    with pytest.raises(fc.LimitError):
        fmt.parse(a, fc.DecodeLimits(max_tensors=1))
    with pytest.raises(fc.ExpectationError):
        fc.decode(a, expect={"wa": ((4, 8), torch.float32)})
    # the same header over other payload bytes: contents are still checked (and the CRC)
    info = fc.message_info(a)
    t = info.tensors[0]
    bad = bytearray(a)
    bad[t.offset : t.offset + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(fc.FormatError, match="non-finite"):
        fc.decode(refix_crc(bytes(bad)))
    with pytest.raises(fc.ChecksumError):
        fc.decode(bytes(bad))
