"""Inputs the fuzzer (fuzz/fuzz_decode.py) or a review found, kept as tests,
and a short coverage-guided run of the fuzz target itself.

Every file in tests/fuzz_regressions/ is one input in the target's format
(first byte: 1 = re-seal the CRC32C, 0 = as is). Each once made the decoder
hand back NaN/Inf from an affine tensor, or is a bomb; ``check_input`` fails
on exactly that, so these pin the fixes (FORMAT.md 3.2, 3.3, 4).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))
from fuzz_decode import check_input  # noqa: E402  after the sys.path entry above

CASES = sorted((ROOT / "tests" / "fuzz_regressions").glob("*.bin"))


def test_there_are_regression_inputs():
    assert len(CASES) >= 6


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_regression_input(path):
    check_input(path.read_bytes())


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_fuzz_target_runs_briefly(tmp_path):
    """A bounded libFuzzer run from the golden seeds: `make fuzz` runs it for as long as asked."""
    seeds, corpus = tmp_path / "seeds", tmp_path / "corpus"
    corpus.mkdir()
    subprocess.run([sys.executable, str(ROOT / "fuzz" / "make_seeds.py"), str(seeds)], check=True,
                   capture_output=True)  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_decode.py"), "-runs=20000", "-max_total_time=60",
                        f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds)],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 20000 runs" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_instrumented_decoder_keeps_no_tensor_alive():
    """atheris 3.0.0 leaks the result of a traced comparison that is not a
    Python bool: a ``tensor > x`` on the decode path keeps a tensor alive per
    decode, and a long `make fuzz` run grows until libFuzzer reports a false
    out-of-memory. The target's own checks run outside the instrumented package."""
    script = f"""
import gc, sys, torch
sys.path.insert(0, {str(ROOT / "fuzz")!r})
from fuzz_decode import check_input  # imports flocora_codec instrumented
import flocora_codec as fc
x = {{"mask": torch.tensor([True, False, True]), "w": torch.randn(16, 24), "b": torch.randn(24),
      "h": torch.randn(8, 8).half()}}
specs = [fc.CodecSpec(), fc.CodecSpec(granularity="group", group_size=8, meta_dtype="float16"),
         fc.CodecSpec(density=0.25), fc.CodecSpec(density=0.25, topk_scope="global", values="quantized"),
         fc.CodecSpec(density=0.25, values="sign")]
inputs = [b"\\x00" + fc.encode(x, s) for s in specs]
def live():
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
for data in inputs:
    check_input(data)
before = live()
for _ in range(200):
    for data in inputs:
        check_input(data)
print(live() - before)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) <= 5, f"{r.stdout.split()[-1]} tensors kept alive by 1,000 instrumented decodes"
