"""ClientApp: one fl client (its Dirichlet partition) per SuperNode.

The compression is the library's ``compression_mod``; the only app-specific
part is that its spec comes from the run config, which Flower hands over with
each message (mods are fixed when the ClientApp object is built).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flocora_codec.flower import compression_mod
from flocora_flower.task import app_config, codec_specs, fl_config, from_record, method_for, to_record

_MODS: dict = {}


def _node_partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError(
            "this ClientApp needs node config 'partition-id' and 'num-partitions' (simulation sets them; on a "
            'deployment start each SuperNode with --node-config "partition-id=I num-partitions=N")'
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` replace run-config keys (Python API runs)."""

    def codec_mod(msg: Message, context: Context, call_next) -> Message:
        appcfg = app_config(context.run_config, overrides)
        up, down = codec_specs(appcfg)
        if up is None and down is None:
            return call_next(msg, context)  # plain Flower: no codec anywhere
        key = (up, str(appcfg["codec-mode"]), bool(appcfg["codec-error-feedback"]) and up is not None)
        if key not in _MODS:
            _MODS[key] = compression_mod(up, mode=key[1], error_feedback=key[2] if up is not None else None)
        return _MODS[key](msg, context, call_next)

    app = ClientApp(mods=[codec_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        appcfg = app_config(context.run_config, overrides)
        cid, num_partitions = _node_partition(context)
        cfg = fl_config(appcfg)
        cfg["data"]["num_clients"] = num_partitions  # one fl client per SuperNode
        method, device = method_for(cfg)
        rnd = int(msg.content["config"].get("server-round", 1))
        received = from_record(msg.content["arrays"], device)
        tensors, metrics = method.client_update(cid, received, rnd)
        content = RecordDict(
            {
                "arrays": to_record(tensors),
                "metrics": MetricRecord(
                    {
                        "num-examples": int(metrics["num_samples"]),
                        "train-loss": float(metrics["loss"]),
                        "train-acc": float(metrics["acc"]),
                    }
                ),
            }
        )
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
