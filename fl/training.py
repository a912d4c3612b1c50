"""The client-side training step and evaluation, as plain functions.

``train_client(model, data, config)`` trains whatever parameters of ``model``
require grad, in place, and returns metrics. It knows nothing of rounds,
messages or methods, so a Flower client can call it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import ClientData, Dataset, augment_batch


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # cap on optimizer steps (quick runs, tests)

    @classmethod
    def from_dict(cls, d: dict, **over) -> "TrainConfig":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in {**d, **over}.items() if k in keys})


def train_client(model: nn.Module, data: ClientData, config: TrainConfig) -> dict:
    """Local SGD on ``data.train_idx``; returns loss, accuracy and counts."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_client: the model has no parameter that requires grad")
    n = data.num_samples
    if n == 0:
        raise ValueError("train_client: the client has no training samples")
    opt = torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    x_all, y_all = data.train.x, data.train.y
    gen = torch.Generator(device=x_all.device).manual_seed(config.seed)
    model.train()
    total_loss = torch.zeros((), device=x_all.device)
    correct = torch.zeros((), dtype=torch.int64, device=x_all.device)
    seen = steps = 0
    for _ in range(config.epochs):
        order = data.train_idx[torch.randperm(n, device=x_all.device, generator=gen)]
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            xb = augment_batch(x_all[idx], data.augment, gen)
            yb = y_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # accumulate on device: no host sync per step on a GPU
            total_loss += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
            steps += 1
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if config.max_steps is not None and steps >= config.max_steps:
            break
    loss = float(total_loss) / seen
    if loss != loss:  # NaN: a diverged client must not poison the average
        raise FloatingPointError("train_client: training loss is NaN (diverged)")
    return {"loss": loss, "acc": int(correct) / seen, "num_samples": n, "steps": steps}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, idx: torch.Tensor | None = None, batch_size: int = 512) -> dict:
    """Accuracy and mean loss of ``model`` on ``data`` (or its ``idx`` rows)."""
    model.eval()
    n = len(data) if idx is None else len(idx)
    if n == 0:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    total_loss = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.x.device)
    for start in range(0, n, batch_size):
        sel = slice(start, start + batch_size) if idx is None else idx[start : start + batch_size]
        xb, yb = data.x[sel], data.y[sel]
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return {"acc": int(correct) / n, "loss": float(total_loss) / n, "n": n}
