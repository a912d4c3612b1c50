"""The flocora-codec command line, through main(argv) and once as a subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import flocora_codec as fc
from flocora_codec import cli
from flocora_codec.files import read_tensors, tensors_from_bytes


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "layer.lora_A": rng.standard_normal((8, 64)).astype(np.float32),
        "layer.bias": rng.standard_normal(8).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),
    }
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_encode_inspect_decode(tmp_path, npz, capsys):
    path, arrays = npz
    msg, out = tmp_path / "m.flc", tmp_path / "out.npz"
    argv = ["encode", str(path), "-o", str(msg), "--bits", "3", "--granularity", "group", "--group-size", "16",
            "--meta-dtype", "float16", "--rounding", "stochastic", "--seed", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    spec = fc.CodecSpec(bits=3, granularity="group", group_size=16, meta_dtype="float16", rounding="stochastic", seed=5)
    assert msg.read_bytes() == fc.encode_numpy(arrays, spec)
    capsys.readouterr()

    assert cli.main(["inspect", str(msg)]) == 0
    text = capsys.readouterr().out
    assert "CRC32C ok" in text and "format v1" in text
    assert "layer.lora_A" in text and "8x64" in text and "affine 3-bit group=16 stochastic meta=float16" in text
    info = fc.message_info(msg.read_bytes())
    assert f"header {info.header_bytes}" in text and f"payload {info.payload_bytes}" in text

    assert cli.main(["decode", str(msg), "-o", str(out)]) == 0
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    expected = fc.decode_numpy(msg.read_bytes())
    assert list(got) == list(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and got[k].shape == arrays[k].shape
        np.testing.assert_array_equal(got[k], expected[k])
    np.testing.assert_array_equal(got["layer.bias"], arrays["layer.bias"])  # 1-d raw by default


def test_inspect_json(tmp_path, npz, capsys):
    path, _ = npz
    msg = tmp_path / "m.flc"
    assert cli.main(["encode", str(path), "-o", str(msg), "--density", "0.1", "--no-keep-1d-raw"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "--json", str(msg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] and doc["version"] == 1 and doc["bytes"]["total"] == msg.stat().st_size
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["layer.bias"]["codec"] == "topk" and rows["layer.bias"]["count"] == 1
    assert rows["layer.lora_A"]["count"] == 51 and rows["steps"]["codec"] == "raw"


@pytest.mark.parametrize("damage", ["flip", "truncate", "version"])
def test_inspect_and_decode_reject_bad_messages(tmp_path, npz, capsys, damage):
    path, _ = npz
    msg = tmp_path / "m.flc"
    cli.main(["encode", str(path), "-o", str(msg)])
    data = bytearray(msg.read_bytes())
    if damage == "flip":
        data[40] ^= 0x10
    elif damage == "truncate":
        del data[-7:]
    else:
        data[4] = 9
    msg.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["inspect", str(msg)]) == 1
    err = capsys.readouterr().err
    assert "invalid message" in err
    assert ("UnsupportedVersionError" if damage == "version" else "ChecksumError") in err
    assert cli.main(["decode", str(msg), "-o", str(tmp_path / "x.npz")]) == 1
    assert not (tmp_path / "x.npz").exists()


def test_usage_and_io_errors(tmp_path, npz, capsys):
    path, _ = npz
    assert cli.main([]) == 2
    assert cli.main(["encode", str(path), "-o", str(tmp_path / "m"), "--bits", "9"]) == 2
    assert "bits must be" in capsys.readouterr().err
    assert cli.main(["encode", str(path), "-o", str(tmp_path / "m"), "--group-size", "12"]) == 2
    assert cli.main(["encode", str(path), "-o", str(tmp_path / "m"), "--granularity", "column"]) == 2
    assert cli.main(["encode", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "m")]) == 3
    assert cli.main(["inspect", str(tmp_path / "missing.flc")]) == 3
    (tmp_path / "text.npz").write_text("not a zip")
    assert cli.main(["encode", str(tmp_path / "text.npz"), "-o", str(tmp_path / "m")]) == 3


def test_raw_and_bits_none(tmp_path, npz):
    path, arrays = npz
    for flags in (["--raw"], ["--bits", "none"]):
        msg = tmp_path / "m.flc"
        assert cli.main(["encode", str(path), "-o", str(msg), *flags]) == 0
        out = fc.decode_numpy(msg.read_bytes())
        for k in arrays:
            np.testing.assert_array_equal(out[k], arrays[k])


def test_help_reads_like_a_man_page(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for section in ("commands:", "examples:", "exit status:", "inspect MSG", "docs/FORMAT.md"):
        assert section in text
    assert cli.main(["encode", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--bits", "--granularity", "--group-size", "--rounding", "--seed", "--meta-dtype", "--density",
                "--k", "--topk-scope", "--values", "--keep-1d-raw", "--no-keep-1d-raw"):  # fmt: skip
        assert opt in text


def test_python_dash_m(tmp_path, npz):
    # One subprocess only (each one imports torch): the __main__ entry and its exit status.
    path, _ = npz
    msg = tmp_path / "m.flc"
    assert cli.main(["encode", str(path), "-o", str(msg)]) == 0
    msg.write_bytes(msg.read_bytes()[:-1])
    r = subprocess.run([sys.executable, "-m", "flocora_codec", "inspect", str(msg)], capture_output=True, text=True)
    assert r.returncode == 1 and "invalid message" in r.stderr, r.stderr


# ---- .safetensors, standard streams, --version ---------------------------------
def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "base_model.model.fc1.lora_A.weight": torch.randn(8, 64, generator=g).bfloat16(),
        "base_model.model.fc1.lora_B.weight": torch.randn(64, 8, generator=g).half(),
        "base_model.model.fc1.bias": torch.randn(64, generator=g),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def _cli_spec(bits):
    """The spec `flocora-codec encode --bits B` uses (1-d tensors raw)."""
    return fc.CodecSpec(bits=bits, granularity="row", rules=(fc.Rule("*", "raw", max_ndim=1),))


def test_safetensors_round_trip_keeps_dtypes(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    x = _tensors()
    src, msg, out = tmp_path / "adapter_model.safetensors", tmp_path / "a.flc", tmp_path / "out.safetensors"
    st.save_file(x, src, metadata={"format": "pt"})
    assert cli.main(["encode", str(src), "-o", str(msg), "--bits", "4"]) == 0
    # safetensors lays tensors out in its own order (not the dict's); the
    # message follows the file's layout, so the same file always gives the same bytes
    assert msg.read_bytes() == fc.encode(read_tensors(src), _cli_spec(4))
    assert cli.main(["encode", str(src), "-o", str(tmp_path / "again.flc"), "--bits", "4"]) == 0
    assert (tmp_path / "again.flc").read_bytes() == msg.read_bytes()
    assert cli.main(["decode", str(msg), "-o", str(out)]) == 0
    got = st.load_file(out)
    expected = fc.decode(msg.read_bytes())
    assert sorted(got) == sorted(x)
    for k in x:
        assert got[k].dtype == x[k].dtype and got[k].shape == x[k].shape
        assert torch.equal(got[k], expected[k])
    assert torch.equal(got["base_model.model.fc1.bias"], x["base_model.model.fc1.bias"])  # raw 1-d
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers/PEFT expect
    # .npz output of the same message: bfloat16 as float32, the rest exact
    assert cli.main(["decode", str(msg), "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as f:
        a = f["base_model.model.fc1.lora_A.weight"]
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, expected["base_model.model.fc1.lora_A.weight"].float().numpy())
        assert f["base_model.model.fc1.lora_B.weight"].dtype == np.float16


def _stdio(monkeypatch, data: bytes):
    stdin, stdout = io.TextIOWrapper(io.BytesIO(data)), io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    return stdout


def test_dash_is_stdin_and_stdout(tmp_path, npz, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load, save

    data = save(_tensors())
    x = tensors_from_bytes(data, "safetensors")
    out = _stdio(monkeypatch, data)
    assert cli.main(["encode", "-", "-o", "-", "--bits", "3"]) == 0  # format sniffed from the bytes
    msg = out.buffer.getvalue()
    assert msg == fc.encode(x, _cli_spec(3))

    out = _stdio(monkeypatch, msg)
    assert cli.main(["decode", "-", "-o", "-"]) == 2  # no suffix to tell the format
    assert "--format" in capsys.readouterr().err
    out = _stdio(monkeypatch, msg)
    assert cli.main(["decode", "-", "-o", "-", "--format", "safetensors"]) == 0
    got = load(out.buffer.getvalue())
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in x.items()}

    path, arrays = npz  # an .npz on stdin too
    out = _stdio(monkeypatch, path.read_bytes())
    assert cli.main(["encode", "-", "-o", "-"]) == 0
    assert out.buffer.getvalue() == fc.encode_numpy(arrays, _cli_spec(4))
    _stdio(monkeypatch, msg)
    assert cli.main(["inspect", "--json", "-"]) == 0
    sys.stdout.flush()
    doc = json.loads(sys.stdout.buffer.getvalue())
    assert doc["file"] == "<stdin>" and doc["bytes"]["total"] == len(msg)
    _stdio(monkeypatch, b"neither npz nor safetensors")
    assert cli.main(["encode", "-", "-o", str(tmp_path / "m")]) == 3


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"flocora-codec {fc.__version__} (torch {torch.__version__}, ")
    assert f"{fc.ops.BACKEND} ops" in out


def test_compact_messages_and_schemas(tmp_path, capsys):
    from flocora_codec.cli import main as cli_main

    src = tmp_path / "u.npz"
    np.savez(src, a=np.linspace(-1, 1, 512, dtype=np.float32).reshape(16, 32), b=np.ones(32, np.float32))
    msg, schema = tmp_path / "u.flc", tmp_path / "u.fls"
    assert cli_main(["encode", str(src), "-o", str(msg), "--bits", "2", "--schema", str(schema)]) == 0
    assert schema.exists() and msg.read_bytes()[4] == 3  # a compact message, and its schema written alongside
    capsys.readouterr()
    # without its schema a compact message cannot be verified: exit 1, saying which schema to pass
    assert cli_main(["inspect", str(msg)]) == 1
    err = capsys.readouterr().err
    assert "pass its schema file with --schema" in err and fc.Schema.from_bytes(schema.read_bytes()).id.hex() in err
    assert cli_main(["inspect", str(msg), "--schema", str(schema)]) == 0
    out = capsys.readouterr().out
    assert "compact message against schema" in out and "header 24 |" in out
    assert cli_main(["inspect", str(schema)]) == 0
    assert "flocora-codec schema" in capsys.readouterr().out
    assert cli_main(["inspect", "--json", str(schema)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "schema"
    out_npz = tmp_path / "back.npz"
    assert cli_main(["decode", str(msg), "--schema", str(schema), "-o", str(out_npz)]) == 0
    with np.load(out_npz) as f:
        assert f["a"].shape == (16, 32) and np.array_equal(f["b"], np.ones(32, np.float32))
    # an existing schema file is used as it is: the second message matches it
    assert cli_main(["encode", str(src), "-o", str(tmp_path / "v.flc"), "--bits", "2", "--schema", str(schema)]) == 0
    assert (tmp_path / "v.flc").read_bytes() == msg.read_bytes()
    assert cli_main(["encode", str(src), "-o", str(tmp_path / "w.flc"), "--bits", "4", "--schema", str(schema)]) == 3


def test_bench_is_a_subcommand(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--full" in out and "--isa {auto,scalar,avx2,avx512}" in out


@pytest.mark.skipif(fc.ops.BACKEND != "compiled", reason="the benchmark's baselines are checked against the kernels")
def test_bench_baselines_compute_what_the_codec_does():
    from flocora_codec import bench

    bench._check_baselines(full=True)  # raises if a plain-PyTorch layout disagrees
