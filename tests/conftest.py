"""Shared test fixtures: the devices every op is tested on, the CPU ISA, and
the distribution built from the checkout."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flocora_codec  # noqa: F401  (loads the extension)
from flocora_codec import ops

# FLOCORA_FORCE_REFERENCE=1 (tests/test_fallback.py) runs the codec tests on
# the pure-PyTorch reference ops; kernel-only tests skip there.
REFERENCE_BACKEND = ops.BACKEND == "reference"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


_ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2}


@pytest.fixture(params=list(_ISA_LEVELS))
def cpu_isa(request):
    """Runs a test once per build of the CPU loops this CPU can run: portable,
    AVX2 and AVX-512 (skipped where the CPU lacks it)."""
    if REFERENCE_BACKEND:
        if request.param != "scalar":
            pytest.skip("reference backend: no CPU ISA to choose")
        yield "reference"
        return
    level = _ISA_LEVELS[request.param]
    got = torch.ops.flocora._set_cpu_isa(level)
    if got != level:
        torch.ops.flocora._set_cpu_isa(-1)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    torch.ops.flocora._set_cpu_isa(-1)


ROOT = Path(__file__).resolve().parents[1]


def run_ok(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def built_dist(tmp_path_factory):
    """sdist of the checkout's files (as a clone has them), a wheel built from
    that sdist alone (compiles _C), and that wheel installed into an empty
    directory: ``{"src", "sdist", "wheel", "site"}``. Built once per session
    (tests/test_packaging.py, the Flower deployment test)."""
    try:
        out = run_ok(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout
    except (OSError, AssertionError):
        pytest.skip("not a git checkout: cannot tell which files a clone has")
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "clone"
    for f in out.splitlines():
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    dist = tmp / "sdist"
    # setuptools' PEP 517 backend without isolation, as `python -m build --sdist --no-isolation` calls it
    run_ok([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
           cwd=src)  # fmt: skip
    (sdist,) = dist.glob("flocora_codec-*.tar.gz")
    wheels = tmp / "wheels"
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
            "--disable-pip-version-check", "-q", "-w", str(wheels), str(sdist)], cwd=tmp)  # fmt: skip
    (wheel,) = wheels.glob("flocora_codec-*.whl")
    site = tmp / "site"
    run_ok([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
            "-q", "--target", str(site), str(wheel)], cwd=tmp)  # fmt: skip
    return {"src": src, "sdist": sdist, "wheel": wheel, "site": site}
