"""ServerApp: Flower's FedAvg inside ``CompressedStrategy``; the global model
is evaluated centrally with ``fl``'s evaluation on the test split."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flocora_codec.flower import CompressedStrategy
from flocora_flower.task import app_config, codec_specs, fl_config, from_record, method_for, set_tensors, to_record

log = logging.getLogger("flocora_flower")


def make_server_app(overrides: dict | None = None, results: dict | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` replace run-config keys, and ``results``
    (a dict) receives the run summary (Python API runs)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        appcfg = app_config(context.run_config, overrides)
        cfg = fl_config(appcfg)
        method, device = method_for(cfg)
        # Flower's node sampling draws from the global `random`: seed it, so
        # runs that differ only in the codec sample the same nodes.
        random.seed(int(cfg.get("seed", 0)))
        up, down = codec_specs(appcfg)
        n = int(appcfg["min-nodes"])
        strategy = CompressedStrategy(
            FedAvg(
                fraction_train=float(appcfg["fraction-train"]),
                fraction_evaluate=0.0,
                min_train_nodes=n,
                min_available_nodes=n,
            ),
            downlink=down,
            max_update_norm_ratio=float(appcfg.get("max-update-norm-ratio", 0.0)),
        )

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            set_tensors(method.global_model, from_record(arrays, device))
            m = method.evaluate()
            return MetricRecord({"acc": float(m["acc"]), "loss": float(m["loss"])})

        rounds = int(appcfg["num-server-rounds"])
        # a node that has not replied when the round's time is up (dead, hung)
        # is left out of that round; the run goes on with the replies received
        result = strategy.start(
            grid=grid,
            initial_arrays=to_record(method.download(0)),
            num_rounds=rounds,
            timeout=float(appcfg.get("round-timeout", 3600.0)),
            train_config=ConfigRecord(),
            evaluate_fn=evaluate,
        )
        summary = {
            "method": method.name,
            "uplink_codec": repr(up),
            "downlink_codec": repr(down),
            "rounds": rounds,
            "acc": [
                float(result.evaluate_metrics_serverapp[r]["acc"])
                for r in range(rounds + 1)
                if r in result.evaluate_metrics_serverapp
            ],
            "train_loss": [
                float(result.train_metrics_clientapp[r]["train-loss"])
                for r in range(1, rounds + 1)
                if r in result.train_metrics_clientapp
            ],
            "bytes": {int(r): dict(h) for r, h in strategy.history.items()},
        }
        log.info("flocora_flower summary: %s", json.dumps(summary))
        if appcfg.get("summary-path"):
            Path(str(appcfg["summary-path"])).write_text(json.dumps(summary, indent=2))
        if results is not None:
            results.update(summary)

    return app


app = make_server_app()
