"""GPU throughput of the codec ops, against the device's copy bandwidth.

    .venv/bin/python benchmarks/bench_cuda.py [--quick] [--max-mib 1024]

Needs a CUDA device and the extension built with its CUDA kernels; exits
with a clear message otherwise. Every number is the median of several runs
timed with CUDA events, and the device-to-device copy bandwidth is measured
in the same run. Bandwidth counts bytes read plus bytes written, for the copy
and for every op alike (quantize: 4n read + n*bits/8 + metadata written).
Inputs of at most L2_ROTATE_BYTES rotate over enough buffers that each call
reads from DRAM, not from the L2 cache of the previous call; larger inputs
flush L2 by writing a scratch buffer before each timed call.

Note: quantize_pack, topk_encode and sparse_decode read one error flag back
to the host per call (a sync), so their times include one round trip.

Results go to stdout and to benchmarks/results/cuda-<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUP = 64
L2_ROTATE_BYTES = 256 << 20  # rotate buffers up to this total footprint (> 4x the L2 of an H100/H200)


def revision() -> str:
    """The commit measured: FLOCORA_REV where the tree was copied without its
    .git (a lent GPU machine gets the working tree alone), else git's."""
    import os

    if os.environ.get("FLOCORA_REV"):
        return f"git {os.environ['FLOCORA_REV']} (working tree copied to the GPU machine)"
    from flocora_codec.bench import code_revision

    return code_revision()


def require_cuda():
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
    from flocora_codec import ops

    x = torch.zeros(8, device="cuda")
    try:
        ops.quantize_pack([x], 4, [8])
    except (RuntimeError, NotImplementedError) as e:
        sys.exit(
            f"bench_cuda.py: the extension has no CUDA kernels ({e.__class__.__name__}: {str(e)[:200]}); "
            "build it with a CUDA torch and CUDA_HOME set"
        )


