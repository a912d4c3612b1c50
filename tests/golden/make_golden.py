"""Generate the golden messages of wire formats v1, v2 and v3 (run from the repo root).

    .venv/bin/python tests/golden/make_golden.py            # every case
    .venv/bin/python tests/golden/make_golden.py q3_row_f32  # some cases

Writes ``inputs.npz`` (fixed, deterministic inputs), ``<case>.flc`` (the
message) and ``<case>.npz`` (what it decodes to). ``tests/test_codec.py``
re-encodes the inputs with ``CASES[case]`` and compares bytes exactly, and
decodes each file to the stored values. Generate only the cases of a new
format version: the bytes of earlier versions are pinned forever (``v2_*``
cases are version 2, ``v3_*`` version 3, all others version 1).

Version 3 (compact) cases also write ``<case>.fls``, the schema the message
refers to; ``tests/test_compact.py`` pins both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import flocora_codec as fc

HERE = Path(__file__).resolve().parent
BF16_SUFFIX = ".bf16"  # npz has no bfloat16: such inputs are stored as their uint16 bits


def make_inputs() -> dict[str, np.ndarray]:
    """A small LoRA-like update: conv and linear adapters, norms, a classifier, odd dtypes."""
    rng = np.random.Generator(np.random.PCG64(20240614))
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {
        "layer1.conv.lora_A": f32(8, 16, 3, 3),
        "layer1.conv.lora_B": (0.01 * f32(32, 8, 1, 1)).astype(np.float32),
        "layer1.norm.weight": 1.0 + 0.1 * f32(32),
        "fc.weight": f32(10, 67),  # 670 elements: a short last group everywhere
        "fc.bias": f32(10),
        "half.lora_A": f32(12, 20).astype(np.float16),
        "emb" + BF16_SUFFIX: torch.from_numpy(f32(6, 10)).to(torch.bfloat16).view(torch.uint16).numpy(),
        "const": np.full((4, 8), 0.5, dtype=np.float32),
        "steps": np.array(1234, dtype=np.int64),
        "mask": np.array([True, False, True, True, False]),
    }


def to_tensors(arrays) -> dict[str, torch.Tensor]:
    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(a.copy(order="C"))  # ascontiguousarray would make 0-d 1-d
        out[name] = t.view(torch.bfloat16) if name.endswith(BF16_SUFFIX) else t
    return out


def to_arrays(tensors) -> dict[str, np.ndarray]:
    return {n: (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy() for n, t in tensors.items()}


S = fc.CodecSpec
CASES: dict[str, fc.CodecSpec] = {
    "raw": S.raw(),
    "q1_tensor_f32": S(bits=1, granularity="tensor"),
    "q1_group8_f16": S(bits=1, granularity="group", group_size=8, meta_dtype="float16"),
    "q3_row_f32": S(bits=3, granularity="row"),
    "q3_group16_f16": S(bits=3, granularity="group", group_size=16, meta_dtype="float16"),
    "q4_row_f16": S(bits=4, granularity="row", meta_dtype="float16"),
    "q4_group64_f32": S(bits=4, granularity="group", group_size=64),
    "q8_tensor_f16": S(bits=8, granularity="tensor", meta_dtype="float16"),
    "q8_row_f32_all": S(bits=8, granularity="row", rules=()),  # 1-d tensors quantized too
    "q2_row_stochastic": S(bits=2, granularity="row", rounding="stochastic", seed=7),
    "topk_bitmap_f32": S(density=0.6),
    "topk_ef_f16": S(density=0.05, values="float16"),
    "topk_quantized": S(k=20, values="quantized", bits=4, granularity="group", group_size=8, meta_dtype="float16"),
    "topk_global_bf16": S(density=0.1, topk_scope="global", values="bfloat16"),
    # version 2: STC's sign-and-mean values
    "v2_sign_tensor_f32": S(density=0.1, values="sign"),
    "v2_sign_global_f16": S(density=0.2, topk_scope="global", values="sign", meta_dtype="float16", rules=()),
    "rules_mixed": S(
        bits=4,
        rules=(
            fc.Rule("*.lora_B", S(bits=8, granularity="tensor")),
            fc.Rule("fc.*", S(k=30, values="quantized", bits=8, granularity="tensor")),
            fc.Rule("*", "raw", max_ndim=1),
        ),
    ),
}


# version 3: compact messages against a schema (FORMAT.md 6)
COMPACT_CASES: dict[str, fc.CodecSpec] = {
    "v3_q4_row_f32": S(bits=4, granularity="row"),
    "v3_sign_tensor_f32": S(density=0.1, values="sign"),
    "v3_topk_global_bf16": S(density=0.1, topk_scope="global", values="bfloat16"),
}


def main(names) -> None:
    arrays = make_inputs()
    np.savez(HERE / "inputs.npz", **arrays)
    tensors = to_tensors(arrays)
    for name in names or [*CASES, *COMPACT_CASES]:
        if name in COMPACT_CASES:
            schema = fc.Schema.build(tensors, COMPACT_CASES[name])
            (HERE / f"{name}.fls").write_bytes(schema.to_bytes())
            data = fc.encode(tensors, COMPACT_CASES[name], schema=schema)
            decoded = fc.decode(data, schemas=[schema])
        else:
            data = fc.encode(tensors, CASES[name])
            decoded = fc.decode(data)
        (HERE / f"{name}.flc").write_bytes(data)
        np.savez(HERE / f"{name}.npz", **to_arrays(decoded))
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
