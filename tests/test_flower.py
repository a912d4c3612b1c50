"""Flower integration: compression_mod -> CompressedStrategy -> wrapped strategy.

The fast tests build Flower ``Message`` objects by hand and call the mod and the
strategy directly (no Ray, no SuperLink). One ``slow`` test runs a real
``run_simulation`` (Ray) with two nodes for two rounds.
"""

from __future__ import annotations

import importlib
import logging
import sys

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install 'flocora-codec[flower]')")

from flwr.app import (  # noqa: E402  after importorskip
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg  # noqa: E402  after importorskip
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402  after importorskip

import flocora_codec as fc  # noqa: E402  after importorskip
from flocora_codec import flower as ff  # noqa: E402  after importorskip

NODES = (11, 22)
WEIGHTS = {11: 30, 22: 10}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps instruction messages with the running task's identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """The one Grid method the strategies use in configure_*."""

    def get_node_ids(self):
        return list(NODES)


def global_arrays(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 37)).astype(np.float32),  # odd row length
        "fc.bias": rng.standard_normal(10).astype(np.float32),  # 1-D: raw by default rule
        "steps": np.array(7, dtype=np.int64),  # non-float: always sent as is
    }


def client_update(node: int, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * node + rnd)
    out = {}
    for k, v in arrays.items():
        if np.issubdtype(v.dtype, np.floating):
            out[k] = (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
        else:
            out[k] = np.asarray(v + 1)
    return out


def make_app(rnd: int, seen: dict | None = None):
    """A ClientApp function: one 'training' step, num-examples as weight."""

    def app(msg: Message, context: Context) -> Message:
        rec = next(iter(msg.content.array_records.values()))
        arrays = {k: a.numpy() for k, a in rec.items()}  # fails if still encoded
        if seen is not None:
            seen[context.node_id] = arrays
        new = client_update(context.node_id, rnd, arrays)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                "metrics": MetricRecord({"num-examples": WEIGHTS[context.node_id], "loss": 1.0}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def make_contexts():
    return {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES}


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def run_round(strategy, mod, contexts, rnd, arrays, app=None, tamper=None):
    """configure_train -> (mod around app) per node -> aggregate_train.

    Returns ((arrays, metrics), wire): ``wire`` holds each reply as it left the
    client (node id, content), before the strategy replaced it with decoded arrays.
    """
    msgs = list(
        strategy.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in arrays.items()}), ConfigRecord(), FakeGrid())
    )
    app = app or make_app(rnd)
    replies = []
    for msg in msgs:
        ctx = contexts[msg.metadata.dst_node_id]
        reply = mod(msg, ctx, app) if mod is not None else app(msg, ctx)
        replies.append(reply)
    if tamper is not None:
        tamper(replies)
    wire = [Wire(r.metadata.src_node_id, r.content if r.has_content() else None, r) for r in replies]
    return strategy.aggregate_train(rnd, replies), wire


class Wire:
    def __init__(self, node, content, msg):
        self.node, self.content, self.msg = node, content, msg


