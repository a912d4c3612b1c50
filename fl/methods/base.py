"""What every method gives the round loop.

A method holds the server state and the simulated clients' state, and says
which tensors go down and up, with which codec spec. The loop (fl.loop) does
the sampling, the real encoding/decoding, byte counting and fault handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import flocora_codec as fc

from ..comm import make_spec
from ..data import ClientData, Dataset
from ..models import build_model
from ..training import TrainConfig

TRANSPORTS = ("weights", "delta")
# what a checkpoint leaves out: rebuilt from the config on resume
_NOT_CHECKPOINTED = ("cfg", "mcfg", "train_cfg", "train", "test", "clients", "device")


@dataclass
class Update:
    """A decoded client upload as the server sees it."""

    cid: int
    tensors: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict = field(default_factory=dict)


class Method:
    name = "method"
    communicates = True  # False: clients train alone, nothing travels
    uploads_deltas = False  # weights transport: clients upload trained - received (FLASC), not weights

    def __init__(self, cfg: dict, train: Dataset, test: Dataset, clients: list[ClientData], device):
        self.cfg = cfg
        self.mcfg = cfg.get("method", {})
        self.train_cfg = cfg.get("train", {})
        self.train, self.test, self.clients, self.device = train, test, clients, device
        self.seed = int(cfg.get("seed", 0))
        self.model_seed = int(cfg.get("model", {}).get("seed", self.seed))
        self.transport = self.mcfg.get("transport", "weights")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"method.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        self.up_spec = make_spec(self.mcfg, "up")
        self.down_spec = make_spec(self.mcfg, "down")

    # -- model construction shared by subclasses --------------------------------
    def build(self, member: int = 0, seed: int | None = None) -> nn.Module:
        m = self.cfg.get("model", {})
        return build_model(
            m.get("arch", "resnet8"),
            num_classes=self.train.num_classes,
            width=m.get("width", 64),
            in_channels=self.train.x.shape[1],
            image_size=self.train.x.shape[-1],
            member=member,
            seed=self.model_seed if seed is None else seed,
        )

    def client_train_config(self, cid: int, rnd: int, **over) -> TrainConfig:
        # a distinct, repeatable stream per (run seed, round, client)
        seed = (self.seed * 1_000_003 + rnd * 10_007 + cid) % (2**63)
        return TrainConfig.from_dict(self.train_cfg, seed=seed, **over)

    # -- the interface the loop uses -------------------------------------------------
    def allowed_names(self) -> set[str]:
        """Names that may appear in a message (either direction)."""
        raise NotImplementedError

    def frozen_names(self) -> set[str]:
        """Names that must never appear in a message."""
        return set()

    def download(self, rnd: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def client_update(self, cid: int, received: dict[str, torch.Tensor], rnd: int):
        """Client side: returns (tensors to upload, metrics with num_samples)."""
        raise NotImplementedError

    def down_spec_at(self, rnd: int) -> fc.CodecSpec:
        """The download's spec in round ``rnd``."""
        return self.down_spec

    def up_spec_at(self, cid: int, rnd: int) -> fc.CodecSpec:
        """Client ``cid``'s upload spec in round ``rnd``."""
        return self.up_spec

    def error_feedback(self, cid: int):
        """The client's ``fc.ErrorFeedback`` for its upload, or None."""
        return None

    def aggregate(self, rnd: int, updates: list[Update]) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def reference_model_bytes(self) -> int:
        """Size of a raw message of the whole model: FedAvg's message, the
        denominator of every communication ratio."""
        model = self.build()
        return len(fc.encode({k: v.detach() for k, v in model.named_parameters()}, fc.CodecSpec.raw()))

    def describe(self) -> dict:
        return {}

    # -- resume ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Everything that changes over rounds (models, optimizers, residuals)."""
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_CHECKPOINTED}

    def load_checkpoint_state(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- delta transport (fl.transport) -------------------------------------------------------
    def make_link(self):
        raise ValueError(f"method {self.name!r} does not support method.transport = 'delta'")
