"""STC, Sparse Ternary Compression (Sattler et al., 2019), on the codec.

The whole model's update travels both ways as a top-k of each tensor whose
kept values become ``sign * mu`` with one mean magnitude ``mu`` per tensor
(the codec's ``values = "sign"``: one bit per kept value), the positions as
Elias-Fano or bitmap codes (STC uses Golomb codes of the gaps, which cost
about the same for geometric gaps). Residuals are kept on both sides and
clients that skipped rounds catch up from the server's log of recent
broadcasts: exactly ``method.transport = "delta"`` with these defaults.
"""

from __future__ import annotations

from .fedavg import FedAvg

STC_DEFAULTS = {
    "transport": "delta",
    "sparse_values": "sign",
    "topk_scope": "tensor",
    "ul_density": 0.01,
    "dl_density": 0.01,
    "error_feedback": True,
    "server_error_feedback": True,
}


class STC(FedAvg):
    name = "stc"

    def __init__(self, cfg, *rest):
        cfg = {**cfg, "method": {**STC_DEFAULTS, **cfg.get("method", {})}}
        if cfg["method"]["transport"] != "delta" or cfg["method"]["sparse_values"] != "sign":
            raise ValueError("stc: needs method.transport = 'delta' and method.sparse_values = 'sign'")
        super().__init__(cfg, *rest)

    def describe(self):
        d = super().describe()
        d.update({k: self.mcfg.get(k) for k in ("ul_density", "dl_density", "topk_scope", "flatten")})
        return d
