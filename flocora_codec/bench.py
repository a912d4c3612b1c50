"""``flocora-codec bench``: CPU throughput of the codec against the machine's
memory bandwidth and against what users would write instead.

Every number is a median of several runs, and every ratio is taken against a
baseline measured in the same run: ``dst.copy_(x)`` (bytes read + written)
and ``x.sum()`` (bytes read) are the two bandwidth limits; the plain-PyTorch
formulations (eager and ``torch.compile(dynamic=False)``, warmed up, in the
two 4-bit layouts a user would pick) are the peers. Bandwidth counts bytes
read plus bytes written for the copy and every op alike (encode: ``4n`` read,
``n*bits/8`` + metadata written; decode the reverse). "fresh" decode allocates
its output as :func:`flocora_codec.decode` does (page faults included);
"into" decodes into a reused tensor (:func:`flocora_codec.decode_into`).

Quick by default (about 20 s on a quiet machine); ``--full`` adds 64 and 256
MiB, every bit width, the compiled peers at 4 bits for every size and at 1, 2
and 8 bits for 16 MiB, and one 1 GiB tensor (about 3 minutes). Needs only an
installed flocora-codec (matplotlib, when present, draws the plot).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import flocora_codec as fc
from flocora_codec import ops
from flocora_codec.demo import resnet18_lora_state_dict

GROUP = 64
FLT_MIN = torch.finfo(torch.float32).tiny


def median_seconds(fn, repeats: int, min_seconds: float = 0.02) -> float:
    """Median of ``repeats`` timings after a warm-up; calls shorter than
    ``min_seconds / 20`` are batched."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    inner = max(1, int(min_seconds / 20 / max(once, 1e-7)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, min_seconds: float = 0.1) -> dict:
    """Median seconds per call of each of ``fns``, timed in rounds that take
    every function in turn, so that a drift of the machine's bandwidth during
    the rounds hits all of them alike (ratios of these medians compare like
    with like). Calls shorter than ``min_seconds / 20`` are batched."""
    inner = {}
    for key, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        inner[key] = max(1, int(min_seconds / 20 / max(time.perf_counter() - start, 1e-7)))
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[key]):
                fn()
            times[key].append((time.perf_counter() - start) / inner[key])
    return {key: statistics.median(t) for key, t in times.items()}