class Timer:
    """Median milliseconds of fn over `repeats` calls, each between two CUDA events."""

    def __init__(self):
        self.scratch = torch.empty(L2_ROTATE_BYTES // 4, dtype=torch.float32, device="cuda")

    def __call__(self, fn, repeats: int, flush: bool) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            if flush:
                self.scratch.zero_()  # evicts the inputs of the previous call from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def rotating(make, nbytes: int):
    """Enough copies of an input that a rotation through them misses L2."""
    n = max(1, min(16, L2_ROTATE_BYTES // max(nbytes, 1)))
    bufs = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return bufs[state["i"]]

    return nxt, n > 1


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ---- sections --------------------------------------------------------------------
def bench_copy(timer, sizes_mib, repeats):
    rows = {}
    for mib in sizes_mib:
        n = (mib << 20) // 4
        nxt, rot = rotating(lambda: torch.randn(n, device="cuda"), 4 * n)
        dst = torch.empty(n, device="cuda")
        ms = timer(lambda: dst.copy_(nxt()), repeats, flush=not rot)
        rows[mib] = gbps(8 * n, ms)  # read + write
    return rows


def bench_quant(timer, sizes_mib, repeats, copy_bw):
    from flocora_codec import ops

    lines = [
        "| input | bits | groups | quantize+pack ms | GB/s | % of copy | unpack+dequantize ms | GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mib in sizes_mib:
        n = (mib << 20) // 4
        nxt, rot = rotating(lambda: torch.randn(n, device="cuda"), 4 * n)
        for bits in (1, 2, 4, 8):
            for gname, group in ((str(GROUP), GROUP), ("tensor", n)):
                if gname == "tensor" and bits not in (4, 8):
                    continue
                qms = timer(lambda: ops.quantize_pack([nxt()], bits, [group]), repeats, flush=not rot)
                p, s, o = ops.quantize_pack([nxt()], bits, [group])
                meta = s.numel() * 8
                q_bytes = 4 * n + p.numel() + meta
                dms = timer(lambda: ops.unpack_dequantize(p, s, o, bits, [n], [group]), repeats, flush=True)  # noqa: F821  called before the `del` below
                d_bytes = p.numel() + meta + 4 * n
                lines.append(
                    f"| {mib} MiB fp32 | {bits} | {gname} | {qms:.3f} | {gbps(q_bytes, qms):.0f} | "
                    f"{100 * gbps(q_bytes, qms) / copy_bw[mib]:.0f}% | {dms:.3f} | {gbps(d_bytes, dms):.0f} | "
                    f"{100 * gbps(d_bytes, dms) / copy_bw[mib]:.0f}% |"
                )
                del p, s, o
        torch.cuda.empty_cache()
    return lines


def bench_topk(timer, n, repeats):
    from flocora_codec import ops

    x = torch.randn(n, device="cuda")
    lines = [
        "| elements | density | flocora topk_encode ms | flocora global scope ms | torch.topk+gather ms | "
        "index bytes (flocora) | index bytes (int64) |",
        "|---|---|---|---|---|---|---|",
    ]
    for density in (0.01, 0.1):
        k = int(density * n)
        ours = timer(lambda: ops.topk_encode([x], [k]), repeats, flush=True)
        ours_g = timer(lambda: ops.topk_encode([x], [k], global_scope=True), repeats, flush=True)

        def baseline():
            idx = torch.topk(x.abs(), k, sorted=False).indices
            return idx, x[idx]

        base = timer(baseline, repeats, flush=True)
        _, values, index = ops.topk_encode([x], [k])
        lines.append(f"| {n} | {density} | {ours:.3f} | {ours_g:.3f} | {base:.3f} | {index.numel()} | {8 * k} |")
        # Sanity: the same k-th largest magnitude as torch.topk (ties may pick other indices).
        if values.abs().min() != torch.topk(x.abs(), k).values.min():
            sys.exit("bench_cuda.py: topk_encode disagrees with torch.topk on the threshold")
    return lines


def resnet18_adapter_shapes(rank: int = 16, num_classes: int = 10):
    """ResNet-18 (CIFAR stem) with LoRA r on every conv: A (r, cin, k, k),
    B (cout, r, 1, 1), plus batch-norm weight/bias and the fc layer."""
    convs = [("conv1", 3, 64, 3)]
    cin = 64
    for li, cout in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            first = b == 0 and li > 1
            convs.append((f"layer{li}.{b}.conv1", cin if b == 0 else cout, cout, 3))
            convs.append((f"layer{li}.{b}.conv2", cout, cout, 3))
            if first:
                convs.append((f"layer{li}.{b}.shortcut.0", cin, cout, 1))
        cin = cout
    shapes = []
    for _, ci, co, k in convs:
        shapes += [(rank, ci, k, k), (co, rank, 1, 1), (co,), (co,)]
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def bench_state_dict(timer, repeats):
    from flocora_codec import ops

    shapes = resnet18_adapter_shapes()
    xs = [torch.randn(s, device="cuda") * 0.05 for s in shapes]
    groups = [GROUP] * len(xs)
    numels = [x.numel() for x in xs]
    total = sum(numels)
    lines = [
        f"ResNet-18 r=16 adapter state dict: {len(xs)} tensors, {total} elements ({4 * total / 1e6:.2f} MB fp32)",
        "",
        "| op | one multi-tensor call ms | per-tensor loop ms | speed-up |",
        "|---|---|---|---|",
    ]

    def row(name, multi, loop):
        m, lp = timer(multi, repeats, flush=False), timer(loop, repeats, flush=False)
        lines.append(f"| {name} | {m:.3f} | {lp:.3f} | {lp / m:.1f}x |")

    row(
        "quantize_pack 4-bit g64",
        lambda: ops.quantize_pack(xs, 4, groups),
        lambda: [ops.quantize_pack([x], 4, [GROUP]) for x in xs],
    )
    p, s, o = ops.quantize_pack(xs, 4, groups)
    singles = [ops.quantize_pack([x], 4, [GROUP]) for x in xs]
    row(
        "unpack_dequantize 4-bit g64",
        lambda: ops.unpack_dequantize(p, s, o, 4, numels, groups),
        lambda: [ops.unpack_dequantize(a, b, c, 4, [x.numel()], [GROUP]) for (a, b, c), x in zip(singles, xs)],
    )
    ks = [max(1, x.numel() // 10) for x in xs]
    row(
        "topk_encode 10% per tensor",
        lambda: ops.topk_encode(xs, ks),
        lambda: [ops.topk_encode([x], [k]) for x, k in zip(xs, ks)],
    )
    return lines


def bench_messages(repeats):
    """Whole messages from and to CUDA tensors through the public API, against
    moving the same tensors to the host (what any serializer does first)."""
    import time

    import flocora_codec as fc
    from flocora_codec.bench import MESSAGE_SPECS

    shapes = resnet18_adapter_shapes()
    state = {f"t{i}": torch.randn(s, device="cuda") * 0.05 for i, s in enumerate(shapes)}
    vals = list(state.values())
    targets = {k: torch.empty_like(v) for k, v in state.items()}

    def wall_ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    to_host = wall_ms(lambda: [t.cpu() for t in vals])
    lines = [
        f"Whole messages from CUDA tensors (`fc.encode`, bytes on the host) and back to the GPU (`fc.decode(..., "
        f"device='cuda')`, `fc.decode_into` CUDA targets), {len(vals)} tensors, against {len(vals)} `.cpu()` "
        f"copies ({to_host:.3f} ms). Wall clock, median of {repeats}.",
        "",
        "| spec | bytes | encode ms | decode ms | decode_into ms | encode / .cpu() copies |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, spec in MESSAGE_SPECS:
        data = fc.encode(state, spec)
        if data != fc.encode({k: v.cpu() for k, v in state.items()}, spec):
            sys.exit(f"bench_cuda.py: {label}: the CUDA encode differs from the CPU encode")
        enc = wall_ms(lambda: fc.encode(state, spec))
        dec = wall_ms(lambda: fc.decode(data, device="cuda"))
        into = wall_ms(lambda: fc.decode_into(data, targets))
        lines.append(f"| {label} | {len(data):,} | {enc:.3f} | {dec:.3f} | {into:.3f} | {enc / to_host:.1f}x |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--max-mib", type=int, default=1024, help="largest input in MiB of float32 (default 1024)")
    args = ap.parse_args()
    require_cuda()
    torch.manual_seed(0)
    repeats = 5 if args.quick else 20
    sizes = [s for s in ((1, 16, 256) if args.quick else (1, 16, 64, 256, 1024)) if s <= args.max_mib]
    timer = Timer()
    props = torch.cuda.get_device_properties(0)
    copy_bw = bench_copy(timer, sizes, repeats)
    out = [
        f"# flocora_codec CUDA benchmark: {props.name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB. Median of {repeats} runs, CUDA events.",
        "",
        f"Code: {revision()}.",
        "",
        "## Device-to-device copy (read + write)",
        "",
        "| size | GB/s |",
        "|---|---|",
    ]
    out += [f"| {mib} MiB | {bw:.0f} |" for mib, bw in copy_bw.items()]
    out += ["", f"## Quantize + pack / unpack + dequantize (group {GROUP} or per tensor, nearest, fp32 meta)", ""]
    out += bench_quant(timer, sizes, repeats, copy_bw)
    out += ["", "## Top-k (per tensor and global scope) vs torch.topk + gather", ""]
    out += bench_topk(timer, 1 << 22 if args.quick else 1 << 24, repeats)
    out += ["", "## Multi-tensor vs per-tensor calls", ""]
    out += bench_state_dict(timer, repeats)
    out += ["", "## Whole messages", ""]
    try:
        out += bench_messages(repeats)
    except Exception as e:  # noqa: BLE001  (the sections above still get written)
        out += [f"failed: {type(e).__name__}: {e}"]
    text = "\n".join(out) + "\n"
    print(text)
    slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    path = Path(__file__).resolve().parent / "results" / f"cuda-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