def row_scales(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-row quantization step (max - min) / (2**bits - 1), broadcast to x."""
    rows = x.reshape(x.shape[0], -1)
    s = (rows.max(axis=1) - rows.min(axis=1)) / (2**bits - 1)
    return np.broadcast_to(s[:, None], rows.shape).reshape(x.shape)


SPEC4 = fc.CodecSpec(bits=4, granularity="row")


def wire_schemas(record, strategy=None) -> list:
    """The schemas a reply's compact messages can refer to: those it carried
    (first exchange) and those the strategy already held."""
    carried = [fc.Schema.from_bytes(a.data) for a in record.values() if a.stype == ff.SCHEMA_STYPE]
    return carried + (list(strategy.schemas.values()) if strategy is not None else [])


def wire_decode(record, key, strategy=None, numpy=False):
    """Decode one message of a reply as it travelled (compact or full)."""
    decode = fc.decode_numpy if numpy else fc.decode
    return decode(record[key].data, schemas=wire_schemas(record, strategy))


# ---------------------------------------------------------------------------
# mod -> wrapper -> FedAvg against plain FedAvg
# ---------------------------------------------------------------------------
def test_fedavg_matches_plain_within_quantization_error():
    g = global_arrays()
    (plain, _), _ = run_round(FedAvg(), None, make_contexts(), 1, g)
    strategy = ff.CompressedStrategy(FedAvg())
    mod = ff.compression_mod(SPEC4, error_feedback=False)
    (arrays, metrics), wire = run_round(strategy, mod, make_contexts(), 1, g)

    # every reply travelled encoded, with our stype, and reports its bytes
    for w in wire:
        (rec,) = w.content.array_records.values()
        # compact messages (the default), each with its schema in this first exchange
        schemas = {k for k in rec.keys() if k.startswith("flocora/schema/")}
        assert set(rec.keys()) - schemas == {ff.DELTA_KEY, ff.FULL_KEY} and len(schemas) == 2
        assert all(a.stype == (ff.SCHEMA_STYPE if k in schemas else ff.STYPE) for k, a in rec.items())
        (m,) = w.content.metric_records.values()
        assert 0 < m[ff.BYTES_METRIC] < m[ff.RAW_BYTES_METRIC] / 3
        assert m["num-examples"] == WEIGHTS[w.node]

    got, want = as_numpy(arrays), as_numpy(plain)
    assert list(got) == list(want)
    total = sum(WEIGHTS.values())
    for name in ("conv.weight", "fc.weight"):
        # FedAvg of deltas: |error| <= sum_i w_i * scale_i / 2 (nearest rounding)
        bound = sum(WEIGHTS[n] / total * row_scales(client_update(n, 1, g)[name] - g[name], 4) / 2 for n in NODES)
        err = np.abs(got[name] - want[name])
        assert np.all(err <= bound * (1 + 1e-5) + 1e-6), (name, float((err - bound).max()))
        assert err.max() > 0  # it really was quantized
    np.testing.assert_allclose(got["fc.bias"], want["fc.bias"], rtol=0, atol=1e-6)  # raw rule
    assert got["steps"] == want["steps"]

    # round totals: the wrapper's own count equals the clients' reports
    h = strategy.history[1]
    assert h["uplink_bytes"] == sum(w.content["metrics"][ff.BYTES_METRIC] for w in wire)
    assert h["uplink_raw_bytes"] == sum(w.content["metrics"][ff.RAW_BYTES_METRIC] for w in wire)
    assert metrics["flocora-uplink-bytes"] == h["uplink_bytes"]
    assert h["downlink_bytes"] == h["downlink_raw_bytes"] > 0  # downlink not compressed
    assert h["dropped"] == 0
    assert metrics["loss"] == pytest.approx(1.0)


def test_raw_spec_is_lossless():
    g = global_arrays()
    (plain, _), _ = run_round(FedAvg(), None, make_contexts(), 1, g)
    (arrays, _), _ = run_round(
        ff.CompressedStrategy(FedAvg()), ff.compression_mod(fc.CodecSpec.raw()), make_contexts(), 1, g
    )
    for k, v in as_numpy(plain).items():
        # x -> (x - g) -> g + (x - g): exact up to one float rounding
        np.testing.assert_allclose(as_numpy(arrays)[k], v, rtol=0, atol=1e-6)


def test_arrays_mode_sends_no_deltas():
    g = global_arrays()
    (plain, _), _ = run_round(FedAvg(), None, make_contexts(), 1, g)
    mod = ff.compression_mod(fc.CodecSpec(bits=8), mode="arrays")
    (arrays, _), wire = run_round(ff.CompressedStrategy(FedAvg()), mod, make_contexts(), 1, g)
    for w in wire:
        keys = set(w.content["arrays"].keys())
        assert {k for k in keys if not k.startswith("flocora/schema/")} == {ff.FULL_KEY}
    total = sum(WEIGHTS.values())
    name = "fc.weight"
    bound = sum(WEIGHTS[n] / total * row_scales(client_update(n, 1, g)[name], 8) / 2 for n in NODES)
    assert np.all(np.abs(as_numpy(arrays)[name] - as_numpy(plain)[name]) <= bound * (1 + 1e-5) + 1e-6)


def test_error_feedback_residual_telescopes():
    """sum of what was sent + final residual == sum of true updates (EF invariant)."""
    mod = ff.compression_mod(fc.CodecSpec(bits=2, granularity="row"))
    ctx = make_contexts()[11]
    g = global_arrays()
    sent_sum = np.zeros_like(g["fc.weight"], dtype=np.float64)
    true_sum = np.zeros_like(sent_sum)
    for rnd in (1, 2, 3):
        ins = Message(
            RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()})}),
            dst_node_id=11,
            message_type=MessageType.TRAIN,
        )
        reply = mod(ins, ctx, make_app(rnd))
        decoded = as_numpy(ff.decode_array_record(reply.content["arrays"], g))
        sent_sum += decoded["fc.weight"].astype(np.float64) - g["fc.weight"]
        true_sum += client_update(11, rnd, g)["fc.weight"].astype(np.float64) - g["fc.weight"]
    residual = ctx.state["flocora.residual"]["fc.weight"].numpy()
    np.testing.assert_allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-5)
    assert np.abs(residual).max() > 0
    assert "fc.bias" not in ctx.state["flocora.residual"]  # raw tensors leave no residual
    assert ctx.state["flocora.counter"]["rounds"] == 3


def test_error_feedback_of_the_mod_is_fc_error_feedback(caplog):
    """The mod's residuals are fc.ErrorFeedback's on the same deltas (one
    implementation), kept in context.state; a stale residual of another
    shape is dropped with a warning, as ErrorFeedback documents."""
    spec = fc.CodecSpec(bits=2, granularity="row")
    mod = ff.compression_mod(spec)
    ctx = make_contexts()[11]
    g = global_arrays()
    ef = fc.ErrorFeedback(spec)

    def instruction():
        return Message(
            RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()})}),
            dst_node_id=11,
            message_type=MessageType.TRAIN,
        )

    for rnd in (1, 2, 3):
        reply = mod(instruction(), ctx, make_app(rnd))
        deltas = {k: torch.from_numpy(v - g[k]) for k, v in client_update(11, rnd, g).items() if v.ndim}
        assert ef.encode(deltas) == reply.content["arrays"][ff.DELTA_KEY].data
    kept = ctx.state["flocora.residual"]
    assert set(kept) == set(ef.get_state()) == {"conv.weight", "fc.weight"}
    assert all(np.array_equal(kept[k].numpy(), v.numpy()) for k, v in ef.get_state().items())
    # a residual left by another model (a node restarted with a new one): dropped, with a warning
    ctx.state["flocora.residual"] = ArrayRecord({"fc.weight": Array(np.ones((3, 3), np.float32))})
    with caplog.at_level("WARNING", logger="flocora_codec"):
        mod(instruction(), ctx, make_app(4))
    assert "dropped the residual of 'fc.weight'" in caplog.text
    assert ctx.state["flocora.residual"]["fc.weight"].numpy().shape == (10, 37)


def test_stochastic_rounding_draws_fresh_noise_each_round():
    mod = ff.compression_mod(fc.CodecSpec(bits=2, rounding="stochastic"), error_feedback=False)
    ctx = make_contexts()[11]
    g = global_arrays()
    payloads = []
    for _ in range(2):
        ins = Message(
            RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()})}),
            dst_node_id=11,
            message_type=MessageType.TRAIN,
        )
        reply = mod(ins, ctx, make_app(1))  # same update both times
        payloads.append(reply.content["arrays"][ff.DELTA_KEY].data)
    assert payloads[0] != payloads[1]


# ---------------------------------------------------------------------------
# failures: dropped, never fatal; error replies and other types untouched
# ---------------------------------------------------------------------------
def test_corrupt_reply_is_dropped_and_the_round_goes_on(caplog):
    g = global_arrays()

    def corrupt_first(replies):
        rec = replies[0].content["arrays"]
        a = rec[ff.DELTA_KEY]
        data = bytearray(a.data)
        data[len(data) // 2] ^= 0x40
        rec[ff.DELTA_KEY] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(data))

    strategy = ff.CompressedStrategy(FedAvg(min_train_nodes=1))
    mod = ff.compression_mod(SPEC4, error_feedback=False)
    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        (arrays, metrics), wire = run_round(strategy, mod, make_contexts(), 1, g, tamper=corrupt_first)
    bad, good = wire[0], wire[1]
    assert strategy.history[1]["dropped"] == 1
    assert any(f"dropped the reply of node {bad.node}: ChecksumError" in r.getMessage() for r in caplog.records)
    # the aggregate is the surviving client's (decoded) arrays alone
    want = as_numpy(ff.decode_array_record(good.content["arrays"], g))
    for k, v in want.items():
        np.testing.assert_allclose(as_numpy(arrays)[k], v, rtol=0, atol=1e-6)
    assert strategy.history[1]["uplink_bytes"] == good.content["metrics"][ff.BYTES_METRIC]


def test_reply_without_known_base_is_dropped(caplog):
    g = global_arrays()
    strategy = ff.CompressedStrategy(FedAvg(min_train_nodes=1))
    mod = ff.compression_mod(SPEC4)

    def forget_bases(replies):
        strategy._bases.clear()

    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        (arrays, metrics), _ = run_round(strategy, mod, make_contexts(), 1, g, tamper=forget_bases)
    assert arrays is None and metrics is None
    assert strategy.history[1]["dropped"] == 2
    assert "no global arrays" in caplog.text


def test_error_reply_passes_through_untouched():
    g = global_arrays()
    mod = ff.compression_mod(SPEC4)
    ctx = make_contexts()[11]
    ins = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()})}),
        dst_node_id=11,
        message_type=MessageType.TRAIN,
    )
    err = Message(Error(code=2, reason="boom"), reply_to=ins)
    out = mod(ins, ctx, lambda m, c: err)
    assert out is err and out.has_error() and out.error.reason == "boom"
    assert "flocora.counter" not in ctx.state

    # and the strategy hands it to FedAvg, which counts it as a failure
    strategy = ff.CompressedStrategy(FedAvg(min_train_nodes=1))

    def fail_node_22(msg, context):
        if context.node_id == 22:
            return Message(Error(code=2, reason="boom"), reply_to=msg)
        return make_app(1)(msg, context)

    (arrays, _), wire = run_round(strategy, mod, make_contexts(), 1, g, app=fail_node_22)
    assert sum(w.msg.has_error() for w in wire) == 1
    assert strategy.history[1]["dropped"] == 0
    want = client_update(11, 1, g)
    np.testing.assert_allclose(as_numpy(arrays)["fc.bias"], want["fc.bias"], atol=1e-6)


def test_evaluate_messages_are_not_encoded():
    g = global_arrays()
    mod = ff.compression_mod(SPEC4)
    ctx = make_contexts()[11]
    ins = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()})}),
        dst_node_id=11,
        message_type=MessageType.EVALUATE,
    )
    reply_content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in g.items()}),
            "metrics": MetricRecord({"num-examples": 3, "accuracy": 0.5}),
        }
    )
    reply = Message(reply_content, reply_to=ins)
    out = mod(ins, ctx, lambda m, c: reply)
    assert out is reply and out.content is reply_content
    assert not ff.is_encoded(out.content["arrays"])
    assert ff.BYTES_METRIC not in out.content["metrics"]


# ---------------------------------------------------------------------------
# downlink
# ---------------------------------------------------------------------------
def test_downlink_is_encoded_and_decoded_before_the_app():
    g = global_arrays()
    down = fc.CodecSpec(bits=8)
    strategy = ff.CompressedStrategy(FedAvg(), downlink=down)
    mod = ff.compression_mod(SPEC4, error_feedback=False)
    seen = {}
    global_rec = ArrayRecord({k: Array(v) for k, v in g.items()})
    msgs = list(strategy.configure_train(1, global_rec, ConfigRecord(), FakeGrid()))
    assert global_rec["fc.weight"].stype == "numpy.ndarray"  # caller's record untouched
    for m in msgs:
        assert ff.is_encoded(m.content["arrays"])
    g_hat = as_numpy(ff.decode_array_record(msgs[0].content["arrays"]))
    assert np.abs(g_hat["fc.weight"] - g["fc.weight"]).max() > 0  # lossy at 8 bits
    np.testing.assert_array_equal(g_hat["fc.bias"], g["fc.bias"])

    contexts = make_contexts()
    replies = [mod(m, contexts[m.metadata.dst_node_id], make_app(1, seen)) for m in msgs]
    for n in NODES:  # the app saw plain arrays, exactly what the server decodes
        for k in g:
            np.testing.assert_array_equal(seen[n][k], g_hat[k])
    arrays, metrics = strategy.aggregate_train(1, replies)
    h = strategy.history[1]
    assert 0 < h["downlink_bytes"] < h["downlink_raw_bytes"] / 2
    assert metrics["flocora-downlink-bytes"] == h["downlink_bytes"]
    # uplink deltas are relative to g_hat: result = g_hat + avg(delta_hat)
    total = sum(WEIGHTS.values())
    want = sum(WEIGHTS[n] / total * client_update(n, 1, g_hat)["fc.weight"] for n in NODES)
    bound = sum(
        WEIGHTS[n] / total * row_scales(client_update(n, 1, g_hat)["fc.weight"] - g_hat["fc.weight"], 4) / 2
        for n in NODES
    )
    assert np.all(np.abs(as_numpy(arrays)["fc.weight"] - want) <= bound * (1 + 1e-5) + 1e-6)

    # evaluate instructions are encoded too
    emsgs = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid()))
    assert all(ff.is_encoded(m.content["arrays"]) for m in emsgs)


def test_decode_only_mod_leaves_the_uplink_plain():
    g = global_arrays()
    strategy = ff.CompressedStrategy(FedAvg(), downlink=fc.CodecSpec(bits=8))
    (arrays, _), wire = run_round(strategy, ff.compression_mod(None), make_contexts(), 1, g)
    for w in wire:
        assert not ff.is_encoded(w.content["arrays"]) and ff.BYTES_METRIC not in w.content["metrics"]
    h = strategy.history[1]
    assert h["uplink_bytes"] == h["uplink_raw_bytes"] and h["downlink_bytes"] < h["downlink_raw_bytes"]
    # plain uplink: exactly FedAvg of what the clients sent (computed here,
    # from the decoded downlink each client saw)
    seen = {}
    strategy = ff.CompressedStrategy(FedAvg(), downlink=fc.CodecSpec(bits=8))
    (arrays, _), _ = run_round(strategy, ff.compression_mod(None), make_contexts(), 1, g, app=make_app(1, seen))
    got, total = as_numpy(arrays), sum(WEIGHTS.values())
    for k in g:
        if k == "steps":
            continue
        want = sum(WEIGHTS[n] / total * client_update(n, 1, seen[n])[k].astype(np.float64) for n in NODES)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-6)


def test_corrupt_downlink_gives_an_error_reply_without_running_the_app():
    g = global_arrays()
    enc = ff.encode_array_record(g, fc.CodecSpec(bits=8))
    a = enc[ff.FULL_KEY]
    enc[ff.FULL_KEY] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-3])
    ins = Message(RecordDict({"arrays": enc}), dst_node_id=11, message_type=MessageType.TRAIN)
    called = []
    out = ff.compression_mod(SPEC4)(ins, make_contexts()[11], lambda m, c: called.append(1))
    assert not called
    assert out.has_error() and "cannot decode the downlink" in out.error.reason


# ---------------------------------------------------------------------------
# other wrapped strategies
# ---------------------------------------------------------------------------
def _clipped_fedavg(g, norm, base=None):
    """g + sample-weighted mean of each client's update clipped to L2 norm
    ``norm`` over all its arrays (fixed clipping, no noise), by hand."""
    base = base or {n: g for n in NODES}
    total, out = sum(WEIGHTS.values()), {k: g[k].astype(np.float64) for k in g}
    for n in NODES:
        d = {k: client_update(n, 1, base[n])[k].astype(np.float64) - base[n][k] for k in g}
        l2 = np.sqrt(sum(np.sum(v**2) for v in d.values()))
        assert l2 > 2 * norm  # the clipping bites
        for k in g:
            out[k] += WEIGHTS[n] / total * d[k] * min(1.0, norm / l2)
    return out


def test_dp_server_side_wrapper_sees_plain_arrays():
    # The server clips each decoded update: the result is FedAvg of clipped
    # updates, up to the 8-bit quantization of the deltas.
    g = {k: v for k, v in global_arrays().items() if k != "steps"}
    norm = 0.5
    mk = lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=norm, num_sampled_clients=2
    )
    want = _clipped_fedavg(g, norm)
    (plain, _), _ = run_round(mk(), None, make_contexts(), 1, g)
    strategy = ff.CompressedStrategy(mk())
    (arrays, _), _ = run_round(
        strategy, ff.compression_mod(fc.CodecSpec(bits=8), error_feedback=False), make_contexts(), 1, g
    )
    for k in g:
        np.testing.assert_allclose(as_numpy(plain)[k], want[k], rtol=0, atol=1e-6)  # Flower's own clipping
        # 8-bit row steps of updates with |entries| <~ 0.2, clipped ~4x: <~ 2e-4 after clipping
        np.testing.assert_allclose(as_numpy(arrays)[k], want[k], rtol=0, atol=3e-4)
    assert strategy.clipping_norm == norm  # wrapper exposes the wrapped strategy's attributes


def test_client_side_dp_clipping_mod_runs_inside_the_compression_mod():
    """mods=[compression_mod, fixedclipping_mod]: clipping sees plain arrays,
    the codec encodes the clipped update."""
    from flwr.client.mod.utils import make_ffn
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    g = {k: v for k, v in global_arrays().items() if k != "steps"}
    norm = 0.5  # the raw updates have norm ~1.6: clipping bites
    mk = lambda: DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=norm, num_sampled_clients=2
    )
    (plain, _), _ = run_round(mk(), None, make_contexts(), 1, g, app=make_ffn(make_app(1), [fixedclipping_mod]))
    mods = [ff.compression_mod(fc.CodecSpec(bits=8), error_feedback=False), fixedclipping_mod]
    strategy = ff.CompressedStrategy(mk())
    (arrays, _), wire = run_round(strategy, None, make_contexts(), 1, g, app=make_ffn(make_app(1), mods))
    assert all(ff.is_encoded(w.content["arrays"]) for w in wire)
    got, want = as_numpy(arrays), _clipped_fedavg(g, norm)
    for k in g:
        np.testing.assert_allclose(as_numpy(plain)[k], want[k], rtol=0, atol=1e-6)
        # the clipped update (norm 0.5 over ~1k elements) quantized at 8 bits
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=3e-4)


def test_fedadam_through_the_wrapper():
    # Adam's first step is eta * m / (sqrt(v) + tau) with m = 0.1 d and
    # sqrt(v) = 0.1 |d|: with the default tau (1e-3) it is about eta * sign(d),
    # and a wrongly scaled delta barely shows. tau = 0.1 >> 0.1 |d| (|d| <~ 0.1)
    # makes the step nearly linear in d, so the delta's size must be right.
    g = {k: v for k, v in global_arrays().items() if k != "steps"}  # FedAdam: float arrays only
    mk = lambda: FedAdam(eta=0.1, tau=0.1)
    (plain, _), _ = run_round(mk(), None, make_contexts(), 1, g)
    (arrays, _), _ = run_round(
        ff.CompressedStrategy(mk()),
        ff.compression_mod(fc.CodecSpec(bits=8), error_feedback=False),
        make_contexts(),
        1,
        g,
    )
    for k in ("conv.weight", "fc.weight"):
        step = np.abs(as_numpy(plain)[k] - g[k])
        diff = np.abs(as_numpy(arrays)[k] - as_numpy(plain)[k])
        # 8-bit quantization moves each step by a few % at most; a delta
        # scaled by 2x or 0.6x moves the typical step by 40 % or more
        assert np.median(diff) < 0.05 * np.median(step), (k, float(np.median(diff)), float(np.median(step)))
        assert np.max(diff) < 0.2 * np.max(step), k


def float32_app(rnd: int):
    """A client whose model is float32 (as a PyTorch model): it answers in
    float32 whatever dtype the global arrays came in."""
    inner = make_app(rnd)

    def app(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        rec = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in rec.items()}
        )
        return reply

    return app


def test_fedadam_float64_globals_still_travel_as_deltas(caplog):
    """FedAdam returns float64 global arrays from round 2; a float32 client
    still sends deltas (in float32), and the result tracks plain FedAdam."""
    g = {k: v for k, v in global_arrays().items() if k != "steps"}
    plain_strategy, strategy = FedAdam(eta=0.05), ff.CompressedStrategy(FedAdam(eta=0.05))
    mod = ff.compression_mod(fc.CodecSpec(bits=8))
    plain_arrays, arrays, contexts = dict(g), dict(g), make_contexts()
    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        for rnd in (1, 2, 3):
            (plain_rec, _), _ = run_round(plain_strategy, None, make_contexts(), rnd, plain_arrays,
                                          app=float32_app(rnd))  # fmt: skip
            (rec, metrics), wire = run_round(strategy, mod, contexts, rnd, arrays, app=float32_app(rnd))
            if rnd > 1:
                assert arrays["fc.weight"].dtype == np.float64  # what FedAdam hands back
            for w in wire:
                # every float tensor travelled as a delta: nothing in full
                assert ff.FULL_KEY not in w.content["arrays"], rnd
                delta = wire_decode(w.content["arrays"], ff.DELTA_KEY, strategy)
                assert {t.dtype for t in delta.values()} == {torch.float32}
            plain_arrays, arrays = as_numpy(plain_rec), as_numpy(rec)
    assert not [r for r in caplog.records if "sent in full" in r.getMessage()]
    diff = np.abs(arrays["fc.weight"] - plain_arrays["fc.weight"])
    assert np.median(diff) < 1e-2 and not np.allclose(arrays["fc.weight"], g["fc.weight"])


def test_full_fallback_warns_once(caplog):
    g = global_arrays()

    def reshaping_app(msg, context):
        reply = make_app(1)(msg, context)
        rec = reply.content["arrays"]
        w = rec["fc.weight"].numpy()
        rec["fc.weight"] = Array(np.ascontiguousarray(w.reshape(37, 10)))  # no longer the global's shape
        return reply

    mod = ff.compression_mod(SPEC4)
    with caplog.at_level(logging.WARNING, logger="flwr.flocora_codec"):
        for _ in range(2):
            (_, _), wire = run_round(ff.CompressedStrategy(FedAvg()), mod, make_contexts(), 1, g, app=reshaping_app)
    rec = wire[0].content["arrays"]
    names = fc.message_info(rec[ff.FULL_KEY].data, schemas=wire_schemas(rec)).tensors
    assert "fc.weight" in [t.name for t in names]
    warnings = [r.getMessage() for r in caplog.records if "sent in full" in r.getMessage()]
    assert len(warnings) == 1 and "fc.weight" in warnings[0] and "differ in shape" in warnings[0]


def test_round_byte_totals_are_sums_not_averages():
    g = global_arrays()
    strategy = ff.CompressedStrategy(FedAvg())
    (_, metrics), wire = run_round(strategy, ff.compression_mod(SPEC4), make_contexts(), 1, g)
    per_reply = [w.content["metrics"][ff.BYTES_METRIC] for w in wire]
    assert len(set(per_reply)) >= 1 and metrics["flocora-uplink-bytes"] == sum(per_reply)
    assert metrics["flocora-uplink-raw-bytes"] == sum(w.content["metrics"][ff.RAW_BYTES_METRIC] for w in wire)
    # the per-reply counts never reach FedAvg's weighted averaging
    assert ff.BYTES_METRIC not in metrics and ff.RAW_BYTES_METRIC not in metrics
    assert metrics["loss"] == pytest.approx(1.0)


def _dp_round_trip(mods, rounds, norm):
    from flwr.client.mod.utils import make_ffn
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    g = {k: v for k, v in global_arrays().items() if k != "steps"}
    strategy = ff.CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=norm, num_sampled_clients=2))  # fmt: skip
    contexts, arrays, sent_norms = make_contexts(), g, []
    for rnd in range(1, rounds + 1):
        (rec, _), wire = run_round(strategy, None, contexts, rnd, arrays, app=make_ffn(make_app(rnd), mods))
        for w in wire:
            assert not w.msg.has_error(), w.msg.error
            delta = wire_decode(w.content["arrays"], ff.DELTA_KEY, strategy, numpy=True)
            sent_norms.append(float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in delta.values()))))
        arrays = as_numpy(rec)
    return sent_norms, contexts


def test_error_feedback_never_lifts_a_clipped_update_above_the_clipping_norm():
    """The documented order, mods=[compression_mod(spec), fixedclipping_mod]:
    fixedclipping_mod clips the plain update; the compression mod adds its
    error-feedback residual and quantizes, then keeps what it sends within the
    clipping norm that came with the instruction."""
    from flwr.clientapp.mod import fixedclipping_mod

    norm = 0.5  # the raw updates have norm ~1.6: clipping bites every round
    spec = fc.CodecSpec(bits=2, granularity="tensor")  # coarse: large quantization error to feed back
    sent, contexts = _dp_round_trip([ff.compression_mod(spec), fixedclipping_mod], 4, norm)
    assert max(sent) <= norm * (1 + 1e-9), sent
    assert max(sent) > 0.9 * norm  # it did send clipped-size updates
    # error feedback is on: residuals were kept (quantization error only)
    residual = as_numpy(next(iter(contexts.values())).state.array_records["flocora.residual"])
    assert residual and all(np.isfinite(r).all() for r in residual.values())
    r_norm = float(np.sqrt(sum(np.sum(r.astype(np.float64) ** 2) for r in residual.values())))
    assert r_norm < norm  # bounded by one quantization error, not growing with what clipping cut


def test_compression_mod_inside_the_clipping_mod_fails_loudly():
    """The wrong order, mods=[fixedclipping_mod, compression_mod]: the clipping
    mod would see encoded arrays; it answers with an error reply instead of
    clipping codec bytes."""
    from flwr.client.mod.utils import make_ffn
    from flwr.clientapp.mod import fixedclipping_mod

    g = {k: v for k, v in global_arrays().items() if k != "steps"}
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    strategy = ff.CompressedStrategy(DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=0.5, num_sampled_clients=2))  # fmt: skip
    mods = [fixedclipping_mod, ff.compression_mod(SPEC4)]
    (_, _), wire = run_round(strategy, None, make_contexts(), 1, g, app=make_ffn(make_app(1), mods))
    assert all(w.msg.has_error() for w in wire)


# ---------------------------------------------------------------------------
# records and argument checks
# ---------------------------------------------------------------------------
def test_decode_array_record_rejects_bad_records():
    g = global_arrays()
    enc = ff.encode_array_record(client_update(11, 1, g), SPEC4, base=g)
    with pytest.raises(ff.EncodedRecordError, match="no global arrays"):
        ff.decode_array_record(enc)
    other = {k: np.zeros((3, 3), np.float32) for k in g}
    with pytest.raises(ff.EncodedRecordError, match="shape"):
        ff.decode_array_record(enc, other)
    with pytest.raises(ff.EncodedRecordError, match="absent from the global"):
        ff.decode_array_record(enc, {"fc.bias": g["fc.bias"]})
    bad = ArrayRecord({"flocora/other": enc[ff.DELTA_KEY]})
    with pytest.raises(ff.EncodedRecordError, match="unexpected key"):
        ff.decode_array_record(bad, g)
    with pytest.raises(fc.CodecError):
        a = enc[ff.DELTA_KEY]
        ff.decode_array_record(ArrayRecord({ff.DELTA_KEY: Array(a.dtype, a.shape, a.stype, b"x" * 40)}), g)


from hypothesis import given, settings  # noqa: E402  the property tests' own imports
from hypothesis import strategies as st  # noqa: E402  the property tests' own imports

_shapes = st.sampled_from([(), (0,), (1,), (7,), (3, 5), (0, 4), (4, 1), (2, 3, 4), (16, 65)])
_dtypes = st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_])


@st.composite
def _record_and_base(draw):
    n = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    arrays, base = {}, {}
    for i in range(n):
        shape, dtype = draw(_shapes), draw(_dtypes)
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        arrays[f"t{i}.w"] = x
        how = draw(st.sampled_from(["same", "absent", "other_shape"]))
        if how == "same":
            base[f"t{i}.w"] = (rng.standard_normal(shape) * 3).astype(dtype)
        elif how == "other_shape":
            base[f"t{i}.w"] = np.zeros((2, 2), dtype)
    return arrays, base


@settings(max_examples=40, deadline=None)
@given(_record_and_base(), st.booleans())
def test_record_roundtrip_property(rb, use_base):
    """Raw spec: every tensor comes back with its name, shape and dtype, equal up
    to one float rounding of (x - base) + base; ints and bools exactly."""
    arrays, base = rb
    base = base if use_base else None
    out = as_numpy(ff.decode_array_record(ff.encode_array_record(arrays, fc.CodecSpec.raw(), base), base))
    assert set(out) == set(arrays)
    for k, x in arrays.items():
        y = out[k]
        assert y.shape == x.shape and y.dtype == x.dtype, k
        if np.issubdtype(x.dtype, np.floating):
            tol = float(np.finfo(x.dtype).eps) * 8 * (1 + np.abs(x.astype(np.float64)).max(initial=0))
            np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64), rtol=0, atol=tol)
        else:
            np.testing.assert_array_equal(y, x)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 20), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_quantized_delta_within_half_a_step_property(bits, rows, cols, seed):
    rng = np.random.default_rng(seed)
    g = {"w": rng.standard_normal((rows, cols)).astype(np.float32)}
    x = {"w": (g["w"] + rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 10)).astype(np.float32)}
    enc = ff.encode_array_record(x, fc.CodecSpec(bits=bits, granularity="row"), g)
    got = as_numpy(ff.decode_array_record(enc, g))["w"]
    d = x["w"] - g["w"]
    bound = row_scales(d, bits) / 2
    assert np.all(np.abs(got - x["w"]) <= bound * (1 + 1e-5) + 1e-6 * (1 + np.abs(x["w"])))


def test_empty_record_roundtrips():
    enc = ff.encode_array_record({}, SPEC4)
    assert list(enc.keys()) == [ff.FULL_KEY]
    assert len(ff.decode_array_record(enc)) == 0


def test_argument_checks():
    with pytest.raises(ValueError, match="mode"):
        ff.compression_mod(SPEC4, mode="weights")
    with pytest.raises(ValueError, match="error_feedback"):
        ff.compression_mod(SPEC4, mode="arrays", error_feedback=True)
    with pytest.raises(TypeError, match="CodecSpec"):
        ff.compression_mod({"bits": 4})
    with pytest.raises(TypeError, match="Strategy"):
        ff.CompressedStrategy(object())
    with pytest.raises(TypeError, match="downlink"):
        ff.CompressedStrategy(FedAvg(), downlink=4)


def test_clear_import_error_without_flower(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.app", None)  # makes `import flwr.app` fail
    monkeypatch.delitem(sys.modules, "flocora_codec.flower", raising=False)
    with pytest.raises(ImportError, match=r"flocora-codec\[flower\]"):
        importlib.import_module("flocora_codec.flower")
    monkeypatch.undo()
    importlib.import_module("flocora_codec.flower")


# ---------------------------------------------------------------------------
# one real simulation (Ray)
# ---------------------------------------------------------------------------
def _sim_apps(out: dict):
    """A tiny least-squares model trained by 2 virtual nodes through the codec."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    w_true = np.linspace(-1.0, 1.0, 8 * 32, dtype=np.float32).reshape(8, 32)

    def data(node: int):
        rng = np.random.default_rng(node % 1000)
        x = rng.standard_normal((64, 32)).astype(np.float32)
        return x, x @ w_true.T

    client = ClientApp(mods=[ff.compression_mod(fc.CodecSpec(bits=4))])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        x, y = data(context.node_id)
        for _ in range(5):  # a few full-batch gradient steps
            w = w - 0.05 * ((x @ w.T - y).T @ x) / len(x)
        loss = float(np.mean((x @ w.T - y) ** 2))
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": len(x), "loss": loss}),
            }
        )
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = ff.CompressedStrategy(FedAvg(fraction_evaluate=0.0))
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros((8, 32), np.float32))}),
            num_rounds=2,
            timeout=120,
        )
        out["history"] = dict(strategy.history)
        out["loss"] = [float(result.train_metrics_clientapp[r]["loss"]) for r in (1, 2)]
        out["w"] = result.arrays["w"].numpy()

    return server, client


