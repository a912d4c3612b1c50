"""Delta transport (error feedback both ways, catch-up of stateful clients),
STC, density tiers and decay, resumable runs and seeded sweeps."""

from __future__ import annotations

import json

import pytest
import torch

import flocora_codec as fc
from fl import loop
from fl.cli import main
from fl.comm import Timer
from fl.config import load_config
from fl.transport import DeltaLink, Layout

TINY = [
    "data.dataset=synthetic",
    "data.num_samples=96",
    "data.num_classes=4",
    "data.image_size=8",
    "data.num_clients=5",
    "data.dirichlet_alpha=1.0",
    "model.width=4",
    "model.arch=resnet8",
    "train.rounds=5",
    "train.clients_per_round=2",
    "train.batch_size=16",
    "train.max_steps=2",
    "threads=1",
]


def tiny(*over):
    return load_config(None, TINY + list(over))


def tensors(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(60, 100, generator=g) * scale, "b": torch.randn(60, generator=g) * scale}


def link(down=None, up=None, **kw):
    down = down or fc.CodecSpec(bits=2, rules=())
    up = up or fc.CodecSpec(bits=2, rules=())
    return DeltaLink(tensors(0), lambda rnd: down, lambda cid, rnd: up, **kw)


# ---- layout ------------------------------------------------------------------------------
def test_flat_layout_round_trip_and_refusal():
    t = tensors(1)
    lay = Layout(t, flatten=True)
    packed = lay.pack(t)
    assert list(packed) == ["params"] and packed["params"].shape == (6060,)
    assert all(torch.equal(a, b) for a, b in zip(lay.unpack(packed).values(), t.values()))
    with pytest.raises(ValueError, match="6060 elements"):
        lay.unpack({"params": torch.zeros(6059)})
    with pytest.raises(ValueError):
        lay.unpack({"w": torch.zeros(6060)})


# ---- the link ----------------------------------------------------------------------------
def test_catch_up_reproduces_the_public_model_bit_for_bit():
    lk, timer = link(), Timer()
    state0, received, how = lk.sync(0, 1, timer, None)
    assert how == "seed" and received == [] and all(torch.equal(state0[k], lk.init[k]) for k in state0)
    glob = tensors(0)
    for rnd in range(1, 4):  # three rounds of server updates; client 0 sleeps through them
        glob = {k: v + 0.1 * tensors(rnd)[k] for k, v in glob.items()}
        _, glob = lk.broadcast(rnd, glob, timer)
    state, received, how = lk.sync(0, 4, timer, None)
    assert how == "catch-up" and len(received) == 3
    assert received == [m for _, m in lk.log]
    for k in state:
        assert torch.equal(state[k], lk.public[k]), k


def test_snapshot_when_catching_up_costs_more():
    lk, timer = link(down=fc.CodecSpec.raw(), up=fc.CodecSpec.raw()), Timer()
    glob = tensors(0)
    for rnd in range(1, 4):
        glob = {k: v + tensors(rnd)[k] for k, v in glob.items()}
        _, glob = lk.broadcast(rnd, glob, timer)
    state, received, how = lk.sync(3, 4, timer, None)
    # three raw deltas weigh three snapshots: one snapshot is sent instead
    assert how == "snapshot" and len(received) == 1 and len(received[0]) == lk.snapshot_bytes
    assert all(torch.equal(state[k], lk.public[k]) for k in state)
    # the log keeps no more than a snapshot's worth beyond the newest message
    assert sum(len(m) for _, m in lk.log) < 2 * lk.snapshot_bytes


def test_server_error_feedback_keeps_what_the_broadcast_dropped():
    timer = Timer()
    with_ef, without = link(server_ef=True), link(server_ef=False)
    glob_a = glob_b = tensors(0)
    total = {k: torch.zeros_like(v) for k, v in glob_a.items()}
    for rnd in range(1, 30):
        step = {k: 0.01 * v for k, v in tensors(100 + rnd).items()}
        total = {k: total[k] + step[k] for k in total}
        _, glob_a = with_ef.broadcast(rnd, {k: glob_a[k] + step[k] for k in step}, timer)
        _, glob_b = without.broadcast(rnd, {k: glob_b[k] + step[k] for k in step}, timer)
    init = tensors(0)
    for k in total:
        # with EF the server's model holds every update; without, it is reset to what was sent
        torch.testing.assert_close(glob_a[k] - init[k], total[k], atol=1e-5, rtol=0)
        assert torch.equal(glob_b[k], without.public[k])
    # and what clients hold tracks the true model far better with EF
    err_ef = sum(float((with_ef.public[k] - init[k] - total[k]).norm()) for k in total)
    err_plain = sum(float((without.public[k] - init[k] - total[k]).norm()) for k in total)
    assert err_ef < 0.5 * err_plain


