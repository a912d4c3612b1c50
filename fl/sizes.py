"""FLoCoRA's communication ratios from our own messages, without training.

For each model and rank, the real upload (trainable tensors of mode 2,
encoded by flocora_codec) is set beside FLoCoRA's analytic formula, and the
ratio to FedAvg's real message (the whole model, raw). A freshly built model
is enough: sizes do not depend on the values (except for top-k, not used).
"""
from __future__ import annotations

import flocora_codec as fc
from .comm import flocora_analytic_bits
from .lora import apply_flocora, get_tensors, trainable_names
from .models import build_model, num_params


def message_sizes(arch: str, ranks, bits_list, num_classes: int = 10, width: int = 64) -> list[dict]:
    full = build_model(arch, num_classes=num_classes, width=width, seed=0)
    fedavg_msg = fc.encode({k: v.detach() for k, v in full.named_parameters()}, fc.CodecSpec.raw())
    fedavg_analytic = num_params(full) * 4
    rows = [{"arch": arch, "rank": None, "bits": 32, "analytic_bytes": fedavg_analytic, "bytes": len(fedavg_msg),
             "header_bytes": fc.message_info(fedavg_msg).header_bytes, "ratio_paper": 1.0, "ratio_ours": 1.0}]
    for r in ranks:
        model = apply_flocora(build_model(arch, num_classes=num_classes, width=width, seed=0), r, 2 * r, 2, seed=1)
        tensors = get_tensors(model, trainable_names(model))
        for bits in [None, *bits_list]:
            spec = fc.CodecSpec.raw() if bits is None else fc.CodecSpec(bits=bits, granularity="row")
            msg = fc.encode(tensors, spec)
            info = fc.message_info(msg)
            analytic = flocora_analytic_bits(tensors, bits) / 8
            rows.append({"arch": arch, "rank": r, "bits": bits or 32, "analytic_bytes": analytic, "bytes": len(msg),
                         "header_bytes": info.header_bytes, "metadata_bytes": info.metadata_bytes,
                         "payload_bytes": info.payload_bytes,
                         "ratio_paper": fedavg_analytic / analytic, "ratio_ours": len(fedavg_msg) / len(msg)})
    return rows


def sizes_table(archs, ranks, bits_list, num_classes: int = 10) -> str:
    head = ("| model | r | bits | formula bytes | our bytes | ours - formula | of which header | "
            "ratio (formula) | ratio (ours) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for row in message_sizes(arch, ranks, bits_list, num_classes):
            lines.append(
                f"| {row['arch']} | {row['rank'] or 'FedAvg'} | {row['bits']} | {row['analytic_bytes']:,.0f} | "
                f"{row['bytes']:,} | {row['bytes'] - row['analytic_bytes']:+,.0f} | {row['header_bytes']:,} | "
                f"{row['ratio_paper']:.2f}x | {row['ratio_ours']:.2f}x |")
    return "\n".join(lines)
