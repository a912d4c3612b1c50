"""The round loop: sample clients, send real codec messages both ways,
count their bytes, drop faulty clients, aggregate, evaluate, log.

Per round one JSON line goes to ``rounds.jsonl``; at the end ``summary.json``.
A client that raises, or whose upload fails to decode (or holds a tensor it
must not), is dropped from that round with the reason logged; the round
completes with the others (and is skipped, keeping the global state, if none
is left).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from fl.comm import Timer, check_names, message_breakdown
from fl.config import load_config
from fl.data import load_dataset, make_clients
from fl.methods import METHODS, Update

log = logging.getLogger("fl")


class InjectedFault(RuntimeError):
    """Raised by a client listed in ``faults.raise_clients`` (tests, demos)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(cfg: dict):
    """Data (on the device) and the method object for one run."""
    device = pick_device(cfg.get("device", "auto"))
    if int(cfg.get("threads", 0)) > 0:
        # on a shared, oversubscribed CPU one thread is several times faster
        # than two spinning OpenMP threads
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    d = cfg["data"]
    train, test = load_dataset(d, seed)
    train, test = train.to(device), test.to(device)
    clients = make_clients(train, int(d["num_clients"]), float(d["dirichlet_alpha"]), seed,
                           float(d.get("holdout", 0.0)), d.get("augment", "none"))
    name = cfg["method"].get("name", "fedavg")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name](cfg, train, test, clients, device), device


