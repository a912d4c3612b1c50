"""Named tensors from and to files: ``.safetensors`` and numpy ``.npz``.

``.safetensors`` (the format PEFT saves adapters in, ``adapter_model.safetensors``)
keeps every dtype, bfloat16 and float16 included, so a file survives
``encode`` -> message -> ``decode`` with its names, shapes and dtypes. ``.npz``
has no bfloat16: it is written as float32 (exact). Reading ``.safetensors``
needs the ``safetensors`` package (``pip install safetensors``, or the
``safetensors`` extra of flocora-codec).

Example: a LoRA adapter on disk to a message and back::

    import flocora_codec as fc
    from flocora_codec.files import read_tensors, write_tensors

    msg = fc.encode(read_tensors("adapter_model.safetensors"), fc.CodecSpec(bits=4))
    write_tensors(fc.decode(msg), "restored.safetensors")
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping

import numpy as np
import torch

FORMATS = ("safetensors", "npz")
# The metadata transformers/PEFT expect in a PyTorch safetensors file.
SAFETENSORS_METADATA = {"format": "pt"}


class MissingDependencyError(ImportError):
    """A file format whose package is not installed."""


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise MissingDependencyError(
            "reading or writing .safetensors needs the safetensors package: "
            "pip install safetensors (or install flocora-codec with its extra, flocora-codec[safetensors])"
        ) from exc
    return safetensors.torch


def format_of(path: str | os.PathLike | None, data: bytes | None = None) -> str | None:
    """``"safetensors"`` or ``"npz"`` from a file name's suffix, else from the
    first bytes of ``data`` (a zip archive is npz; an 8-byte length followed
    by ``{`` is safetensors); ``None`` when neither tells."""
    if path is not None and str(path) != "-":
        suffix = os.path.splitext(str(path))[1].lower()
        if suffix == ".safetensors":
            return "safetensors"
        if suffix == ".npz":
            return "npz"
    if data is not None:
        if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
            return "npz"
        if len(data) >= 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
            return "safetensors"
    return None


def tensors_from_bytes(data: bytes, fmt: str) -> dict[str, torch.Tensor]:
    """Parse a whole ``.safetensors`` or ``.npz`` file held in memory."""
    if fmt == "safetensors":
        tensors = _safetensors_torch().load(bytes(data))
        # safetensors returns its tensors in no stable order (a hash map), so
        # the same file could give different messages: use the file's layout
        # order (data offsets), which the writer fixed once.
        n = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + n]))
        order = sorted((k for k in header if k != "__metadata__"), key=lambda k: tuple(header[k]["data_offsets"]))
        return {k: tensors[k] for k in order}
    if fmt == "npz":
        out = {}
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for name in npz.files:
                a = np.array(npz[name], order="C")  # writable, C order (0-d stays 0-d)
                try:
                    out[name] = torch.from_numpy(a)
                except TypeError as exc:
                    raise ValueError(f"{name!r} has dtype {a.dtype}, which the codec does not carry") from exc
        return out
    raise ValueError(f"unknown tensor file format {fmt!r}; expected one of {', '.join(FORMATS)}")


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], fmt: str) -> bytes:
    """Serialize named tensors as a ``.safetensors`` or ``.npz`` file.

    ``.npz`` stores bfloat16 tensors as float32 (numpy has no bfloat16).
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if fmt == "safetensors":
        return _safetensors_torch().save(tensors, metadata=dict(SAFETENSORS_METADATA))
    if fmt == "npz":
        arrays = {n: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for n, t in tensors.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    raise ValueError(f"unknown tensor file format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read_tensors(path: str | os.PathLike, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Named tensors of a ``.safetensors`` or ``.npz`` file (``fmt`` from the
    suffix or the content when not given)."""
    with open(path, "rb") as f:
        data = f.read()
    fmt = fmt or format_of(path, data)
    if fmt is None:
        raise ValueError(f"{path}: neither a .safetensors nor an .npz file")
    try:
        return tensors_from_bytes(data, fmt)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a valid .{fmt} file: {exc}") from exc


def write_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write named tensors as ``.safetensors`` or ``.npz`` (``fmt`` from the suffix)."""
    fmt = fmt or format_of(path)
    if fmt is None:
        raise ValueError(f"{path}: name it .safetensors or .npz, or pass fmt")
    data = tensors_to_bytes(tensors, fmt)
    with open(path, "wb") as f:
        f.write(data)
