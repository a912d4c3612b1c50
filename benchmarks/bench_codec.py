"""CPU throughput of the codec ops, against the machine's copy bandwidth and
against what users would pick instead (docs/peers.md).

    .venv/bin/python benchmarks/bench_codec.py [--quick] [--skip-huge]

Every number is the median of several runs, with its baselines measured in the
same run. Bandwidth counts bytes read plus bytes written, for the copy and for
every op alike (quantize: 4n read + n*bits/8 + metadata written). The results
go to stdout and to benchmarks/results/cpu-<cpu>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flocora_codec as fc
from flocora_codec import ops
from flocora_codec.demo import resnet18_lora_state_dict

GROUP = 64
FLT_MIN = torch.finfo(torch.float32).tiny


def median_seconds(fn, repeats: int, min_seconds: float = 0.05) -> float:
    """Median of `repeats` timings; tiny calls are batched to >= min_seconds/20."""
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


# ---- baselines: the best plain-PyTorch formulation, eager and compiled -------------
def torch_quantize_pack(x: torch.Tensor, bits: int, group: int):
    """Plain-PyTorch group quantize + LSB-first pack (bits dividing 8).

    Same math and bytes as flocora_codec for nearest rounding and float32
    metadata (checked below), written the way a user would for speed: the
    packing goes through a reshape, not strided slices.
    """
    g = x.reshape(-1, group)
    lo = g.amin(1, keepdim=True) + 0.0
    hi = g.amax(1, keepdim=True) + 0.0
    levels = float(2**bits - 1)
    scale = (hi - lo) / levels
    scale = torch.where(scale >= FLT_MIN, scale, torch.zeros_like(scale))
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), scale)
    q = ((g - lo) * inv).clamp(0.0, levels).round().to(torch.int32)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    packed = (q.reshape(-1, per_byte) << shifts).sum(1).to(torch.uint8)
    return packed, scale.reshape(-1), lo.reshape(-1)


def torch_unpack_dequantize(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int):
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    q = ((packed.to(torch.int32).reshape(-1, 1) >> shifts) & (2**bits - 1)).to(torch.float32)
    return (offset.reshape(-1, 1) + q.reshape(-1, group) * scale.reshape(-1, 1)).reshape(-1)


def torchao_quantize(x: torch.Tensor, bits: int, group: int):
    """torchao: choose_qparams_affine + quantize_affine (+ pack_uint4 at 4 bits)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1, group)
    g = x.reshape(-1, group)
    scale, zero = choose_qparams_affine(g, MappingType.ASYMMETRIC, block, torch.uint8, 0, 2**bits - 1)
    q = quantize_affine(g, block, scale, zero, torch.uint8, 0, 2**bits - 1)
    if bits == 4:
        from torchao.prototype.mx_formats.kernels import pack_uint4  # torchao 0.18 location

        q = pack_uint4(q)
    return q


def bnb_quantize(x: torch.Tensor):
    import bitsandbytes.functional as F

    return F.quantize_4bit(x, blocksize=GROUP, quant_type="nf4")


