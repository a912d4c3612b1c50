"""CPU throughput of the codec ops: ``flocora-codec bench`` from a checkout.

    .venv/bin/python benchmarks/bench_codec.py [--full] [--out DIR]

The benchmark itself lives in the package (flocora_codec/bench.py), so that
an installed flocora-codec runs it without this repository. Results go to
stdout and, with a plot, to benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flocora_codec.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
