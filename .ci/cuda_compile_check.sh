#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda/*.cu). CI has no GPU and
# the dev venv's torch is a CPU build, so this builds the whole extension
# against a second venv (.venv-cuda, a CUDA build of torch) into its own build
# dir: flocora_codec/*.so (the CPU build the tests load) is never touched.
# Fails if any .cu does not compile; skips (exit 0) only when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: SKIPPED, no nvcc at $CUDA_HOME/bin/nvcc (CUDA kernels not compiled)"
  exit 0
fi
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "cuda-check: FAILED, no csrc/cuda/*.cu files" >&2
  exit 1
fi

VENV=.venv-cuda
# Pins of the CUDA venv: torch 2.14.1 is a CUDA 13 build on local disk. The
# stamp records them, so a changed pin rebuilds the venv.
PINS="torch==2.14.1 ninja==1.13.2 setuptools>=64 wheel numpy==2.4.6"
start=$(date +%s)
if [ ! -f "$VENV/.stamp" ] || [ "$(cat "$VENV/.stamp")" != "$PINS" ]; then
  echo "cuda-check: creating $VENV ($PINS)"
  rm -rf "$VENV"
  python3.11 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $PINS
  "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch in .venv-cuda is not a CUDA build")'
  echo "$PINS" > "$VENV/.stamp"
  echo "cuda-check: venv ready in $(( $(date +%s) - start )) s"
fi

# sm_80 (A100) and sm_90 (H100/H200). -g0 (host side; nvcc itself has no -g0) keeps objects small; setup.py
# already passes --fmad=false, on which CPU/CUDA byte identity depends.
export CUDA_HOME TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-$(nproc)}
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xcompiler=-g0"
BUILD=build/cuda-check
t0=$(date +%s)
# setup.py records in flocora_codec/_build_info.py which torch the extension
# was built against; this build is for the CUDA torch of $VENV, and must not
# leave that record behind for the CPU build the tests load (which would then
# refuse to load and fall back to the Python reference).
info=flocora_codec/_build_info.py
saved=$(mktemp)
had_info=0
if [ -f "$info" ]; then cp "$info" "$saved"; had_info=1; fi
restore_info() { if [ "$had_info" -eq 1 ]; then cp "$saved" "$info"; else rm -f "$info"; fi; rm -f "$saved"; }
trap restore_info EXIT
# Own lock (not `make build`'s .build.lock, which this long compile would
# hold for minutes): two cuda-checks never share ninja state in $BUILD.
mkdir -p "$BUILD"
if ! flock .cuda-check.lock "$VENV/bin/python" setup.py -q build_ext \
    --build-temp "$BUILD" --build-lib "$BUILD/lib" > "$BUILD.log" 2>&1; then
  cat "$BUILD.log" >&2
  echo "cuda-check: FAILED, the CUDA build did not compile (log above, $BUILD.log)" >&2
  exit 1
fi
so=$(find "$BUILD/lib" -name '_C*.so' | head -1)
missing=0
for cu in "${cu_files[@]}"; do
  obj=$(find "$BUILD" -path "*/${cu%.cu}.o" | head -1)
  if [ -z "$obj" ]; then echo "cuda-check: no object for $cu" >&2; missing=1; fi
done
if [ -z "$so" ] || [ "$missing" -ne 0 ]; then
  cat "$BUILD.log" >&2
  echo "cuda-check: FAILED, missing objects or extension" >&2
  exit 1
fi
# The kernels must be compiled for both architectures: read the fatbinary
# with cuobjdump where the toolkit has it, else the flags ninja compiled with.
for sm in 80 90; do
  if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
    found=$("$CUDA_HOME/bin/cuobjdump" --list-elf "$so" | grep -c "sm_$sm" || true)
  else
    found=$(grep -c "arch=compute_$sm,code=sm_$sm" "$BUILD/build.ninja" || true)
  fi
  if [ "$found" -eq 0 ]; then
    echo "cuda-check: FAILED, no sm_$sm code in $so" >&2
    exit 1
  fi
done
# The .so must load (no undefined symbols) and register a CUDA kernel for
# every op; torch loads without a GPU, nothing is launched.
if ! "$VENV/bin/python" - "$so" <<'PY'
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("flocora_codec._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
ops = ["quantize_pack", "unpack_dequantize", "topk_encode", "sparse_decode", "sparse_decode_add_"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("flocora::" + op, "CUDA")]
sys.exit("no CUDA kernel registered for: " + ", ".join(missing) if missing else 0)
PY
then
  echo "cuda-check: FAILED, the CUDA build does not load or lacks kernels" >&2
  exit 1
fi
# The candidate kernels of benchmarks/cuda_variants (a standalone program a GPU
# session runs): compiled here too, so that they keep building.
if ! "$CUDA_HOME/bin/nvcc" -O3 -std=c++17 -arch=sm_90 --fmad=false -I csrc/include \
    benchmarks/cuda_variants/quant_variants.cu -o "$BUILD/quant_variants" >"$BUILD-variants.log" 2>&1; then
  cat "$BUILD-variants.log" >&2
  echo "cuda-check: FAILED, benchmarks/cuda_variants/quant_variants.cu does not compile" >&2
  exit 1
fi
echo "cuda-check: OK, ${#cu_files[@]} .cu files compiled for sm_80 and sm_90, all 5 ops registered for CUDA, in $(( $(date +%s) - t0 )) s ($so)"
