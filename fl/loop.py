"""The round loop: sample clients, send real codec messages both ways,
count their bytes, drop faulty clients, aggregate, evaluate, log.

Per round one JSON line goes to ``rounds.jsonl``; at the end ``summary.json``.
A client that raises, does not answer within ``server.client_timeout_s``,
sends an upload that fails to decode or is not the tensors the server expects
(names, shapes, dtypes: checked before anything is allocated), holds NaN or
Inf, or (with ``server.max_update_norm_ratio``) an update far larger than the
round's median, is dropped from that round with the reason and its kind
logged; the round completes with the others (and is skipped, keeping the
global state, if none is left). This is fault tolerance, not Byzantine
robustness: colluding or subtly wrong clients pass these checks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

import flocora_codec as fc

from .comm import Plain, SchemaBook, Timer, check_names, encoder, message_breakdown
from .config import load_config
from .data import load_dataset, make_clients
from .methods import METHODS, Update

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
    clients = make_clients(
        train,
        int(d["num_clients"]),
        float(d["dirichlet_alpha"]),
        seed,
        float(d.get("holdout", 0.0)),
        d.get("augment", "none"),
    )
    name = cfg["method"].get("name", "fedavg")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name](cfg, train, test, clients, device), device


def _corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def _bomb(name: str, numel: int = 1 << 28) -> bytes:
    """A valid top-k message that keeps nothing of a float32 tensor ``name`` of
    ``numel`` elements: about 80 bytes that would decode to ``4 * numel``."""
    import struct

    from flocora_codec import format as fmt

    nb = name.encode()
    body = fmt.PREAMBLE.pack(fmt.MAGIC, 1, 0, 1, 1)
    body += fmt.CodecRecord(fmt.CODEC_TOPK, values=fmt.VALUES_F32).pack()
    body += struct.pack("<H", len(nb)) + nb + struct.pack("<BBQHQB3Q", 1, 1, numel, 0, 0, 1, 0, 0, 0)
    return body + struct.pack("<I", fmt.crc32c(body))


CHECKPOINT = "checkpoint.pt"


_PROVENANCE: dict | None = None


def provenance() -> dict:
    """What produced a run: package and torch versions, the code revision.

    Read once per process: Python runs the code it imported, so a commit made
    while a long sweep runs must not be credited with its later runs.
    """
    global _PROVENANCE
    if _PROVENANCE is None:
        _PROVENANCE = _read_provenance()
    return dict(_PROVENANCE)


def _read_provenance() -> dict:
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "flocora_codec": fc.__version__,
        "torch": torch.__version__,
        "git_rev": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


class _State:
    """Everything a run carries from one round to the next (checkpointed)."""

    def __init__(self, seed: int):
        self.rnd = 0
        self.rng = np.random.default_rng(seed + 17)
        self.records: list[dict] = []
        self.cum_up = self.cum_down = 0
        self.up_sizes: list[int] = []
        self.down_sizes: list[int] = []
        self.participations = 0  # client-rounds that received the model and uploaded
        self.last_up = self.last_down = None
        self.link = None  # fl.transport.DeltaLink in delta transport
        self.book = None  # fl.comm.SchemaBook when messages are compact
        self.compact_decided = False  # a run keeps the message kind it started with
        self.schema_up = self.schema_down = 0  # bytes of schemas sent, once per receiver


def _save_checkpoint(out: Path, st: _State, method) -> None:
    """Atomically write the state after a completed round (os.replace)."""
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save({"state": st.__dict__, "method": method.checkpoint_state(), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, out / CHECKPOINT)


def _load_checkpoint(out: Path, st: _State, method) -> None:
    # our own file from an earlier run of this program: full unpickling is intended
    ck = torch.load(out / CHECKPOINT, weights_only=False)
    st.__dict__.update(ck["state"])
    if "compact_decided" not in ck["state"]:
        # a run from before compact messages: it goes on with full messages
        st.book, st.compact_decided, st.schema_up, st.schema_down = None, True, 0, 0
    method.load_checkpoint_state(ck["method"])
    torch.set_rng_state(ck["torch_rng"])


def run(
    cfg: dict,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Run one experiment; returns the summary (also written under ``out_dir``).

    With ``resume``, ``out_dir`` must hold a checkpoint of this config: the run
    continues after its last completed round and gives the same per-round
    results as an uninterrupted one. ``stop_after`` ends the run after that
    round without a summary (tests of ``resume``).
    """
    method, device = setup(cfg)
    tcfg, faults = cfg["train"], cfg.get("faults", {})
    rounds, per_round = int(tcfg["rounds"]), int(tcfg["clients_per_round"])
    n_clients = len(method.clients)
    if not 1 <= per_round <= n_clients:
        raise ValueError(f"clients_per_round must be in 1..{n_clients}, got {per_round}")
    transport = method.transport
    allowed, frozen = method.allowed_names(), method.frozen_names()
    st = _State(int(cfg.get("seed", 0)))
    out = Path(out_dir) if out_dir else None
    if resume:
        if out is None or not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
        saved = json.loads((out / "config.json").read_text())
        if _without(saved, "train.rounds") != _without(cfg, "train.rounds"):
            raise ValueError(
                f"--resume: the config differs from the one {out} was started with (only train.rounds may change)"
            )
        _load_checkpoint(out, st, method)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        runs_info = (
            json.loads((out / "provenance.json").read_text()) if resume and (out / "provenance.json").is_file() else []
        )
        runs_info.append({**provenance(), "started_at_round": st.rnd + 1})
        (out / "provenance.json").write_text(json.dumps(runs_info, indent=2))
        # rounds.jsonl holds exactly the checkpointed rounds: a round cut short left nothing
        with open(out / "rounds.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in st.records)
    if transport == "delta" and st.link is None:
        st.link = method.make_link()
    if not st.compact_decided:
        # messages against schemas agreed once (FORMAT.md 6)
        st.book = SchemaBook() if bool(cfg["method"].get("compact", True)) else None
        st.compact_decided = True
    bar = _progress(rounds, progress, cfg.get("name", "run"), st.rnd)
    scfg = cfg.get("server", {})
    timeout = float(scfg.get("client_timeout_s", 0.0) or 0.0)
    ratio = float(scfg.get("max_update_norm_ratio", 0.0) or 0.0)
    for rnd in range(st.rnd + 1, rounds + 1):
        t0 = time.perf_counter()
        timer = Timer(st.book)
        selected = sorted(st.rng.choice(n_clients, per_round, replace=False).tolist())
        down_msg = down = None
        if method.communicates and transport == "weights":
            down = method.download(rnd)
            check_names(down, allowed, frozen, "download")
            down_msg = timer.encode(down, Plain(method.down_spec_at(rnd)))
            st.last_down = down_msg
        updates, dropped, bytes_up, bytes_down, train_losses, sync = [], [], 0, 0, [], {}
        schema_before = (st.schema_up, st.schema_down)
        # what a client's upload must hold (checked before the decoder allocates) and
        # the tensors its update is measured against
        expect_up = down if method.communicates and transport == "weights" else None
        norm_base = None if transport == "delta" or method.uploads_deltas else expect_up
        norms = {}
        for cid in selected:
            acct = {"down": 0, "up": 0}
            try:
                tensors, metrics = _with_timeout(
                    lambda cancelled, cid=cid, acct=acct: _one_client(
                        method, st, cid, rnd, timer, device, faults, sync, down_msg, expect_up, acct, cancelled),
                    timeout, f"client {cid}")  # fmt: skip
                if method.communicates:
                    norms[cid] = _screen_update(cid, tensors, norm_base)
                updates.append(Update(cid, tensors, int(metrics["num_samples"]), metrics))
                train_losses.append(metrics["loss"])
            except Exception as e:  # noqa: BLE001  (any client failure drops that client only)
                reason = f"{type(e).__name__}: {e}"
                log.warning("round %d: client %d dropped: %s", rnd, cid, reason)
                dropped.append({"cid": cid, "kind": _drop_kind(e), "reason": reason})
            finally:
                # bytes that were sent count, whatever became of the client
                bytes_down += acct["down"]
                bytes_up += acct["up"]
        if ratio > 0 and updates:
            updates, train_losses = _apply_norm_bound(updates, norms, ratio, dropped, rnd)
        st.participations += len(updates)
        if method.communicates:
            if transport == "delta":
                if updates:
                    method.apply_deltas(rnd, updates)
                # the server broadcasts every round (its residual may still hold news)
                msg, new_global = st.link.broadcast(rnd, method.global_tensors(), timer)
                method.set_global(new_global)
                st.last_down = msg or st.last_down
            elif updates:
                method.aggregate(rnd, updates)
        st.cum_up += bytes_up
        st.cum_down += bytes_down
        rec = {
            "round": rnd,
            "clients": selected,
            "dropped": dropped,
            "train_loss": float(np.mean(train_losses)) if train_losses else math.nan,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "cum_bytes_up": st.cum_up,
            "cum_bytes_down": st.cum_down,
            "encode_ms": timer.encode_ms,
            "decode_ms": timer.decode_ms,
            # schemas sent this round (first contact), included in bytes_up / bytes_down
            "schema_bytes_up": st.schema_up - schema_before[0],
            "schema_bytes_down": st.schema_down - schema_before[1],
        }
        if sync:
            rec["sync"] = sync
        every = int(cfg.get("eval", {}).get("every", 1))
        if rnd % every == 0 or rnd == rounds:
            rec.update({k: v for k, v in method.evaluate().items() if k in ("acc", "loss", "acc_personal")})
            if transport == "delta" and method.communicates and st.link.down_mode == "broadcast":
                rec["acc_public"] = method.evaluate_tensors(st.link.public)["acc"]
        rec["wall_s"] = time.perf_counter() - t0
        st.records.append(rec)
        st.rnd = rnd
        if out:
            _save_checkpoint(out, st, method)
            with open(out / "rounds.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.update(rec)
        if stop_after is not None and rnd >= stop_after:
            bar.close()
            return {}
    bar.close()
    summary = _summary(cfg, method, st, device, sum(r["wall_s"] for r in st.records))
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _without(cfg: dict, dotted: str) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
        node = node.get(p, {})
    node.pop(last, None)
    return cfg


class ClientTimeout(TimeoutError):
    """A client did not answer within ``server.client_timeout_s``."""


class NonFiniteUpdate(ValueError):
    """A decoded client update holds NaN or Inf."""


class UpdateNormBound(ValueError):
    """A client update's norm exceeds ``server.max_update_norm_ratio`` times the round's median."""


_DROP_KINDS = {
    ClientTimeout: "timeout",
    NonFiniteUpdate: "nonfinite",
    UpdateNormBound: "norm",
    fc.CodecError: "decode",
    InjectedFault: "injected",
}


def _drop_kind(e: Exception) -> str:
    return next((kind for cls, kind in _DROP_KINDS.items() if isinstance(e, cls)), "error")


def _with_timeout(work, timeout: float, who: str):
    """``work(cancelled)``, or :class:`ClientTimeout` after ``timeout`` seconds (0: no limit).

    In this single-process simulation a Python thread cannot be stopped: a
    client past its deadline is abandoned in a daemon thread, its result is
    discarded, and ``cancelled`` tells it to stop touching shared state at its
    next stage boundary. Real clients are separate processes (Flower).
    """
    if timeout <= 0:
        return work(threading.Event())
    cancelled, box = threading.Event(), {}

    def target():
        try:
            box["result"] = work(cancelled)
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, name=f"fl-{who}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        cancelled.set()
        raise ClientTimeout(f"{who} did not answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _check_cancelled(cancelled: threading.Event, cid: int) -> None:
    if cancelled.is_set():
        raise ClientTimeout(f"client {cid}: abandoned after its timeout")


def _inject(cid: int, tensors: dict, faults: dict, cancelled: threading.Event) -> dict:
    """Faults a test or demo asked for, applied to what the client is about to send."""
    if cid in faults.get("hang_clients", []):
        deadline = time.monotonic() + float(faults.get("hang_s", 3600.0))
        while time.monotonic() < deadline and not cancelled.is_set():
            time.sleep(0.02)
        _check_cancelled(cancelled, cid)
    if cid in faults.get("scale_clients", []):
        tensors = {k: v * float(faults.get("scale_factor", 1000.0)) for k, v in tensors.items()}
    if cid in faults.get("nan_clients", []):
        # in a 1-D tensor if there is one: those travel raw, so the NaN reaches the server
        name = min(tensors, key=lambda k: (tensors[k].dim() != 1, list(tensors).index(k)))
        tensors = dict(tensors)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    return tensors


def _one_client(method, st: _State, cid, rnd, timer, device, faults, sync, down_msg, expect_up, acct, cancelled):
    """One client's round: receive, train, upload; returns what the server decoded
    and the client's metrics. Bytes are counted in ``acct`` as they are sent."""
    allowed, frozen = method.allowed_names(), method.frozen_names()
    if method.transport == "delta":
        link = st.link
        state, received, how = link.sync(cid, rnd, timer, device)
        acct["down"] = sum(len(m) for m in received) + _schema_cost(st, f"client {cid}", received, "down")
        st.down_sizes.extend(len(m) for m in received)
        if received:
            st.last_down = received[-1]
        sync[str(cid)] = {"how": how, "messages": len(received), "bytes": acct["down"]}
        check_names(state, allowed, frozen, f"client {cid} model")
        if cid in faults.get("raise_clients", []):
            raise InjectedFault(f"client {cid}: injected failure")
        trained, metrics = method.train_from(cid, state, rnd)
        delta = _inject(cid, {k: trained[k] - state[k] for k in state}, faults, cancelled)
        _check_cancelled(cancelled, cid)
        up_msg = link.upload(cid, rnd, delta, timer)
    else:
        received = {}
        if down_msg is not None:
            acct["down"] = len(down_msg) + _schema_cost(st, f"client {cid}", [down_msg], "down")
            st.down_sizes.append(len(down_msg))
            received = timer.decode(down_msg, device, expect=expect_up)  # the client's side
            check_names(received, allowed, frozen, f"client {cid} received")
        if cid in faults.get("raise_clients", []):
            raise InjectedFault(f"client {cid}: injected failure")
        tensors, metrics = method.client_update(cid, received, rnd)
        if not method.communicates:
            return tensors, metrics
        check_names(tensors, allowed, frozen, f"client {cid} upload")
        tensors = _inject(cid, tensors, faults, cancelled)
        _check_cancelled(cancelled, cid)
        up_msg = timer.encode(tensors, encoder(method.up_spec_at(cid, rnd), method.error_feedback(cid)))
    if cid in faults.get("corrupt_clients", []):
        up_msg = _corrupt(up_msg)
    if cid in faults.get("bomb_clients", []):
        up_msg = _bomb(next(iter(st.link.layout.expected() if method.transport == "delta" else expect_up)))
    acct["up"] = len(up_msg) + _schema_cost(st, f"server from client {cid}", [up_msg], "up")
    st.up_sizes.append(len(up_msg))
    # the server's side: the upload must hold exactly what it expects, or nothing is allocated
    if method.transport == "delta":
        tensors = st.link.receive(up_msg, timer, device)
    else:
        tensors = timer.decode(up_msg, device, expect=expect_up)
    check_names(tensors, allowed, frozen, f"client {cid} upload (decoded)")
    st.last_up = up_msg  # the summary's breakdown describes a message that decoded
    return tensors, metrics


def _schema_cost(st: _State, receiver: str, messages, direction: str) -> int:
    """Bytes of the schemas ``receiver`` gets with ``messages`` (each once)."""
    if st.book is None:
        return 0
    n = sum(st.book.cost(receiver, m) for m in messages)
    setattr(st, f"schema_{direction}", getattr(st, f"schema_{direction}") + n)
    return n


def _screen_update(cid: int, tensors: dict, base: dict | None) -> float:
    """Refuse a decoded update holding NaN or Inf; return its L2 norm (of
    ``tensors - base`` when the upload is weights, of ``tensors`` for deltas)."""
    sq = 0.0
    for name, t in tensors.items():
        if not torch.is_floating_point(t):
            continue
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteUpdate(f"client {cid}: tensor {name!r} of its update holds NaN or Inf")
        d = t.double() - base[name].double() if base is not None else t.double()
        sq += float(torch.dot(d.reshape(-1), d.reshape(-1)))
    return math.sqrt(sq)


def _apply_norm_bound(updates, norms, ratio, dropped, rnd):
    """Drop updates whose norm exceeds ``ratio`` times the round's lower median
    norm (the lower median: with two clients, the larger cannot set its own bar)."""
    ordered = sorted(norms[u.cid] for u in updates)
    median = ordered[(len(ordered) - 1) // 2]
    kept = []
    for u in updates:
        if norms[u.cid] > ratio * median:
            reason = (
                f"UpdateNormBound: client {u.cid}: update norm {norms[u.cid]:.4g} exceeds "
                f"{ratio:g} x the round's median {median:.4g}"
            )
            log.warning("round %d: client %d dropped: %s", rnd, u.cid, reason)
            dropped.append({"cid": u.cid, "kind": "norm", "reason": reason})
        else:
            kept.append(u)
    return kept, [u.metrics["loss"] for u in kept]


def convergence(accs: list[float], window: int = 10, tol: float = 0.005) -> dict:
    """The flatness criterion of docs/experiments.md: the mean accuracy of the
    last ``window`` rounds moved less than ``tol`` from the ``window`` before."""
    if len(accs) < 2 * window:
        return {"acc_last10_mean": float(np.mean(accs[-window:])) if accs else None, "flat": False}
    last, prev = float(np.mean(accs[-window:])), float(np.mean(accs[-2 * window : -window]))
    return {"acc_last10_mean": last, "acc_prev10_mean": prev, "flat": abs(last - prev) < tol}


def _summary(cfg, method, st: _State, device, wall):
    records, up_sizes, down_sizes, last_up, last_down = st.records, st.up_sizes, st.down_sizes, st.last_up, st.last_down
    accs = [r["acc"] for r in records if "acc" in r]
    ref = method.reference_model_bytes()
    n_up, n_down = len(up_sizes), len(down_sizes)
    # every message, plus each schema once per receiver that needed it
    total_up, total_down = sum(up_sizes) + st.schema_up, sum(down_sizes) + st.schema_down
    # FedAvg's traffic for the same participations: one raw model down and one up each
    fedavg_equiv = 2 * ref * st.participations if method.communicates else 0
    s = {
        "name": cfg.get("name", "run"),
        "method": method.name,
        "transport": method.transport,
        "device": str(device),
        "rounds": len(records),
        "final_acc": accs[-1] if accs else None,
        "best_acc": max(accs) if accs else None,
        # with few clients per round on non-IID data the last round alone is noisy
        "acc_last3_mean": float(np.mean(accs[-3:])) if accs else None,
        "bytes_up_total": total_up,
        "bytes_down_total": total_down,
        "mb_up_per_round": total_up / 1e6 / len(records),
        "mb_down_per_round": total_down / 1e6 / len(records),
        "up_message_bytes": sum(up_sizes) / n_up if n_up else 0,
        "down_message_bytes": sum(down_sizes) / n_down if n_down else 0,
        "compact": st.book is not None,
        "schema_bytes_up": st.schema_up,
        "schema_bytes_down": st.schema_down,
        "fedavg_message_bytes": ref,
        # what FedAvg would have sent for the same messages: one full model each
        "participations": st.participations,
        "fedavg_equivalent_bytes": fedavg_equiv,
        "ratio_vs_fedavg": fedavg_equiv / (total_up + total_down) if total_up + total_down else None,
        "ratio_up_vs_fedavg": ref * n_up / total_up if total_up else None,
        "dropped_total": sum(len(r["dropped"]) for r in records),
        "dropped_by_kind": _count_kinds(records),
        "encode_ms_total": sum(r["encode_ms"] for r in records),
        "decode_ms_total": sum(r["decode_ms"] for r in records),
        "wall_s": wall,
        "describe": method.describe(),
        "config": cfg,
        "provenance": provenance(),
        **convergence(accs),
    }
    pers = [r["acc_personal"] for r in records if "acc_personal" in r]
    if pers:
        conv = convergence(pers)
        s.update(
            final_acc_personal=pers[-1],
            best_acc_personal=max(pers),
            personal_last10_mean=conv["acc_last10_mean"],
            personal_flat=conv["flat"],
        )
    if last_up is not None:
        s["last_up_breakdown"] = message_breakdown(last_up, st.book and st.book.registry)
    if last_down is not None:
        s["last_down_breakdown"] = message_breakdown(last_down, st.book and st.book.registry)
    return s


def _count_kinds(records) -> dict:
    counts: dict[str, int] = {}
    for r in records:
        for d in r["dropped"]:
            kind = d.get("kind", "error")  # records of runs before kinds were logged
            counts[kind] = counts.get(kind, 0) + 1
    return counts


class _progress:
    """tqdm over rounds showing accuracy and cumulative MB (silent if off)."""

    def __init__(self, total, enabled, desc, done=0):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="round", leave=False, dynamic_ncols=True)

    def update(self, rec):
        if self.bar is not None:
            post = {
                "acc": f"{rec['acc']:.3f}" if "acc" in rec else "-",
                "MB": f"{(rec['cum_bytes_up'] + rec['cum_bytes_down']) / 1e6:.1f}",
            }
            if rec["dropped"]:
                post["dropped"] = len(rec["dropped"])
            self.bar.set_postfix(post)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def resume_dir(run_dir, overrides=(), progress=True) -> tuple[dict, Path]:
    """Continue the run in ``run_dir`` from its last completed round
    (``overrides`` may only change ``train.rounds``, e.g. to train longer)."""
    run_dir = Path(run_dir)
    cfg = load_config(None, overrides, base=json.loads((run_dir / "config.json").read_text()))
    if (run_dir / "summary.json").is_file():
        done = json.loads((run_dir / "summary.json").read_text())
        if done["rounds"] >= int(cfg["train"]["rounds"]):
            return done, run_dir
    return run(cfg, run_dir, progress, resume=True), run_dir


def run_file(path, overrides=(), out_root="runs", progress=True) -> tuple[dict, Path]:
    cfg = load_config(path, overrides)
    stem = Path(out_root) / f"{cfg.get('name', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = stem, 1
    while out.exists():
        i += 1
        out = stem.with_name(f"{stem.name}-{i}")
    return run(cfg, out, progress), out