@pytest.mark.slow
def test_run_simulation_two_nodes_two_rounds():
    ray = pytest.importorskip("ray", reason="run_simulation needs flwr[simulation] (Ray)")
    from flwr.simulation import run_simulation

    # Ray workers unpickle the ClientApp: ship this module's code by value, so
    # they need not import the test package from their own sys.path.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out: dict = {}
    server, client = _sim_apps(out)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=2,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    assert sorted(out["history"]) == [1, 2]
    for h in out["history"].values():
        assert h["dropped"] == 0
        assert 0 < h["uplink_bytes"] < h["uplink_raw_bytes"] / 2
    assert out["loss"][1] < out["loss"][0]  # it learned through 4-bit deltas


# ---------------------------------------------------------------------------
# the bundled app on a real deployment: 1 SuperLink + 2 SuperNodes on loopback
# ---------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> list[int]:
    """PIDs of all living descendants of ``pid`` (from /proc), deepest last."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(procs) -> None:
    """Stop the processes we started and every process they spawned, by PID.

    SuperLink and SuperNode start their SuperExec (and it the ServerApp /
    ClientApp processes) in sessions of their own, so a process-group signal
    would miss them: collect the descendants first, then signal each one.
    """
    import os
    import signal
    import subprocess
    import time

    pids = []
    for p in procs:
        pids += _descendants(p.pid) + [p.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # whatever ignored SIGTERM
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=5)


def _wait_http(url: str, timeout: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


class _Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 running fl/flower_app.

    flocora-codec comes from the wheel built from the sdist (tests/conftest.py),
    installed into a directory of its own: the Flower processes see that
    directory and the venv's packages, not the repository (no `fl` on the path;
    the app imports the installed `flocora_fl`). Every process is stopped by
    PID on exit, the processes they spawned included.
    """

    def __init__(self, tmp_path, built_dist, n_nodes: int = 2):
        import os
        from pathlib import Path

        self.tmp, self.repo = tmp_path, Path(__file__).resolve().parents[1]
        self.app_dir = self.repo / "fl" / "flower_app"
        self.binaries = Path(sys.executable).parent
        if not (self.binaries / "flower-superlink").exists():
            pytest.skip("flower-superlink is not installed next to this Python")
        self.link_port, *self.node_ports = _free_ports(1 + n_nodes)
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.link_port}"\n'
            "insecure = true\n")  # fmt: skip
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(home),
            # the installed wheel, plus whatever else PYTHONPATH held except the
            # repository (e.g. flwr 1.41 for tests/test_flower_versions.py)
            "PYTHONPATH": os.pathsep.join([str(built_dist["site"])] + [
                p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != self.repo]),
            "PATH": os.pathsep.join([str(self.binaries), env.get("PATH", "")]),
            # nothing may be pip-installed at run time, nor any update checked
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        })  # fmt: skip
        env.pop("FLOCORA_FORCE_REFERENCE", None)
        self.env, self.site = env, built_dist["site"]
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict = {}

    def check_environment(self) -> None:
        import subprocess

        check = subprocess.run([sys.executable, "-c", "import importlib.util as u, flocora_fl, flocora_codec, "
                                "flwr; assert u.find_spec('fl') is None; print(flocora_fl.__file__, "
                                "flocora_codec.__file__, flwr.__version__)"],
                               env=self.env, cwd=self.tmp, capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0 and check.stdout.count(str(self.site)) == 2, check.stdout + check.stderr
        assert check.stdout.split()[-1] == flwr.__version__  # the Flower processes run the Flower under test

    def start(self, name, *args):
        import subprocess

        with open(self.logs / f"{name}.log", "w") as out:
            self.procs[name] = subprocess.Popen([str(self.binaries / args[0]), *args[1:]], env=self.env, cwd=self.tmp,
                                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def __enter__(self):
        self.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.link_port),
            "--disable-runtime-dependency-installation",
        )
        _wait_http(f"http://127.0.0.1:{self.link_port}/health", 60)
        for i, port in enumerate(self.node_ports):
            self.start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-retries",
                "20",
                "--node-config",
                f"partition-id={i} num-partitions={len(self.node_ports)}",
            )
        return self

    def __exit__(self, *exc):
        procs = list(self.procs.values())
        _stop(procs)
        assert all(p.poll() is not None for p in procs)

    def submit(self, run_config: str, summary_path, wait: float = 420):
        """``flwr run`` in the background; returns the process (its output in logs/flwr-run.log)."""
        import subprocess

        out = open(self.logs / "flwr-run.log", "w")
        return subprocess.Popen([str(self.binaries / "flwr"), "run", str(self.app_dir), "deploy", "--stream",
                                 "--run-config", run_config], env=self.env, cwd=self.tmp, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def summary(self, summary_path, run, timeout: float) -> dict:
        import json
        import time

        deadline = time.monotonic() + timeout
        while not summary_path.exists() and time.monotonic() < deadline:
            time.sleep(1)
        run.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert summary_path.exists(), ((self.logs / "flwr-run.log").read_text()[-3000:],
                                       (self.logs / "superlink.log").read_text()[-3000:])  # fmt: skip
        return json.loads(summary_path.read_text())


@pytest.mark.slow
def test_flower_app_deployment_two_supernodes(tmp_path, built_dist):
    """``flwr run`` of fl/flower_app against a SuperLink and two SuperNodes
    (127.0.0.1 only), two rounds with 4-bit uplink and 8-bit downlink, from
    a plain install of the wheel (see _Deployment)."""
    with _Deployment(tmp_path, built_dist) as dep:
        dep.check_environment()
        summary_path = tmp_path / "summary.json"
        run_config = (
            f"num-server-rounds=2 codec-bits=4 downlink-bits=8 min-nodes=2 fraction-train=1.0 "
            f'summary-path="{summary_path}" '
            f'fl-overrides="method.name=flocora train.max_steps=3 data.num_clients=2"'
        )
        res = dep.summary(summary_path, dep.submit(run_config, summary_path), timeout=480)
    assert res["method"] == "flocora" and res["rounds"] == 2
    assert len(res["acc"]) == 3 and all(0.0 <= a <= 1.0 for a in res["acc"])
    for rnd in ("1", "2"):
        h = res["bytes"][rnd]
        assert h["dropped"] == 0 and h["instructions"] == 2 and h["missing_replies"] == 0
        assert 0 < h["uplink_bytes"] < h["uplink_raw_bytes"] / 4  # 4-bit deltas, 1-D tensors raw
        assert 0 < h["downlink_bytes"] < h["downlink_raw_bytes"] / 2  # 8-bit downlink


@pytest.mark.slow
def test_flower_app_deployment_survives_a_supernode_killed_mid_round(tmp_path, built_dist):
    """SuperNode 1 is killed (SIGKILL, with its ClientApp) as soon as it starts
    training in round 2: the round ends at its timeout with the other node's
    reply, the run completes, and the summary shows the missing reply."""
    import os
    import signal
    import time

    with _Deployment(tmp_path, built_dist) as dep:
        summary_path = tmp_path / "summary.json"
        run_config = (
            f"num-server-rounds=2 codec-bits=4 min-nodes=2 fraction-train=1.0 round-timeout=45.0 "
            f'summary-path="{summary_path}" '
            f'fl-overrides="method.name=flocora train.max_steps=3 data.num_clients=2"'
        )
        run = dep.submit(run_config, summary_path)
        log1 = dep.logs / "supernode1.log"
        deadline = time.monotonic() + 300
        while log1.read_text().count("Start `flwr-clientapp` process") < 2:  # its round-2 ClientApp
            assert time.monotonic() < deadline and run.poll() is None, log1.read_text()[-3000:]
            time.sleep(0.05)
        node = dep.procs["supernode1"]
        for pid in _descendants(node.pid) + [node.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait(timeout=10)
        sent_before_kill = log1.read_text().count("Sending: train message")
        res = dep.summary(summary_path, run, timeout=300)
    assert sent_before_kill == 1, "node 1 answered round 2 before it was killed: the test did not test anything"
    assert res["rounds"] == 2 and len(res["acc"]) == 3
    h1, h2 = res["bytes"]["1"], res["bytes"]["2"]
    assert (h1["instructions"], h1["missing_replies"]) == (2, 0)
    assert (h2["instructions"], h2["missing_replies"], h2["dropped"]) == (2, 1, 0)
    assert 0 < h2["uplink_bytes"] < h1["uplink_bytes"]  # one reply aggregated instead of two
