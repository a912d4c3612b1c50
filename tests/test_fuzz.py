"""Corrupted and hostile messages: the decoder returns valid tensors or raises CodecError.

Each mutant is decoded twice: with the checksum left stale (it must be
rejected, as ChecksumError when magic and version are intact) and with the
checksum recomputed after the mutation, which takes the parser's own checks
and the kernels' index validation out of the CRC's shadow. A few thousand
mutants in all; nothing else may escape (no IndexError, RuntimeError,
MemoryError, struct.error, crash or hang). The decoder turns only the
kernels' ValueError (a malformed index code) into FormatError, so a kernel
RuntimeError reaching the decoder would fail these tests, not be relabelled.
"""

from __future__ import annotations

import struct

import crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flocora_codec as fc
from flocora_codec import format as fmt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tens of thousands of tiny decodes: intra-op threads only add barrier
    # waits (up to tens of ms each on a loaded machine), and fuzzing is about
    # what the decoder accepts, not how fast.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Small limits: a mutant that inflates a shape must hit the limit, not allocate.
LIMITS = fc.DecodeLimits(max_total_elements=1 << 20, max_message_bytes=1 << 20)


def _seed_messages() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g)
    tensors = {"a.lora_A": r(4, 6), "a.lora_B": r(6, 4), "n.weight": r(6), "i": torch.arange(5), "h": r(3, 5).half()}
    specs = [
        fc.CodecSpec.raw(),
        fc.CodecSpec(bits=3, granularity="group", group_size=8, meta_dtype="float16"),
        fc.CodecSpec(bits=1, granularity="row", rounding="stochastic"),
        fc.CodecSpec(density=0.5),  # bitmap indices
        fc.CodecSpec(k=2, values="float16"),  # Elias-Fano indices
        fc.CodecSpec(density=0.3, values="quantized", bits=4, granularity="group", group_size=8),
        fc.CodecSpec(k=7, topk_scope="global", values="bfloat16"),
        fc.CodecSpec(density=0.4, values="sign", rules=()),  # version 2
        fc.CodecSpec(k=9, topk_scope="global", values="sign", meta_dtype="float16"),
    ]
    return [fc.encode(tensors, s) for s in specs]


MESSAGES = _seed_messages()


def header_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of the header, by FORMAT.md 2."""
    pm = fmt.parse(data)
    fields = [(4, 2), (6, 2), (8, 2), (10, 4)]
    pos = fmt.PREAMBLE_SIZE
    fields += [(pos + i, 1) for i in range(8 * len(pm.records))]
    pos += 8 * len(pm.records)
    for e in pm.entries:
        fields.append((pos, 2))
        pos += 2 + len(e.name.encode())
        fields += [(pos, 1), (pos + 1, 1)]
        pos += 2
        fields += [(pos + 8 * d, 8) for d in range(len(e.shape))]
        pos += 8 * len(e.shape)
        fields.append((pos, 2))
        pos += 2
        if pm.records[e.codec_index].codec == fmt.CODEC_TOPK:
            fields += [(pos, 8), (pos + 8, 1)]
            pos += 9
        fields += [(pos, 8), (pos + 8, 8), (pos + 16, 8)]
        pos += 24
    assert pos == pm.header_bytes
    return fields


FIELDS = [header_fields(m) for m in MESSAGES]
INTERESTING = [0, 1, 2, 3, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               10**12, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c.crc32c(body))


def check_outcome(data: bytes) -> None:
    """Decode must give well-formed tensors or raise CodecError; nothing else."""
    try:
        out = fc.decode(data, limits=LIMITS)
    except fc.CodecError:
        return
    info = fc.message_info(data, limits=LIMITS)  # a message decode accepts, info accepts
    assert [t.name for t in info.tensors] == list(out)
    for t in info.tensors:
        v = out[t.name]
        assert isinstance(v, torch.Tensor) and tuple(v.shape) == t.shape and v.dtype == t.dtype
        if t.values == "sign":  # +-mu with a finite mu: never NaN or Inf
            assert bool(torch.isfinite(v).all()), t.name


def check_stale(original: bytes, mutant: bytes) -> None:
    """With the original trailer kept, any real change must be rejected."""
    if mutant == original:
        return
    with pytest.raises(fc.CodecError) as exc:
        fc.decode(mutant, limits=LIMITS)
    intact = len(mutant) >= fmt.MIN_MESSAGE and mutant[:6] == original[:6]
    if intact:
        # magic and version untouched: only the checksum can (and must) catch it
        assert exc.type is fc.ChecksumError, exc.value


def apply(data: bytes, body_mutation) -> tuple[bytes, bytes]:
    """(mutant with stale checksum, mutant with recomputed checksum)."""
    body = body_mutation(data[:-4])
    return body + data[-4:], with_crc(body)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("field"), st.integers(0, 10**6), st.sampled_from(INTERESTING)),
    st.tuples(st.just("field_delta"), st.integers(0, 10**6), st.sampled_from([-2, -1, 1, 2, 8])),
)


def mutate(msg_index: int, op, data: bytes):
    kind, where, arg = op

    def body_mutation(body: bytes) -> bytes:
        b = bytearray(body)
        if not b:
            return body
        p = where % len(b)
        if kind == "flip":
            b[p] ^= arg
        elif kind == "truncate":
            del b[p:]
        elif kind == "insert":
            b.insert(p, arg)
        elif kind == "delete":
            del b[p : p + arg]
        else:
            off, width = FIELDS[msg_index][where % len(FIELDS[msg_index])]
            if off + width > len(b):  # an earlier mutation cut it off
                return body
            old = int.from_bytes(b[off : off + width], "little")
            new = arg if kind == "field" else old + arg
            b[off : off + width] = (new % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(b)

    return apply(data, body_mutation)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(msg=st.integers(0, len(MESSAGES) - 1), ops=st.lists(mutations, min_size=1, max_size=3))
def test_random_mutants(msg, ops):
    data = MESSAGES[msg]
    stale, fixed = data, data
    for op in ops:
        stale, _ = mutate(msg, op, stale)
        _, fixed = mutate(msg, op, fixed)
    check_stale(data, stale)
    check_outcome(fixed)


@pytest.mark.parametrize("msg", range(len(MESSAGES)))
def test_every_header_field_inflated(msg):
    """Each integer field set to each interesting value, checksum recomputed."""
    data = MESSAGES[msg]
    for off, width in FIELDS[msg]:
        for v in INTERESTING:
            if v >= 1 << (8 * width):
                continue
            b = bytearray(data[:-4])
            b[off : off + width] = v.to_bytes(width, "little")
            check_outcome(with_crc(bytes(b)))


@pytest.mark.parametrize("msg", range(len(MESSAGES)))
def test_every_byte_flipped(msg):
    """Every byte of the message (header and sections) flipped, checksum recomputed."""
    data = MESSAGES[msg]
    for p in range(len(data) - 4):
        for x in (0x01, 0x80, 0xFF):
            b = bytearray(data[:-4])
            b[p] ^= x
            check_outcome(with_crc(bytes(b)))


@pytest.mark.parametrize("msg", range(len(MESSAGES)))
def test_every_truncation(msg):
    data = MESSAGES[msg]
    for cut in range(len(data)):
        check_stale(data, data[:cut])
        if cut >= 4:
            with pytest.raises(fc.CodecError):
                fc.decode(with_crc(data[: cut - 4]), limits=LIMITS)


def test_seed_messages_decode():
    for data in MESSAGES:
        out = fc.decode(data, limits=LIMITS)
        assert len(out) == 5
