"""The distribution as a user gets it: sdist -> wheel -> install away from the checkout.

Builds the sdist from a copy of the checkout's files (as a fresh clone has
them), builds a wheel from that sdist alone (compiling the extension: 20 s
to 2 min on two cores), installs the wheel into an empty target directory
and, from a directory outside the repository, imports it and round-trips
messages. Also checks the metadata the wheel declares.
"""

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import run_ok as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_works_away_from_the_checkout(built_dist, tmp_path):
    sdist, wheel = built_dist["sdist"], built_dist["wheel"]
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    src = built_dist["src"]
    needed = {str(p.relative_to(src)) for p in (src / "csrc").rglob("*") if p.is_file()}
    assert needed and needed <= members, f"sdist lacks {sorted(needed - members)}"
    assert {"setup.py", "pyproject.toml", "LICENSE", "CHANGELOG.md", "README.md"} <= members
    assert "flocora_codec/_build_info.py" not in members  # written at build time, for the torch of that build

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("flocora_codec/_C") and n.endswith(".so") for n in names), names
    assert {"flocora_fl/config.py", "flocora_fl/methods/fedavg.py", "flocora_fl/configs/offline_mnist.toml",
            "flocora_fl/configs/sweeps/frontier_mnist.toml"} <= set(names)  # fmt: skip
    assert not any(n.startswith(("fl/", "flocora_flower/")) for n in names)
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert f"Requires-Dist: torch<{major}.{minor + 1},>={major}.{minor}" in meta
    assert "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: experiments" in meta and "Requires-Python: >=3.11" in meta

    site = built_dist["site"]
    away = tmp_path / "elsewhere"
    away.mkdir()
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("error")  # a fallback warning would mean _C did not load
        import torch
        import flocora_codec as fc
        assert fc.__file__.startswith({str(site)!r}), fc.__file__
        assert fc.ops.BACKEND == "compiled", fc.ops.FALLBACK_REASON
        from flocora_codec._build_info import TORCH_VERSION
        assert TORCH_VERSION == torch.__version__
        g = torch.Generator().manual_seed(0)
        x = {{"lora_A": torch.randn(16, 64, generator=g).bfloat16(), "w": torch.randn(32, 48, generator=g),
              "b": torch.randn(48, generator=g).half()}}
        for spec in (fc.CodecSpec(bits=4), fc.CodecSpec(density=0.1, values="quantized", bits=8)):
            msg = fc.encode(x, spec)
            y = fc.decode(msg)
            assert {{k: (v.dtype, v.shape) for k, v in y.items()}} == {{k: (v.dtype, v.shape) for k, v in x.items()}}
            assert torch.equal(y["b"], x["b"])  # 1-d tensors travel raw
            assert fc.message_info(msg).total_bytes == len(msg)
        # the experiment code, under its installed name, with its configs
        from flocora_fl.config import CONFIG_DIR, load_config, load_sweep
        assert str(CONFIG_DIR).startswith({str(site)!r}), CONFIG_DIR
        assert load_config(CONFIG_DIR / "offline_mnist.toml")["data"]["dataset"] == "mnist5k"
        assert len(load_sweep(CONFIG_DIR / "sweeps" / "frontier_mnist.toml")[2]) > 10
        import sys
        assert "fl" not in sys.modules
        print(fc.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOCORA_FORCE_REFERENCE")}
    env["PYTHONPATH"] = str(site)
    r = _run([sys.executable, "-c", script], cwd=away, env=env)
    import flocora_codec

    assert r.stdout.strip() == flocora_codec.__version__
    r = _run([sys.executable, "-m", "flocora_codec", "--version"], cwd=away, env=env)
    assert r.stdout.startswith(f"flocora-codec {flocora_codec.__version__} ") and "compiled ops" in r.stdout
    # the benchmark runs from the plain install (one timing per median: a smoke run)
    _run([sys.executable, "-m", "flocora_codec", "bench", "--out", "res", "--repeats", "1", "--no-plot"], cwd=away,
         env=env)  # fmt: skip
    (table,) = (away / "res").glob("cpu-*-quick.md")
    text = table.read_text()
    assert "| 16 MiB | 4 |" in text and "Whole messages" in text and "Top-k sparse encode" in text


@pytest.mark.slow
def test_without_a_compiler_the_pure_python_wheel_works(built_dist, tmp_path):
    """FLOCORA_NO_EXT=1: no compiler used; the wheel is py3-none-any, accepts
    any torch >= 2.4, and writes the same messages through the reference ops."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOCORA_FORCE_REFERENCE")}
    env["FLOCORA_NO_EXT"] = "1"
    env["CXX"] = env["CC"] = "/nonexistent/no-compiler"  # a compile attempt would fail
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
          "--disable-pip-version-check", "-q", "-w", str(wheels), str(built_dist["sdist"])], cwd=tmp_path,
         env=env)  # fmt: skip
    (wheel,) = wheels.glob("flocora_codec-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: torch>=2.4\n" in meta
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
          "-q", "--target", str(site), str(wheel)], cwd=tmp_path)  # fmt: skip
    away = tmp_path / "elsewhere"
    away.mkdir()
    script = textwrap.dedent(f"""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import flocora_codec as fc
        assert fc.__file__.startswith({str(site)!r}) and fc.ops.BACKEND == "reference"
        (w,) = [w for w in caught if w.category.__name__ == "ReferenceFallbackWarning"]
        assert "FLOCORA_NO_EXT" in str(w.message), str(w.message)
        g = torch.Generator().manual_seed(0)
        x = {{"w": torch.randn(32, 48, generator=g), "a": torch.randn(8, 64, generator=g).bfloat16()}}
        import sys
        sys.stdout.buffer.write(fc.encode(x, fc.CodecSpec(bits=4)) + fc.encode(x, fc.CodecSpec(density=0.1)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOCORA_FORCE_REFERENCE")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", script], cwd=away, env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    import flocora_codec as fc

    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(32, 48, generator=g), "a": torch.randn(8, 64, generator=g).bfloat16()}
    assert r.stdout == fc.encode(x, fc.CodecSpec(bits=4)) + fc.encode(x, fc.CodecSpec(density=0.1))
