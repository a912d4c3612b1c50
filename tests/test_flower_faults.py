"""Faulty and hostile replies through CompressedStrategy: each is dropped, by
cause, and FedAvg aggregates exactly the others."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed")

from flwr.app import Array, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

import flocora_codec as fc
from fl.loop import _bomb
from flocora_codec import flower as ff
from tests.test_flower import (  # noqa: F401  task_identity: an autouse fixture
    SPEC4,
    as_numpy,
    global_arrays,
    make_contexts,
    run_round,
    task_identity,
    wire_decode,
)


def replace_array(reply, key, fn):
    """Swap one message of a reply; the schema that came along for the old
    (compact) message goes too, as a client sending the new one would do."""
    rec = reply.content["arrays"]
    a = rec[key]
    rec[key] = fn(a)
    sid = fc.format.compact_schema_id(a.data)
    if sid is not None:
        rec.pop(ff.SCHEMA_KEY_PREFIX + sid.hex(), None)


def run(tamper, **kw):
    g = global_arrays()
    strategy = ff.CompressedStrategy(FedAvg(min_train_nodes=1), **kw)
    mod = ff.compression_mod(SPEC4, error_feedback=False)
    (arrays, _), wire = run_round(strategy, mod, make_contexts(), 1, g, tamper=tamper)
    return strategy.history[1], arrays, wire, g


def only_the_second(arrays, wire, g):
    """The aggregate equals the second reply's decoded arrays alone (FedAvg of one)."""
    want = as_numpy(ff.decode_array_record(wire[1].content["arrays"], g))
    got = as_numpy(arrays)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_reply_holding_nan_is_dropped(caplog):
    def nan_first(replies):
        # the 1-D bias travels raw inside the full message... make it NaN
        def poison(a):
            arrays = wire_decode(replies[0].content["arrays"], ff.DELTA_KEY, numpy=True)
            arrays["fc.bias"] = arrays["fc.bias"].copy()
            arrays["fc.bias"][3] = np.nan
            return Array(dtype=a.dtype, shape=(0,), stype=a.stype, data=fc.encode_numpy(arrays, SPEC4))

        replace_array(replies[0], ff.DELTA_KEY, poison)  # a full message: the decoder needs no schema

    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        h, arrays, wire, g = run(nan_first)
    assert (h["dropped"], h["dropped_nonfinite"], h["dropped_decode"]) == (1, 1, 0)
    assert "NaN or Inf" in caplog.text
    only_the_second(arrays, wire, g)


@pytest.mark.parametrize("bound", [0.0, 10.0])
def test_oversized_reply_is_dropped_only_with_the_bound_on(bound):
    def scale_first(replies):
        def scale(a):
            arrays = {
                k: v * 1000 for k, v in wire_decode(replies[0].content["arrays"], ff.DELTA_KEY, numpy=True).items()
            }
            return Array(dtype=a.dtype, shape=(0,), stype=a.stype, data=fc.encode_numpy(arrays, SPEC4))

        replace_array(replies[0], ff.DELTA_KEY, scale)

    h, arrays, wire, g = run(scale_first, max_update_norm_ratio=bound)
    if bound:
        assert (h["dropped"], h["dropped_norm"]) == (1, 1)
        only_the_second(arrays, wire, g)
    else:
        assert h["dropped"] == 0
        assert np.abs(as_numpy(arrays)["fc.weight"]).max() > 10  # the 1000x update was averaged in


def test_bomb_reply_is_refused_before_allocation(caplog):
    def bomb_first(replies):
        replace_array(
            replies[0], ff.DELTA_KEY, lambda a: Array(dtype=a.dtype, shape=(0,), stype=a.stype, data=_bomb("fc.weight"))
        )

    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        h, arrays, wire, g = run(bomb_first)
    assert (h["dropped"], h["dropped_decode"]) == (1, 1)
    assert "ExpectationError" in caplog.text and "(10, 37)" in caplog.text
    only_the_second(arrays, wire, g)
    # without expectations the default limits still refuse it (max_expansion)
    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        h, _, _, _ = run(bomb_first, expect_replies=False)
    assert h["dropped_decode"] == 1 and "max_expansion" in caplog.text


def test_missing_replies_are_counted():
    h, arrays, wire, g = run(lambda replies: replies.pop(0))
    assert (h["instructions"], h["missing_replies"], h["dropped"]) == (2, 1, 0)
    want = as_numpy(ff.decode_array_record(wire[0].content["arrays"], g))
    for k, v in want.items():
        np.testing.assert_array_equal(as_numpy(arrays)[k], v)


def test_honest_replies_pass_every_check():
    h, _, _, _ = run(None, max_update_norm_ratio=10.0)
    assert (h["instructions"], h["missing_replies"], h["dropped"]) == (2, 0, 0)


def _error_in_place_of_first(code):
    def tamper(replies):
        first = replies[0]
        stand_in = Message(Error(code=code, reason="test"), reply_to=first)
        replies[0] = stand_in

    return tamper


@pytest.mark.parametrize(
    "code, missing, failed",
    [
        (ErrorCode.NODE_UNAVAILABLE, 1, 0),  # the SuperLink missed the node's heartbeats
        (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, 1, 0),
        (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, 0, 1),
    ],
)
def test_error_replies_are_counted_as_missing_or_failed(code, missing, failed):
    h, arrays, wire, g = run(_error_in_place_of_first(code))
    assert (h["instructions"], h["missing_replies"], h["failed_replies"], h["dropped"]) == (2, missing, failed, 0)
    only_the_second(arrays, wire, g)
