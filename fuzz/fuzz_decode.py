"""Coverage-guided fuzzing of ``decode`` and ``message_info`` (atheris, libFuzzer).

    make fuzz FUZZ_SECONDS=600          # or: python fuzz/fuzz_decode.py -max_total_time=600 CORPUS SEEDS...

The target holds the decoder to docs/FORMAT.md sections 4 and 6: only the
codec's own errors (``CodecError``), never another exception, a crash or a
hang; ``message_info``, ``decode`` and ``decode_into`` agree on what is valid
(``decode_into`` writing the same bits, and nothing when it refuses); every
affine or top-k tensor that decodes is finite; a schema that parses
serializes back to the same bytes. The first input byte picks a mode: bit 0 set, the rest of the
input gets a valid CRC32C appended, so the fuzzer explores what lies behind
the checksum (a hostile sender re-seals its messages too), else the rest is
taken as it is; bit 1 set, the rest is a schema (``Schema.from_bytes``), else
a message, decoded with the golden schemas at hand (compact messages).
Seeds: the golden messages and schemas (each in both CRC modes).
A crash input found is saved under ``fuzz/crashes/``; copy it to
``tests/fuzz_regressions/`` and it becomes a test (tests/test_fuzz_regressions.py).

atheris 3.0.0's comparison hook leaks the result of a traced comparison that
is not a Python bool (``tensor > 1`` in instrumented code keeps that tensor
alive forever). The compiled decode path compares tensors by method or as
ints, so the fuzzer's memory stays flat; a new ``tensor <op> x`` in it shows
up as steady RSS growth in libFuzzer's status lines (and, in a long run, as a
false out-of-memory finding); tests/test_fuzz_regressions.py counts the
tensors an instrumented decode leaves alive.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import crc32c
import numpy  # noqa: F401  (imported uninstrumented, like torch: only our code is traced)
import torch

torch.set_num_threads(1)

try:
    import atheris
except ImportError:  # the regression test imports check_input without atheris
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["flocora_codec"]):
        import flocora_codec as fc
else:
    import flocora_codec as fc

# Small limits: each input must run in well under a millisecond, and a header
# that claims more must be refused, not allocated.
LIMITS = fc.DecodeLimits(max_total_elements=1 << 16, max_message_bytes=1 << 20)
GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
SCHEMAS = [fc.Schema.from_bytes(p.read_bytes()) for p in sorted(GOLDEN.glob("*.fls"))]


def message_of(data: bytes) -> bytes:
    """The message an input stands for (see the module docstring)."""
    if not data:
        return b""
    body = data[1:]
    return body + struct.pack("<I", crc32c.crc32c(body)) if data[0] & 1 else body


def check_schema(data: bytes) -> None:
    try:
        schema = fc.Schema.from_bytes(data, limits=LIMITS)
    except fc.CodecError:
        return
    assert schema.to_bytes() == bytes(data)
    assert fc.Schema.from_bytes(schema.to_bytes()) == schema


def check_input(data: bytes) -> None:
    """Run one input; raise AssertionError (or the foreign exception) on a finding."""
    msg = message_of(data)
    if data and data[0] & 2:
        check_schema(msg)
        return
    try:
        info = fc.message_info(msg, limits=LIMITS, schemas=SCHEMAS)
    except fc.CodecError:
        info = None
    try:
        out = fc.decode(msg, limits=LIMITS, schemas=SCHEMAS)
    except fc.CodecError:
        if info is not None:  # a header that parses: decode_into must refuse too, writing nothing
            targets = {t.name: torch.full(t.shape, 7, dtype=t.dtype) for t in info.tensors}
            before = {k: _bits(v) for k, v in targets.items()}
            try:
                fc.decode_into(msg, targets, limits=LIMITS, schemas=SCHEMAS)
            except fc.CodecError:
                pass
            else:
                raise AssertionError("decode_into accepted a message decode refused")
            assert all(torch.equal(_bits(v), before[k]) for k, v in targets.items()), "decode_into wrote, then failed"
        return
    assert info is not None, "decode accepted a message message_info refused"
    assert list(out) == [t.name for t in info.tensors]
    for t in info.tensors:
        x = out[t.name]
        assert x.dtype == t.dtype and tuple(x.shape) == t.shape, t.name
        if t.codec != "raw":
            assert bool(torch.isfinite(x).all()), f"{t.name}: {t.codec} tensor decoded to NaN/Inf"
    # decode_into gives the same bits, into targets of their own
    targets = {k: torch.full_like(v, 7) for k, v in out.items()}
    fc.decode_into(msg, targets, limits=LIMITS, schemas=SCHEMAS)
    for k, v in out.items():
        assert torch.equal(_bits(targets[k]), _bits(v)), f"{k}: decode_into differs from decode"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (NaN payloads and -0.0 compared exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def main() -> None:
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    if atheris is None:
        sys.exit("fuzz/fuzz_decode.py needs atheris: pip install atheris")
    main()
