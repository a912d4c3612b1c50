"""Server-side aggregation, independent of the round loop.

``weighted_average`` is FedAvg's sample-weighted mean (FLoCoRA, FedLoRA).
``ServerOptimizer`` applies an averaged client delta to global tensors as a
pseudo-gradient (FLASC: SGD with lr 1 is plain FedAvg of deltas; Adam is
FedAdam-style).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(updates: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * u_i / sum_i w_i per key, accumulated in float64 for exactness."""
    if not updates:
        raise ValueError("weighted_average: no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"weighted_average: {len(updates)} updates but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weighted_average: weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = set(updates[0])
    for u in updates[1:]:
        if set(u) != keys:
            raise KeyError(f"weighted_average: updates disagree on keys: {sorted(keys ^ set(u))[:5]}")
    total = float(sum(weights))
    out = {}
    for k in updates[0]:
        acc = torch.zeros(updates[0][k].shape, dtype=torch.float64, device=updates[0][k].device)
        for u, w in zip(updates, weights):
            acc += u[k].to(acc.device, torch.float64) * (w / total)
        out[k] = acc.to(updates[0][k].dtype)
    return out


class ServerOptimizer:
    """Global tensors updated from averaged deltas with SGD or Adam.

    The pseudo-gradient is ``-mean_delta``; with SGD at lr 1 and no momentum
    the result is ``global + mean_delta`` exactly.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        kind: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params = {k: torch.nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in tensors.items()}
        plist = list(self.params.values())
        if kind == "sgd":
            self.opt = torch.optim.SGD(plist, lr=lr, momentum=momentum)
        elif kind == "adam":
            self.opt = torch.optim.Adam(plist, lr=lr, betas=tuple(betas), eps=eps)
        elif kind == "adamw":
            self.opt = torch.optim.AdamW(plist, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        else:
            raise ValueError(f"server optimizer must be 'sgd', 'adam' or 'adamw', got {kind!r}")

    def step(self, mean_delta: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.grad = -mean_delta[k].to(p.device, p.dtype) if k in mean_delta else torch.zeros_like(p)
        self.opt.step()
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the global tensors (e.g. reset to what clients hold), keeping the optimizer state."""
        for k, p in self.params.items():
            p.copy_(tensors[k])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}
