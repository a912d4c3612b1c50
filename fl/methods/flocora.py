"""FLoCoRA: a frozen random base rebuilt from a shared seed, LoRA adapters
(+ norms + fc in mode 2) trained and averaged; optional b-bit quantization of
the upload, or of both directions (``quantize_download``).

Unlike the paper's simulation (which ships and averages the whole state
dict), only the trainable tensors are ever encoded: the loop checks every
message against the frozen names.
"""
from __future__ import annotations

from ..comm import flocora_analytic_bits
from ..lora import apply_flocora, get_tensors, is_lora_name
from .fedavg import FedAvg


class FLoCoRA(FedAvg):
    name = "flocora"

    def make_model(self):
        m = self.mcfg
        rank = int(m.get("rank", 16))
        alpha = float(m.get("alpha", 2 * rank))
        # adapters get their own seed so changing the rank leaves the base alone
        return apply_flocora(self.build(), rank, alpha, int(m.get("mode", 2)), seed=self.model_seed + 1)

    def describe(self):
        d = super().describe()
        tensors = get_tensors(self.global_model, self._trainable)
        bits = self.mcfg.get("bits")
        down_bits = bits if self.mcfg.get("quantize_download") else None
        rank = int(self.mcfg.get("rank", 16))
        lora = sum(t.numel() for k, t in tensors.items() if is_lora_name(k))
        d.update(
            rank=rank, alpha=float(self.mcfg.get("alpha", 2 * rank)), mode=int(self.mcfg.get("mode", 2)),
            params_lora=lora, params_base=d["params_total"] - lora,
            params_non_lora_trainable=sum(t.numel() for k, t in tensors.items() if not is_lora_name(k)),
            analytic_up_bytes=flocora_analytic_bits(tensors, bits) / 8,
            analytic_down_bytes=flocora_analytic_bits(tensors, down_bits) / 8,
            # FedAvg sends the model without adapters
            analytic_fedavg_bytes=(d["params_total"] - lora) * 4,
        )
        return d
