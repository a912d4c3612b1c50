"""The distribution as a user gets it: sdist -> wheel -> install away from the checkout.

Builds the sdist from a copy of the checkout's files (as a fresh clone has
them), builds a wheel from that sdist alone (compiling the extension: 20 s
to 2 min on two cores), installs the wheel into an empty target directory
and, from a directory outside the repository, imports it and round-trips
messages. Also checks the metadata the wheel declares.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkout_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a clone (plus local edits) holds."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which files a clone has")
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_works_away_from_the_checkout(tmp_path):
    src = tmp_path / "clone"
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path / "dist"
    # setuptools' PEP 517 backend without isolation, as `python -m build --sdist --no-isolation` calls it
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"], cwd=src)
    (sdist,) = dist.glob("flocora_codec-*.tar.gz")

    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    needed = {str(p.relative_to(src)) for p in (src / "csrc").rglob("*") if p.is_file()}
    assert needed and needed <= members, f"sdist lacks {sorted(needed - members)}"
    assert {"setup.py", "pyproject.toml", "LICENSE", "CHANGELOG.md", "README.md"} <= members
    assert "flocora_codec/_build_info.py" not in members  # written at build time, for the torch of that build

    # The wheel is built from the sdist alone (pip unpacks it in its own temp dir).
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
          "--disable-pip-version-check", "-q", "-w", str(wheels), str(sdist)], cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("flocora_codec-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("flocora_codec/_C") and n.endswith(".so") for n in names), names
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert f"Requires-Dist: torch<{major}.{minor + 1},>={major}.{minor}" in meta
    assert "License-Expression: Apache-2.0" in meta

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
          "-q", "--target", str(site), str(wheel)], cwd=tmp_path)  # fmt: skip
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
        print(fc.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOCORA_FORCE_REFERENCE")}
    env["PYTHONPATH"] = str(site)
    r = _run([sys.executable, "-c", script], cwd=away, env=env)
    import flocora_codec

    assert r.stdout.strip() == flocora_codec.__version__
    r = _run([sys.executable, "-m", "flocora_codec", "--version"], cwd=away, env=env)
    assert r.stdout.startswith(f"flocora-codec {flocora_codec.__version__} ") and "compiled ops" in r.stdout
