"""Schemas: the tensor table of a stream of messages, agreed on once.

In an FL session the names, shapes, dtypes and codec records of what one side
sends never change between rounds. A :class:`Schema` holds them; both sides
keep it, and each message refers to it by a 16-byte id (the start of the
SHA-256 of the schema's bytes) and carries only what changes: top-k counts,
metadata, indices, payloads and the checksum (docs/FORMAT.md section 6).

>>> schema = Schema.build(model_update, spec)        # sender
>>> peer_gets(schema.to_bytes())                      # once
>>> data = encode(model_update, spec, schema=schema)  # every round: compact
>>> decode(data, schemas=[schema])                    # receiver
"""

from __future__ import annotations

from collections.abc import Mapping

from flocora_codec import format as fmt
from flocora_codec.codec import _resolve_record
from flocora_codec.spec import CodecSpec

__all__ = ["Schema", "SchemaRegistry"]


class Schema:
    """The tables a compact message refers to: names, dtypes, shapes, codecs.

    Build one with :meth:`build` (from tensors, or ``(shape, dtype)`` pairs,
    and the ``CodecSpec`` the messages will use), send :meth:`to_bytes` to the
    receiver once, who rebuilds it with :meth:`from_bytes` (untrusted input,
    checked like a message). Equal tables give equal bytes and the same id.
    """

    __slots__ = ("parsed", "_data")

    def __init__(self, parsed: fmt.ParsedSchema, data: bytes):
        self.parsed, self._data = parsed, data

    @classmethod
    def build(cls, tensors: Mapping, spec: CodecSpec | None = None) -> "Schema":
        """The schema of messages ``encode(tensors, spec)`` would write.

        ``tensors`` maps names to tensors (only shape and dtype are read) or to
        ``(shape, dtype)`` pairs; the order is the messages' order.
        """
        spec = CodecSpec() if spec is None else spec
        if not isinstance(spec, CodecSpec):
            raise TypeError(f"Schema.build: spec must be a CodecSpec, not {type(spec).__name__}")
        records: dict[fmt.CodecRecord, int] = {}
        entries, names_utf8, cache = [], [], {}
        for name, (shape, dtype) in fmt.expectation(tensors).items():
            if dtype is None:
                raise TypeError(f"Schema.build: {name!r} needs a dtype")
            _, rec = _resolve_record(spec, name, dtype, len(shape), cache)
            idx = records.setdefault(rec, len(records))
            entries.append(fmt.TensorEntry(name, dtype, shape, idx))
            names_utf8.append(name.encode("utf-8"))
        data = fmt.write_schema(list(records), entries, names_utf8)
        return cls.from_bytes(data)

    @classmethod
    def from_bytes(cls, data, *, limits: fmt.DecodeLimits | None = None, expect=None,
                   partial: bool = False) -> "Schema":  # fmt: skip
        """Validate schema bytes from a peer.

        ``limits`` and ``expect`` (as for :func:`flocora_codec.decode`) bound
        here, once, what every compact message against this schema may
        allocate: a server should pass its model as ``expect``.
        """
        exp = None if expect is None else fmt.expectation(expect)
        data = bytes(data)
        return cls(fmt.parse_schema(data, limits, exp, partial), data)

    def to_bytes(self) -> bytes:
        """The serialized schema (FORMAT.md 6.1), to send to the receiver."""
        return self._data

    @property
    def id(self) -> bytes:
        """16 bytes naming this schema in compact messages."""
        return self.parsed.schema_id

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.parsed.entries]

    def tensors(self) -> dict[str, tuple]:
        """``{name: (shape, dtype)}``, usable as ``decode(..., expect=...)``."""
        return {e.name: (e.shape, e.dtype) for e in self.parsed.entries}

    def check_matches(self, records: list, entries: list) -> None:
        """Raise ValueError unless an encoder's tables are this schema's."""
        mine = self.parsed
        if len(entries) != len(mine.entries):
            raise ValueError(f"encode: {len(entries)} tensors, but schema {self.id.hex()} has {len(mine.entries)}")
        for e, s in zip(entries, mine.entries):
            if (e.name, e.dtype, tuple(e.shape)) != (s.name, s.dtype, s.shape):
                raise ValueError(f"encode: tensor {e.name!r} ({e.dtype}, {tuple(e.shape)}) is not the schema's "
                                 f"{s.name!r} ({s.dtype}, {s.shape}) at that position")  # fmt: skip
            if records[e.codec_index] != mine.records[s.codec_index]:
                raise ValueError(f"encode: the spec gives tensor {e.name!r} another codec than schema "
                                 f"{self.id.hex()} ({records[e.codec_index].describe()} vs "
                                 f"{mine.records[s.codec_index].describe()})")  # fmt: skip
        if records != mine.records:
            raise ValueError(f"encode: the spec's codec records differ from schema {self.id.hex()}'s")

    def __eq__(self, other) -> bool:
        return isinstance(other, Schema) and other._data == self._data

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:
        return f"Schema({self.id.hex()}, {len(self.parsed.entries)} tensors, {len(self._data)} bytes)"


class SchemaRegistry(dict):
    """Schemas by id: what one side holds. ``decode(..., schemas=registry)``."""

    def add(self, schema: Schema) -> Schema:
        """Keep ``schema`` (an equal one already kept is returned instead)."""
        return self.setdefault(schema.id, schema)

    def add_bytes(self, data, **kw) -> Schema:
        """Validate schema bytes from a peer (``Schema.from_bytes``) and keep them."""
        return self.add(Schema.from_bytes(data, **kw))