def optional_baseline(name, factory):
    try:
        fn = factory()
        fn()
        return fn, None
    except Exception as exc:  # noqa: BLE001 - report why a peer could not run
        return None, f"{name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    isa = "AVX2" if torch.ops.flocora._set_cpu_isa(-1) else "portable scalar"
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"flocora_codec loops: {isa}; Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def fmt_size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:g} {unit}"
        nbytes /= 1024
    return f"{nbytes:g} TiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 16 MiB only, fewer repeats")
    parser.add_argument("--skip-huge", action="store_true", help="skip the > 2^31-payload-bit tensor")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/cpu-<cpu>.md)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 9)
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20] + ([] if args.quick else [256 << 20])
    lines: list[str] = []
    notes: list[str] = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    emit("# flocora_codec CPU benchmark")
    emit()
    emit(f"Machine: {machine_description()}")
    emit()

    compiled_q = torch.compile(torch_quantize_pack, dynamic=True)
    compiled_dq = torch.compile(torch_unpack_dequantize, dynamic=True)

    # ---- dense quantize + pack / unpack + dequantize ---------------------------------
    emit("## Quantize + pack and unpack + dequantize (group 64, nearest, fp32 metadata)")
    emit()
    emit(
        "GB/s counts bytes read + written; `% copy` is against `dst.copy_(x)` on the same size in the same run; "
        "x-factors are our speed over each baseline. Our ops allocate their outputs; the copy reuses its `dst`."
    )
    emit()
    emit(
        "| size | bits | copy GB/s | encode GB/s | % copy | vs eager | vs compiled | decode GB/s | % copy | "
        "vs eager | vs compiled |"
    )
    emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for nbytes in sizes:
        n = nbytes // 4
        x = torch.randn(n)
        dst = torch.empty_like(x)
        copy_s = median_seconds(lambda: dst.copy_(x), repeats)  # noqa: F821  called before the `del` below
        copy_gbs = 8 * n / copy_s / 1e9
        for bits in (1, 2, 4, 8):
            moved_enc = 4 * n + n * bits // 8 + 8 * n // GROUP
            ours_q = median_seconds(lambda: ops.quantize_pack([x], bits, [GROUP]), repeats)
            packed, scales, offsets = ops.quantize_pack([x], bits, [GROUP])
            ours_dq = median_seconds(
                lambda: ops.unpack_dequantize(packed, scales, offsets, bits, [n], [GROUP]), repeats
            )
            # The baseline must compute the same thing: same bytes.
            bp, bs, bo = torch_quantize_pack(x, bits, GROUP)
            assert torch.equal(bp, packed) and torch.equal(bs, scales), "baseline disagrees with the codec"
            eager_q = median_seconds(lambda: torch_quantize_pack(x, bits, GROUP), max(3, repeats // 3))
            comp_q = median_seconds(lambda: compiled_q(x, bits, GROUP), repeats)
            eager_dq = median_seconds(
                lambda: torch_unpack_dequantize(packed, scales, offsets, bits, GROUP), max(3, repeats // 3)
            )
            comp_dq = median_seconds(lambda: compiled_dq(packed, scales, offsets, bits, GROUP), repeats)
            enc_gbs = moved_enc / ours_q / 1e9
            dec_gbs = moved_enc / ours_dq / 1e9
            summary[(nbytes, bits)] = (
                enc_gbs / copy_gbs,
                dec_gbs / copy_gbs,
                eager_q / ours_q,
                comp_q / ours_q,
                eager_dq / ours_dq,
                comp_dq / ours_dq,
            )
            emit(
                f"| {fmt_size(nbytes)} | {bits} | {copy_gbs:.1f} | {enc_gbs:.2f} | {100 * enc_gbs / copy_gbs:.0f}% | "
                f"{eager_q / ours_q:.1f}x | {comp_q / ours_q:.1f}x | {dec_gbs:.2f} | "
                f"{100 * dec_gbs / copy_gbs:.0f}% | {eager_dq / ours_dq:.1f}x | {comp_dq / ours_dq:.1f}x |"
            )
        del x, dst
    emit()

    # ---- peers at 4 bits on 16 MiB ----------------------------------------------------
    n = (16 << 20) // 4
    x = torch.randn(n)
    emit("## Peers, 4-bit quantization of 16 MiB of fp32 (group/block 64)")
    emit()
    emit("| what | ms | GB/s of fp32 input |")
    emit("|---|---:|---:|")
    rows = [
        ("flocora_codec quantize_pack (fused, packed)", lambda: ops.quantize_pack([x], 4, [GROUP])),
        ("plain PyTorch eager (same bytes)", lambda: torch_quantize_pack(x, 4, GROUP)),
        ("plain PyTorch under torch.compile (same bytes)", lambda: compiled_q(x, 4, GROUP)),
    ]
    for name, factory in [
        ("torchao choose_qparams_affine + quantize_affine + pack_uint4", lambda: lambda: torchao_quantize(x, 4, GROUP)),
        ("bitsandbytes quantize_4bit nf4 (CPU)", lambda: lambda: bnb_quantize(x)),
    ]:
        fn, why = optional_baseline(name, factory)
        if fn is None:
            notes.append(why)
        else:
            rows.append((name, fn))
    for name, fn in rows:
        s = median_seconds(fn, repeats)
        emit(f"| {name} | {1e3 * s:.2f} | {4 * n / s / 1e9:.2f} |")
    emit()

    # ---- top-k -------------------------------------------------------------------------
    emit("## Top-k sparse encode vs `torch.topk(|x|)` + gather")
    emit()
    emit(
        "Ours selects by radix threshold search and writes the compact index code (bitmap or Elias-Fano); "
        "`torch.topk` returns int64 indices."
    )
    emit()
    emit("| size | density | ours ms | torch.topk+gather ms | speed-up | index bytes (ours) | int64 index bytes |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
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
            _, _, index_bytes = ops.topk_encode([x], [k])
            emit(
                f"| {fmt_size(nbytes)} | {density} | {1e3 * ours:.2f} | {1e3 * theirs:.2f} | {theirs / ours:.1f}x | "
                f"{index_bytes.numel():,} | {8 * k:,} |"
            )
        del x
    emit()

    # ---- a whole adapter state dict ----------------------------------------------------
    state = resnet18_lora_state_dict(16)
    mats = [t for t in state.values() if t.dim() > 1]
    rows_g = [t.numel() // t.shape[0] for t in mats]
    emit(
        f"## A ResNet-18 r=16 LoRA state dict ({len(mats)} adapter tensors, "
        f"{sum(t.numel() for t in mats):,} values): one multi-tensor call vs a per-tensor loop"
    )
    emit()
    emit("| op | one call ms | per-tensor loop ms | speed-up |")
    emit("|---|---:|---:|---:|")
    seeds = [0] * len(mats)
    multi = median_seconds(lambda: ops.quantize_pack(mats, 4, rows_g, seeds=seeds), repeats)
    loop = median_seconds(lambda: [ops.quantize_pack([t], 4, [g]) for t, g in zip(mats, rows_g)], repeats)
    emit(f"| quantize_pack 4-bit per row | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    p, s, o = ops.quantize_pack(mats, 4, rows_g, seeds=seeds)
    numels = [t.numel() for t in mats]
    singles = [ops.quantize_pack([t], 4, [g]) for t, g in zip(mats, rows_g)]
    multi = median_seconds(lambda: ops.unpack_dequantize(p, s, o, 4, numels, rows_g), repeats)
    loop = median_seconds(
        lambda: [ops.unpack_dequantize(a, b, c, 4, [t.numel()], [g]) for (a, b, c), t, g in zip(singles, mats, rows_g)],
        repeats,
    )
    emit(f"| unpack_dequantize 4-bit per row | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    ks = [max(1, t.numel() // 10) for t in mats]
    multi = median_seconds(lambda: ops.topk_encode(mats, ks), repeats)
    loop = median_seconds(lambda: [ops.topk_encode([t], [k]) for t, k in zip(mats, ks)], repeats)
    emit(f"| topk_encode 10% per tensor | {1e3 * multi:.3f} | {1e3 * loop:.3f} | {loop / multi:.1f}x |")
    clone = median_seconds(lambda: [t.clone() for t in mats], repeats)
    emit(f"| (dispatch floor: {len(mats)} `clone()` calls) | | {1e3 * clone:.3f} | |")
    emit()
    emit("Whole messages (`flocora_codec.encode` / `decode`, all 82 tensors incl. the raw 1-D ones):")
    emit()
    emit("| spec | bytes | encode ms | decode ms |")
    emit("|---|---:|---:|---:|")
    for label, spec in [
        ("raw fp32", fc.CodecSpec.raw()),
        ("4-bit per row", fc.CodecSpec(bits=4, granularity="row")),
        ("top-10% global, fp16 values", fc.CodecSpec(density=0.1, topk_scope="global", values="float16")),
    ]:
        data = fc.encode(state, spec)
        enc = median_seconds(lambda: fc.encode(state, spec), repeats)
        dec = median_seconds(lambda: fc.decode(data), repeats)
        emit(f"| {label} | {len(data):,} | {1e3 * enc:.3f} | {1e3 * dec:.3f} |")
    emit()

    # ---- one tensor past 2^31 payload bits ----------------------------------------------
    if not args.skip_huge:
        n = (1 << 28) + (1 << 20)  # 8-bit codes: 2^31 + 2^23 payload bits; 1.004 GiB of fp32
        x = torch.randn(n)
        packed, scales, offsets = ops.quantize_pack([x], 8, [GROUP])
        enc = median_seconds(lambda: ops.quantize_pack([x], 8, [GROUP]), 3)
        y = ops.unpack_dequantize(packed, scales, offsets, 8, [n], [GROUP])
        dec = median_seconds(lambda: ops.unpack_dequantize(packed, scales, offsets, 8, [n], [GROUP]), 3)
        bound = (scales.repeat_interleave(GROUP) / 2) * (1 + 1e-5) + 1e-6
        ok = bool(((y - x).abs() <= bound).all()) and packed.numel() * 8 > 2**31
        emit(f"## One tensor past 2^31 payload bits: {n:,} elements at 8 bits ({packed.numel() * 8:,} bits)")
        emit()
        emit(
            f"encode {1e3 * enc:.0f} ms ({4 * n / enc / 1e9:.2f} GB/s of input), decode {1e3 * dec:.0f} ms; "
            f"every element within scale/2: {'yes' if ok else 'NO'}"
        )
        emit()
        del x, y, packed
    if notes:
        emit("Notes: " + "; ".join(notes))
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / ("cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", machine_description().split(";")[0]).strip("-").lower() + ".md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