def paired_ratios(baseline, fns: dict, rounds: int, repeats: int) -> tuple[float, dict]:
    """Each of ``fns`` against ``baseline``, in ``rounds`` rounds that time the
    baseline and then every function, each in a loop of its own
    (:func:`median_seconds`). Returns (the baseline's median seconds, per key
    the median seconds and every round's ratio to that round's baseline):
    the host's bandwidth drifts within a run, and a ratio taken within one
    round compares like with like where a single pair could straddle a
    change."""
    base, times, ratios = [], {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        b = median_seconds(baseline, repeats)
        base.append(b)
        for key, fn in fns.items():
            t = median_seconds(fn, repeats)
            times[key].append(t)
            ratios[key].append(t / b)
    return statistics.median(base), {k: (statistics.median(times[k]), ratios[k]) for k in fns}


def fmt_ratios(ratios: list[float]) -> str:
    """``median x (lowest-highest)`` of a row's per-round ratios."""
    lo, mid, hi = min(ratios), statistics.median(ratios), max(ratios)
    return f"{mid:.1f}x" if len(ratios) == 1 else f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"


def fresh_seconds(fn, repeats: int) -> float:
    """Median of single calls, each on memory the allocator has just handed
    back (the first call's output is freed before the next)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times)


# The whole-message rows of the CPU and GPU benchmarks.
MESSAGE_SPECS = [
    ("4-bit per row (default)", fc.CodecSpec()),
    ("4-bit group 64", fc.CodecSpec(bits=4, granularity="group", group_size=64)),
    ("raw", fc.CodecSpec.raw()),
    ("top-10% global, fp16 values", fc.CodecSpec(density=0.1, topk_scope="global", values="float16")),
    ("top-10% per tensor, fp16 values", fc.CodecSpec(density=0.1, values="float16")),
    ("top-10% global, sign values (STC)", fc.CodecSpec(density=0.1, topk_scope="global", values="sign")),
    ("top-10% per tensor, 8-bit values", fc.CodecSpec(density=0.1, values="quantized", bits=8)),
]

_ALLOCATING_PROBE = """
import statistics, sys, time, torch
import flocora_codec as fc
from flocora_codec import bench, ops
nbytes, mode, repeats, with_peers = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
if int(sys.argv[5]) >= 0:  # the loops `bench --isa` forces in the parent
    torch.ops.flocora._set_cpu_isa(int(sys.argv[5]))
if mode == "reused" and not fc.reuse_freed_memory():
    print("nan nan nan nan")
    raise SystemExit
bits, group = 4, bench.GROUP
x = torch.randn(nbytes // 4)
p, s, o = ops.quantize_pack([x], bits, [group])
calls = {
    "encode": lambda: ops.quantize_pack([x], bits, [group]),
    "decode": lambda: ops.unpack_dequantize(p, s, o, bits, [x.numel()], [group]),
}
if with_peers:
    halves = bench.torch_quantize_halves(x, bits, group)
    compile_ = bench._compiler()
    q_h, q_i = compile_(bench.torch_quantize_halves), compile_(bench.torch_quantize_interleaved)
    dq_h, dq_i = compile_(bench.torch_dequantize_halves), compile_(bench.torch_dequantize_interleaved)
    calls["q_halves"] = lambda: q_h(x, bits, group)
    calls["q_interleaved"] = lambda: q_i(x, bits, group)
    calls["dq_halves"] = lambda: dq_h(*halves, bits, group)
    calls["dq_interleaved"] = lambda: dq_i(p, s, o, bits, group)
# Each function in a loop of its own (interleaved calls would change what
# the next one's allocation costs: freed blocks of other sizes), the loops in
# the order A B .. B A, so that a drift of the machine hits both sides alike.
# The first calls of a loop compile and place glibc's blocks (a compiled
# decode of 256 MiB took five calls to stop faulting in pages).
warmup = 6
times = {k: [] for k in calls}
for k in list(calls) + list(reversed(calls)):
    for i in range(warmup + (repeats + 1) // 2):
        t = time.perf_counter()
        out = calls[k]()
        if i >= warmup:
            times[k].append(time.perf_counter() - t)
        del out
ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
encode, decode = ms["encode"], ms["decode"]
compiled_encode = min(ms.get("q_halves", float("nan")), ms.get("q_interleaved", float("nan")))
compiled_decode = min(ms.get("dq_halves", float("nan")), ms.get("dq_interleaved", float("nan")))
print(encode, decode, compiled_encode, compiled_decode)
"""


def _allocating_ms(nbytes: int, mode: str, repeats: int, peers: bool = True) -> tuple[float, float, float, float]:
    """Median ms of allocating 4-bit calls in a fresh interpreter: (encode,
    decode, compiled encode, compiled decode), the compiled ones the faster
    of the two layouts (nan without `peers`: compiling them takes seconds)."""
    args = [str(nbytes), mode, str(repeats), "1" if peers else "0", str(-1 if _forced_isa is None else _forced_isa)]
    out = subprocess.run([sys.executable, "-c", _ALLOCATING_PROBE, *args],
                         capture_output=True, text=True, check=True, timeout=900).stdout  # fmt: skip
    enc, dec, cenc, cdec = out.split()
    return float(enc), float(dec), float(cenc), float(cdec)


# ---- plain-PyTorch peers: same math, written for speed -------------------------------
def _params(g: torch.Tensor, bits: int):
    lo = g.amin(1, keepdim=True) + 0.0
    hi = g.amax(1, keepdim=True) + 0.0
    levels = float(2**bits - 1)
    scale = (hi - lo) / levels
    scale = torch.where(scale >= FLT_MIN, scale, torch.zeros_like(scale))
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), scale)
    return lo, scale, inv, levels


def torch_quantize_interleaved(x: torch.Tensor, bits: int, group: int):
    """Group quantize + LSB-first pack of consecutive codes (flocora_codec's
    layout, same bytes; bits dividing 8)."""
    g = x.reshape(-1, group)
    lo, scale, inv, levels = _params(g, bits)
    q = ((g - lo) * inv).clamp(0.0, levels).round().to(torch.int32)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    packed = (q.reshape(-1, per_byte) << shifts).sum(1).to(torch.uint8)
    return packed, scale.reshape(-1), lo.reshape(-1)


def torch_quantize_halves(x: torch.Tensor, bits: int, group: int):
    """The layout a user picks for speed: a group's 8/bits parts packed against
    each other (4 bits: byte j = code j | code j + group/2 << 4)."""
    g = x.reshape(-1, group)
    lo, scale, inv, levels = _params(g, bits)
    q = ((g - lo) * inv).clamp(0.0, levels).round().to(torch.int32)
    per_byte = 8 // bits
    parts = q.reshape(-1, per_byte, group // per_byte)
    packed = parts[:, 0]
    for k in range(1, per_byte):
        packed = packed | (parts[:, k] << (k * bits))
    return packed.to(torch.uint8).reshape(-1), scale.reshape(-1), lo.reshape(-1)


def torch_dequantize_interleaved(packed, scale, offset, bits: int, group: int):
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    q = ((packed.to(torch.int32).reshape(-1, 1) >> shifts) & (2**bits - 1)).to(torch.float32)
    return (offset.reshape(-1, 1) + q.reshape(-1, group) * scale.reshape(-1, 1)).reshape(-1)


def torch_dequantize_halves(packed, scale, offset, bits: int, group: int):
    per_byte = 8 // bits
    p = packed.to(torch.int32).reshape(-1, 1, group // per_byte)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * bits).reshape(1, -1, 1)
    q = ((p >> shifts) & (2**bits - 1)).to(torch.float32).reshape(-1, group)
    return (offset.reshape(-1, 1) + q * scale.reshape(-1, 1)).reshape(-1)


def copy_into(outs, results) -> None:
    """Each result into its reused output."""
    for out, result in zip(outs, results):
        out.copy_(result)


def torch_quantize_halves_into(x: torch.Tensor, bits: int, group: int, packed, scales, offsets) -> None:
    """The halves layout written into reused outputs (the compiled kernel then
    stores straight into them, as ``quantize_pack_into_`` does)."""
    copy_into((packed, scales, offsets), torch_quantize_halves(x, bits, group))


def torch_dequantize_halves_into(out: torch.Tensor, packed, scale, offset, bits: int, group: int) -> None:
    out.copy_(torch_dequantize_halves(packed, scale, offset, bits, group))


def torch_quantize_interleaved_into(x: torch.Tensor, bits: int, group: int, packed, scales, offsets) -> None:
    """The interleaved layout written into reused outputs (at 8 bits it
    compiles to faster code than the halves, which it then equals)."""
    copy_into((packed, scales, offsets), torch_quantize_interleaved(x, bits, group))


def torch_dequantize_interleaved_into(out: torch.Tensor, packed, scale, offset, bits: int, group: int) -> None:
    out.copy_(torch_dequantize_interleaved(packed, scale, offset, bits, group))


# The compiled formulations of an encode or decode into reused outputs: each
# layout compiled with the store into the output, and each layout's compiled
# allocating function followed by an eager copy_ (which wins where the
# compiler writes the fused store as slower code: 1-4-bit encodes). Their
# tags in the table.
INTO_FORMULATIONS = {
    "H": "halves into",
    "I": "interleaved into",
    "Hc": "halves, then copy_",
    "Ic": "interleaved, then copy_",
}


def _check_baselines(full: bool) -> None:
    """The peers compute what the codec does: the interleaved layout writes its
    bytes, the halves layout decodes to its values."""
    x = torch.randn(1 << 14) * 3
    for bits in (1, 2, 4, 8) if full else (4,):
        packed, scales, offsets = ops.quantize_pack([x], bits, [GROUP])
        ours = ops.unpack_dequantize(packed, scales, offsets, bits, [x.numel()], [GROUP])
        bp, bs, bo = torch_quantize_interleaved(x, bits, GROUP)
        hp, hs, ho = torch_quantize_halves(x, bits, GROUP)
        ok = torch.equal(bp, packed) and torch.equal(bs, scales) and torch.equal(bo, offsets)
        ok = ok and torch.equal(torch_dequantize_interleaved(bp, bs, bo, bits, GROUP), ours)
        ok = ok and torch.equal(torch_dequantize_halves(hp, hs, ho, bits, GROUP), ours)
        outs = [torch.empty_like(t) for t in (hp, hs, ho)]
        torch_quantize_halves_into(x, bits, GROUP, *outs)
        dense = torch.empty_like(x)
        torch_dequantize_halves_into(dense, hp, hs, ho, bits, GROUP)
        ok = ok and all(torch.equal(a, b) for a, b in zip(outs, (hp, hs, ho))) and torch.equal(dense, ours)
        outs = [torch.empty_like(t) for t in (bp, bs, bo)]
        torch_quantize_interleaved_into(x, bits, GROUP, *outs)
        dense = torch.empty_like(x)
        torch_dequantize_interleaved_into(dense, packed, scales, offsets, bits, GROUP)
        ok = ok and all(torch.equal(a, b) for a, b in zip(outs, (bp, bs, bo))) and torch.equal(dense, ours)
        if not ok:
            raise RuntimeError(f"a plain-PyTorch baseline disagrees with the codec at {bits} bits")


def _compiler():
    """torch.compile(dynamic=False), with room for one graph per size and bit width."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return lambda fn: torch.compile(fn, dynamic=False)


def torchao_quantize(x: torch.Tensor, bits: int, group: int):
    """torchao: choose_qparams_affine + quantize_affine (+ pack_uint4 at 4 bits)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1, group)
    g = x.reshape(-1, group)
    scale, zero = choose_qparams_affine(g, MappingType.ASYMMETRIC, block, torch.uint8, 0, 2**bits - 1)
    q = quantize_affine(g, block, scale, zero, torch.uint8, 0, 2**bits - 1)
    if bits == 4:
        from torchao.prototype.mx_formats.kernels import pack_uint4

        q = pack_uint4(q)
    return q


def bnb_quantize(x: torch.Tensor):
    import bitsandbytes.functional as F

    return F.quantize_4bit(x, blocksize=GROUP, quant_type="nf4")


# ---- report -------------------------------------------------------------------------
def code_revision() -> str:
    """The git commit of the checkout this module runs from (and whether its
    tracked files differ from it), or the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and (root / ".git").exists():
            status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"]
            dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, timeout=10)
            state = "clean tree" if not dirty.stdout.strip() else "tracked files modified"
            return f"git {head.stdout.strip()} ({state})"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"flocora_codec {fc.__version__} (installed, no checkout)"


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    isa = "reference (no compiled kernels)"
    if ops.BACKEND == "compiled":
        level = _forced_isa if _forced_isa is not None else torch.ops.flocora._set_cpu_isa(-1)
        isa = ("portable scalar", "AVX2", "AVX-512")[level] + (" (forced)" if _forced_isa is not None else "")
    thp = ""
    try:
        thp = ", THP " + re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(
            1
        )
        thp += "/defrag " + re.search(
            r"\[([\w+]+)\]", Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text()
        ).group(1)
    except (OSError, AttributeError):
        pass
    try:
        load = " load %.2f %.2f %.2f;" % os.getloadavg()
    except OSError:
        load = ""
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs{thp};{load} torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; flocora_codec {fc.__version__ if hasattr(fc, '__version__') else ''} "
        f"loops: {isa}; Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def fmt_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:g} {unit}"
        nbytes /= 1024
    return f"{nbytes:g} TiB"


def run(full: bool = False, out_dir: str | os.PathLike = "benchmarks/results", repeats: int | None = None,
        skip_huge: bool = False, plot: bool = True, isa: str = "auto") -> Path:  # fmt: skip
    """Run the benchmark, print the table and write it (and the plot) under ``out_dir``.

    Returns the path of the markdown file.
    """
    global _forced_isa
    if isa != "auto":  # the loops of an older CPU, on this one (the table says which ran)
        if ops.BACKEND != "compiled":
            raise SystemExit("bench --isa needs the compiled kernels")
        level = ISA_LEVELS[isa]
        if torch.ops.flocora._set_cpu_isa(level) != level:
            torch.ops.flocora._set_cpu_isa(-1)
            raise SystemExit(f"bench --isa {isa}: this CPU cannot run those loops")
        _forced_isa = level
    try:
        return _run(full, Path(out_dir), repeats, skip_huge, plot, isa)
    finally:
        if isa != "auto":
            _forced_isa = None
            torch.ops.flocora._set_cpu_isa(-1)


ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2}
_forced_isa = None  # the level `run(isa=...)` forces while it runs


def _run(full, out_dir, repeats, skip_huge, plot, isa) -> Path:
    repeats = repeats or (15 if full else 7)
    sizes = [64 << 10, 1 << 20, 16 << 20] + ([64 << 20, 256 << 20] if full else [])
    all_bits = (1, 2, 3, 4, 5, 6, 7, 8) if full else (1, 2, 4, 8)

    def compiled_at(nbytes, bits):  # each (size, bits) is a compilation of its own: a few seconds
        # --full: 1, 2, 4 and 8 bits from 16 MiB up (the sizes the speed goals name), 4 bits at every size
        return (bits == 4 and (full or nbytes == 16 << 20)) or (full and nbytes >= 16 << 20 and 8 % bits == 0)

    compile_ = _compiler()
    peers = {name: compile_(fn) for name, fn in [
        ("q_interleaved", torch_quantize_interleaved), ("q_halves", torch_quantize_halves),
        ("dq_interleaved", torch_dequantize_interleaved), ("dq_halves", torch_dequantize_halves),
        ("qH", torch_quantize_halves_into), ("dqH", torch_dequantize_halves_into),
        ("qI", torch_quantize_interleaved_into), ("dqI", torch_dequantize_interleaved_into)]}  # fmt: skip
    _check_baselines(full)
    lines: list[str] = []
    notes: list[str] = []
    curves: dict[str, list] = {}

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    emit("# flocora_codec CPU benchmark" + (" (--full)" if full else " (quick)"))
    emit()
    emit(f"Machine: {machine_description()}")
    emit()
    flags = (" --full" if full else "") + (f" --isa {isa}" if isa and isa != "auto" else "")
    emit(f"Code: {code_revision()}; run as `flocora-codec bench{flags}`.")
    emit()
    emit("## Encode (quantize + pack) and decode (unpack + dequantize): group 64, nearest, fp32 metadata")
    emit()
    emit(
        "GB/s counts bytes read + written. The limits and the *into* columns are medians of rounds that time "
        "each of them in turn, so the machine's drift hits all alike; whatever allocates is timed in a loop of "
        "its own. Limits: `copy` = `dst.copy_(x)` (r+w, "
        "into a reused tensor), `read` = `x.sum()` (bytes read). "
        "`% copy`: our GB/s over copy's; `% read` (encode): "
        "input consumed over `read`. Encode *into* reused outputs (`quantize_pack_into_`) and *allocating* "
        "(`quantize_pack`, a new output each call: past glibc's 32 MiB mmap threshold every call faults in fresh "
        "pages). Decode *into* a reused fp32 tensor (`decode_into`'s path) and *fresh* (a new output each call, "
        "single shot, page faults included). `% fill`: the time of `torch.empty(n).fill_(1)` on fresh memory "
        "(single shot, as *fresh*: writing the output alone, page faults included) over decode fresh's; past "
        "32 MiB that is the floor the kernel's page zeroing sets. `vs compiled`: the compiled formulation's time "
        "over ours, `torch.compile(dynamic=False)`, warmed up; *into*: the fastest of four formulations that "
        "write into reused outputs, tagged after the ratio: either layout compiled together with its "
        "`out.copy_(...)`, which the compiled kernel then stores into directly (`H` halves, `I` interleaved; "
        "timed in the same rounds as ours), or either layout's compiled allocating function followed by an "
        "eager `out.copy_` (`Hc`, `Ic`; they allocate, so each in a loop of its own); "
        "`ceiling`: the fastest compiled decode into's time over a bare `dst.fill_(1)` of the same reused output, "
        "timed in the same rounds: writing the output alone, the most a decode into with ordinary stores could gain "
        "over it (below 32 MiB ours uses those; past it, streaming stores, which can beat the fill); "
        "*alloc*: the faster of the two layouts (halves / interleaved), allocating its output as the allocating "
        "op does. Past 32 MiB every allocating call faults in fresh pages, and both sides run at the speed of "
        "the page faults. On AVX-512 CPUs, inputs of 32 MiB and more are encoded by the AVX2 one-pass loop "
        "(and top-k by the AVX2 passes), which read memory faster there."
    )
    emit()
    emit(
        "| size | bits | copy GB/s | read GB/s | encode into GB/s | % copy | % read | vs compiled into | "
        "encode allocating GB/s | vs compiled alloc | decode into GB/s | % copy | vs compiled into | "
        "ceiling | decode fresh GB/s | % fill | vs compiled alloc |"
    )
    emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nbytes in sizes:
        n = nbytes // 4
        x = torch.randn(n)
        dst = torch.empty_like(x)
        for bits in all_bits:
            packed, scales, offsets = ops.quantize_pack([x], bits, [GROUP])
            # Nothing that allocates goes into the interleaved rounds: one
            # function's freed buffers change what the next one's allocation costs.
            rounds = {
                "copy": lambda: dst.copy_(x),
                "read": lambda: x.sum(),
                "enc_into": lambda: ops.quantize_pack_into_([x], bits, [GROUP], packed, scales, offsets),
                "into": lambda: ops.unpack_dequantize_into_([dst], packed, scales, offsets, bits, [GROUP]),
            }
            if compiled_at(nbytes, bits):
                halves = [torch.empty_like(t) for t in (packed, scales, offsets)]
                peers["qH"](x, bits, GROUP, *halves)  # a halves-layout message for the halves decodes
                inter = [torch.empty_like(t) for t in (packed, scales, offsets)]
                rounds["qH"] = lambda: peers["qH"](x, bits, GROUP, *halves)
                rounds["qI"] = lambda: peers["qI"](x, bits, GROUP, *inter)
                rounds["dqH"] = lambda: peers["dqH"](dst, *halves, bits, GROUP)
                rounds["dqI"] = lambda: peers["dqI"](dst, packed, scales, offsets, bits, GROUP)
                rounds["fill_into"] = lambda: dst.fill_(1.0)  # the stores alone: no decode into is faster
            t = interleaved_medians(rounds, repeats)
            t["enc"] = median_seconds(lambda: ops.quantize_pack([x], bits, [GROUP]), repeats)
            t["dec"] = median_seconds(
                lambda: ops.unpack_dequantize(packed, scales, offsets, bits, [n], [GROUP]), repeats
            )
            if compiled_at(nbytes, bits):
                for k in ("q_interleaved", "q_halves"):
                    t[k] = median_seconds(lambda k=k: peers[k](x, bits, GROUP), repeats)
                for k in ("dq_interleaved", "dq_halves"):
                    t[k] = median_seconds(lambda k=k: peers[k](packed, scales, offsets, bits, GROUP), repeats)

                # Allocating, so in loops of their own as the other allocating calls.
                t["qHc"] = median_seconds(lambda: copy_into(halves, peers["q_halves"](x, bits, GROUP)), repeats)
                t["qIc"] = median_seconds(lambda: copy_into(inter, peers["q_interleaved"](x, bits, GROUP)), repeats)
                t["dqHc"] = median_seconds(lambda: dst.copy_(peers["dq_halves"](*halves, bits, GROUP)), repeats)
                t["dqIc"] = median_seconds(
                    lambda: dst.copy_(peers["dq_interleaved"](packed, scales, offsets, bits, GROUP)), repeats
                )
            copy_gbs, read_gbs = 8 * n / t["copy"] / 1e9, 4 * n / t["read"] / 1e9
            if bits == 4:
                curves.setdefault("copy_ (r+w)", []).append((nbytes, copy_gbs))
                curves.setdefault("x.sum() (read)", []).append((nbytes, read_gbs))
            moved = 4 * n + (n * bits + 7) // 8 + 8 * n // GROUP
            enc, enc_into, into = t["enc"], t["enc_into"], t["into"]
            fresh = fresh_seconds(lambda: ops.unpack_dequantize(packed, scales, offsets, bits, [n], [GROUP]), repeats)
            fill = fresh_seconds(lambda: torch.empty(n).fill_(1.0), repeats)
            vs_q = vs_dq = vs_q_into = vs_dq_into = dq_into_ceiling = "-"
            if compiled_at(nbytes, bits):
                cq = min(t["q_interleaved"], t["q_halves"])
                cdq = min(t["dq_interleaved"], t["dq_halves"])
                vs_q, vs_dq = f"{cq / enc:.2f}x", f"{cdq / t['dec']:.2f}x"  # all four allocate their output
                q_tag = min(INTO_FORMULATIONS, key=lambda tag: t["q" + tag])
                dq_tag = min(INTO_FORMULATIONS, key=lambda tag: t["dq" + tag])
                cq_into, cdq_into = t["q" + q_tag], t["dq" + dq_tag]
                vs_q_into, vs_dq_into = f"{cq_into / enc_into:.2f}x {q_tag}", f"{cdq_into / into:.2f}x {dq_tag}"
                dq_into_ceiling = f"{cdq_into / t['fill_into']:.2f}x"
                if bits == 4:
                    curves.setdefault("torch.compile encode (best layout)", []).append((nbytes, moved / cq / 1e9))
                    curves.setdefault("torch.compile decode (best layout)", []).append((nbytes, moved / cdq / 1e9))
                    curves.setdefault("torch.compile decode into", []).append((nbytes, moved / cdq_into / 1e9))
            enc_gbs, enc_into_gbs = moved / enc / 1e9, moved / enc_into / 1e9
            into_gbs, fresh_gbs = moved / into / 1e9, moved / fresh / 1e9
            if bits == 4:
                curves.setdefault("ours encode into 4-bit", []).append((nbytes, enc_into_gbs))
                curves.setdefault("ours encode allocating 4-bit", []).append((nbytes, enc_gbs))
                curves.setdefault("ours decode into 4-bit", []).append((nbytes, into_gbs))
                curves.setdefault("ours decode fresh 4-bit", []).append((nbytes, fresh_gbs))
            emit(
                f"| {fmt_size(nbytes)} | {bits} | {copy_gbs:.1f} | {read_gbs:.1f} | {enc_into_gbs:.1f} | "
                f"{100 * enc_into_gbs / copy_gbs:.0f}% | {100 * 4 * n / enc_into / 1e9 / read_gbs:.0f}% | "
                f"{vs_q_into} | {enc_gbs:.1f} | {vs_q} | {into_gbs:.1f} | {100 * into_gbs / copy_gbs:.0f}% | "
                f"{vs_dq_into} | {dq_into_ceiling} | {fresh_gbs:.1f} | {100 * fill / fresh:.0f}% | {vs_dq} |"
            )
        del x, dst
    emit()

    # ---- peers at 4 bits on 16 MiB ----------------------------------------------------
    n = (16 << 20) // 4
    x = torch.randn(n)
    emit("## Peers: 4-bit quantization of 16 MiB of fp32 (group / block 64)")
    emit()
    emit("| what | ms | GB/s of fp32 input |")
    emit("|---|---:|---:|")
    rows = [
        ("flocora_codec quantize_pack (fused, packed)", lambda: ops.quantize_pack([x], 4, [GROUP])),
        ("PyTorch eager, interleaved (same bytes)", lambda: torch_quantize_interleaved(x, 4, GROUP)),
        ("torch.compile, interleaved (same bytes)", lambda: peers["q_interleaved"](x, 4, GROUP)),
        ("torch.compile, halves packed against each other", lambda: peers["q_halves"](x, 4, GROUP)),
    ]
    for name, fn in [
        ("torchao choose_qparams_affine + quantize_affine + pack_uint4", lambda: torchao_quantize(x, 4, GROUP)),
        ("bitsandbytes quantize_4bit nf4 (CPU)", lambda: bnb_quantize(x)),
    ]:
        try:
            fn()
            rows.append((name, fn))
        except Exception as exc:  # noqa: BLE001 - an optional peer: say why it did not run
            notes.append(
                f"{name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
            )
    for name, fn in rows:
        s = median_seconds(fn, repeats)
        emit(f"| {name} | {1e3 * s:.2f} | {4 * n / s / 1e9:.2f} |")
    emit()
    del x

    # ---- small tensors and whole messages ---------------------------------------------
    emit("## Small tensors: one call per tensor against the dispatch floor")
    emit()
    emit("| values | clone() us | encode us | decode into us | encode / clone | decode / clone |")
    emit("|---:|---:|---:|---:|---:|---:|")
    for numel in (16, 256, 4096, 65536):
        x = torch.randn(numel)
        dst = torch.empty_like(x)
        clone = median_seconds(lambda: x.clone(), repeats)
        enc = median_seconds(lambda: ops.quantize_pack([x], 4, [GROUP]), repeats)
        p, s, o = ops.quantize_pack([x], 4, [GROUP])
        dec = median_seconds(lambda: ops.unpack_dequantize_into_([dst], p, s, o, 4, [GROUP]), repeats)
        emit(
            f"| {numel:,} | {1e6 * clone:.1f} | {1e6 * enc:.1f} | {1e6 * dec:.1f} | {enc / clone:.1f}x | "
            f"{dec / clone:.1f}x |"
        )
    emit()

    state = resnet18_lora_state_dict(16)
    mats = [t for t in state.values() if t.dim() > 1]
    rows_g = [t.numel() // t.shape[0] for t in mats]
    emit(
        f"## A ResNet-18 r=16 LoRA adapter set ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} "
        f"values; {len(mats)} adapter matrices)"
    )
    emit()
    emit("One multi-tensor kernel call against a per-tensor loop (the adapter matrices):")
    emit()
    emit("| op | one call ms | per-tensor loop ms | speed-up |")
    emit("|---|---:|---:|---:|")
    multi = median_seconds(lambda: ops.quantize_pack(mats, 4, rows_g), repeats)
    loop = median_seconds(lambda: [ops.quantize_pack([t], 4, [g]) for t, g in zip(mats, rows_g)], repeats)
    emit(f"| quantize_pack 4-bit per row | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    p, s, o = ops.quantize_pack(mats, 4, rows_g)
    numels = [t.numel() for t in mats]
    singles = [ops.quantize_pack([t], 4, [g]) for t, g in zip(mats, rows_g)]
    multi = median_seconds(lambda: ops.unpack_dequantize(p, s, o, 4, numels, rows_g), repeats)
    loop = median_seconds(lambda: [ops.unpack_dequantize(a, b, c, 4, [t.numel()], [g])
                                   for (a, b, c), t, g in zip(singles, mats, rows_g)], repeats)  # fmt: skip
    emit(f"| unpack_dequantize 4-bit per row | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    ks = [max(1, t.numel() // 10) for t in mats]
    multi = median_seconds(lambda: ops.topk_encode(mats, ks), repeats)
    loop = median_seconds(lambda: [ops.topk_encode([t], [k]) for t, k in zip(mats, ks)], repeats)
    emit(f"| topk_encode 10% per tensor | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    emit()
    vals = list(state.values())
    rounds = 5 if full else 3
    emit(
        f"Whole messages (`fc.encode` / `fc.decode` / `fc.decode_into`, all {len(state)} tensors, the raw 1-D ones "
        f"included) against {len(state)} `clone()` calls (goal: within 2x). Each row takes {rounds} rounds; a round "
        "times the clones, then each call, each in a loop of its own (interleaved with the clones' allocations, "
        "glibc's heap handed the allocating decode fresh pages on many calls). Times are medians over the rounds; "
        "ratios are the median (lowest-highest) of each round's own ratio, since the host's speed drifts within a run:"
    )
    emit()
    emit(
        "| spec | bytes | clones ms | encode ms | decode ms | decode_into ms | encode / clones | decode / clones | "
        "decode_into / clones |"
    )
    emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    targets = {k: v.clone() for k, v in state.items()}
    for label, spec in MESSAGE_SPECS:
        data = fc.encode(state, spec)
        clone, t = paired_ratios(
            lambda: [v.clone() for v in vals],
            {
                "encode": lambda: fc.encode(state, spec),
                "decode": lambda: fc.decode(data),
                "into": lambda: fc.decode_into(data, targets),
            },
            rounds,
            repeats,
        )
        ms = " | ".join(f"{1e3 * t[k][0]:.3f}" for k in ("encode", "decode", "into"))
        ratios = " | ".join(fmt_ratios(t[k][1]) for k in ("encode", "decode", "into"))
        emit(f"| {label} | {len(data):,} | {1e3 * clone:.3f} | {ms} | {ratios} |")
    emit()

    # ---- top-k -------------------------------------------------------------------------
    emit("## Top-k sparse encode against `torch.topk(|x|)` + gather")
    emit()
    emit("| size | density | ours ms | torch.topk+gather ms | speed-up |")
    emit("|---|---:|---:|---:|---:|")
    for nbytes in [s for s in sizes if s >= 1 << 20]:
        n = nbytes // 4
        x = torch.randn(n)
        for density in (0.01, 0.1):
            k = int(n * density)
            ours = median_seconds(lambda: ops.topk_encode([x], [k]), repeats)

            def torch_topk():
                idx = torch.topk(x.abs(), k, sorted=False).indices
                return idx, x[idx]

            theirs = median_seconds(torch_topk, max(3, repeats // 2))
            emit(f"| {fmt_size(nbytes)} | {density} | {1e3 * ours:.2f} | {1e3 * theirs:.2f} | {theirs / ours:.1f}x |")
        del x
    emit()

    if full and not skip_huge:
        n = (1 << 28) + (1 << 20)  # 8-bit codes: 2^31 + 2^23 payload bits
        x = torch.randn(n)
        packed, scales, offsets = ops.quantize_pack([x], 8, [GROUP])
        enc = median_seconds(lambda: ops.quantize_pack([x], 8, [GROUP]), 3)
        y = ops.unpack_dequantize(packed, scales, offsets, 8, [n], [GROUP])
        bound = (scales.repeat_interleave(GROUP) / 2) * (1 + 1e-5) + 1e-6
        ok = bool(((y - x).abs() <= bound).all()) and packed.numel() * 8 > 2**31
        emit(
            f"## One tensor past 2^31 payload bits: {n:,} elements at 8 bits: encode {1e3 * enc:.0f} ms "
            f"({4 * n / enc / 1e9:.2f} GB/s of input); every element within scale/2: {'yes' if ok else 'NO'}"
        )
        emit()
        del x, y, packed
    if full:
        emit("## Allocating calls, glibc's default against `fc.reuse_freed_memory()`")
        emit()
        emit(
            "Repeated 4-bit encodes and decodes that allocate their outputs, ours and the compiled formulation "
            "(the faster layout), each setting in an interpreter of its own (the setting is process-wide), each "
            "function in a loop of its own, the loops in the order ours, compiled, compiled, ours. By "
            "default glibc maps every block of 32 MiB or more afresh and each call faults its pages in, whoever "
            "makes the call; after `fc.reuse_freed_memory()` the freed blocks stay in the heap. `vs compiled`: "
            "the compiled formulation's time over ours in the same interpreter."
        )
        emit()
        emit(
            "| size | op | default ms | compiled default ms | vs compiled | reused ms | compiled reused ms | "
            "vs compiled |"
        )
        emit("|---|---|---:|---:|---:|---:|---:|---:|")
        for nbytes in (64 << 20, 256 << 20):
            default, reused = (_allocating_ms(nbytes, mode, repeats) for mode in ("default", "reused"))
            for i, op in enumerate(("encode", "decode")):
                ours_d, theirs_d, ours_r, theirs_r = default[i], default[i + 2], reused[i], reused[i + 2]
                emit(
                    f"| {fmt_size(nbytes)} | {op} | {ours_d:.2f} | {theirs_d:.2f} | {theirs_d / ours_d:.2f}x | "
                    f"{ours_r:.2f} | {theirs_r:.2f} | {theirs_r / ours_r:.2f}x |"
                )
        emit()
    if notes:
        emit("Notes: " + "; ".join(notes))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", machine_description().split(";")[0]).strip("-").lower()
    stem += ("" if isa == "auto" else f"-{isa}") + ("" if full else "-quick")
    md = out_dir / f"{stem}.md"
    if plot:
        png = _plot(curves, out_dir / f"{stem}.png")
        if png is not None:
            lines.append(f"\n![GB/s against size]({png.name})")
        else:
            print("(matplotlib is not installed: no plot)")
    md.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {md}")
    return md


def _plot(curves, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in curves.items():
        style = "--" if "copy" in label or "sum" in label else ("-o" if label.startswith("ours") else ":s")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fp32 tensor size (bytes)")
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title("flocora_codec CPU throughput, group 64")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full",
        action="store_true",
        help="sizes up to 256 MiB, every bit width, compiled peers at 1/2/4/8 bits (~2 min)",
    )
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR",
                        help="directory for the table and the plot (default: benchmarks/results)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timings per median (default 7 quick, 15 full)")
    parser.add_argument("--skip-huge", action="store_true", help="--full: skip the 1 GiB tensor")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--isa", choices=["auto", *ISA_LEVELS], default="auto",
                        help="force the loops of one instruction set (default: the best this CPU has)")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flocora-codec bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.full, args.out, args.repeats, args.skip_huge, not args.no_plot, args.isa)
    return 0
