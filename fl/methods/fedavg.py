"""FedAvg: the whole model travels raw both ways; sample-weighted average.

It is also the parent of FLoCoRA, which changes only what is trainable (and
so what travels) and the codec spec.
"""
from __future__ import annotations

from fl.aggregation import weighted_average
from fl.lora import frozen_names, get_tensors, set_tensors, trainable_names
from fl.methods.base import Method, Update
from fl.models import num_params
from fl.training import evaluate, train_client


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

    def describe(self):
        return {"params_total": num_params(self.global_model),
                "params_trainable": num_params(self.global_model, trainable_only=True)}