def test_client_residual_is_added_to_the_next_upload():
    lk, timer = link(), Timer()
    delta = tensors(5, 0.1)
    msg = lk.upload(2, 1, delta, timer)
    sent = lk.receive(msg, timer, None)
    residual = lk.residuals[2].get_state()
    for k in delta:
        torch.testing.assert_close(sent[k] + residual[k], delta[k], rtol=0, atol=1e-6)
    # a client without error feedback keeps nothing
    plain = link(client_ef=False)
    plain.upload(2, 1, delta, timer)
    assert plain.residuals == {}


# ---- the loop in delta transport -----------------------------------------------------------
def test_delta_raw_equals_fedavg_of_weights(tmp_path):
    # lossless specs: sending deltas changes nothing but float rounding
    a = loop.run(tiny("method.name=fedavg"), tmp_path / "a", progress=False)
    b = loop.run(tiny("method.name=fedavg", "method.transport=delta"), tmp_path / "b", progress=False)
    ra = [json.loads(x) for x in (tmp_path / "a/rounds.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b/rounds.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb):
        assert x["clients"] == y["clients"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert a["final_acc"] == pytest.approx(b["final_acc"], abs=0.02)


def test_delta_bytes_are_the_messages_each_client_received(tmp_path, monkeypatch):
    seen = []
    orig = Timer.decode

    def decode(timer, data, device=None, expect=None):
        seen.append(data)
        return orig(timer, data, device, expect)

    monkeypatch.setattr(Timer, "decode", decode)
    cfg = tiny("method.name=flocora", "method.rank=2", "method.transport=delta", "method.bits=2")
    s = loop.run(cfg, tmp_path, progress=False)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:
        assert r["bytes_down"] == sum(v["bytes"] for v in r["sync"].values())
    assert rounds[0]["bytes_down"] == 0  # round 1: every client rebuilds the initial model from the seed
    # every download message a client received and every upload was decoded (plus the server's own broadcasts)
    broadcasts = len(rounds)
    assert (
        len(seen) == broadcasts + sum(v["messages"] for r in rounds for v in r["sync"].values()) + s["participations"]
    )
    assert s["fedavg_equivalent_bytes"] == 2 * s["fedavg_message_bytes"] * s["participations"]
    assert 0 < s["bytes_up_total"] and 0 < s["bytes_down_total"]


def test_stc_sends_ternary_top_k_per_tensor(tmp_path, monkeypatch):
    msgs = []
    orig = Timer.encode

    def encode(timer, tensors, how):
        data = orig(timer, tensors, how)
        msgs.append((data, timer.book.registry if timer.book else None))
        return data

    monkeypatch.setattr(Timer, "encode", encode)
    for compact, version in ((True, 3), (False, 2)):
        msgs.clear()
        loop.run(tiny("method.name=stc", "method.ul_density=0.05", "method.dl_density=0.05", "train.rounds=2",
                      f"method.compact={str(compact).lower()}"), tmp_path / str(compact), progress=False)  # fmt: skip
        assert msgs
        for data, schemas in msgs:
            info = fc.message_info(data, schemas=schemas)
            assert info.version == version  # sign values need v2; a compact message is v3
            assert {t.values for t in info.tensors} == {"sign"} and {t.topk_scope for t in info.tensors} == {"tensor"}
            for name, t in fc.decode(data, schemas=schemas).items():
                assert t[t != 0].abs().unique().numel() <= 1, name


def test_density_tiers_and_decay():
    cfg = tiny(
        "method.name=flasc",
        "method.rank=2",
        "method.ul_density_tiers=[0.0625, 0.25, 1.0]",
        "method.dl_density=0.5",
        "method.density_decay=0.5",
        "method.min_density=0.1",
    )
    method, _ = loop.setup(cfg)
    assert [method.up_spec_at(c, 1).density for c in range(4)] == [0.0625, 0.25, None, 0.0625]
    assert method.up_spec_at(1, 2).density == 0.125
    assert method.up_spec_at(1, 3).density == 0.1  # floored
    assert [method.down_spec_at(r).density for r in (1, 2, 3, 4)] == [0.5, 0.25, 0.125, 0.1]


def test_clients_that_miss_rounds_hold_the_same_model_as_the_server_sent(tmp_path):
    cfg = tiny(
        "method.name=fedavg",
        "method.transport=delta",
        "method.ul_density=0.2",
        "method.dl_density=0.2",
        "method.flatten=true",
        "train.rounds=6",
    )
    method, device = loop.setup(cfg)
    st = loop._State(int(cfg["seed"]))
    loop.run(cfg, tmp_path, progress=False)
    ck = torch.load(tmp_path / loop.CHECKPOINT, weights_only=False)
    link_ = ck["state"]["link"]
    timer = Timer(ck["state"]["book"])  # the run's schemas, which its clients hold
    for cid in range(5):  # every client, however long it slept, ends exactly at `public`
        state, _, _ = link_.sync(cid, 7, timer, None)
        assert all(torch.equal(state[k], link_.public[k]) for k in state), cid
    assert st.rnd == 0 and method.transport == "delta"


# ---- resume ----------------------------------------------------------------------------------
def _records(path):
    strip = ("wall_s", "encode_ms", "decode_ms")
    return [
        {k: v for k, v in json.loads(x).items() if k not in strip}
        for x in (path / "rounds.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "variant",
    [
        ["method.name=stc"],
        [
            "method.name=flocora",
            "method.rank=2",
            "method.transport=delta",
            "method.bits=2",
            "method.rounding=stochastic",
        ],
        ["method.name=flasc", "method.rank=2", "method.ul_density=0.2", "method.error_feedback=true"],
        ["method.name=fedlora", "model.arch=cnn", "data.image_size=16", "data.holdout=0.25", "method.rank=2"],
    ],
)
def test_resume_between_rounds_gives_the_same_rounds(variant, tmp_path):
    cfg = tiny(*variant)
    full = loop.run(cfg, tmp_path / "full", progress=False)
    loop.run(cfg, tmp_path / "cut", progress=False, stop_after=2)
    assert len(_records(tmp_path / "cut")) == 2 and not (tmp_path / "cut/summary.json").exists()
    resumed, _ = loop.resume_dir(tmp_path / "cut", progress=False)
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    assert resumed["final_acc"] == full["final_acc"] and resumed["bytes_up_total"] == full["bytes_up_total"]
    prov = json.loads((tmp_path / "cut/provenance.json").read_text())
    assert [p["started_at_round"] for p in prov] == [1, 3] and prov[0]["flocora_codec"] == fc.__version__


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a round: not an Exception, so no client drop."""


def test_resume_after_a_kill_during_a_round(tmp_path, monkeypatch):
    cfg = tiny("method.name=flocora", "method.rank=2", "method.transport=delta", "method.bits=4")
    loop.run(cfg, tmp_path / "full", progress=False)
    from fl.methods.fedavg import FedAvg

    orig = FedAvg.train_from
    calls = {"n": 0}

    def dying(self, cid, tensors, rnd):
        calls["n"] += 1
        if rnd == 4 and calls["n"] > 7:  # second client of round 4
            raise Killed()
        return orig(self, cid, tensors, rnd)

    monkeypatch.setattr(FedAvg, "train_from", dying)
    with pytest.raises(Killed):
        loop.run(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(FedAvg, "train_from", orig)
    assert len(_records(tmp_path / "cut")) == 3
    loop.resume_dir(tmp_path / "cut", progress=False)
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


def test_resume_refuses_another_config_and_extends_rounds(tmp_path):
    cfg = tiny("method.name=fedavg", "train.rounds=2")
    loop.run(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="only train.rounds"):
        loop.run(tiny("method.name=fedavg", "train.rounds=2", "train.lr=0.5"), tmp_path, progress=False, resume=True)
    s, _ = loop.resume_dir(tmp_path, ["train.rounds=3"], progress=False)
    assert s["rounds"] == 3 and len(_records(tmp_path)) == 3
    assert main(["run", "--resume", str(tmp_path), "train.rounds=4", "-q"]) == 0
    assert len(_records(tmp_path)) == 4


# ---- seeded sweep ------------------------------------------------------------------------------
def test_seeded_sweep_is_resumable_and_reports_the_frontier(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text(
        "\n".join(
            [
                "threads = 1",
                "[data]",
                'dataset = "synthetic"',
                "num_samples = 64",
                "num_classes = 4",
                "image_size = 8",
                "num_clients = 4",
                "dirichlet_alpha = 1.0",
                "[model]",
                "width = 4",
                "[train]",
                "rounds = 2",
                "clients_per_round = 2",
                "batch_size = 16",
                "max_steps = 1",
            ]
        )
        + "\n"
    )
    sweep = tmp_path / "sw.toml"
    sweep.write_text(
        f'base = "base.toml"\nresults = "{tmp_path}/res"\nseeds = [1, 2]\n'
        '[[variant]]\nname = "fedavg"\noverrides = ["method.name=fedavg"]\n'
        '[[variant]]\nname = "stc"\noverrides = ["method.name=stc"]\n'
    )
    assert main(["sweep", str(sweep), "-q", "--shard", "0/2"]) == 0
    res = tmp_path / "res/sw"
    done = sorted(p.name for p in (res / "runs").iterdir())
    assert done == ["fedavg-s1", "fedavg-s2"]  # jobs 0 and 2 of (seed, variant)
    before = (res / "runs/fedavg-s1/rounds.jsonl").read_text()
    assert main(["sweep", str(sweep), "-q"]) == 0  # finished runs are skipped, the rest run
    assert (res / "runs/fedavg-s1/rounds.jsonl").read_text() == before
    for name in ("table.md", "frontier.json", "frontier.png", "accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (res / name).is_file(), name
    rows = json.loads((res / "frontier.json").read_text())
    assert {r["name"]: len(r["accs"]) for r in rows} == {"fedavg": 2, "stc": 2}
    assert next(r for r in rows if r["name"] == "fedavg")["gap_points"] == 0
    assert main(["frontier", str(res)]) == 0


def test_convergence_criterion():
    flat = loop.convergence([0.5] * 10 + [0.9] * 10 + [0.903] * 10)
    assert flat["flat"] and flat["acc_last10_mean"] == pytest.approx(0.903)
    rising = loop.convergence([0.1 * i / 30 for i in range(30)])
    assert not rising["flat"]
    assert not loop.convergence([0.9] * 15)["flat"]  # too short to tell


def test_per_client_download_sends_one_message_and_keeps_each_clients_residual():
    lk, timer = link(down_mode="per_client"), Timer()
    assert lk.sync(0, 1, timer, None)[2] == "seed"
    glob = tensors(0)
    total = {k: torch.zeros_like(v) for k, v in glob.items()}
    for rnd in range(1, 40):
        step = {k: 0.01 * v for k, v in tensors(200 + rnd).items()}
        total = {k: total[k] + step[k] for k in total}
        glob = {k: glob[k] + step[k] for k in glob}
        msg, glob = lk.broadcast(rnd, glob, timer)
        assert msg is None and lk.log == []
        state, received, how = lk.sync(0, rnd + 1, timer, None)
        assert how == "per-client" and len(received) == 1
    # the client's copy tracks the server's model to within what one message drops
    err = sum(float((state[k] - glob[k]).norm()) for k in glob)
    step_norm = sum(float((0.01 * v).norm()) for v in tensors(0).values())
    assert err < 3 * step_norm
    # a client seen for the first time after round 1 gets the exact model
    state, received, how = lk.sync(4, 41, timer, None)
    assert how == "snapshot" and all(torch.equal(state[k], glob[k]) for k in glob)


def test_per_client_mode_in_the_loop(tmp_path):
    s = loop.run(
        tiny(
            "method.name=flocora",
            "method.rank=2",
            "method.transport=delta",
            "method.bits=2",
            "method.down_mode=per_client",
        ),
        tmp_path,
        progress=False,
    )
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert all(v["messages"] == 1 for v in r["sync"].values())
        assert r["bytes_down"] == sum(v["bytes"] for v in r["sync"].values())
    assert s["bytes_down_total"] > 0 and "acc_public" not in rounds[-1]