def _corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def run(cfg: dict, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run one experiment; returns the summary (also written under ``out_dir``)."""
    t_start = time.perf_counter()
    method, device = setup(cfg)
    tcfg, faults = cfg["train"], cfg.get("faults", {})
    rounds, per_round = int(tcfg["rounds"]), int(tcfg["clients_per_round"])
    n_clients = len(method.clients)
    if not 1 <= per_round <= n_clients:
        raise ValueError(f"clients_per_round must be in 1..{n_clients}, got {per_round}")
    allowed, frozen = method.allowed_names(), method.frozen_names()
    rng = np.random.default_rng(int(cfg.get("seed", 0)) + 17)
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        lines = open(out / "rounds.jsonl", "w")
    records, cum_up, cum_down = [], 0, 0
    up_sizes, down_sizes, last_up, last_down = [], [], None, None
    bar = _progress(rounds, progress, cfg.get("name", "run"))
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        timer = Timer()
        selected = sorted(rng.choice(n_clients, per_round, replace=False).tolist())
        down_msg = None
        if method.communicates:
            down = method.download(rnd)
            check_names(down, allowed, frozen, "download")
            down_msg = timer.encode(down, method.down_spec)
            last_down = down_msg
        updates, dropped, bytes_up, bytes_down, train_losses = [], [], 0, 0, []
        for cid in selected:
            try:
                received = {}
                if down_msg is not None:
                    bytes_down += len(down_msg)
                    down_sizes.append(len(down_msg))
                    received = timer.decode(down_msg, device)  # the client's side
                    check_names(received, allowed, frozen, f"client {cid} received")
                if cid in faults.get("raise_clients", []):
                    raise InjectedFault(f"client {cid}: injected failure")
                tensors, metrics = method.client_update(cid, received, rnd)
                if method.communicates:
                    check_names(tensors, allowed, frozen, f"client {cid} upload")
                    up_msg = timer.encode(tensors, method.up_spec, method.error_feedback(cid))
                    if cid in faults.get("corrupt_clients", []):
                        up_msg = _corrupt(up_msg)
                    bytes_up += len(up_msg)
                    up_sizes.append(len(up_msg))
                    tensors = timer.decode(up_msg, device)  # the server's side
                    check_names(tensors, allowed, frozen, f"client {cid} upload (decoded)")
                    last_up = up_msg
                updates.append(Update(cid, tensors, int(metrics["num_samples"]), metrics))
                train_losses.append(metrics["loss"])
            except Exception as e:  # noqa: BLE001  (any client failure drops that client only)
                reason = f"{type(e).__name__}: {e}"
                log.warning("round %d: client %d dropped: %s", rnd, cid, reason)
                dropped.append({"cid": cid, "reason": reason})
        if updates and method.communicates:
            method.aggregate(rnd, updates)
        cum_up += bytes_up
        cum_down += bytes_down
        rec = {"round": rnd, "clients": selected, "dropped": dropped,
               "train_loss": float(np.mean(train_losses)) if train_losses else math.nan,
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cum_bytes_up": cum_up, "cum_bytes_down": cum_down,
               "encode_ms": timer.encode_ms, "decode_ms": timer.decode_ms}
        every = int(cfg.get("eval", {}).get("every", 1))
        if rnd % every == 0 or rnd == rounds:
            rec.update({k: v for k, v in method.evaluate().items() if k in ("acc", "loss", "acc_personal")})
        rec["wall_s"] = time.perf_counter() - t0
        records.append(rec)
        if out:
            lines.write(json.dumps(rec) + "\n")
            lines.flush()
        bar.update(rec)
    bar.close()
    if out:
        lines.close()
    summary = _summary(cfg, method, records, up_sizes, down_sizes, last_up, last_down, device,
                       time.perf_counter() - t_start)
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(cfg, method, records, up_sizes, down_sizes, last_up, last_down, device, wall):
    accs = [r["acc"] for r in records if "acc" in r]
    ref = method.reference_model_bytes()
    n_up, n_down = len(up_sizes), len(down_sizes)
    total_up, total_down = sum(up_sizes), sum(down_sizes)
    s = {
        "name": cfg.get("name", "run"), "method": method.name, "device": str(device),
        "rounds": len(records), "final_acc": accs[-1] if accs else None, "best_acc": max(accs) if accs else None,
        # with few clients per round on non-IID data the last round alone is noisy
        "acc_last3_mean": float(np.mean(accs[-3:])) if accs else None,
        "bytes_up_total": total_up, "bytes_down_total": total_down,
        "mb_up_per_round": total_up / 1e6 / len(records), "mb_down_per_round": total_down / 1e6 / len(records),
        "up_message_bytes": total_up / n_up if n_up else 0, "down_message_bytes": total_down / n_down if n_down else 0,
        "fedavg_message_bytes": ref,
        # what FedAvg would have sent for the same messages: one full model each
        "ratio_vs_fedavg": (ref * (n_up + n_down)) / (total_up + total_down) if total_up + total_down else None,
        "ratio_up_vs_fedavg": ref * n_up / total_up if total_up else None,
        "dropped_total": sum(len(r["dropped"]) for r in records),
        "encode_ms_total": sum(r["encode_ms"] for r in records), "decode_ms_total": sum(r["decode_ms"] for r in records),
        "wall_s": wall, "describe": method.describe(), "config": cfg,
    }
    pers = [r["acc_personal"] for r in records if "acc_personal" in r]
    if pers:
        s.update(final_acc_personal=pers[-1], best_acc_personal=max(pers))
    if last_up is not None:
        s["last_up_breakdown"] = message_breakdown(last_up)
    if last_down is not None:
        s["last_down_breakdown"] = message_breakdown(last_down)
    return s


class _progress:
    """tqdm over rounds showing accuracy and cumulative MB (silent if off)."""

    def __init__(self, total, enabled, desc):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="round", leave=False, dynamic_ncols=True)

    def update(self, rec):
        if self.bar is not None:
            post = {"acc": f"{rec['acc']:.3f}" if "acc" in rec else "-",
                    "MB": f"{(rec['cum_bytes_up'] + rec['cum_bytes_down']) / 1e6:.1f}"}
            if rec["dropped"]:
                post["dropped"] = len(rec["dropped"])
            self.bar.set_postfix(post)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_file(path, overrides=(), out_root="runs", progress=True) -> tuple[dict, Path]:
    cfg = load_config(path, overrides)
    stem = Path(out_root) / f"{cfg.get('name', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = stem, 1
    while out.exists():
        i += 1
        out = stem.with_name(f"{stem.name}-{i}")
    return run(cfg, out, progress), out
