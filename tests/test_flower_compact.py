"""Compact messages through Flower: the strategy announces the schemas it
holds in each train instruction, the mod sends compact messages and, once,
the schemas the server lacks (FORMAT.md 6)."""

from __future__ import annotations

import logging
import struct

import crc32c
import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed")

from flwr.app import Array
from flwr.serverapp.strategy import FedAvg

import flocora_codec as fc
from flocora_codec import flower as ff
from tests.test_flower import (  # noqa: F401  task_identity: an autouse fixture
    SPEC4,
    as_numpy,
    global_arrays,
    make_contexts,
    run_round,
    task_identity,
    wire_schemas,
)


def schema_keys(record):
    return sorted(k for k in record.keys() if k.startswith("flocora/schema/"))


def two_rounds(compact: bool, **kw):
    g = global_arrays()
    strategy = ff.CompressedStrategy(FedAvg(), compact=compact, **kw)
    mod, contexts = ff.compression_mod(SPEC4), make_contexts()
    out = []
    for rnd in (1, 2):
        (arrays, _), wire = run_round(strategy, mod, contexts, rnd, g)
        out.append((as_numpy(arrays), wire))
        # FedAvg averages the int counter into a float: keep it an int (the
        # test app's update rule needs it), so it travels in the full message
        g = {**as_numpy(arrays), "steps": global_arrays()["steps"]}
    return strategy, out


def test_schemas_travel_once_then_messages_are_compact():
    strategy, rounds = two_rounds(compact=True)
    _, full_rounds = two_rounds(compact=False)
    (_, wire1), (_, wire2) = rounds
    for w in wire1:  # first exchange: compact messages and both schemas
        rec = w.content["arrays"]
        assert len(schema_keys(rec)) == 2
        held = wire_schemas(rec)
        assert {fc.message_info(rec[k].data, schemas=held).version for k in (ff.DELTA_KEY, ff.FULL_KEY)} == {3}
    for w in wire2:  # the server holds them now: only the messages travel
        rec = w.content["arrays"]
        assert schema_keys(rec) == []
        assert fc.message_info(rec[ff.DELTA_KEY].data, schemas=strategy.schemas).version == 3
    assert len(strategy.schemas) == 2
    h = strategy.history
    # the same updates: the aggregates are bit-identical to full messages
    (full_a1, full_w1), (full_a2, full_w2) = full_rounds
    for (a, _), fa in zip(rounds, (full_a1, full_a2)):
        assert a.keys() == fa.keys() and all(np.array_equal(a[k], fa[k]) for k in a)
    for w in full_w1 + full_w2:
        rec = w.content["arrays"]
        assert schema_keys(rec) == [] and fc.message_info(rec[ff.DELTA_KEY].data).version == 1
    # bytes: round 2 saves every table; round 1 pays the schemas once
    full_bytes = [sum(w.content["arrays"].count_bytes() for w in ws) for ws in (full_w1, full_w2)]
    compact_bytes = [h[1]["uplink_bytes"], h[2]["uplink_bytes"]]
    assert compact_bytes[1] < full_bytes[1] - 2 * 2 * 50  # >= 50 bytes of tables per message
    assert compact_bytes[0] > compact_bytes[1]


def test_no_announcement_means_full_messages():
    # a server that does not announce schemas (compact=False, or another
    # strategy wrapper) gets full messages, which every decoder reads
    g = global_arrays()
    (_, _), wire = run_round(ff.CompressedStrategy(FedAvg(), compact=False), ff.compression_mod(SPEC4),
                             make_contexts(), 1, g)  # fmt: skip
    for w in wire:
        assert fc.message_info(w.content["arrays"][ff.DELTA_KEY].data).version == 1


def test_a_forgotten_schema_is_sent_again():
    strategy, rounds = two_rounds(compact=True, max_schemas=1)
    assert len(strategy.schemas) == 2  # trimmed between rounds only: round 2 announced one of the two
    (_, wire2) = rounds[1]
    for w in wire2:  # the evicted one came along again; the round decoded
        assert len(schema_keys(w.content["arrays"])) == 1
    assert strategy.history[2]["dropped"] == 0


def _tamper_schema(fn):
    def tamper(replies):
        rec = replies[0].content["arrays"]
        (key,) = [k for k in schema_keys(rec) if fc.Schema.from_bytes(rec[k].data).names[0] in ("conv.weight",)]
        fn(rec, key)

    return tamper


def test_hostile_schemas_are_refused(caplog):
    def wrong_key(rec, key):
        rec[key[:-2] + "00"] = rec.pop(key)

    def bomb(rec, key):
        # a compact bomb: a schema claiming 2^30 elements under a real name,
        # and a 29-byte message against it that keeps nothing (k = 0)
        huge = fc.Schema.build({"conv.weight": ((1 << 15, 1 << 15), np.float32)}, fc.CodecSpec(k=1, rules=()))
        body = b"FLoC\x03\x00\x00\x00" + huge.id + b"\x00"
        msg = body + struct.pack("<I", crc32c.crc32c(body))
        rec.pop(key)
        rec[ff.DELTA_KEY] = Array(dtype="uint8", shape=(len(msg),), stype=ff.STYPE, data=msg)
        rec["flocora/schema/" + huge.id.hex()] = Array(dtype="uint8", shape=(len(huge.to_bytes()),),
                                                       stype=ff.SCHEMA_STYPE, data=huge.to_bytes())  # fmt: skip

    for tamper, why in (
        (wrong_key, "is not the schema of a message in the record"),
        (bomb, "ExpectationError: tensor 'conv.weight' is torch.float32 of shape (32768, 32768)"),
    ):
        g = global_arrays()
        strategy = ff.CompressedStrategy(FedAvg(min_train_nodes=1))
        with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
            (arrays, _), wire = run_round(strategy, ff.compression_mod(SPEC4), make_contexts(), 1, g,
                                          tamper=_tamper_schema(tamper))  # fmt: skip
        assert strategy.history[1]["dropped_decode"] == 1 and why in caplog.text
        assert arrays is not None  # the other reply was aggregated
        # nothing of the refused reply was kept: only the good reply's schemas
        assert len(strategy.schemas) == 2 and all(len(sc.names) <= 3 for sc in strategy.schemas.values())
