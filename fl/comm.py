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
        return fc.CodecSpec.raw()
    values = cfg.get("sparse_values", "float32")
    kw = dict(bits=bits if values != "sign" else None, granularity=cfg.get("granularity", "row"),
              rounding=cfg.get("rounding", "nearest"), seed=cfg.get("codec_seed", 0),
              meta_dtype=cfg.get("meta_dtype", "float32"))
    if kw["granularity"] == "group":
        kw["group_size"] = cfg.get("group_size", 64)
    if density is not None:
        kw.update(density=density, topk_scope=cfg.get("topk_scope", "global"),
                  values="quantized" if bits is not None and values != "sign" else values)
    if cfg.get("transport") == "delta" and not cfg.get("keep_1d_raw", False):
        kw["rules"] = ()
    return fc.CodecSpec(**kw)


class Timer:
    """Accumulates encode/decode milliseconds for one round."""

    def __init__(self):
        self.encode_ms = 0.0
        self.decode_ms = 0.0

    def encode(self, tensors: dict[str, torch.Tensor], spec, error_feedback=None) -> bytes:
        # on the tensors' own device: on a GPU only the compressed bytes cross to the host
        t0 = time.perf_counter()
        tensors = {k: v.detach() for k, v in tensors.items()}
        data = error_feedback.encode(tensors) if error_feedback is not None else fc.encode(tensors, spec)
        self.encode_ms += (time.perf_counter() - t0) * 1e3
        return data

    def decode(self, data: bytes, device=None, expect=None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = fc.decode(data, device=device, expect=expect)
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


def message_breakdown(data: bytes) -> dict:
    """Where a message's bytes go (header, metadata, indices, payload)."""
    info = fc.message_info(data)
    return {"total_bytes": info.total_bytes, "header_bytes": info.header_bytes,
            "metadata_bytes": info.metadata_bytes, "index_bytes": info.index_bytes,
            "payload_bytes": info.payload_bytes}
