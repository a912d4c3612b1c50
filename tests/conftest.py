"""Shared test fixtures: the devices every op is tested on, and the CPU ISA."""
import pytest
import torch

import flocora_codec  # noqa: F401  (loads the extension)
from flocora_codec import ops

# FLOCORA_FORCE_REFERENCE=1 (tests/test_fallback.py) runs the codec tests on
# the pure-PyTorch reference ops; kernel-only tests skip there.
REFERENCE_BACKEND = ops.BACKEND == "reference"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["scalar", "avx2"])
def cpu_isa(request):
    """Runs a test once with the portable loops and once with the AVX2 loops."""
    if REFERENCE_BACKEND:
        if request.param != "scalar":
            pytest.skip("reference backend: no CPU ISA to choose")
        yield "reference"
        return
    level = 0 if request.param == "scalar" else 1
    got = torch.ops.flocora._set_cpu_isa(level)
    if got != level:
        torch.ops.flocora._set_cpu_isa(-1)
        pytest.skip("this CPU has no AVX2")
    yield request.param
    torch.ops.flocora._set_cpu_isa(-1)
