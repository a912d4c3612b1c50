"""FLASC: dense local training of the whole adapter, sparse communication.

Download: the codec keeps the top-k of the global tensors by magnitude at
``dl_density`` (the client trains from that masked copy). Upload: top-k of
the client's delta (trained - received) at ``ul_density``. ``topk_scope``
"global" selects over all sparse tensors of a message at once, as FLASC;
1-D tensors (norms, biases) stay raw (FLASC's ViT had none trained; see
docs/experiments.md). The server averages the decoded sparse deltas
(sample-weighted) and applies them with SGD or Adam. ``error_feedback``
keeps each client's residual (``fc.ErrorFeedback``) and adds it back the
next time that client uploads; FLASC itself drops unsent entries.
"""

from __future__ import annotations

import flocora_codec as fc

from ..aggregation import ServerOptimizer, weighted_average
from ..lora import get_tensors, set_tensors
from ..training import train_client
from .flocora import FLoCoRA


class FLASC(FLoCoRA):
    name = "flasc"

    uploads_deltas = True

    def __init__(self, *args):
        super().__init__(*args)
        m = self.mcfg
        self.server_opt = ServerOptimizer(
            get_tensors(self.global_model, self._trainable),
            kind=m.get("server_opt", "sgd"),
            lr=float(m.get("server_lr", 1.0)),
            momentum=float(m.get("server_momentum", 0.0)),
        )
        self._ef = {}

    def download(self, rnd):
        return self.server_opt.tensors()

    def client_update(self, cid, received, rnd):
        set_tensors(self.client_model, received)
        metrics = train_client(self.client_model, self.clients[cid], self.client_train_config(cid, rnd))
        trained = get_tensors(self.client_model, self._trainable)
        return {k: trained[k] - received[k] for k in trained}, metrics

    def error_feedback(self, cid):
        if not self.mcfg.get("error_feedback", False):
            return None
        if cid not in self._ef:
            self._ef[cid] = fc.ErrorFeedback(self.up_spec)
        return self._ef[cid]

    def aggregate(self, rnd, updates):
        mean_delta = weighted_average([u.tensors for u in updates], [u.num_samples for u in updates])
        self.server_opt.step(mean_delta)
        set_tensors(self.global_model, self.server_opt.tensors())

    def analytic_sizes(self, tensors, params_fedavg):
        # FLoCoRA's formula describes FLoCoRA's messages, not FLASC's top-k deltas
        return {}

    def describe(self):
        d = super().describe()
        d.update(
            {
                k: self.mcfg.get(k)
                for k in ("ul_density", "dl_density", "topk_scope", "server_opt", "server_lr", "error_feedback")
            }
        )
        return d
