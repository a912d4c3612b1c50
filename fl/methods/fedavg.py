"""FedAvg: the whole model travels raw both ways; sample-weighted average.

It is also the parent of FLoCoRA, which changes only what is trainable (and
so what travels) and the codec spec.
"""

from __future__ import annotations

import math

from ..aggregation import ServerOptimizer, weighted_average
from ..comm import make_spec
from ..lora import frozen_names, get_tensors, set_tensors, trainable_names
from ..models import num_params
from ..training import evaluate, train_client
from ..transport import DeltaLink
from .base import Method, Update


class FedAvg(Method):
    name = "fedavg"

    def __init__(self, *args):
        super().__init__(*args)
        self.global_model = self.make_model().to(self.device)
        # The clients' working copy is built independently, from the shared
        # seed: whatever is frozen in it already equals the server's.
        self.client_model = self.make_model().to(self.device)
        self._trainable = trainable_names(self.global_model)
        self._frozen = frozen_names(self.global_model)

    def make_model(self):
        return self.build()

    def allowed_names(self):
        return set(self._trainable)

    def frozen_names(self):
        return set(self._frozen)

    def download(self, rnd):
        return get_tensors(self.global_model, self._trainable)

    def client_update(self, cid, received, rnd):
        set_tensors(self.client_model, received)
        metrics = train_client(self.client_model, self.clients[cid], self.client_train_config(cid, rnd))
        return get_tensors(self.client_model, self._trainable), metrics

    def aggregate(self, rnd, updates: list[Update]):
        avg = weighted_average([u.tensors for u in updates], [u.num_samples for u in updates])
        set_tensors(self.global_model, avg)

    def evaluate(self):
        return evaluate(self.global_model, self.test)

    # -- delta transport: both directions as compressed deltas with error feedback -----------
    def make_link(self) -> DeltaLink:
        m = self.mcfg
        self.server_opt = ServerOptimizer(
            self.global_tensors(),
            kind=m.get("server_opt", "sgd"),
            lr=float(m.get("server_lr", 1.0)),
            momentum=float(m.get("server_momentum", 0.0)),
        )
        return DeltaLink(
            self.global_tensors(),
            self.down_spec_at,
            self.up_spec_at,
            server_ef=bool(m.get("server_error_feedback", True)),
            client_ef=bool(m.get("error_feedback", True)),
            flatten=bool(m.get("flatten", False)),
            down_mode=m.get("down_mode", "broadcast"),
        )

    def density_at(self, density, rnd):
        """``density * decay^(rnd-1)``, floored at ``min_density`` (FLASC's density
        decay); the floor never raises a density above where it started."""
        decay = float(self.mcfg.get("density_decay", 1.0))
        if density is None or decay == 1.0:
            return density
        floor = min(density, float(self.mcfg.get("min_density", 0.0)))
        return max(floor, density * math.pow(decay, rnd - 1))

    def down_spec_at(self, rnd):
        return make_spec(self.mcfg, "down", self.density_at(self.mcfg.get("dl_density"), rnd))

    def up_spec_at(self, cid, rnd):
        tiers = self.mcfg.get("ul_density_tiers")
        density = tiers[cid % len(tiers)] if tiers else self.mcfg.get("ul_density")
        return make_spec(self.mcfg, "up", self.density_at(density, rnd))

    def global_tensors(self):
        return get_tensors(self.global_model, self._trainable)

    def set_global(self, tensors):
        set_tensors(self.global_model, tensors)
        self.server_opt.load(tensors)

    def train_from(self, cid, tensors, rnd):
        set_tensors(self.client_model, tensors)
        metrics = train_client(self.client_model, self.clients[cid], self.client_train_config(cid, rnd))
        return get_tensors(self.client_model, self._trainable), metrics

    def apply_deltas(self, rnd, updates: list[Update]):
        self.server_opt.step(weighted_average([u.tensors for u in updates], [u.num_samples for u in updates]))
        set_tensors(self.global_model, self.server_opt.tensors())

    def evaluate_tensors(self, tensors):
        """Accuracy of the model with ``tensors`` as its trainable part (e.g. the public model)."""
        set_tensors(self.client_model, tensors)
        return evaluate(self.client_model, self.test)

    def describe(self):
        return {
            "params_total": num_params(self.global_model),
            "params_trainable": num_params(self.global_model, trainable_only=True),
        }
