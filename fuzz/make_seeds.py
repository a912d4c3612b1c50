"""Write the seed corpus: every golden message and schema, in both CRC modes
of fuzz_decode.py (as sent, and with its checksum left for the target to redo)."""

from __future__ import annotations

import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "fuzz" / "seeds"
out.mkdir(parents=True, exist_ok=True)
for p in sorted((root / "tests" / "golden").glob("*.fl[cs]")):
    data = p.read_bytes()
    schema = 2 if p.suffix == ".fls" else 0  # mode bit 1: the input is a schema
    (out / f"{p.name}.raw").write_bytes(bytes([schema]) + data)
    (out / f"{p.name}.resealed").write_bytes(bytes([schema | 1]) + data[:-4])
print(f"{len(list(out.iterdir()))} seeds in {out}")
