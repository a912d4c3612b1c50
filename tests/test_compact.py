"""Compact messages (format version 3) and schemas (FORMAT.md 6).

The sections of a compact message are those of the full message, byte for
byte; only the header changes: 24 bytes and one varint per top-k tensor
instead of the tables. These tests pin that, the schema's own format and
validation, the golden files of version 3, and what a receiver does with a
compact message whose schema it lacks or that does not fit its schema.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flocora_codec as fc
from flocora_codec import codec as codec_mod
from flocora_codec import format as fmt
from tests.test_codec import make_golden

GOLDEN = Path(__file__).resolve().parent / "golden"


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c.crc32c(body))


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1.lora_A": torch.randn(8, 24, generator=g),
        "layer1.lora_B": torch.randn(24, 8, generator=g),
        "norm.weight": torch.randn(24, generator=g),
        "half": torch.randn(6, 10, generator=g).half(),
        "steps": torch.tensor(3),
    }


SPECS = [
    fc.CodecSpec(bits=4),
    fc.CodecSpec(bits=2, granularity="group", group_size=8, meta_dtype="float16", rounding="stochastic", seed=3),
    fc.CodecSpec(density=0.2, values="sign", rules=()),
    fc.CodecSpec(density=0.3, topk_scope="global", values="bfloat16"),
    fc.CodecSpec(k=5, values="quantized", bits=3),
    fc.CodecSpec.raw(),
]


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_compact_message_is_the_full_message_with_a_small_header(spec):
    tensors = model()
    schema = fc.Schema.build(tensors, spec)
    full, compact = fc.encode(tensors, spec), fc.encode(tensors, spec, schema=schema)
    info_full, info = fc.message_info(full), fc.message_info(compact, schemas=schema)
    n_topk = sum(t.codec == "topk" for t in info.tensors)
    assert info.version == 3 and info.schema_id == schema.id
    assert 24 + n_topk <= info.header_bytes <= 24 + 4 * n_topk  # small counts: 1 byte each here
    # sections identical, byte for byte
    assert compact[info.header_bytes : -4] == full[info_full.header_bytes : -4]
    a, b = fc.decode(full), fc.decode(compact, schemas=[schema])
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert fc.encode(tensors, spec, schema=schema) == compact  # deterministic
    # the per-tensor table is the same, from the schema
    assert [(t.name, t.shape, t.params, t.count) for t in info.tensors] == \
        [(t.name, t.shape, t.params, t.count) for t in info_full.tensors]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), density=st.floats(0.01, 1.0), seed=st.integers(0, 99),
       values=st.sampled_from(["float32", "float16", "sign", "quantized"]))  # fmt: skip
def test_compact_round_trips_like_full_property(rows, cols, density, seed, values):
    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(rows, cols, generator=g), "b": torch.randn(cols, generator=g)}
    spec = fc.CodecSpec(density=density, values=values, bits=4 if values == "quantized" else None, rules=())
    schema = fc.Schema.build(tensors, spec)
    compact = fc.encode(tensors, spec, schema=schema)
    want = fc.decode(fc.encode(tensors, spec))
    got = fc.decode(compact, schemas={schema.id: schema})
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_schema_is_deterministic_and_built_from_shapes_alone():
    tensors = model()
    a = fc.Schema.build(tensors, SPECS[0])
    b = fc.Schema.build({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, SPECS[0])
    assert a == b and a.to_bytes() == b.to_bytes() and a.id == hashlib.sha256(a.to_bytes()).digest()[:16]
    assert fc.Schema.from_bytes(a.to_bytes()) == a
    assert a.tensors()["half"] == ((6, 10), torch.float16)
    # another spec, other records: another schema
    assert fc.Schema.build(tensors, SPECS[1]).id != a.id


def test_unknown_schema_is_named():
    tensors = model()
    schema = fc.Schema.build(tensors, SPECS[0])
    data = fc.encode(tensors, SPECS[0], schema=schema)
    for schemas in (None, [], [fc.Schema.build(tensors, SPECS[2])]):
        with pytest.raises(fc.UnknownSchemaError, match=schema.id.hex()) as err:
            fc.decode(data, schemas=schemas)
        assert err.value.schema_id == schema.id
    with pytest.raises(fc.UnknownSchemaError):
        fc.message_info(data)
    assert fmt.compact_schema_id(data) == schema.id and fmt.compact_schema_id(fc.encode(tensors)) is None
    registry = fc.SchemaRegistry()
    registry.add_bytes(schema.to_bytes())
    assert list(fc.decode(data, schemas=registry)) == list(tensors)


def test_message_that_does_not_fit_its_schema_fails_before_allocation(monkeypatch):
    tensors = model()
    s_a, s_b = fc.Schema.build(tensors, SPECS[0]), fc.Schema.build(tensors, SPECS[1])
    data = fc.encode(tensors, SPECS[0], schema=s_a)
    # the same bytes naming the other schema, re-sealed: the sections do not fit it
    forged = reseal(data[:8] + s_b.id + data[24:-4])
    monkeypatch.setattr(codec_mod, "_decode_parsed", lambda *a: pytest.fail("allocated before refusing"))
    with pytest.raises(fc.FormatError, match=f"schema {s_b.id.hex()}'s header and sections account for"):
        fc.decode(forged, schemas=[s_a, s_b])
    with pytest.raises(fc.FormatError, match="missing bytes"):
        fc.decode(reseal(data[:-5]), schemas=[s_a])
    with pytest.raises(fc.FormatError, match="trailing bytes"):
        fc.decode(reseal(data[:-4] + b"\0"), schemas=[s_a])


def test_counts_are_minimal_varints_within_numel():
    spec = fc.CodecSpec(k=3, values="float32", rules=())
    tensors = {"x": torch.arange(200.0).reshape(10, 20)}
    schema = fc.Schema.build(tensors, spec)
    data = fc.encode(tensors, spec, schema=schema)
    assert data[24] == 3  # count 3, one byte
    body = data[:-4]
    cases = {
        "non-minimal": body[:24] + b"\x83\x00" + body[25:],
        "exceeds its 200": body[:24] + b"\xc9\x01" + body[25:],  # 201
        "longer than 10 bytes": body[:24] + b"\x80" * 11 + body[25:],
        "truncated": body[:24] + b"\x80",
    }
    for why, forged in cases.items():
        with pytest.raises(fc.FormatError):
            fc.decode(reseal(forged), schemas=[schema])
    # a count of 200 (two bytes) decodes like the full message keeping everything
    all_spec = fc.CodecSpec(k=200, values="float32", rules=())
    assert fc.Schema.build(tensors, all_spec) == schema  # k is not part of the schema
    big = fc.encode(tensors, all_spec, schema=schema)
    assert big[24:26] == b"\xc8\x01"
    assert torch.equal(fc.decode(big, schemas=[schema])["x"], tensors["x"])


def test_encode_refuses_tensors_or_spec_that_are_not_the_schema():
    tensors = model()
    schema = fc.Schema.build(tensors, SPECS[0])
    bad = dict(tensors)
    bad["half"] = bad["half"].float()
    with pytest.raises(ValueError, match="'half'"):
        fc.encode(bad, SPECS[0], schema=schema)
    with pytest.raises(ValueError, match="another codec"):
        fc.encode(tensors, SPECS[1], schema=schema)
    with pytest.raises(ValueError, match="tensors, but schema"):
        fc.encode({k: v for k, v in list(tensors.items())[:2]}, SPECS[0], schema=schema)


def test_schema_bytes_are_checked_like_a_message():
    schema = fc.Schema.build(model(), SPECS[2])
    data = schema.to_bytes()
    with pytest.raises(fc.ChecksumError):
        fc.Schema.from_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(fc.FormatError, match="a message, not a schema"):
        fc.Schema.from_bytes(fc.encode(model()))
    with pytest.raises(fc.UnsupportedVersionError):
        fc.Schema.from_bytes(reseal(data[:4] + b"\x02\x00" + data[6:-4]))
    with pytest.raises(fc.FormatError, match="trailing bytes"):
        fc.Schema.from_bytes(reseal(data[:-4] + b"\0"))
    with pytest.raises(fc.LimitError, match="max_total_elements"):
        fc.Schema.from_bytes(data, limits=fc.DecodeLimits(max_total_elements=100))
    with pytest.raises(fc.ExpectationError):
        fc.Schema.from_bytes(data, expect={"x": torch.zeros(3)})
    assert fc.Schema.from_bytes(data, expect=model()) == schema


def test_a_schema_claiming_a_huge_tensor_is_refused_by_a_receiver_that_expects_its_model():
    # a hostile client's schema: one tensor under a real name, 2^28 elements
    huge = fc.Schema.build({"layer1.lora_A": ((1 << 14, 1 << 14), torch.float32)}, fc.CodecSpec(k=1, rules=()))
    with pytest.raises(fc.ExpectationError, match="layer1.lora_A"):
        fc.Schema.from_bytes(huge.to_bytes(), expect={"layer1.lora_A": torch.zeros(8, 24)})
    receiver = torch.nn.Module()  # or the receiver's model itself
    receiver.layer1 = torch.nn.Module()
    receiver.layer1.register_buffer("lora_A", torch.zeros(8, 24))
    with pytest.raises(fc.ExpectationError, match="layer1.lora_A"):
        fc.Schema.from_bytes(huge.to_bytes(), expect=receiver)


def test_error_feedback_writes_compact_messages():
    tensors = model()
    spec = fc.CodecSpec(bits=2, rules=())
    schema = fc.Schema.build(tensors, spec)
    ef_full, ef_compact = fc.ErrorFeedback(spec), fc.ErrorFeedback(spec)
    for _ in range(3):
        full, compact = ef_full.encode(tensors), ef_compact.encode(tensors, schema=schema)
        a, b = fc.decode(full), fc.decode(compact, schemas=schema)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---- golden files of version 3 ---------------------------------------------------------
@pytest.mark.parametrize("case", sorted(make_golden.COMPACT_CASES))
def test_golden_compact_messages(case):
    with np.load(GOLDEN / "inputs.npz") as f:
        inputs = make_golden.to_tensors({k: f[k] for k in f.files})
    spec = make_golden.COMPACT_CASES[case]
    schema_bytes, data = (GOLDEN / f"{case}.fls").read_bytes(), (GOLDEN / f"{case}.flc").read_bytes()
    schema = fc.Schema.build(inputs, spec)
    assert schema.to_bytes() == schema_bytes
    assert fc.encode(inputs, spec, schema=schema) == data
    out = fc.decode(data, schemas=[fc.Schema.from_bytes(schema_bytes)])
    with np.load(GOLDEN / f"{case}.npz") as f:
        expected = make_golden.to_tensors({k: f[k] for k in f.files})
    assert list(out) == list(inputs)
    for k, v in expected.items():
        assert torch.equal(out[k], v), k


def test_version_3_worked_example_of_format_md():
    # FORMAT.md 6.2: schema and compact message typed in from the document
    schema_doc = """46 4c 6f 53 01 00 00 00 01 00 01 00 00 00 02 01 00 00 00 01 05 00
                    01 00 78 01 01 08 00 00 00 00 00 00 00 00 00 69 bb 73 a7"""
    message_doc = """46 4c 6f 43 03 00 00 00 41 52 c6 5b 1c bb 0c cb b3 56 ba 1d f2 21 33 56
                     04 00 00 20 40 6a 06 a5 70 0c b4"""
    schema = fc.Schema.from_bytes(bytes.fromhex(schema_doc))
    data = bytes.fromhex(message_doc)
    assert schema.id.hex() == "4152c65b1cbb0ccbb356ba1df2213356"
    assert fc.decode(data, schemas=[schema])["x"].tolist() == [0.0, -2.5, 0.0, 2.5, 0.0, 2.5, -2.5, 0.0]
    x = torch.tensor([0.5, -4.0, 0.1, 3.0, -0.0, 2.0, -1.0, 0.0])
    spec = fc.CodecSpec(k=4, values="sign", rules=())
    assert fc.Schema.build({"x": x}, spec) == schema
    assert fc.encode({"x": x}, spec, schema=schema) == data
    assert len(data) == 35 and len(fc.encode({"x": x}, spec)) == 80


# ---- hostile compact messages and schemas -----------------------------------------------
_FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
_COMPACT_SEEDS = [(0, (GOLDEN / f"{c}.flc").read_bytes()) for c in make_golden.COMPACT_CASES] + \
                 [(2, (GOLDEN / f"{c}.fls").read_bytes()) for c in make_golden.COMPACT_CASES]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_compact_messages_and_schemas_give_only_codec_errors(data):
    """1-4 bytes anywhere overwritten, CRC re-sealed or not: the fuzz target's
    checks (only CodecError; finite quantized values; schemas round-trip)."""
    import sys

    sys.path.insert(0, str(_FUZZ))
    from fuzz_decode import check_input

    mode, seed = data.draw(st.sampled_from(_COMPACT_SEEDS))
    body = bytearray(seed[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        check_input(bytes([mode | 1]) + bytes(body))  # re-sealed: a hostile sender
    else:
        check_input(bytes([mode]) + bytes(body) + seed[-4:])  # corrupted in transit


def test_fl_sizes_show_compact_headers_under_the_goal():
    # the goal: a compact header under 32 bytes plus 4 per tensor, whatever the names
    from fl.sizes import message_sizes

    rows = message_sizes("resnet8", [8], [2], width=16)
    for row in rows:
        n_topk = row.get("n_tensors", 0) if row["bits"] == "1% sign" else 0
        assert row["compact_header_bytes"] <= 24 + 4 * n_topk
        assert row["compact_bytes"] == row["bytes"] - row["header_bytes"] + row["compact_header_bytes"]
        if row["analytic_bytes"] is not None and row["rank"]:
            # the formula counts payload and metadata only: compact is within 32 bytes of it
            assert 0 <= row["compact_bytes"] - row["analytic_bytes"] <= 32
