"""Run the app with Flower's Python simulation API (``run_simulation``, Ray).

``flwr run`` is the normal way (see the README); this entry point exists for
scripted experiments and tests, because it returns the server's summary
directly and takes run-config overrides in Python::

    cd fl/flower_app && python -m flocora_flower.simulate --nodes 4 --set codec-bits=0 --out plain.json

with flocora-codec installed with its ``experiments`` extra (README, "The
bundled Flower app"); from a checkout that is not installed, put the
repository root on PYTHONPATH as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]


def _export_pythonpath() -> None:
    # Ray workers are fresh interpreters: they find this package (and, in a
    # checkout that is not installed, `fl`) only through PYTHONPATH.
    from flocora_flower import task

    paths = [str(APP_DIR)]
    if task.load_config.__module__ == "fl.config":  # the checkout's fl, not an installed flocora_fl
        paths.append(str(Path(sys.modules["fl"].__file__).resolve().parents[1]))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in paths:
        if p not in parts:
            parts.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


def run(
    overrides: dict | None = None,
    nodes: int = 2,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    total_cpus: int | None = None,
) -> dict:
    """Simulate the app with ``nodes`` virtual SuperNodes; returns the server summary.

    Parameters
    ----------
    overrides : dict, optional
        Run-config keys (as in pyproject.toml) to replace.
    nodes : int
        Virtual SuperNodes, one fl client (Dirichlet partition) each.
    cpus_per_client, gpus_per_client : float
        Ray resources per ClientApp run: how many run at once is
        ``total / per_client``. ``gpus_per_client=0.5`` puts two clients on one GPU.
    total_cpus : int, optional
        CPUs Ray may use (default: all).
    """
    _export_pythonpath()
    from flwr.simulation import run_simulation

    from flocora_flower.client_app import make_client_app
    from flocora_flower.server_app import make_server_app

    results: dict = {}
    init_args = {"include_dashboard": False}
    if total_cpus is not None:
        init_args["num_cpus"] = int(total_cpus)
    run_simulation(
        server_app=make_server_app(overrides, results),
        client_app=make_client_app(overrides),
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": init_args,
        },
    )
    if not results:
        raise RuntimeError("the simulation ended without a server summary (see the Flower log above)")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flocora_flower.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="virtual SuperNodes (default 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, VALUE parsed as TOML (repeatable)",
    )
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--total-cpus", type=int, default=None)
    p.add_argument("--out", help="write the summary JSON here")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw
    summary = run(overrides, args.nodes, args.cpus_per_client, args.gpus_per_client, args.total_cpus)
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
