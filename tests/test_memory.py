"""flocora_codec.reuse_freed_memory: glibc keeps freed large blocks, so a
repeated large allocation finds its pages mapped. Process-wide, so every
check runs in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

import flocora_codec as fc

# Fills a 64 MiB tensor six times (a new one each time) and prints whether
# the settings took and the page faults of each fill. The first fills place
# glibc's blocks (an aligned request needs a little more than the block just
# freed, so one of the next two lands past it); from the fourth on, the
# freed space fits.
_PROBE = """
import resource, sys, torch
import flocora_codec as fc
took = fc.reuse_freed_memory() if sys.argv[1] == "on" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *faults)
"""


def _probe(mode):
    # Without the environment's own malloc tunables (the README suggests them).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout
    took, *faults = out.split()
    return took, [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_after_the_call():
    took, faults = _probe("on")
    if took == "False":
        pytest.skip("mallopt refused (not glibc, or a glibc that caps the mmap threshold)")
    assert took == "True"
    if faults[0] < 4000:
        pytest.skip(f"this system faults in large pages ({faults[0]} faults for 64 MiB): nothing to compare")
    # 64 MiB is 16384 pages of 4 KiB: the first fill faults them in, the last three reuse them.
    assert all(f < faults[0] // 4 for f in faults[3:]), faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_without_the_call_each_large_allocation_faults_again():
    # What the call changes: glibc's default maps a fresh block each time.
    _, faults = _probe("off")
    if faults[0] < 4000:
        pytest.skip(f"this system faults in large pages ({faults[0]} faults for 64 MiB): nothing to compare")
    assert all(f > faults[0] // 2 for f in faults[3:]), faults


@pytest.mark.parametrize("bad", [0, -1, 2**30 + 1, 1.5, True, "1"])
def test_reuse_freed_memory_refuses_bad_limits(bad):
    with pytest.raises(ValueError, match="limit_bytes must be an int"):
        fc.reuse_freed_memory(bad)


@pytest.mark.skipif(fc.ops.BACKEND != "compiled", reason="times the compiled kernels")
@pytest.mark.parametrize("peers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bench_allocating_probe_runs_both_settings(peers):
    # The full benchmark's allocating rows (one smoke timing each; speed is never
    # asserted). With peers, each interpreter compiles four graphs: seconds.
    from flocora_codec import bench

    for mode in ("default", "reused"):
        times = bench._allocating_ms(1 << 20, mode, 1, peers=peers)
        if mode == "reused" and times[0] != times[0]:  # nan: this glibc refused the setting
            continue
        assert times[0] > 0 and times[1] > 0, (mode, times)
        if peers:
            assert times[2] > 0 and times[3] > 0, (mode, times)
        else:
            assert all(t != t for t in times[2:]), (mode, times)
