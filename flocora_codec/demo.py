"""Codec demo: a ResNet-18 LoRA adapter (r=16) state dict at several settings.

``python -m flocora_codec.demo`` prints, per setting, the exact message size,
the ratio against sending the same tensors as raw float32, the max and mean
absolute error after decoding, and the median encode and decode times.

The adapter is built in code with FLoCoRA's placement (mode 2: LoRA on every
conv, stem and 1x1 downsample convs included; GroupNorm and the classifier
sent in full) and plausible trained values: A Kaiming-uniform as initialised,
B small and non-zero as after a few rounds of training.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import flocora_codec as fc


def resnet18_conv_shapes() -> list[tuple[str, int, int, int]]:
    """(name, in_channels, out_channels, kernel) of every conv of a CIFAR ResNet-18."""
    convs = [("conv1", 3, 64, 3)]
    in_ch = 64
    for stage, out_ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride_block = block == 0 and stage > 1
            prefix = f"layer{stage}.{block}"
            convs.append((f"{prefix}.conv1", in_ch, out_ch, 3))
            convs.append((f"{prefix}.conv2", out_ch, out_ch, 3))
            if stride_block:
                convs.append((f"{prefix}.shortcut.0", in_ch, out_ch, 1))
            in_ch = out_ch
    return convs


def resnet18_lora_state_dict(rank: int = 16, num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """What a FLoCoRA client sends for a ResNet-18 at ``rank``: adapters + norms + fc."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, cin, cout, k in resnet18_conv_shapes():
        bound = 1.0 / math.sqrt(cin * k * k)  # kaiming_uniform(a=sqrt(5)), as nn.Conv2d
        state[f"{name}.lora_A"] = (torch.rand(rank, cin, k, k, generator=gen) * 2 - 1) * bound
        state[f"{name}.lora_B"] = torch.randn(cout, rank, 1, 1, generator=gen) * 0.01
        norm = name.replace("conv", "bn").replace("shortcut.0", "shortcut.1")
        state[f"{norm}.weight"] = 1 + 0.05 * torch.randn(cout, generator=gen)
        state[f"{norm}.bias"] = 0.05 * torch.randn(cout, generator=gen)
    state["fc.weight"] = torch.randn(num_classes, 512, generator=gen) * 0.04
    state["fc.bias"] = torch.zeros(num_classes)
    return state


SETTINGS: list[tuple[str, fc.CodecSpec]] = [
    ("raw float32", fc.CodecSpec.raw()),
    ("8-bit per row", fc.CodecSpec(bits=8, granularity="row")),
    ("4-bit per row", fc.CodecSpec(bits=4, granularity="row")),
    ("2-bit per row", fc.CodecSpec(bits=2, granularity="row")),
    ("4-bit group 64, fp16 meta", fc.CodecSpec(bits=4, granularity="group", group_size=64, meta_dtype="float16")),
    ("2-bit group 64, stochastic", fc.CodecSpec(bits=2, granularity="group", group_size=64, rounding="stochastic")),
    ("1-bit per row", fc.CodecSpec(bits=1, granularity="row")),
    ("top-10% per tensor, fp32 values", fc.CodecSpec(density=0.1)),
    ("top-1% global, fp16 values", fc.CodecSpec(density=0.01, topk_scope="global", values="float16")),
    (
        "top-10% global, 4-bit values",
        fc.CodecSpec(density=0.1, topk_scope="global", values="quantized", bits=4, granularity="group", group_size=64),
    ),
]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def run(rank: int = 16, repeats: int = 7) -> str:
    state = resnet18_lora_state_dict(rank)
    raw_bytes = sum(t.numel() * 4 for t in state.values())
    numel = sum(t.numel() for t in state.values())
    lines = [
        f"ResNet-18 LoRA r={rank} (FLoCoRA mode 2): {len(state)} tensors, {numel:,} values, "
        f"{raw_bytes / 1e6:.3f} MB as float32",
        "",
        "| setting | bytes | ratio vs fp32 | max abs err | mean abs err | encode ms | decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, spec in SETTINGS:
        data = fc.encode(state, spec)
        out = fc.decode(data)
        errors = torch.cat([(out[k].float() - v.float()).abs().reshape(-1) for k, v in state.items()])
        enc_ms = _median_ms(lambda: fc.encode(state, spec), repeats)
        dec_ms = _median_ms(lambda: fc.decode(data), repeats)
        lines.append(
            f"| {label} | {len(data):,} | {raw_bytes / len(data):.2f}x | {errors.max().item():.2e} | "
            f"{errors.mean().item():.2e} | {enc_ms:.2f} | {dec_ms:.2f} |"
        )
    info = fc.message_info(fc.encode(state, SETTINGS[2][1]))
    lines += [
        "",
        f"Byte breakdown of the 4-bit per-row message: header {info.header_bytes:,}, "
        f"metadata {info.metadata_bytes:,}, indices {info.index_bytes:,}, payload {info.payload_bytes:,}, "
        f"checksum {info.checksum_bytes}.",
        "Sparse settings keep 1-D tensors raw and decode to dense tensors with zeros elsewhere, "
        "so their error is the dropped mass.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flocora_codec.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per setting (median reported)")
    args = parser.parse_args(argv)
    print(run(args.rank, args.repeats))


if __name__ == "__main__":
    main()
