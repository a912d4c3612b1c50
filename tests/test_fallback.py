"""The package without its compiled part: ops fall back to flocora_codec.reference.

Three checks: the codec's own test files pass with the fallback forced
(FLOCORA_FORCE_REFERENCE=1, in a subprocess: the backend is chosen once at
import), an import with ``_C`` genuinely unloadable works and warns exactly
once, and compiled and reference backends write the same bytes.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flocora_codec as fc
from flocora_codec import ops

ROOT = Path(__file__).resolve().parents[1]
# Files that test messages (not kernels against the reference, which would
# compare the reference with itself): golden bytes, format checks, fuzzing, CLI.
CODEC_TEST_FILES = ["tests/test_codec.py", "tests/test_format.py", "tests/test_sign_values.py",
                    "tests/test_fuzz.py", "tests/test_cli.py", "tests/test_decode_into.py"]  # fmt: skip


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


@pytest.mark.slow
def test_codec_tests_pass_on_reference_backend():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CODEC_TEST_FILES],
        cwd=ROOT,
        env=_env(FLOCORA_FORCE_REFERENCE="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the forced run really ran on the reference (the golden tests skip their AVX2 half there)
    assert "reference backend: no CPU ISA to choose" in r.stdout


def test_import_without_extension_warns_once():
    # _C made unimportable the way a missing or mismatched .so is: ImportError.
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "flocora_codec._C":
                    raise ImportError("undefined symbol: _ZN3c10 (simulated)")
                return None

        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import flocora_codec as fc
            import flocora_codec.ops, flocora_codec.codec, flocora_codec.cli  # noqa: F401  the imports under test
            x = {"w": torch.randn(8, 16).bfloat16(), "b": torch.randn(16)}
            out = fc.decode(fc.encode(x, fc.CodecSpec(bits=4)))
            out2 = fc.decode(fc.encode(x, fc.CodecSpec(density=0.25)))
        ours = [w for w in caught if w.category.__name__ == "ReferenceFallbackWarning"]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "cannot be loaded" in str(ours[0].message) and "simulated" in str(ours[0].message)
        assert fc.ops.BACKEND == "reference"
        assert "flocora_codec._C" not in sys.modules
        assert out["w"].dtype == torch.bfloat16 and out["w"].shape == (8, 16)
        assert out2["b"].dtype == torch.float32
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_extension_built_for_another_torch_is_not_loaded():
    # A _C built against another torch minor release may load and then crash:
    # the recorded build version keeps it unloaded.
    script = textwrap.dedent("""
        import sys, types, warnings
        info = types.ModuleType("flocora_codec._build_info")
        info.TORCH_VERSION, info.TORCH_CUDA = "2.4.1+cpu", None
        sys.modules["flocora_codec._build_info"] = info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import flocora_codec as fc
        assert fc.ops.BACKEND == "reference"
        assert "flocora_codec._C" not in sys.modules
        (w,) = [w for w in caught if w.category.__name__ == "ReferenceFallbackWarning"]
        assert "built for torch 2.4.1+cpu" in str(w.message), str(w.message)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


SPECS = [
    fc.CodecSpec(bits=4),
    fc.CodecSpec(bits=3, granularity="group", group_size=16, meta_dtype="float16", rounding="stochastic", seed=5),
    fc.CodecSpec(bits=8, granularity="tensor"),
    fc.CodecSpec(density=0.05, values="float16"),
    fc.CodecSpec(density=0.1, topk_scope="global", values="quantized", bits=4),
    fc.CodecSpec(density=0.2, values="sign"),
]


@pytest.mark.skipif(ops.BACKEND != "compiled", reason="compares with the compiled kernels")
@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_reference_backend_writes_the_same_bytes(spec, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = {
        "a": torch.randn(40, 75, generator=g),
        "b": (torch.randn(9, 130, generator=g) * 3).to(torch.bfloat16),
        "c": torch.randn(2, 3, 17, generator=g).half(),
        "d": torch.randn(33, generator=g),
        "e": torch.zeros(0, 5),
    }
    compiled = fc.encode(x, spec)
    decoded = fc.decode(compiled)
    monkeypatch.setattr(ops, "BACKEND", "reference")
    assert fc.encode(x, spec) == compiled
    for name, t in fc.decode(compiled).items():
        assert t.dtype == decoded[name].dtype
        assert torch.equal(t, decoded[name])
