"""The Flower tests again on flwr 1.41 (the venv has 1.42).

flwr 1.41 and 1.42 need the same packages (beyond uv, which only runtime
dependency installation uses, and that is disabled), so `make test` installs
flwr 1.41 alone into .flwr-1.41/ and this test runs tests/test_flower.py
(slow cases included: run_simulation, SuperLink + SuperNodes + `flwr run`)
and the Flower run-config checks in a subprocess with it first on PYTHONPATH.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / ".flwr-1.41"


@pytest.mark.slow
@pytest.mark.skipif(not (OLD / "flwr").is_dir(), reason="flwr 1.41 is not in .flwr-1.41/ (`make test` installs it)")
def test_flower_tests_pass_on_flwr_1_41():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(OLD), str(ROOT)])
    env.pop("FLOCORA_FORCE_REFERENCE", None)
    v = subprocess.run([sys.executable, "-c", "import flwr; print(flwr.__version__)"], env=env, cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert v.stdout.strip() == "1.41.0", v.stdout + v.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_flower.py",
                        "tests/test_fl_config.py::test_flower_app_run_config_is_checked"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]  # nothing skipped: all of it ran on 1.41
