"""FLoCoRA's communication ratios from our own messages, without training.

For each model and rank, the real upload (trainable tensors of mode 2,
encoded by flocora_codec) is set beside FLoCoRA's analytic formula, and the
ratio to FedAvg's real message (the whole model, raw); each message both in
full (its own tables) and compact (format v3: a 24-byte header against a
schema sent once, FORMAT.md 6). A freshly built model is enough: sizes do
not depend on the values (top-k rows keep ``density * n`` of each tensor).
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
    rows = [
        {
            "arch": arch,
            "rank": None,
            "bits": 32,
            "analytic_bytes": fedavg_analytic,
            "bytes": len(fedavg_msg),
            "header_bytes": fc.message_info(fedavg_msg).header_bytes,
            "ratio_paper": 1.0,
            "ratio_ours": 1.0,
            **_compact(full_tensors(full), fc.CodecSpec.raw(), len(fedavg_msg)),
        }
    ]
    for r in ranks:
        model = apply_flocora(build_model(arch, num_classes=num_classes, width=width, seed=0), r, 2 * r, 2, seed=1)
        tensors = get_tensors(model, trainable_names(model))
        specs = [(bits or 32, fc.CodecSpec.raw() if bits is None else fc.CodecSpec(bits=bits, granularity="row"))
                 for bits in [None, *bits_list]]  # fmt: skip
        # STC-style: 1% of each tensor, one sign bit and one magnitude per tensor
        specs += [("1% sign", fc.CodecSpec(density=0.01, values="sign", topk_scope="tensor", rules=()))]
        for label, spec in specs:
            msg = fc.encode(tensors, spec)
            info = fc.message_info(msg)
            analytic = flocora_analytic_bits(tensors, spec.bits if spec.bits and not spec.sparse else None) / 8
            rows.append(
                {
                    "arch": arch,
                    "rank": r,
                    "bits": label,
                    "analytic_bytes": None if spec.sparse else analytic,
                    "bytes": len(msg),
                    "header_bytes": info.header_bytes,
                    "metadata_bytes": info.metadata_bytes,
                    "payload_bytes": info.payload_bytes,
                    "n_tensors": len(tensors),
                    "ratio_paper": None if spec.sparse else fedavg_analytic / analytic,
                    "ratio_ours": len(fedavg_msg) / len(msg),
                    **_compact(tensors, spec, len(fedavg_msg)),
                }
            )
    return rows


def full_tensors(model) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def _compact(tensors: dict, spec, fedavg_bytes: int) -> dict:
    """The same message against its schema (format v3)."""
    schema = fc.Schema.build(tensors, spec)
    msg = fc.encode(tensors, spec, schema=schema)
    info = fc.message_info(msg, schemas=schema)
    return {
        "compact_bytes": len(msg),
        "compact_header_bytes": info.header_bytes,
        "schema_bytes": len(schema.to_bytes()),
        "ratio_compact": fedavg_bytes / len(msg),
    }


def sizes_table(archs, ranks, bits_list, num_classes: int = 10) -> str:
    head = (
        "| model | r | bits | formula bytes | our bytes | of which header | compact bytes | compact header | "
        "schema (once) | ratio (formula) | ratio (ours) | ratio (compact) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for row in message_sizes(arch, ranks, bits_list, num_classes):
            formula = "-" if row["analytic_bytes"] is None else f"{row['analytic_bytes']:,.0f}"
            paper = "-" if row["ratio_paper"] is None else f"{row['ratio_paper']:.2f}x"
            lines.append(
                f"| {row['arch']} | {row['rank'] or 'FedAvg'} | {row['bits']} | {formula} | {row['bytes']:,} | "
                f"{row['header_bytes']:,} | {row['compact_bytes']:,} | {row['compact_header_bytes']:,} | "
                f"{row['schema_bytes']:,} | {paper} | {row['ratio_ours']:.2f}x | {row['ratio_compact']:.2f}x |"
            )
    return "\n".join(lines)
