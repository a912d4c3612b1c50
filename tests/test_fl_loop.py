"""The round loop on tiny synthetic data: every method, real messages,
byte counts, what travels, faults, and the offline config end to end."""

import json
from pathlib import Path

import pytest
import torch

import flocora_codec as fc
from fl import comm, loop
from fl.cli import main
from fl.comm import MessageNameError, check_names
from fl.config import load_config

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "data.dataset=synthetic",
    "data.num_samples=96",
    "data.num_classes=4",
    "data.image_size=8",
    "data.num_clients=4",
    "data.dirichlet_alpha=1.0",
    "model.width=4",
    "model.arch=resnet8",
    "train.rounds=2",
    "train.clients_per_round=4",
    "train.batch_size=16",
    "train.max_steps=2",
    "threads=1",
]
VARIANTS = {
    "fedavg": ["method.name=fedavg"],
    "flocora": ["method.name=flocora", "method.rank=2", "method.alpha=4"],
    "flocora-4bit-both": ["method.name=flocora", "method.rank=2", "method.bits=4", "method.quantize_download=true"],
    "flocora-mode3": ["method.name=flocora", "method.rank=2", "method.mode=3", "method.bits=2"],
    "flasc-global-ef-adam": [
        "method.name=flasc",
        "method.rank=2",
        "method.ul_density=0.2",
        "method.dl_density=0.5",
        "method.error_feedback=true",
        "method.server_opt=adam",
        "method.server_lr=0.01",
    ],
    "flasc-tensor-sgd": ["method.name=flasc", "method.rank=2", "method.ul_density=0.1", "method.topk_scope=tensor"],
    "fedlora": ["method.name=fedlora", "model.arch=cnn", "data.image_size=16", "data.holdout=0.25", "method.rank=2"],
    "local": [
        "method.name=fedlora",
        "method.share_adapter=false",
        "model.arch=cnn",
        "data.image_size=16",
        "data.holdout=0.25",
    ],
}


def tiny(*over):
    return load_config(None, TINY + list(over))


