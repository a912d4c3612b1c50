"""Write the seed corpus: every golden message, in both input modes of
fuzz_decode.py (as sent, and with its checksum left for the target to redo)."""
from __future__ import annotations

import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "fuzz" / "seeds"
out.mkdir(parents=True, exist_ok=True)
for p in sorted((root / "tests" / "golden").glob("*.flc")):
    data = p.read_bytes()
    (out / f"{p.stem}.raw").write_bytes(b"\x00" + data)
    (out / f"{p.stem}.resealed").write_bytes(b"\x01" + data[:-4])
print(f"{len(list(out.iterdir()))} seeds in {out}")
