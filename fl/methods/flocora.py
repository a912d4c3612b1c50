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
        rank = int(self.mcfg.get("rank", 16))
        lora = sum(t.numel() for k, t in tensors.items() if is_lora_name(k))
        d.update(
            rank=rank,
            alpha=float(self.mcfg.get("alpha", 2 * rank)),
            mode=int(self.mcfg.get("mode", 2)),
            params_lora=lora,
            params_base=d["params_total"] - lora,
            params_non_lora_trainable=sum(t.numel() for k, t in tensors.items() if not is_lora_name(k)),
        )
        d.update(self.analytic_sizes(tensors, d["params_total"] - lora))
        return d

    def analytic_sizes(self, tensors, params_fedavg: int) -> dict:
        """FLoCoRA's size formula (``fl.comm.flocora_analytic_bits``) for the
        messages it describes: dense ones (b-bit or fp32, 1-D tensors fp32)
        of the weights transport. A sparse direction, or deltas (where 1-D
        tensors are quantized too), reports no analytic size of its own."""
        m = self.mcfg
        # FedAvg sends the model without adapters
        out = {"analytic_fedavg_bytes": params_fedavg * 4}
        if self.transport != "weights":
            return out
        if not self.up_spec.sparse and not m.get("ul_density_tiers"):
            out["analytic_up_bytes"] = flocora_analytic_bits(tensors, m.get("bits")) / 8
        if not self.down_spec.sparse:
            out["analytic_down_bytes"] = (
                flocora_analytic_bits(tensors, m.get("bits") if m.get("quantize_download") else None) / 8
            )
        return out
