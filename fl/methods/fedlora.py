"""FedLoRA (pFedLoRA): heterogeneous client CNNs sharing one LoRA adapter.

Client ``i`` owns member ``i % 5`` of the small-CNN family (fl.models), kept
between rounds; every member ends in the same ``fc3: 500 -> classes``, which
carries the shared adapter. A round on a client: load the global adapter,
train the local model with the adapter frozen, then the adapter with the
model frozen; upload the adapter only. The server averages adapters
(sample-weighted). ``share_adapter = false`` is the "each client alone"
baseline: same models and schedule, nothing travels.

Accuracy is personalised: each client's current model on its own held-out
split (sample-weighted over clients), with the mean accuracy of the client
models on the common test set beside it.
"""

from __future__ import annotations

import flocora_codec as fc

from ..aggregation import weighted_average
from ..lora import adapter_names, add_linear_adapter, get_tensors, set_tensors, set_trainable
from ..training import evaluate, train_client
from .base import Method

ADAPTER_LAYER = "fc3"


class FedLoRA(Method):
    name = "fedlora"

    def __init__(self, *args):
        super().__init__(*args)
        m = self.mcfg
        self.communicates = bool(m.get("share_adapter", True))
        if not self.communicates:
            self.name = "local"
        rank = int(m.get("rank", 4))
        alpha = float(m.get("alpha", 2 * rank))
        self.models = []
        for cid in range(len(self.clients)):
            model = self.build(member=cid, seed=self.model_seed + 7919 * (cid + 1))
            # one adapter seed for all clients: they start from the same adapter
            model = add_linear_adapter(model, ADAPTER_LAYER, rank, alpha, seed=self.model_seed)
            self.models.append(model.to(self.device))
        self._adapter = adapter_names(self.models[0])
        self.global_adapter = get_tensors(self.models[0], self._adapter)

    def allowed_names(self):
        return set(self._adapter)

    def frozen_names(self):
        # the local models are private: none of their own tensors may travel
        return {n for n, _ in self.models[0].named_parameters()} - set(self._adapter)

    def download(self, rnd):
        return {k: v.clone() for k, v in self.global_adapter.items()}

    def client_update(self, cid, received, rnd):
        model = self.models[cid]
        if self.communicates:
            set_tensors(model, received)
        body = [n for n, _ in model.named_parameters() if n not in self._adapter]
        set_trainable(model, body)
        metrics = train_client(model, self.clients[cid], self.client_train_config(cid, rnd))
        set_trainable(model, self._adapter)
        epochs = int(self.mcfg.get("adapter_epochs", 1))
        m2 = train_client(model, self.clients[cid], self.client_train_config(cid, rnd + 100_003, epochs=epochs))
        metrics = {**metrics, "adapter_loss": m2["loss"]}
        return get_tensors(model, self._adapter), metrics

    def aggregate(self, rnd, updates):
        self.global_adapter = weighted_average([u.tensors for u in updates], [u.num_samples for u in updates])

    def evaluate(self):
        personal, glob = [], []
        for cid, model in enumerate(self.models):
            held = self.clients[cid].test_idx
            if len(held):
                personal.append((evaluate(model, self.train, held)["acc"], len(held)))
            glob.append(evaluate(model, self.test))
        n = sum(w for _, w in personal)
        return {
            "acc": sum(g["acc"] for g in glob) / len(glob),
            "loss": sum(g["loss"] for g in glob) / len(glob),
            "acc_personal": sum(a * w for a, w in personal) / n if n else float("nan"),
        }

    def reference_model_bytes(self):
        # FedAvg cannot average heterogeneous models: compare with each client
        # sending its whole local model instead (mean over the family).
        sizes = [
            len(fc.encode({k: v.detach().cpu() for k, v in m.named_parameters()}, fc.CodecSpec.raw()))
            for m in self.models[:5]
        ]
        return int(sum(sizes) / len(sizes))

    def describe(self):
        per = [sum(p.numel() for p in m.parameters()) for m in self.models[:5]]
        return {
            "params_adapter": sum(t.numel() for t in self.global_adapter.values()),
            "params_local_models": per,
            "share_adapter": self.communicates,
        }