class Recorder:
    """Wraps the loop's Timer to see every real message that is decoded."""

    def __init__(self, monkeypatch):
        self.decoded = []  # (bytes, names)
        orig = comm.Timer.decode

        def decode(timer, data, device=None, expect=None):
            out = orig(timer, data, device, expect)
            self.decoded.append((data, set(out)))
            self.schemas = timer.book.registry if timer.book is not None else None
            return out

        monkeypatch.setattr(comm.Timer, "decode", decode)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_method_runs_two_rounds_with_real_messages(variant, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = tiny(*VARIANTS[variant])
    summary = loop.run(cfg, tmp_path, progress=False)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and summary["rounds"] == 2 and summary["dropped_total"] == 0
    assert all(0.0 <= r["acc"] <= 1.0 for r in rounds)
    assert json.loads((tmp_path / "summary.json").read_text())["final_acc"] == rounds[-1]["acc"]
    if variant == "local":
        assert rec.decoded == [] and summary["bytes_up_total"] == summary["bytes_down_total"] == 0
        assert "final_acc_personal" in summary
        return
    # every client decodes the download, the server every upload: 2 per client-round
    assert len(rec.decoded) == 2 * 2 * 4
    # compact messages (the default): each client's schemas travel once, counted too
    schema_bytes = summary["schema_bytes_up"] + summary["schema_bytes_down"]
    assert summary["compact"] and schema_bytes > 0
    assert sum(len(d) for d, _ in rec.decoded) + schema_bytes == summary["bytes_up_total"] + summary["bytes_down_total"]
    assert all(isinstance(d, bytes) and fc.message_info(d, schemas=rec.schemas).total_bytes == len(d)
               for d, _ in rec.decoded)  # fmt: skip
    assert all(fc.message_info(d, schemas=rec.schemas).version == 3 for d, _ in rec.decoded)
    # only the trainable (shared) tensors travel, never a frozen/private one
    method, _ = loop.setup(cfg)
    allowed, frozen = method.allowed_names(), method.frozen_names()
    assert bool(frozen) == (variant != "fedavg"), "all but FedAvg have tensors that must stay home"
    for _, names in rec.decoded:
        assert names == allowed and not names & frozen


def test_byte_counts_per_round_match_message_lengths(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = tiny("method.name=flocora", "method.rank=2", "method.bits=4")
    loop.run(cfg, tmp_path, progress=False)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    per_round = [rec.decoded[i * 8 : (i + 1) * 8] for i in range(2)]
    for r, msgs in zip(rounds, per_round):
        # order in a round: per client, its download decode then the server's upload decode
        assert r["bytes_down"] == sum(len(d) for d, _ in msgs[0::2]) + r["schema_bytes_down"]
        assert r["bytes_up"] == sum(len(d) for d, _ in msgs[1::2]) + r["schema_bytes_up"]
    assert rounds[1]["cum_bytes_up"] == rounds[0]["bytes_up"] + rounds[1]["bytes_up"]
    # all 4 clients take part in both rounds: each gets and sends its schemas once, in round 1
    one = len(rec.schemas[fc.format.compact_schema_id(per_round[0][1][0])].to_bytes())
    assert rounds[0]["schema_bytes_up"] == 4 * one and rounds[1]["schema_bytes_up"] == 0
    assert rounds[0]["schema_bytes_down"] > 0 and rounds[1]["schema_bytes_down"] == 0


def test_full_messages_when_compact_is_off(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    summary = loop.run(tiny("method.name=flocora", "method.rank=2", "method.bits=4", "method.compact=false",
                            "train.rounds=1"), tmp_path, progress=False)  # fmt: skip
    assert not summary["compact"] and summary["schema_bytes_up"] == summary["schema_bytes_down"] == 0
    assert all(fc.message_info(d).version == 1 for d, _ in rec.decoded)
    assert sum(len(d) for d, _ in rec.decoded) == summary["bytes_up_total"] + summary["bytes_down_total"]


def test_quantized_upload_is_smaller_and_close():
    tensors = {"a.lora_A.weight": torch.randn(4, 32), "n.weight": torch.ones(32)}
    spec_q = comm.make_spec({"bits": 4}, "up")
    assert comm.make_spec({"bits": 4}, "down") == fc.CodecSpec.raw()
    assert len(fc.encode(tensors, spec_q)) < len(fc.encode(tensors, fc.CodecSpec.raw()))
    out = fc.decode(fc.encode(tensors, spec_q))
    assert torch.equal(out["n.weight"], tensors["n.weight"])  # 1-D stays raw
    torch.testing.assert_close(out["a.lora_A.weight"], tensors["a.lora_A.weight"], atol=0.6, rtol=0)


def test_make_spec_keeps_its_defaults():
    # built by CodecSpec.from_dict; the specs pin what make_spec gave before it did
    assert comm.make_spec({}, "up") == fc.CodecSpec.raw()
    assert comm.make_spec({"bits": 4}, "up") == fc.CodecSpec(bits=4)
    assert comm.make_spec(
        {
            "bits": 2,
            "granularity": "group",
            "group_size": 16,
            "rounding": "stochastic",
            "codec_seed": 3,
            "meta_dtype": "float16",
        },
        "up",
    ) == fc.CodecSpec(bits=2, granularity="group", group_size=16, rounding="stochastic", seed=3, meta_dtype="float16")
    assert comm.make_spec({"ul_density": 0.1, "dl_density": 1.0}, "up") == fc.CodecSpec(
        bits=None, density=0.1, topk_scope="global"
    )
    assert comm.make_spec({"ul_density": 0.1, "dl_density": 1.0}, "down") == fc.CodecSpec.raw()
    assert comm.make_spec({"bits": 4, "ul_density": 0.1, "transport": "delta"}, "up") == fc.CodecSpec(
        bits=4, density=0.1, topk_scope="global", values="quantized", rules=()
    )
    assert comm.make_spec({"bits": 4, "transport": "delta", "keep_1d_raw": True}, "down") == fc.CodecSpec(bits=4)
    assert comm.make_spec({"sparse_values": "sign", "bits": 4, "ul_density": 0.01}, "up") == fc.CodecSpec(
        bits=None, density=0.01, topk_scope="global", values="sign"
    )


@pytest.mark.parametrize("over, fields", [
    (["method.name=flocora", "method.bits=4"], {"analytic_up_bytes", "analytic_down_bytes", "analytic_fedavg_bytes"}),
    (["method.name=flocora", "method.ul_density=0.1"], {"analytic_down_bytes", "analytic_fedavg_bytes"}),
    (["method.name=flocora", "method.transport=delta"], {"analytic_fedavg_bytes"}),
    (["method.name=flasc", "method.ul_density=0.1", "method.dl_density=0.5"], set()),
])  # fmt: skip
def test_each_method_reports_only_its_own_analytic_sizes(over, fields):
    method, _ = loop.setup(tiny("method.rank=2", *over))
    assert {k for k in method.describe() if k.startswith("analytic_")} == fields


def test_frozen_tensor_in_a_message_is_refused(tmp_path, monkeypatch):
    with pytest.raises(MessageNameError, match="frozen"):
        check_names({"conv1.base.weight"}, {"conv1.lora_A.weight"}, {"conv1.base.weight"}, "test")
    cfg = tiny("method.name=flocora", "method.rank=2")
    method, _ = loop.setup(cfg)
    leak = sorted(method.frozen_names())[0]
    orig = type(method).download

    def leaky_download(self, rnd):
        d = orig(self, rnd)
        d[leak] = torch.zeros(1)
        return d

    monkeypatch.setattr(type(method), "download", leaky_download)
    with pytest.raises(MessageNameError, match="frozen"):
        loop.run(cfg, tmp_path, progress=False)


class Captured:
    """Wraps loop.setup to keep the run's method and a copy of its initial global model."""

    def __init__(self, monkeypatch):
        self.methods, self.initial = [], []
        real = loop.setup

        def setup(cfg):
            method, device = real(cfg)
            self.methods.append(method)
            self.initial.append(_state(method))
            return method, device

        monkeypatch.setattr(loop, "setup", setup)


def _state(method):
    """Every parameter and buffer of the global model, copied."""
    return {k: v.detach().clone() for k, v in method.global_model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_fedavg_learns_the_synthetic_task(tmp_path):
    # Class prototypes plus noise, 4 classes: chance is 0.25. A loop that
    # trains but does not apply the aggregate (or applies it wrongly) stays near it.
    s = loop.run(
        tiny("method.name=fedavg", "data.num_samples=320", "train.rounds=4", "train.max_steps=5"),
        tmp_path,
        progress=False,
    )
    assert s["final_acc"] >= 0.6, s["final_acc"]


def _expected_fedavg(cfg, survivors, rnd=1):
    """The global model after one FedAvg round over ``survivors`` only, built
    by hand: a fresh setup, each survivor trained from the downloaded model,
    then the sample-weighted mean in float64 (not fl.aggregation)."""
    method, _ = loop.setup(cfg)
    down = method.download(rnd)
    ups = [method.client_update(cid, {k: v.clone() for k, v in down.items()}, rnd) for cid in survivors]
    total = sum(m["num_samples"] for _, m in ups)
    return {k: (sum(t[k].double() * (m["num_samples"] / total) for t, m in ups)).to(down[k].dtype) for k in down}


def test_faulty_clients_are_dropped_and_survivors_aggregated(tmp_path, caplog, monkeypatch):
    cfg = tiny("method.name=fedavg", "faults.raise_clients=[0]", "faults.corrupt_clients=[2]", "train.rounds=1")
    cap = Captured(monkeypatch)
    summary = loop.run(cfg, tmp_path, progress=False)
    (r,) = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert summary["dropped_total"] == 2 and r["clients"] == [0, 1, 2, 3]
    reasons = {d["cid"]: d["reason"] for d in r["dropped"]}
    assert reasons[0] == "InjectedFault: client 0: injected failure"
    # the corrupted upload fails the codec's CRC32C check, nothing else
    assert reasons[2].startswith("ChecksumError: "), reasons[2]
    assert "client 2 dropped" in caplog.text
    got = _state(cap.methods[0])
    want = _expected_fedavg(cfg, [1, 3])
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # and it is not the fault-free model over all four clients
    assert not all(torch.equal(got[k], v) for k, v in _expected_fedavg(cfg, [0, 1, 2, 3]).items())


def test_all_clients_failing_keeps_global_state(tmp_path, monkeypatch):
    # Both ways to fail: raising before training, and an upload that does not
    # decode after the client trained (its work must not leak into the model).
    cfg = tiny("method.name=fedavg", "faults.raise_clients=[0,1]", "faults.corrupt_clients=[2,3]", "train.rounds=2")
    cap = Captured(monkeypatch)
    summary = loop.run(cfg, tmp_path, progress=False)
    assert summary["dropped_total"] == 8 and summary["participations"] == 0
    # bit-identical, every parameter and buffer, after training attempts and evaluation
    _assert_same_state(_state(cap.methods[0]), cap.initial[0])


def test_runs_repeat_with_the_same_seed(tmp_path, monkeypatch):
    cfg = tiny("method.name=flocora", "method.rank=2", "method.bits=8", "method.rounding=stochastic")
    cap = Captured(monkeypatch)
    loop.run(cfg, tmp_path / "a", progress=False)
    loop.run(cfg, tmp_path / "b", progress=False)
    a, b = (_state(m) for m in cap.methods)
    _assert_same_state(a, b)
    assert not all(torch.equal(a[k], v) for k, v in cap.initial[0].items())  # it trained


def test_offline_default_config_end_to_end(tmp_path, capsys):
    cfg_path = ROOT / "configs" / "offline_mnist.toml"
    runs = tmp_path / "runs"
    for variant in (["method.name=fedavg"], ["method.name=flocora", "method.bits=4"]):
        assert (
            main(
                [
                    "run",
                    str(cfg_path),
                    "train.rounds=1",
                    "train.clients_per_round=2",
                    "train.max_steps=4",
                    *variant,
                    f"name=smoke-{variant[-1].split('=')[-1]}",
                    "--out",
                    str(runs),
                    "-q",
                ]
            )
            == 0
        )
    dirs = sorted(str(p) for p in runs.iterdir())
    assert len(dirs) == 2
    capsys.readouterr()
    assert main(["compare", *dirs, "-o", str(tmp_path / "table.md")]) == 0
    table = capsys.readouterr().out
    assert "| smoke-fedavg | fedavg |" in table and "1.00x" in table
    assert main(["plot", *dirs, "-o", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy_vs_mb.png").stat().st_size > 1000


def test_dense_flasc_with_sgd_lr1_equals_flocora(tmp_path):
    # FedAvg of deltas applied with lr 1 is FedAvg of weights: same accuracy
    common = ["method.rank=2", "method.alpha=4", "train.rounds=2"]
    a = loop.run(tiny("method.name=flocora", *common), tmp_path / "a", progress=False)
    b = loop.run(
        tiny("method.name=flasc", "method.server_opt=sgd", "method.server_lr=1.0", *common),
        tmp_path / "b",
        progress=False,
    )
    assert a["final_acc"] == b["final_acc"]
    ra = [json.loads(x) for x in (tmp_path / "a" / "rounds.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "rounds.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


@pytest.mark.parametrize("bits", [None, 4])
def test_real_bytes_match_flocora_formula_up_to_header(bits, tmp_path):
    over = ["method.name=flocora", "method.rank=2", "train.rounds=1"] + ([f"method.bits={bits}"] if bits else [])
    s = loop.run(tiny(*over), tmp_path, progress=False)
    d, up = s["describe"], s["last_up_breakdown"]
    assert up["total_bytes"] == s["up_message_bytes"]
    # same payload bits as the formula (b-bit codes, fp32 scale+offset per row);
    # the rest is our header (names, shapes, specs) plus a few bytes of framing
    extra = s["up_message_bytes"] - d["analytic_up_bytes"]
    assert up["header_bytes"] <= extra <= up["header_bytes"] + 16
    assert 0 < s["fedavg_message_bytes"] - d["analytic_fedavg_bytes"] < 4096
