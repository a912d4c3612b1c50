"""Messages on the wire: codec specs from configs, name checks, timings,
and FLoCoRA's analytic size formula to compare our real byte counts with.

Every message in either direction is ``flocora_codec.encode`` output (bytes)
and is decoded with ``flocora_codec.decode`` on the other side; byte counts
are ``len()`` of those messages, never estimates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

import flocora_codec as fc


class MessageNameError(RuntimeError):
    """A message holds a tensor that must never travel (frozen or private)."""


def check_names(names: Iterable[str], allowed: set[str], frozen: set[str], where: str) -> None:
    names = set(names)
    leaked = names & frozen
    if leaked:
        raise MessageNameError(f"{where}: frozen tensors must never travel, found {sorted(leaked)[:5]}")
    extra = names - allowed
    if extra:
        raise MessageNameError(f"{where}: tensors not allowed in this message: {sorted(extra)[:5]}")


_UNSET = object()


def make_spec(cfg: dict, direction: str, density=_UNSET) -> "fc.CodecSpec":
    """Codec spec of one direction from the ``[method]`` section.

    Keys: ``bits`` (quantize, FLoCoRA), ``quantize_download`` (also quantize
    the download), ``granularity``/``group_size``/``rounding``, and for
    top-k ``ul_density``/``dl_density``/``topk_scope``/``sparse_values``
    (``"sign"``: STC's sign-and-mean values). ``density`` overrides the
    configured one (tiers, decay). 1-D tensors (norms, biases) stay raw, as
    FLoCoRA and our codec default do, except in delta transport, where every
    tensor is compressed (error feedback keeps what is dropped) unless
    ``keep_1d_raw``.
    """
    bits = cfg.get("bits")
    if direction == "down" and not cfg.get("quantize_download", cfg.get("transport") == "delta"):
        bits = None
    if density is _UNSET:
        density = cfg.get("ul_density" if direction == "up" else "dl_density")
    if density is not None and density >= 1.0:
        density = None
    if bits is None and density is None:
        return fc.CodecSpec.from_dict({"raw": True})
    values = cfg.get("sparse_values", "float32")
    kw = dict(
        bits=bits if values != "sign" else None,
        granularity=cfg.get("granularity", "row"),
        rounding=cfg.get("rounding", "nearest"),
        seed=cfg.get("codec_seed", 0),
        meta_dtype=cfg.get("meta_dtype", "float32"),
        keep_1d_raw=cfg.get("transport") != "delta" or cfg.get("keep_1d_raw", False),
    )
    if kw["granularity"] == "group":
        kw["group_size"] = cfg.get("group_size", 64)
    if density is not None:
        kw.update(
            density=density,
            topk_scope=cfg.get("topk_scope", "global"),
            values="quantized" if bits is not None and values != "sign" else values,
        )
    return fc.CodecSpec.from_dict(kw)


class SchemaBook:
    """The schemas of a run's compact messages, and which receiver holds which.

    Both sides of a link agree on a message's tables once (``fc.Schema``);
    afterwards each message carries a 24-byte header instead. A receiver
    that has not seen a message's schema is sent it first: :meth:`cost`
    returns those bytes the first time, 0 afterwards, so the byte counts
    include every schema that travelled, once per receiver (per client and
    direction).
    """

    def __init__(self):
        self.registry = fc.SchemaRegistry()
        self._by_layout: dict[tuple, fc.Schema] = {}
        self.held: dict[str, set[bytes]] = {}

    def schema_for(self, tensors: dict[str, torch.Tensor], spec: "fc.CodecSpec") -> "fc.Schema":
        # densities that decay give new specs but the same schema (equal bytes, one id)
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items()), spec)
        schema = self._by_layout.get(key)
        if schema is None:
            schema = self._by_layout[key] = self.registry.add(fc.Schema.build(tensors, spec))
        return schema

    def cost(self, receiver: str, message: bytes) -> int:
        """Bytes of the schema ``receiver`` must get before ``message`` (0 if it holds it)."""
        sid = fc.format.compact_schema_id(message)
        held = self.held.setdefault(receiver, set())
        if sid is None or sid in held:
            return 0
        held.add(sid)
        return len(self.registry[sid].to_bytes())


class Plain:
    """``fc.encode`` with one spec, shaped like ``fc.ErrorFeedback`` (``spec``,
    ``encode(tensors, schema=)``) so that :class:`Timer` takes either."""

    def __init__(self, spec: "fc.CodecSpec"):
        self.spec = spec

    def encode(self, tensors: dict[str, torch.Tensor], *, schema=None) -> bytes:
        return fc.encode(tensors, self.spec, schema=schema)


def encoder(spec: "fc.CodecSpec", error_feedback: "fc.ErrorFeedback | None" = None):
    """What encodes a message with ``spec``: ``error_feedback`` (its residuals
    kept, its spec set to ``spec``) or :class:`Plain`."""
    if error_feedback is None:
        return Plain(spec)
    error_feedback.spec = spec  # density tiers and decay change the spec, not the residual
    return error_feedback


class Timer:
    """Encodes and decodes the round's messages, timing them (milliseconds).

    With a :class:`SchemaBook` every message is compact (format version 3):
    its schema comes from the book, which the decoding side shares.
    """

    def __init__(self, book: SchemaBook | None = None):
        self.encode_ms = 0.0
        self.decode_ms = 0.0
        self.book = book

    def encode(self, tensors: dict[str, torch.Tensor], how) -> bytes:
        """``how``: an :func:`encoder` (``fc.ErrorFeedback`` or :class:`Plain`)."""
        # on the tensors' own device: on a GPU only the compressed bytes cross to the host
        t0 = time.perf_counter()
        tensors = {k: v.detach() for k, v in tensors.items()}
        schema = self.book.schema_for(tensors, how.spec) if self.book is not None else None
        data = how.encode(tensors, schema=schema)
        self.encode_ms += (time.perf_counter() - t0) * 1e3
        return data

    def decode(self, data: bytes, device=None, expect=None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = fc.decode(data, device=device, expect=expect, schemas=self.book.registry if self.book else None)
        self.decode_ms += (time.perf_counter() - t0) * 1e3
        return out


def flocora_analytic_bits(tensors: dict[str, torch.Tensor], bits: int | None) -> int:
    """FLoCoRA's size formula for one message, in bits.

    ``numel*bits + channels*(32+32)`` per quantized tensor (ndim >= 2; channels
    = dim 0: a scale and a zero point each), 32 bits per element otherwise.
    """
    total = 0
    for t in tensors.values():
        if bits is not None and t.dim() >= 2:
            total += t.numel() * bits + t.shape[0] * 64
        else:
            total += t.numel() * 32
    return total


def message_breakdown(data: bytes, schemas=None) -> dict:
    """Where a message's bytes go (header, metadata, indices, payload)."""
    info = fc.message_info(data, schemas=schemas)
    return {
        "total_bytes": info.total_bytes,
        "header_bytes": info.header_bytes,
        "metadata_bytes": info.metadata_bytes,
        "index_bytes": info.index_bytes,
        "payload_bytes": info.payload_bytes,
    }
