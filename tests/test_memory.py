"""flocora_codec.reuse_freed_memory: glibc keeps freed large blocks, so a
repeated large allocation finds its pages mapped. Process-wide, so every
check runs in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

import flocora_codec as fc

# Fills a 64 MiB tensor eight times (a new one each time) and prints whether
# the settings took and the page faults of each fill. The first fills place
# glibc's blocks (an aligned request needs a little more than the block just
# freed, so one or two of the next three land past it: the fourth fill
# faulted again in 7 of 25 runs here, the fifth in none); from the sixth on,
# the freed space fits.
_PROBE = """
import resource, sys, torch
import flocora_codec as fc
took = fc.reuse_freed_memory() if sys.argv[1] == "on" else None
faults = []
for _ in range(8):
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
    assert all(f < faults[0] // 4 for f in faults[5:]), faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_without_the_call_each_large_allocation_faults_again():
    # What the call changes: glibc's default maps a fresh block each time.
    _, faults = _probe("off")
    if faults[0] < 4000:
        pytest.skip(f"this system faults in large pages ({faults[0]} faults for 64 MiB): nothing to compare")
    assert all(f > faults[0] // 2 for f in faults[3:]), faults


# Decodes into fresh outputs past 32 MiB, where the kernel streams its stores
# if the output's pages are already mapped (a reused heap block) and stores
# normally if they are not: both must give the reference's values (as must
# the into path, which always streams at this size).
_DECODE_PROBE = """
import sys, torch
import flocora_codec as fc
from flocora_codec import ops, reference
took = fc.reuse_freed_memory() if sys.argv[1] == "on" else None
torch.manual_seed(0)
n = (1 << 23) + 1031  # past 32 MiB of float32, a partial last group
x = torch.randn(n) * 3
isas = [level for level in (0, 1, 2) if torch.ops.flocora._set_cpu_isa(level) == level]  # this CPU's loops
for isa, bits in [(isa, bits) for isa in isas for bits in (1, 4, 8)]:
    torch.ops.flocora._set_cpu_isa(isa)
    p, s, o = ops.quantize_pack([x], bits, [64])
    want = reference.unpack_dequantize(p, s, o, bits, n, 64, torch.float32)
    into = torch.empty_like(x)
    ops.unpack_dequantize_into_([into], p, s, o, bits, [64])
    assert torch.equal(into, want), (isa, bits)
    for _ in range(4):
        got = ops.unpack_dequantize(p, s, o, bits, [n], [64])
        assert torch.equal(got, want), (isa, bits)
        del got
print(took, isas, "ok")
"""


@pytest.mark.skipif(fc.ops.BACKEND != "compiled", reason="the compiled kernels' store paths")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_large_fresh_decodes_match_the_reference_on_reused_and_fresh_pages(mode):
    out = subprocess.run([sys.executable, "-c", _DECODE_PROBE, mode], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "ok", out.stdout


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
