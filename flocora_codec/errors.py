"""Errors raised by the codec.

Every problem with a *message* (bytes handed to :func:`flocora_codec.decode`)
raises a subclass of :class:`CodecError`, which is a ``ValueError``: callers
that already guard against bad input with ``except ValueError`` keep working,
and ``except CodecError`` catches exactly "this message is not acceptable".
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "FormatError",
    "ChecksumError",
    "UnsupportedVersionError",
    "LimitError",
    "ExpectationError",
    "UnknownSchemaError",
]


class CodecError(ValueError):
    """Base class: the message cannot be decoded (or the input encoded)."""


class FormatError(CodecError):
    """The message is malformed: a field, length or section violates docs/FORMAT.md."""


class ChecksumError(CodecError):
    """The CRC32C trailer does not match the message (corrupted in transit)."""


class UnsupportedVersionError(CodecError):
    """The message uses a format version this decoder does not implement."""


class LimitError(CodecError):
    """The message exceeds a :class:`flocora_codec.DecodeLimits` bound."""


class ExpectationError(CodecError):
    """The message is well formed, but its tensors are not the names, shapes and
    dtypes the receiver said it expects (``decode(..., expect=...)``)."""


class UnknownSchemaError(CodecError):
    """A compact message names a schema (by its id) that the receiver does not hold.

    ``schema_id`` is the 16-byte id it names: ask the sender for that schema.
    """

    def __init__(self, message: str, schema_id: bytes = b""):
        super().__init__(message)
        self.schema_id = schema_id
