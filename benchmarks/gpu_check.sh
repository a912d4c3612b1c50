#!/usr/bin/env bash
# The GPU checks in one call of a lent NVIDIA machine (an H200 here): build
# the extension with its CUDA kernels for Hopper, run every CUDA test (the
# parity suite's slow cases past 2^31 elements included), then
# benchmarks/bench_cuda.py. Logs and the result table land in $OUT; the last
# lines printed are a summary. Each step has its own time limit, so that the
# whole call ends inside one 10-minute command with room to spare.
#
# Prepare on a machine with a package index, once, in the repository root (the
# GPU machine has none, and its image lacks crc32c, our one runtime
# dependency beyond torch and numpy):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .whl crc32c
# then run `bash benchmarks/gpu_check.sh` there, carrying `.whl`.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
status=0
step() { echo "== $1 ($(date +%T))"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step "build (CUDA, sm_${TORCH_CUDA_ARCH_LIST/./})"
if ! timeout 200 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  exit 1
fi
$PY - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch
from flocora_codec import _build_info, ops
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
print("build", {k: v for k, v in vars(_build_info).items() if not k.startswith("_")}, "backend", ops.BACKEND)
EOF

# The files with CUDA cases (the others import what the image lacks: flwr, mlxtend).
step "CUDA tests (tests/test_cuda_parity.py, slow cases included, and every [cuda] case)"
timeout 240 $PY -m pytest -q -p no:cacheprovider -k cuda --junitxml="$OUT/cuda-tests.xml" \
  tests/test_cuda_parity.py tests/test_quant.py tests/test_topk.py tests/test_decode_into.py \
  tests/test_codec.py tests/test_hostile.py >"$OUT/cuda-tests.log" 2>&1 || status=1
tail -15 "$OUT/cuda-tests.log"

step "benchmarks/bench_cuda.py"
timeout 150 $PY benchmarks/bench_cuda.py --max-mib 1024 >"$OUT/bench_cuda.log" 2>&1 || status=1
cp benchmarks/results/cuda-*.md "$OUT/" 2>/dev/null
tail -25 "$OUT/bench_cuda.log"

step "done (status $status)"
exit $status
