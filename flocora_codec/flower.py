"""Flower (flwr 1.41, 1.42) integration: a client mod and a strategy wrapper.

Two lines turn an existing Flower app into one that sends compressed updates::

    app = ClientApp(mods=[compression_mod(CodecSpec(bits=4))])   # client side
    strategy = CompressedStrategy(FedAvg())                       # server side

On the way up, :func:`compression_mod` replaces the arrays of every ``train``
reply with one or two flocora messages (``Array`` objects whose ``stype`` is
:data:`STYPE`): by default the *update* (reply minus the global arrays the
client received), with error feedback kept in ``Context.state``.
:class:`CompressedStrategy` decodes them back to plain arrays (global + update)
before the wrapped strategy (``FedAvg``, ``FedAdam``, the DP wrappers, ...)
sees them, so that strategy needs no change. With ``downlink=`` the global
arrays travel encoded as well and the mod decodes them before the client app
runs.

The wire layout inside the reply's single ``ArrayRecord``:

=====================  =====================================================
key                    content
=====================  =====================================================
``"flocora/delta"``    message of the tensors sent as ``x - global``
``"flocora/full"``     message of the tensors sent as they are (names absent
                       from the global arrays, non-float tensors, or
                       ``mode="arrays"``)
=====================  =====================================================

Each entry is ``Array(dtype="uint8", shape=(n,), stype=STYPE, data=message)``,
so Flower moves it like any other array, and a strategy that forgets the
wrapper fails loudly (``Array.numpy()`` refuses a foreign ``stype``) instead of
averaging codec bytes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import (
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
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError(
        "flocora_codec.flower needs Flower (flwr>=1.41,<2; tested with 1.41 and 1.42), which is not installed. "
        "pip install 'flwr>=1.41,<2', or install flocora-codec with its extra, flocora-codec[flower] "
        '(README, "Installing")'
    ) from exc

import flocora_codec as fc

__all__ = [
    "STYPE",
    "DELTA_KEY",
    "FULL_KEY",
    "BYTES_METRIC",
    "RAW_BYTES_METRIC",
    "SCHEMA_STYPE",
    "SCHEMAS_CONFIG_KEY",
    "EncodedRecordError",
    "is_encoded",
    "encode_array_record",
    "decode_array_record",
    "compression_mod",
    "CompressedStrategy",
]

# A child of Flower's logger: its handlers show our warnings wherever Flower's
# own log goes (terminal, `flwr run --stream`, SuperLink/SuperNode logs).
log = logging.getLogger("flwr.flocora_codec")

STYPE = "flocora/v1"
"""``Array.stype`` of an array whose ``data`` is one flocora wire message."""
DELTA_KEY = "flocora/delta"
FULL_KEY = "flocora/full"
BYTES_METRIC = "flocora-bytes"
"""Reply metric: bytes of the encoded ``ArrayRecord`` (``ArrayRecord.count_bytes``)."""
RAW_BYTES_METRIC = "flocora-raw-bytes"
"""Reply metric: bytes the same arrays take as plain Flower arrays."""
SCHEMA_STYPE = "flocora/schema-v1"
"""``Array.stype`` of an array whose ``data`` is one schema (FORMAT.md 6.1)."""
SCHEMA_KEY_PREFIX = "flocora/schema/"
"""Key prefix of a schema sent with a reply: ``flocora/schema/<id in hex>``."""
SCHEMAS_CONFIG_KEY = "flocora-schemas"
"""Train-instruction config key: the ids (16 bytes each, concatenated) of the
schemas the server holds. Its presence tells the mod to send compact messages."""
CLIPPING_NORM_KEY = "clipping_norm"
"""Config key of the clipping norm that Flower's DP strategy wrappers send with
train instructions (flwr's ``KEY_CLIPPING_NORM``, read by ``fixedclipping_mod``)."""

_MODES = ("delta", "arrays")
# error codes of the replies a SuperLink writes for a node that cannot answer
_UNREACHABLE = frozenset(
    (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
)


class EncodedRecordError(ValueError):
    """An ``ArrayRecord`` that claims to hold flocora messages but cannot be decoded
    into plain arrays (wrong keys, missing global arrays, shape mismatch)."""


# ---------------------------------------------------------------------------
# ArrayRecord <-> flocora messages
# ---------------------------------------------------------------------------
def is_encoded(record: ArrayRecord) -> bool:
    """Whether ``record`` holds at least one flocora message.

    Parameters
    ----------
    record : ArrayRecord

    Returns
    -------
    bool
    """
    return any(a.stype == STYPE for a in record.values())


def _message_array(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _c_array(x) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
    return np.require(np.asarray(x), requirements="C")


def _as_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
    # writable C arrays: torch.from_numpy shares their memory and warns on read-only ones
    return {k: torch.from_numpy(np.require(v, requirements=("C", "W"))) for k, v in arrays.items()}


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _split_delta(
    arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split into (deltas against ``base``, tensors sent as they are).

    Float tensors whose name and shape match a float array of ``base`` become
    deltas, in the reply's dtype (``x - base.astype(x.dtype)``): a strategy
    such as ``FedAdam`` returns float64 global arrays that a float32 model
    answers in float32, and the receiver adds the delta to the global arrays
    cast the same way. The difference of anything else (integer counters, new
    tensors, changed shapes) is either undefined or no smaller than the tensor.
    """
    delta, full = {}, {}
    for name, x in arrays.items():
        b = None if base is None else base.get(name)
        if b is not None and _is_float(x) and _is_float(b) and b.shape == x.shape:
            delta[name] = x - b.astype(x.dtype, copy=False)
        else:
            full[name] = x
    return delta, full


def _full_fallbacks(full: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None) -> list[str]:
    """Float tensors sent in full in delta mode although a delta was expected:
    no global arrays at all, or a global array of another shape or kind."""
    return [n for n, x in full.items() if _is_float(x) and (base is None or n in base)]


def encode_array_record(
    record: ArrayRecord | Mapping[str, np.ndarray],
    spec: fc.CodecSpec,
    base: ArrayRecord | Mapping[str, np.ndarray] | None = None,
    *,
    server_schemas: set | None = None,
) -> ArrayRecord:
    """Encode an ``ArrayRecord`` (or a dict of numpy arrays) into flocora messages.

    Parameters
    ----------
    record : ArrayRecord or mapping of str to numpy.ndarray
        The arrays to send.
    spec : CodecSpec
        How to compress them.
    base : ArrayRecord or mapping, optional
        Arrays the receiver already holds (the global model). Float arrays with
        the same name, shape and dtype travel as ``x - base``; ``None`` sends
        everything as it is.
    server_schemas : set of bytes, optional
        The ids of the schemas the receiver holds: write compact messages
        (FORMAT.md 6) and add the schemas it lacks to the record. ``None``
        (the default) writes full messages.

    Returns
    -------
    ArrayRecord
        With :data:`DELTA_KEY` and/or :data:`FULL_KEY` entries of ``stype``
        :data:`STYPE`.
    """
    arrays = _to_numpy(record) if isinstance(record, ArrayRecord) else dict(record)
    if isinstance(base, ArrayRecord):
        base = _to_numpy(base)
    delta, full = _split_delta(arrays, base)
    out = ArrayRecord()
    compact = _Compactor(server_schemas)
    if delta:
        out[DELTA_KEY] = _message_array(fc.encode_numpy(delta, spec, schema=compact.schema(delta, spec)))
    if full or not delta:  # an empty record still becomes one (empty) message
        out[FULL_KEY] = _message_array(fc.encode_numpy(full, spec, schema=compact.schema(full, spec)))
    compact.add_to(out)
    return out


def decode_array_record(
    record: ArrayRecord,
    base: ArrayRecord | Mapping[str, np.ndarray] | None = None,
    *,
    limits: Any = None,
    expect_base: bool = False,
    schemas: "fc.SchemaRegistry | None" = None,
) -> ArrayRecord:
    """Decode a record made by :func:`encode_array_record` back to plain arrays.

    Parameters
    ----------
    record : ArrayRecord
        Holds :data:`DELTA_KEY` and/or :data:`FULL_KEY` messages, nothing else.
    base : ArrayRecord or mapping, optional
        The arrays the deltas were taken against; required when the record has
        a :data:`DELTA_KEY` entry.
    limits : DecodeLimits, optional
        Passed to the decoder (untrusted input: bounds what a message may
        allocate). ``None`` uses the codec's defaults.
    expect_base : bool
        Every tensor of either message must be one of ``base``'s names with
        its shape (any dtype), checked before anything is allocated: a reply
        cannot make the server allocate more than the global model. Schemas
        in the record are held to the same.
    schemas : SchemaRegistry, optional
        The schemas the receiver holds, for compact messages. Schemas that
        come with the record (``flocora/schema/<id>`` entries) are validated
        and, once the record has decoded, added to it.

    Returns
    -------
    ArrayRecord
        Plain numpy arrays: names in ``base`` first (in its order), then the
        rest in message order.

    Raises
    ------
    EncodedRecordError
        Unknown keys or stype, deltas without ``base``, names or shapes that do
        not match ``base``, a name sent twice.
    CodecError
        A message that fails to decode (checksum, format, limits).
    """
    arrived = []
    for key, arr in record.items():
        if key.startswith(SCHEMA_KEY_PREFIX):
            if arr.stype != SCHEMA_STYPE:
                raise EncodedRecordError(f"entry {key!r} has stype {arr.stype!r}, expected {SCHEMA_STYPE!r}")
            arrived.append((key, arr))
            continue
        if key not in (DELTA_KEY, FULL_KEY):
            raise EncodedRecordError(
                f"encoded ArrayRecord has unexpected key {key!r} (expected {DELTA_KEY!r} and/or {FULL_KEY!r})"
            )
        if arr.stype != STYPE:
            raise EncodedRecordError(f"entry {key!r} has stype {arr.stype!r}, expected {STYPE!r}")
    kwargs = {} if limits is None else {"limits": limits}
    if isinstance(base, ArrayRecord):
        base = _to_numpy(base)
    if expect_base:
        if base is None:
            raise EncodedRecordError("cannot check the reply: no global arrays are known for its node")
        kwargs.update(expect={n: (b.shape, None) for n, b in base.items()}, partial=True)
    held = fc.SchemaRegistry(schemas or {})
    new_schemas = []
    named = {fc.format.compact_schema_id(record[k].data) for k in (DELTA_KEY, FULL_KEY) if k in record}
    for key, arr in arrived:
        if key[len(SCHEMA_KEY_PREFIX) :] not in {sid.hex() for sid in named if sid is not None}:
            # only the schemas of its own messages: a reply cannot make the server validate or keep more
            raise EncodedRecordError(f"entry {key!r} is not the schema of a message in the record")
        schema = fc.Schema.from_bytes(arr.data, **kwargs)
        if key != SCHEMA_KEY_PREFIX + schema.id.hex():
            raise EncodedRecordError(f"entry {key!r} holds schema {schema.id.hex()}")
        new_schemas.append(held.add(schema))
    kwargs["schemas"] = held
    out: dict[str, np.ndarray] = {}
    if DELTA_KEY in record:
        if base is None:
            raise EncodedRecordError("reply carries deltas but no global arrays are known to add them to")
        delta = fc.decode_numpy(record[DELTA_KEY].data, **kwargs)
        for name, b in base.items():
            if name in delta:
                d = delta[name]
                if d.shape != b.shape:
                    raise EncodedRecordError(
                        f"delta {name!r} has shape {tuple(d.shape)} but the global array has {tuple(b.shape)}"
                    )
                # in the delta's dtype: the reply's (see _split_delta)
                out[name] = b.astype(d.dtype, copy=False) + d
        unknown = [n for n in delta if n not in base]
        if unknown:
            raise EncodedRecordError(f"deltas for names absent from the global arrays: {unknown[:5]}")
    if FULL_KEY in record:
        for name, x in fc.decode_numpy(record[FULL_KEY].data, **kwargs).items():
            if name in out:
                raise EncodedRecordError(f"tensor {name!r} sent both as delta and in full")
            out[name] = x
    if schemas is not None:
        for schema in new_schemas:
            schemas.add(schema)
    return ArrayRecord({k: Array(_c_array(v)) for k, v in out.items()})


def _update_norm(reply: Message, base: Mapping[str, np.ndarray] | None) -> float | None:
    """L2 norm of a reply's float arrays minus the global arrays (the arrays
    themselves where no global one matches); None if any holds NaN or Inf."""
    sq = 0.0
    for rec in reply.content.array_records.values():
        for name, arr in rec.items():
            x = arr.numpy()
            if not _is_float(x):
                continue
            if not np.isfinite(x).all():
                return None
            b = None if base is None else base.get(name)
            d = x.astype(np.float64) - (b if b is not None and b.shape == x.shape else 0.0)
            sq += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(sq))


def _warn_once(seen: set, key: tuple, fmt: str, *args) -> None:
    if key not in seen:
        seen.add(key)
        log.warning(fmt, *args)


def _l2(arrays: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())))


class _Compactor:
    """Writes compact messages (FORMAT.md 6) when the server holds schemas:
    each message against its schema, and the schemas the server lacks go
    along in the reply, once."""

    def __init__(self, server_ids: set | None):
        self.server_ids = server_ids
        self.to_send: dict[bytes, fc.Schema] = {}

    def schema(self, arrays: Mapping[str, np.ndarray], spec: fc.CodecSpec) -> "fc.Schema | None":
        if self.server_ids is None:
            return None  # a server that announced nothing: full (version 1/2) messages
        schema = fc.Schema.build(arrays, spec)
        if schema.id not in self.server_ids:
            self.to_send[schema.id] = schema
        return schema

    def add_to(self, record: ArrayRecord) -> None:
        for sid, schema in self.to_send.items():
            data = schema.to_bytes()
            record[SCHEMA_KEY_PREFIX + sid.hex()] = Array(dtype="uint8", shape=(len(data),), stype=SCHEMA_STYPE,
                                                          data=data)  # fmt: skip


def _server_schema_ids(msg: Message) -> set | None:
    """The schema ids a train instruction says the server holds (None: not announced)."""
    for rec in msg.content.config_records.values():
        value = rec.get(SCHEMAS_CONFIG_KEY)
        if isinstance(value, bytes) and len(value) % fc.format.SCHEMA_ID_SIZE == 0:
            n = fc.format.SCHEMA_ID_SIZE
            return {value[i : i + n] for i in range(0, len(value), n)}
    return None


def _encode_within(
    delta: dict[str, np.ndarray], spec: fc.CodecSpec, bound: float | None, schema: "fc.Schema | None" = None
) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode ``delta`` so that the *decoded* update has L2 norm <= ``bound``.

    Returns ``(message, decoded, encoded_delta)``, ``encoded_delta`` being
    ``delta`` scaled down when the bound needed it. Quantization (and error
    feedback's residual before it) can lift the norm of a clipped update above
    the clipping norm; scaling the input scales every codec's output in
    proportion (affine offsets and scales, top-k values, sign magnitudes), so
    one rescale lands within the bound up to float rounding, which the margin
    of the following tries absorbs.
    """
    data = fc.encode_numpy(delta, spec, schema=schema)
    sent = fc.decode_numpy(data, schemas=schema)
    if bound is None:
        return data, sent, delta
    for attempt in range(8):
        norm = _l2(sent)
        if norm <= bound:
            return data, sent, delta
        factor = bound / norm * (1.0 - 1e-6 * 4**attempt)
        delta = {k: (v * factor).astype(v.dtype, copy=False) for k, v in delta.items()}
        data = fc.encode_numpy(delta, spec, schema=schema)
        sent = fc.decode_numpy(data, schemas=schema)
    if _l2(sent) <= bound:
        return data, sent, delta
    log.warning("compression_mod: could not fit the update within the clipping norm %g; sending zeros", bound)
    delta = {k: np.zeros_like(v) for k, v in delta.items()}
    data = fc.encode_numpy(delta, spec, schema=schema)
    return data, fc.decode_numpy(data, schemas=schema), delta


def _copy_content(content: RecordDict, replace: Mapping[str, Any]) -> RecordDict:
    """A new RecordDict with some records swapped; the old one is left as is
    (Flower strategies share one RecordDict between all messages of a round)."""
    out = {k: replace.get(k, rec) for k, rec in content.items()}
    out.update({k: rec for k, rec in replace.items() if k not in out})
    return RecordDict(out)


def _is_train(msg: Message) -> bool:
    # message types are "train" or "train.<action>"
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (stable across processes, unlike hash())."""
    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return zlib.crc32(data) & 0x7FFFFFFF


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------
def compression_mod(
    spec: fc.CodecSpec | None,
    *,
    mode: str = "delta",
    error_feedback: bool | None = None,
    state_key: str = "flocora",
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A Flower client mod that compresses train replies (and decodes the downlink).

    Put it first in ``ClientApp(mods=[...])`` so it is the outermost layer: it
    decodes what arrives before any other mod sees it and encodes what leaves
    after them. With client-side DP clipping the order is
    ``mods=[compression_mod(spec), fixedclipping_mod]``: ``fixedclipping_mod``
    clips the plain update, then this mod adds its error-feedback residual,
    quantizes, and scales what it sends so that the *decoded* update stays
    within the clipping norm of the instruction (the ``"clipping_norm"`` that
    Flower's ``DifferentialPrivacyClientSideFixedClipping`` sends): error
    feedback then only re-sends quantization error, never what clipping cut.
    The other order fails loudly (``fixedclipping_mod`` answers with an error
    reply rather than clip codec bytes).

    Parameters
    ----------
    spec : CodecSpec or None
        How the uplink is compressed. ``None``: replies travel as plain arrays
        and the mod only decodes a compressed downlink.
    mode : {"delta", "arrays"}
        ``"delta"``: send ``reply - global`` for float arrays that the train
        instruction carried (its single ``ArrayRecord``); others travel in full.
        ``"arrays"``: send the reply arrays themselves.
    error_feedback : bool, optional
        Add the previous round's compression error of each delta before
        encoding it (:class:`flocora_codec.ErrorFeedback`, whose residuals
        live in ``context.state``, so they persist across rounds on the node,
        survive restarts of the ClientApp process and never leave it; a
        residual of the wrong shape is dropped with a warning, as there).
        Default: on in ``"delta"`` mode. Not available in ``"arrays"`` mode.
    state_key : str
        Prefix of the records this mod keeps in ``context.state``.

    Returns
    -------
    callable
        ``mod(msg, context, call_next) -> Message``.

    Notes
    -----
    - Any incoming message whose ``ArrayRecord`` holds flocora messages (the
      strategy's ``downlink=``) is decoded first; if that fails the mod answers
      with an error reply and the client app is not called.
    - Only replies to ``train`` messages are encoded; error replies, replies
      without exactly one ``ArrayRecord`` and other message types pass through.
    - The reply's ``MetricRecord`` (the first one; a new ``"metrics"`` record
      if there is none) gains :data:`BYTES_METRIC` and :data:`RAW_BYTES_METRIC`.
    - With ``rounding="stochastic"`` the seed is mixed with the node id and a
      per-node round counter, so rounds and nodes draw independent noise.
    - Deltas are taken in the reply's dtype: global arrays that come back in
      another float dtype (``FedAdam`` returns float64 from round 2) still
      travel as deltas. A float tensor that cannot (no global arrays in the
      instruction, another shape) is sent in full, and the mod logs a
      warning the first time that happens for those tensors.
    - The clipping bound needs ``mode="delta"``; in ``"arrays"`` mode it is
      not enforced after quantization (a warning says so).
    - Compact messages (FORMAT.md 6): when the train instruction lists the
      schemas the server holds (:data:`SCHEMAS_CONFIG_KEY`, which
      ``CompressedStrategy`` sends), each message refers to its schema by id
      instead of carrying its tables, and a schema the server lacks travels
      once, in the reply (``flocora/schema/<id>``). Otherwise the mod writes
      full messages, which every decoder reads.
    """
    if spec is not None and not isinstance(spec, fc.CodecSpec):
        raise TypeError(f"compression_mod: spec must be a flocora_codec.CodecSpec or None; got {type(spec).__name__}")
    if mode not in _MODES:
        raise ValueError(f"compression_mod: mode must be one of {', '.join(_MODES)}; got {mode!r}")
    if error_feedback is None:
        error_feedback = mode == "delta" and spec is not None
    if error_feedback and mode != "delta":
        raise ValueError('compression_mod: error_feedback needs mode="delta" (it compensates the error of updates)')
    residual_key = f"{state_key}.residual"
    counter_key = f"{state_key}.counter"
    warned: set = set()

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        # 1. downlink: decode before the app (and any inner mod) sees the arrays
        if msg.has_content():
            encoded = {k: r for k, r in msg.content.array_records.items() if is_encoded(r)}
            if encoded:
                try:
                    decoded = {k: decode_array_record(r) for k, r in encoded.items()}
                except Exception as err:  # noqa: BLE001  any failure means: do not train on it
                    reason = f"flocora compression_mod: cannot decode the downlink arrays: {type(err).__name__}: {err}"
                    log.warning(reason)
                    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
                msg.content = _copy_content(msg.content, decoded)

        train = _is_train(msg)
        base, clip = None, None
        if spec is not None and train and mode == "delta" and msg.has_content() and len(msg.content.array_records) == 1:
            base = _to_numpy(next(iter(msg.content.array_records.values())))
        if spec is not None and train and msg.has_content() and len(msg.content.config_records) == 1:
            # the clipping norm Flower's DP wrappers send (what fixedclipping_mod reads)
            value = next(iter(msg.content.config_records.values())).get(CLIPPING_NORM_KEY)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                clip = float(value)

        server_ids = _server_schema_ids(msg) if spec is not None and train and msg.has_content() else None

        reply = call_next(msg, context)

        if spec is None or not train or reply.has_error() or not reply.has_content():
            return reply
        records = reply.content.array_records
        if len(records) != 1:
            log.warning(
                "compression_mod: train reply has %d ArrayRecords (expected 1); sent uncompressed", len(records)
            )
            return reply
        rkey, record = next(iter(records.items()))
        if is_encoded(record):  # already compressed (a second compression mod)
            return reply
        arrays = _to_numpy(record)

        # per-node round counter: fresh stochastic rounding noise every round
        counters = context.state.config_records.get(counter_key) or ConfigRecord({"rounds": 0})
        rounds = int(counters["rounds"])
        round_spec = spec
        if spec.rounding == "stochastic":
            round_spec = spec.replace(seed=_mix_seed(spec.seed, context.node_id, rounds))
        context.state[counter_key] = ConfigRecord({"rounds": rounds + 1})

        if mode == "delta":
            delta, full = _split_delta(arrays, base)
            fallback = _full_fallbacks(full, base)
            if fallback:
                why = ("the train instruction carried no single ArrayRecord of global arrays" if base is None
                       else "their global arrays differ in shape or are not float")  # fmt: skip
                _warn_once(warned, ("full", tuple(fallback)),
                           "compression_mod: %d float tensor(s) sent in full, quantized without error feedback, "
                           "instead of as deltas: %s (%s)", len(fallback), fallback[:5], why)  # fmt: skip
            out = ArrayRecord()
            compact = _Compactor(server_ids)
            if delta:
                ef = targets = None
                if error_feedback:
                    # fc.ErrorFeedback's residuals, kept in context.state between messages
                    # (a deployment starts a new ClientApp process per message)
                    ef = fc.ErrorFeedback(round_spec)
                    old = context.state.array_records.get(residual_key)
                    if old is not None:
                        ef.set_state(_to_numpy(old))
                    to_send, targets = ef.compensate(_as_tensors(delta))
                    delta = {k: v.numpy() for k, v in to_send.items()}
                encoded = delta
                data, sent, delta = _encode_within(delta, round_spec, clip, compact.schema(delta, round_spec))
                out[DELTA_KEY] = _message_array(data)
                if ef is not None:
                    # residual of the (clipped) vector that was encoded: error
                    # feedback re-sends quantization error, never what clipping cut
                    ef.settle(targets if delta is encoded else _as_tensors(delta), _as_tensors(sent))
                    context.state[residual_key] = ArrayRecord(
                        {k: Array(_c_array(v.numpy())) for k, v in ef.get_state().items()}
                    )
            if full or not delta:
                out[FULL_KEY] = _message_array(
                    fc.encode_numpy(full, round_spec, schema=compact.schema(full, round_spec))
                )
            compact.add_to(out)
        else:
            if clip is not None:
                _warn_once(warned, ("clip-arrays",),
                           "compression_mod: mode='arrays' cannot keep the update within the clipping norm %g "
                           "after quantization; use mode='delta'", clip)  # fmt: skip
            out = encode_array_record(arrays, round_spec, None, server_schemas=server_ids)

        metrics = dict(reply.content.metric_records)
        mkey, mrec = next(iter(metrics.items())) if metrics else ("metrics", MetricRecord())
        mrec = MetricRecord(dict(mrec))
        mrec[BYTES_METRIC] = out.count_bytes()
        mrec[RAW_BYTES_METRIC] = record.count_bytes()
        content = _copy_content(reply.content, {rkey: out})
        content[mkey] = mrec
        reply.content = content
        return reply

    mod.__name__ = mod.__qualname__ = "compression_mod"
    return mod


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------
def _without_byte_metrics(reply: Message) -> Message:
    """The reply without the mod's per-reply byte metrics: the wrapped strategy
    would average them (FedAvg weights every metric by num-examples); the
    round totals are summed here instead."""
    metrics = reply.content.metric_records
    swap = {}
    for key, rec in metrics.items():
        if BYTES_METRIC in rec or RAW_BYTES_METRIC in rec:
            swap[key] = MetricRecord({k: v for k, v in rec.items() if k not in (BYTES_METRIC, RAW_BYTES_METRIC)})
    if swap:
        reply.content = _copy_content(reply.content, swap)
    return reply


class CompressedStrategy(Strategy):
    """Wrap any Flower strategy so that it receives (and optionally sends)
    compressed arrays.

    Parameters
    ----------
    strategy : Strategy
        The strategy that does the actual work (``FedAvg``, ``FedAdam``, a DP
        wrapper, ...). It only ever sees plain arrays.
    downlink : CodecSpec, optional
        Also compress the global arrays sent to clients (train and evaluate
        instructions). The wrapped strategy is then handed the *decoded*
        arrays, i.e. exactly the model the clients start from, so that its
        bookkeeping (FedAdam's pseudo-gradient, DP clipping of updates) matches
        what the clients trained on. ``None`` sends them as plain arrays.
    decode_limits : DecodeLimits, optional
        Bounds on what one client message may allocate when decoded.
    expect_replies : bool
        Decode each reply against the global arrays its node was sent
        (names and shapes, before anything is allocated; default on). A
        reply holding anything else is dropped.
    compact : bool
        Announce the schemas this server holds in every train instruction, so
        that clients running ``compression_mod`` send compact messages
        (FORMAT.md 6): a 24-byte header instead of the tables, each schema
        sent once (default on). Schemas are checked against the node's global
        arrays like the messages; at most ``max_schemas`` are kept (oldest
        first out; a client whose schema was dropped sends it again).
    max_schemas : int
        See ``compact``.
    max_update_norm_ratio : float
        Drop a reply whose update (its arrays minus the global arrays) has an
        L2 norm above this multiple of the round's lower median update norm;
        0 (the default) switches the bound off. Replies holding NaN or Inf are
        always dropped. Fault tolerance, not Byzantine robustness.

    Attributes
    ----------
    strategy : Strategy
        The wrapped strategy.
    history : dict of int to dict
        Per round: ``uplink_bytes`` / ``uplink_raw_bytes`` (encoded replies vs
        the same arrays as plain Flower arrays, summed over accepted replies),
        ``downlink_bytes`` / ``downlink_raw_bytes`` (summed over train
        instructions), ``dropped`` (replies dropped, of which
        ``dropped_decode``, ``dropped_nonfinite`` and ``dropped_norm`` by
        cause), ``instructions`` (train messages sent), ``missing_replies``
        (instructions no reply came back for: dead or hung nodes, whether the
        round's timeout ran out or the SuperLink answered for the node with a
        node- or message-unavailable error) and ``failed_replies`` (replies
        carrying any other error, such as a ClientApp that raised). Bytes are ``ArrayRecord.count_bytes()``: array
        payloads plus key names.

    Notes
    -----
    A reply that fails to decode (corrupt bytes, wrong shapes, no known global
    arrays for its node) is dropped with a logged warning and never reaches
    the wrapped strategy; the round goes on with the others. The aggregated
    train ``MetricRecord`` gains the round totals ``flocora-uplink-bytes``,
    ``flocora-uplink-raw-bytes``, ``flocora-downlink-bytes`` and
    ``flocora-downlink-raw-bytes``, summed here over the round's accepted
    replies and instructions (``Result.train_metrics_clientapp[round]`` of
    ``strategy.start``); the per-reply ``flocora-bytes`` metrics are removed
    before the wrapped strategy aggregates, so no averaged byte count appears.

    Examples
    --------
    >>> strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0))
    >>> result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
    >>> strategy.history[1]["uplink_bytes"]
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        downlink: fc.CodecSpec | None = None,
        decode_limits: Any = None,
        expect_replies: bool = True,
        max_update_norm_ratio: float = 0.0,
        compact: bool = True,
        max_schemas: int = 64,
    ):
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"CompressedStrategy wraps a flwr.serverapp.strategy.Strategy; got {type(strategy).__name__}"
            )
        if downlink is not None and not isinstance(downlink, fc.CodecSpec):
            raise TypeError(f"CompressedStrategy: downlink must be a CodecSpec or None; got {type(downlink).__name__}")
        self.strategy = strategy
        self.downlink = downlink
        self.decode_limits = decode_limits
        self.expect_replies = bool(expect_replies)
        if not max_update_norm_ratio >= 0:
            raise ValueError(f"CompressedStrategy: max_update_norm_ratio must be >= 0; got {max_update_norm_ratio!r}")
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self.compact = bool(compact)
        self.max_schemas = int(max_schemas)
        self.schemas = fc.SchemaRegistry()  # uplink schemas, from the clients' first replies
        self.history: dict[int, dict[str, int]] = {}
        self._bases: dict[int, dict[str, np.ndarray]] = {}

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped strategy's extras (e.g. a DP wrapper's privacy_spent).
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"CompressedStrategy({self.strategy!r}, downlink={self.downlink!r})"

    def summary(self) -> None:
        """Log the compression settings, then the wrapped strategy's summary."""
        log.info("CompressedStrategy: uplink decoded from %s; downlink %s", STYPE, self.downlink or "plain arrays")
        self.strategy.summary()

    def _round_stats(self, server_round: int) -> dict[str, int]:
        return self.history.setdefault(
            server_round,
            {"uplink_bytes": 0, "uplink_raw_bytes": 0, "downlink_bytes": 0, "downlink_raw_bytes": 0, "dropped": 0,
             "dropped_decode": 0, "dropped_nonfinite": 0, "dropped_norm": 0, "instructions": 0,
             "missing_replies": 0, "failed_replies": 0},
        )  # fmt: skip

    def _downlink_pair(self, arrays: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord | None]:
        """(what clients will hold after decoding, what travels) for ``arrays``."""
        if self.downlink is None or is_encoded(arrays):
            return arrays, None
        encoded = encode_array_record(arrays, self.downlink)
        return decode_array_record(encoded), encoded

    def _encode_instructions(
        self,
        messages: Iterable[Message],
        sent: ArrayRecord,
        encoded: ArrayRecord | None,
        server_round: int,
        record_bases: bool,
    ) -> list[Message]:
        messages = list(messages)
        cache: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}  # id(plain record) -> (plain, encoded)
        if encoded is not None:
            cache[id(sent)] = (sent, encoded)
        numpy_cache: dict[int, dict[str, np.ndarray]] = {}
        stats = self._round_stats(server_round) if record_bases else None
        if record_bases:
            self._bases = {}
            # oldest schemas out, between rounds only: every schema announced
            # for a round stays until its replies are decoded
            while len(self.schemas) > self.max_schemas:
                del self.schemas[next(iter(self.schemas))]
        for msg in messages:
            if not msg.has_content():
                continue
            swap = {}
            for key, rec in msg.content.array_records.items():
                plain, wire = rec, rec
                if self.downlink is not None and not is_encoded(rec):
                    if id(rec) not in cache:
                        # a record the wrapped strategy built itself: encode it too
                        enc = encode_array_record(rec, self.downlink)
                        cache[id(rec)] = (decode_array_record(enc), enc)
                    plain, wire = cache[id(rec)]
                    swap[key] = wire
                if stats is not None:
                    stats["downlink_bytes"] += wire.count_bytes()
                    stats["downlink_raw_bytes"] += rec.count_bytes()
                if record_bases and len(msg.content.array_records) == 1:
                    if id(plain) not in numpy_cache:
                        numpy_cache[id(plain)] = _to_numpy(plain)
                    self._bases[msg.metadata.dst_node_id] = numpy_cache[id(plain)]
            if record_bases and self.compact and _is_train(msg):
                # the schemas this server holds (and keeps until the round's replies are in)
                ids = b"".join(self.schemas)
                for key, cfg in msg.content.config_records.items():
                    swap[key] = ConfigRecord({**dict(cfg), SCHEMAS_CONFIG_KEY: ids})
                if not msg.content.config_records:
                    swap["config"] = ConfigRecord({SCHEMAS_CONFIG_KEY: ids})
            if swap:
                msg.content = _copy_content(msg.content, swap)
            if stats is not None:
                stats["instructions"] += 1
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy configure the round; encode the downlink if
        asked; remember, per node, the arrays its update will be relative to."""
        sent, encoded = self._downlink_pair(arrays)
        messages = self.strategy.configure_train(server_round, sent, config, grid)
        return self._encode_instructions(messages, sent, encoded, server_round, record_bases=True)

    def _decode_reply(self, reply: Message) -> Message:
        encoded = {k: r for k, r in reply.content.array_records.items() if is_encoded(r)}
        if not encoded:
            return reply
        node = reply.metadata.src_node_id
        base = self._bases.get(node)
        decoded = {k: decode_array_record(r, base, limits=self.decode_limits, expect_base=self.expect_replies,
                                          schemas=self.schemas) for k, r in encoded.items()}  # fmt: skip
        reply.content = _copy_content(reply.content, decoded)
        return reply

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every compressed reply (dropping those that fail), then let the
        wrapped strategy aggregate plain arrays."""
        stats = self._round_stats(server_round)
        replies = list(replies)
        # a dead node shows up either as no reply at all (the round's timeout
        # ran out) or, once the SuperLink misses its heartbeats, as an error
        # reply the SuperLink writes in its name: both are missing replies
        stand_ins = sum(1 for r in replies if r.has_error() and r.error.code in _UNREACHABLE)
        stats["missing_replies"] = max(0, stats["instructions"] - len(replies)) + stand_ins
        stats["failed_replies"] = sum(1 for r in replies if r.has_error()) - stand_ins
        kept: list[Message] = []
        norms: dict[int, float] = {}

        def drop(reply: Message, kind: str, why: str) -> None:
            stats["dropped"] += 1
            stats["dropped_" + kind] += 1
            log.warning("CompressedStrategy: round %d: dropped the reply of node %s: %s",
                        server_round, reply.metadata.src_node_id, why)  # fmt: skip

        for reply in replies:
            if reply.has_error() or not reply.has_content():
                kept.append(reply)  # the wrapped strategy counts and logs failures
                continue
            wire = sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                reply = self._decode_reply(reply)
            except Exception as err:  # noqa: BLE001  one bad client must not end the round
                drop(reply, "decode", f"{type(err).__name__}: {err}")
                continue
            stats["uplink_bytes"] += wire
            stats["uplink_raw_bytes"] += sum(r.count_bytes() for r in reply.content.array_records.values())
            reply = _without_byte_metrics(reply)
            norm = _update_norm(reply, self._bases.get(reply.metadata.src_node_id))
            if norm is None:
                drop(reply, "nonfinite", "its arrays hold NaN or Inf")
                continue
            norms[id(reply)] = norm
            kept.append(reply)
        if self.max_update_norm_ratio > 0 and norms:
            ordered = sorted(norms.values())
            bar = self.max_update_norm_ratio * ordered[(len(ordered) - 1) // 2]  # lower median
            screened = []
            for reply in kept:
                if norms.get(id(reply), 0.0) > bar:
                    drop(reply, "norm", f"update norm {norms[id(reply)]:.4g} exceeds {self.max_update_norm_ratio:g} "
                                        "x the round's median")  # fmt: skip
                else:
                    screened.append(reply)
            kept = screened
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if metrics is not None:
            metrics = MetricRecord(dict(metrics))
            for name in ("uplink_bytes", "uplink_raw_bytes", "downlink_bytes", "downlink_raw_bytes"):
                metrics["flocora-" + name.replace("_", "-")] = stats[name]
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; encode the downlink arrays if asked."""
        sent, encoded = self._downlink_pair(arrays)
        messages = self.strategy.configure_evaluate(server_round, sent, config, grid)
        return self._encode_instructions(messages, sent, encoded, server_round, record_bases=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate unchanged (evaluate replies carry metrics, not arrays)."""
        return self.strategy.aggregate_evaluate(server_round, replies)
